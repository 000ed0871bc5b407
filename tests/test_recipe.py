"""Recipes: every shipped recipe validates, overrides apply, invalid fields are named."""

import re

import pytest
import yaml

from toolchain.errors import UserError
from toolchain.recipe import builtin_recipe_names, describe_plan, load_recipe, recipe_field_namer, schema_reference


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
    depth = load_recipe("llama-3.1-8b-minitron-4b-depth")
    assert depth.students[0].prune.num_layers == 16 and depth.students[0].prune.hidden_size is None
    assert depth.importance.calibration_samples == 1024 and depth.compute.dtype == "bfloat16"


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
    path.write_text("name: mine\nstudents:\n  - name: a\n    prune: {num_layers: 2\n")
    with pytest.raises(UserError, match="not valid YAML at line 5, column 1"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"name": "dup", "students": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(UserError, match="unique"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"name": "dup", "students": [{"name": "teacher"}]}))
    with pytest.raises(UserError, match="cannot be named 'teacher'"):
        load_recipe(str(path))


def test_schema_documents_every_field():
    rows = schema_reference()
    keys = {key for key, _, _ in rows}
    assert {"teacher.model", "data.seq_len", "distill.lr", "students[].prune.hidden_size", "engine.profile", "serve.host"} <= keys
    assert all(description for _, _, description in rows)


TINY_TARGETS = ["--set", "data.seq_len=32", "--set", "students.width.prune.hidden_size=32", "--set", "students.width.prune.ffn_hidden_size=64",
                "--set", "students.depth.prune.num_layers=2"]


def test_cli_validate_checks_teacher_data_targets_and_profile(cli, tiny_model, corpus_jsonl, tmp_path):
    ok = cli("validate", "smollm2-135m-minitron", "--teacher", tiny_model, "--data", corpus_jsonl, *TINY_TARGETS)
    assert ok.returncode == 0, ok.stderr
    assert "inputs: teacher, data, student targets and engine profile checked" in ok.stdout and str(tiny_model) in ok.stdout
    cases = {
        ("--teacher", tmp_path / "missing"): "neither a directory nor a built-in model",
        ("--data", tmp_path / "missing.jsonl"): "does not exist",
        ("--set", "students.width.prune.hidden_size=128"): "students.width.prune.hidden_size 128 is larger than the model's 64",
        ("--set", "engine.profile=h900-fp8"): "unknown engine profile 'h900-fp8'",
        ("--set", "data.seq_len=4096"): "data.seq_len 4096 exceeds the teacher's max_position_embeddings (256)",
        ("--set", "eval.batch_size=0"): "invalid recipe field eval.batch_size",
    }
    for flag, message in cases.items():
        base = {"--teacher": tiny_model, "--data": corpus_jsonl}
        args = [arg for key, value in base.items() if key != flag[0] for arg in (key, value)]
        result = cli("validate", "smollm2-135m-minitron", *TINY_TARGETS, *args, *flag)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (flag, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_cli_recipes_lists_and_shows(cli):
    listed = cli("recipes")
    assert listed.returncode == 0
    for name in builtin_recipe_names():
        assert name in listed.stdout
    shown = cli("recipes", "show", "smollm2-135m-minitron")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["name"] == "smollm2-135m-minitron"
    unknown = cli("recipes", "show", "nope")
    assert unknown.returncode == 2 and "no built-in recipe 'nope'" in unknown.stderr


def test_every_setting_reaches_the_help_and_the_docs(cli):
    """--help, --schema and docs/settings.md come from the same fields."""
    from pathlib import Path

    from toolchain.cli_args import field_flag
    from toolchain.recipe import settings_reference_markdown
    from toolchain.settings import SECTIONS

    docs = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
    assert docs.read_text() == settings_reference_markdown(), "regenerate docs/settings.md with `minitron validate --schema --markdown`"
    help_text = cli("prune", "--help").stdout
    for section in ("prune", "importance", "data", "compute"):
        for name in SECTIONS[section].model_fields:
            assert field_flag(SECTIONS[section], name) in help_text, name


def test_a_students_distill_fields_lay_over_the_recipes():
    recipe = load_recipe("smollm2-135m-minitron", ["distill.lr=2e-3", "distill.min_lr=2e-4"])
    width, depth = (recipe.student_distill(recipe.student(name)) for name in ("width", "depth"))
    assert (width.lr, depth.lr) == (2e-3, 2e-3)  # a recipe-level override reaches the student with its own section
    assert (width.tokens, depth.tokens) == (recipe.distill.tokens, 49152)
    assert depth.teacher_cache == recipe.distill.teacher_cache == "teacher-cache"

    by_steps = load_recipe("smollm2-135m-minitron", ["students.depth.distill={steps: 5}", "students.width.distill.lr=5e-4"])
    assert by_steps.student_distill(by_steps.student("depth")).model_dump(include={"steps", "tokens"}) == {"steps": 5, "tokens": None}
    assert by_steps.student_distill(by_steps.student("width")).lr == 5e-4 and by_steps.distill.lr == 1e-3


@pytest.mark.parametrize("override,message", [
    ("students.depth.distill.lr=0", "invalid recipe: students.depth.distill.lr: Input should be greater than 0"),
    ("students.depth.distill.bogus=1", "invalid recipe: students.depth.distill.bogus: Extra inputs are not permitted"),
    ("students.depth.distill.min_lr=1", "invalid recipe: students.depth.distill: min_lr must not exceed lr"),
])
def test_an_invalid_student_distill_field_is_named(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe("smollm2-135m-minitron", [override])


def test_errors_name_the_student_field_only_where_the_student_sets_it():
    recipe = load_recipe("smollm2-135m-minitron")
    name = recipe_field_namer(recipe, recipe.student("depth"))
    assert (name("distill.tokens"), name("training.lr")) == ("students.depth.distill.tokens", "distill.lr")
