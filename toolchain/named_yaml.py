"""YAML files a user names by path or by built-in name (recipes, engine profiles), and dotted-key overrides of them.

One loader, so `minitron run RECIPE` and `minitron build --profile PROFILE` accept the same kinds of
argument and fail with the same one-line errors. Not a schema: callers validate the mapping with
their own pydantic model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from toolchain.errors import UserError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def builtin_names(folder: Traversable) -> list[str]:
    """The built-in names in `folder`: its YAML file names without .yaml."""
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def read_named_text(source: str | Path, folder: Traversable, kind: str) -> tuple[str, str, str]:
    """(text, label for messages, name) of a YAML file given as a path or as a built-in name in `folder`."""
    names = builtin_names(folder)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return path.read_text(), str(path), path.stem
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {kind} {path}: {exc}") from None
    if str(source) in names:
        return folder.joinpath(f"{source}.yaml").read_text(), str(source), str(source)
    if path.exists():
        raise UserError(f"{kind} {path} is a directory; pass a YAML file or a built-in name ({', '.join(names)})")
    if path.suffix in (".yaml", ".yml") or "/" in str(source):
        raise UserError(f"{kind} file {path} does not exist; pass an existing YAML file or a built-in name ({', '.join(names)})")
    raise UserError(f"unknown {kind} {str(source)!r}; pass a YAML file or a built-in name ({', '.join(names)})")


def parse_yaml(text: str, label: str) -> object:
    """YAML to Python; a syntax error names its line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{label} is not valid YAML{where}: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None


def read_named_yaml(source: str | Path, folder: Traversable, kind: str, expected: str) -> tuple[dict, str]:
    """The mapping in a YAML file given as a path or as a built-in name in `folder`, and the file's name (stem).

    `kind` ("recipe", "engine profile") and `expected` (its top-level keys) word the errors.
    """
    text, label, name = read_named_text(source, folder, kind)
    data = parse_yaml(text, f"{kind} {label}")
    if not isinstance(data, dict):
        raise UserError(f"{kind} {label} must be a YAML mapping ({expected})")
    return data, name


def apply_override(data: dict, dotted_key: str, value) -> None:
    """Set `a.b.c` in nested dicts/lists; list items by index or by their `name`."""
    parts = dotted_key.split(".")
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = int(part) if part.isdigit() else next((i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part), None)
            if index is None or index >= len(node):
                raise UserError(f"override {dotted_key}: no list item {part!r}")
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UserError(f"override {dotted_key}: {'.'.join(parts[:depth])} is not a section")
