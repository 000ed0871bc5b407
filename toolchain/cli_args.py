"""Argument groups that several subcommands share, so every stage spells its flags the same way."""

import argparse

from toolchain.models import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str = "float32", default_device: str = "cpu") -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default=default_dtype, help=f"weights and compute dtype (default {default_dtype})")
    parser.add_argument("--device", default=default_device, help=f"cpu, cuda, cuda:N or auto (default {default_device})")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", required=required, default=None if required else "builtin:python-docs",
                        help="data spec: .txt file or folder, .jsonl, .parquet, or builtin:python-docs" + ("" if required else " (default)"))
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text (default text)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default 256)")


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
