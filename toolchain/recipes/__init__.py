"""`minitron recipes`: the built-in recipes (the YAML files of this package), listed or printed to copy and edit.

As `tune ls` / `tune cp`: `minitron recipes` lists them with their descriptions, `minitron recipes show NAME`
prints one; save it, edit it, and run it with `minitron run my-recipe.yaml`.
"""


def configure_parser(parser) -> None:
    parser.add_argument("action", nargs="?", choices=["show"], help="show: print one recipe's YAML")
    parser.add_argument("name", nargs="?", help="the recipe to show")


def command(args) -> int:
    from toolchain.errors import UserError
    from toolchain.recipe import builtin_recipe_names, load_recipe, recipe_text

    if args.action is None:
        for name in builtin_recipe_names():
            print(f"{name}\n    {' '.join(load_recipe(name).description.split())}")
        print("\nprint one with `minitron recipes show NAME > my-recipe.yaml`, edit it, run it with `minitron run my-recipe.yaml`")
        return 0
    if args.name is None:
        raise UserError(f"name the recipe to show: one of {', '.join(builtin_recipe_names())}")
    if args.name not in builtin_recipe_names():
        raise UserError(f"no built-in recipe {args.name!r}; built-ins: {', '.join(builtin_recipe_names())}")
    print(recipe_text(args.name), end="")
    return 0
