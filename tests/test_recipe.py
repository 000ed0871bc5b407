"""Recipes: every shipped recipe validates, overrides apply, invalid fields are named."""

import pytest
import yaml

from toolchain.errors import UserError
from toolchain.recipe import builtin_recipe_names, describe_plan, load_recipe, schema_reference


def test_builtin_recipes_exist():
    assert {"smollm2-135m-minitron", "llama-3.1-8b-minitron-4b-width", "llama-3.1-8b-minitron-4b-depth"} <= set(builtin_recipe_names())


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_every_builtin_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.students
    assert name in describe_plan(recipe)


def test_published_architectures():
    width = load_recipe("llama-3.1-8b-minitron-4b-width").students[0].prune
    assert (width.hidden_size, width.ffn_hidden_size, width.num_attention_heads, width.num_layers) == (3072, 9216, None, None)
    depth = load_recipe("llama-3.1-8b-minitron-4b-depth").students[0].prune
    assert depth.num_layers == 16 and depth.hidden_size is None


def test_overrides_by_index_and_name(tmp_path):
    recipe = load_recipe("smollm2-135m-minitron", ["students.width.prune.hidden_size=396", "students.1.prune.num_layers=20",
                                                    "distill.lr=2e-4", "teacher.model=/models/x", "output_dir=out/here"])
    assert recipe.students[0].prune.hidden_size == 396
    assert recipe.students[1].prune.num_layers == 20
    assert recipe.distill.lr == 2e-4 and recipe.teacher.model == "/models/x"
    assert str(recipe.resolved_output_dir()) == "out/here"


@pytest.mark.parametrize(
    "override,field",
    [
        ("students.width.prune.hidden_size=-4", "students.0.prune.hidden_size"),
        ("distill.lr=0", "distill.lr"),
        ("data.seq_len=abc", "data.seq_len"),
        ("quantize.format=fp4", "quantize.format"),
        ("distill.bogus=1", "distill.bogus"),
    ],
)
def test_invalid_field_is_named(override, field):
    with pytest.raises(UserError, match=f"invalid recipe field {field}"):
        load_recipe("smollm2-135m-minitron", [override])


def test_recipe_file_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "students": [{"name": "a", "prune": {"num_layers": 2}}]}))
    assert load_recipe(str(path)).students[0].prune.num_layers == 2
    with pytest.raises(UserError, match="recipe file .*missing.yaml does not exist.*smollm2-135m-minitron"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="unknown recipe 'no-such-recipe'"):
        load_recipe("no-such-recipe")
    path.write_text("name: mine\nstudents: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line 3"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"name": "dup", "students": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(UserError, match="unique"):
        load_recipe(str(path))


def test_schema_documents_every_field():
    rows = schema_reference()
    keys = {key for key, _, _ in rows}
    assert {"teacher.model", "data.seq_len", "distill.lr", "students[].prune.hidden_size", "engine.profile", "serve.host"} <= keys
    assert all(description for _, _, description in rows)


def test_cli_validate(cli):
    ok = cli("validate", "llama-3.1-8b-minitron-4b-width", "--teacher", "/models/llama-3.1-8b")
    assert ok.returncode == 0 and "hidden_size': 3072" in ok.stdout and "/models/llama-3.1-8b" in ok.stdout
    bad = cli("validate", "smollm2-135m-minitron", "--set", "eval.batch_size=0")
    assert bad.returncode == 2 and "eval.batch_size" in bad.stderr and "Traceback" not in bad.stderr
