"""Flags generated from the settings sections: types, choices, none, layering (defaults < recipe < flags), one-line errors."""

import pytest
import yaml

from toolchain.cli import COMMANDS, build_parser
from toolchain.cli_args import ArgumentParser, add_section_flags, flag_of, sections_from_args
from toolchain.errors import UserError, settings_named_by


def parse(*argv):
    parser = ArgumentParser(prog="t")
    for key in ("data", "training", "bench", "eval"):
        add_section_flags(parser, key)
    parser.add_argument("--recipe")
    return parser.parse_args([str(arg) for arg in argv])


def test_types_lists_booleans_and_none():
    args = parse("--seq-len", "64", "--adam-betas", "0.8,0.99", "--no-autocast", "--profile", "h100-fp8,l4-int4-awq", "--eval-batches", "none",
                 "--lr", "-1e-4")
    data, bench, evaluation = sections_from_args(args, "data", "bench", "eval")
    assert data.seq_len == 64 and bench.profiles == ["h100-fp8", "l4-int4-awq"] and evaluation.max_batches is None
    assert vars(args)["training.adam_betas"] == [0.8, 0.99] and vars(args)["training.autocast"] is False
    assert vars(args)["training.lr"] == -1e-4  # parsed as a number (not taken for a flag); the section refuses it


def test_only_given_flags_override_and_a_recipe_sits_between(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "data": {"seq_len": 128, "text_field": "body"}, "eval": {"batch_size": 2}}))
    data, evaluation = sections_from_args(parse("--recipe", recipe, "--seq-len", "64"), "data", "eval")
    assert (data.seq_len, data.text_field, data.spec) == (64, "body", "builtin:python-docs")  # flag < recipe < default
    assert evaluation.batch_size == 2


def test_invalid_values_name_the_flag():
    with settings_named_by(flag_of), pytest.raises(UserError, match="invalid --lr: Input should be greater than 0"):
        sections_from_args(parse("--lr", "-1e-4"), "training")
    with settings_named_by(flag_of), pytest.raises(UserError, match="invalid --eval-fraction"):
        sections_from_args(parse("--eval-fraction", "1.5"), "data")


def test_flag_names_follow_the_fields():
    assert (flag_of("data.spec"), flag_of("data.seq_len"), flag_of("eval.max_batches"), flag_of("profile.kv_cache.dtype")) == (
        "--data", "--seq-len", "--eval-batches", "--kv-cache-dtype")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_builds_its_flags_without_clashes(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser([name]).parse_args([name, "--help"])
    assert exit_.value.code == 0 and "usage: minitron " + name in capsys.readouterr().out


def test_a_bad_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser(["prune"]).parse_args(["prune", "--out", "x", "--depth-method", "sideways"])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(error.splitlines()) == 1 and "invalid choice: 'sideways'" in error and "--help" in error
