"""Command-line flags generated from the settings sections, and the sections built back from them.

A subcommand adds the sections its stage takes (`add_section_flags(parser, "data")`); every field
becomes a flag with its type, choices, default and help taken from the field. Flags the user did not
give stay absent, so `sections_from_args` layers: field defaults, then the recipe's section when
`--recipe` is given, then the flags. Invalid values become one-line errors naming the flag.
"""

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from toolchain.errors import UserError, setting, validation_message
from toolchain.settings import SECTIONS

# argparse takes "-1e-4" for an option unless it looks like a negative number; accept exponents too.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, without the usage block, and exits 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def field_flag(model: type[BaseModel], name: str, prefix: str = "") -> str:
    """The flag of a field: its own name with dashes (nested fields prefixed by their section), unless it names another."""
    extra = model.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + (prefix + name).replace("_", "-").replace(".", "-")


def flag_of(path: str) -> str:
    """The flag of a setting path `section.field` (the naming the CLI uses in errors)."""
    section, _, name = path.partition(".")
    model = SECTIONS.get(section)
    if model is not None and name in model.model_fields:
        return field_flag(model, name)
    return "--" + (name or section).replace("_", "-").replace(".", "-")


def optional(convert):
    """A converter that also reads `none`/`null` as None (to unset a recipe's value)."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def comma_list(convert):
    def parse(text: str):
        return [convert(part) for part in text.split(",") if part.strip()]
    parse.__name__ = f"comma-separated {convert.__name__}s"
    return parse


def argument_options(annotation, name: str) -> dict | None:
    """argparse options for a field's type; None for types the command line does not set (dicts)."""
    origin, nullable = get_origin(annotation), False
    if origin in (typing.Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        nullable = len(members) < len(get_args(annotation))
        annotation = members[0]
        origin = get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(get_args(annotation))
        convert = type(choices[0])
        return {"type": optional(convert) if nullable else convert, "choices": choices + ([None] if nullable else []),
                "metavar": "{" + ",".join(map(str, choices)) + (",none" if nullable else "") + "}"}
    if origin in (list, tuple):
        return {"type": comma_list(get_args(annotation)[0]), "metavar": "A,B"}
    if annotation in (int, float, str):
        return {"type": optional(annotation) if nullable else annotation, "metavar": name.upper() if annotation is str else annotation.__name__.upper()}
    return None


def help_text(field, default) -> str:
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else ("none" if default is None else default)
    return f"{field.description or ''} (default: {shown})".replace("%", "%%")


def add_section_flags(parser: argparse.ArgumentParser, key: str, model: type[BaseModel] | None = None, title: str | None = None,
                      exclude: tuple[str, ...] = (), prefix: str = "", group=None) -> None:
    """One flag per field of section `key` (nested sections flattened: `--kv-cache-dtype`); dest `key.field`."""
    model = model or SECTIONS[key]
    group = group or parser.add_argument_group(title or f"{key} settings")
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            add_section_flags(parser, key, annotation, prefix=f"{prefix}{name}.", group=group)
            continue
        options = argument_options(annotation, name)
        if options is None:
            continue
        default = field.get_default(call_default_factory=True)
        group.add_argument(field_flag(model, name, prefix), dest=f"{key}.{prefix}{name}", default=argparse.SUPPRESS, help=help_text(field, default), **options)


def given_flags(args: argparse.Namespace, key: str) -> dict:
    """The fields of section `key` set on the command line, as a nested dict."""
    values: dict = {}
    for dest, value in vars(args).items():
        if not dest.startswith(f"{key}."):
            continue
        *parents, leaf = dest[len(key) + 1:].split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return values


def flat_flags(args: argparse.Namespace, key: str) -> dict:
    """The fields of section `key` set on the command line, by dotted name ({"kv_cache.dtype": "auto"})."""
    return {dest[len(key) + 1:]: value for dest, value in vars(args).items() if dest.startswith(f"{key}.")}


def merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for name, value in top.items():
        merged[name] = merge(merged[name], value) if isinstance(value, dict) and isinstance(merged.get(name), dict) else value
    return merged


def validate_section(key: str, model: type[BaseModel], data: dict) -> BaseModel:
    """Validate one section; the first problem becomes a one-line error naming the setting as the caller names it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        location, message = validation_message(exc)
        name = setting(f"{key}.{location}") if location else f"{key} settings"
        raise UserError(f"invalid {name}: {message}") from None


def section_from_args(args: argparse.Namespace, key: str, base: BaseModel | dict | None = None, model: type[BaseModel] | None = None):
    """Section `key`: its defaults, overlaid by `base` (a recipe's section) and then by the flags given."""
    model = model or SECTIONS[key]
    data = base.model_dump() if isinstance(base, BaseModel) else dict(base or {})
    return validate_section(key, model, merge(data, given_flags(args, key)))


def add_output_flags(parser: argparse.ArgumentParser, out_help: str) -> None:
    """`--out`, `--overwrite` and `--json`, as every subcommand that writes one output directory has them."""
    parser.add_argument("--out", required=True, type=Path, help=f"{out_help} (written atomically; must be absent or empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out, once the new output is complete")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_recipe_source(parser: argparse.ArgumentParser, student: bool = False) -> None:
    """`--recipe`: take this subcommand's sections from a recipe; flags override them."""
    parser.add_argument("--recipe", help="take the settings from a recipe (a YAML path or built-in name, `minitron recipes`); flags override them")
    if student:
        parser.add_argument("--recipe-student", metavar="NAME", help="the recipe's student whose prune/distill settings to use (needed when it has several)")


def sections_from_args(args: argparse.Namespace, *keys: str) -> tuple:
    """The named sections for a subcommand: defaults < `--recipe` (and `--recipe-student`) < flags."""
    from toolchain.recipe import load_recipe

    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else None
    student = recipe.student(getattr(args, "recipe_student", None)) if recipe is not None and ({"prune", "distill"} & set(keys)) else None
    return tuple(section_from_args(args, key, recipe.section(key, student) if recipe is not None else None) for key in keys)


def add_recipe_override_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="override teacher.model")
    parser.add_argument("--data", help="override data.spec")
    parser.add_argument("--out", help="override output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe field, e.g. --set distill.lr=3e-4 --set students.width.prune.hidden_size=432")


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The --set list plus the named shortcut flags, as key=value strings."""
    overrides = list(args.overrides)
    for flag, key in (("teacher", "teacher.model"), ("data", "data.spec"), ("out", "output_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides
