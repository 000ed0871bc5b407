"""The one exception type for mistakes a user can fix, and how an error names the setting to change.

The CLI prints a UserError as one line, exit 2. Library code names a setting by its section path
(`setting("data.seq_len")`); who called it decides how the user sees it: a subcommand shows the flag
(`--seq-len`), a recipe run the recipe field (`students.width.prune.hidden_size`).
"""

import contextlib
from collections.abc import Callable
from contextvars import ContextVar


class UserError(Exception):
    """Bad input: the message names the problem and the fix. Never shown with a traceback."""


_setting_namer: ContextVar[Callable[[str], str] | None] = ContextVar("setting_namer", default=None)


def setting(path: str) -> str:
    """How the user refers to the setting `section.field` where this code was called from."""
    namer = _setting_namer.get()
    return namer(path) if namer else path


@contextlib.contextmanager
def settings_named_by(namer: Callable[[str], str]):
    """Within the block, `setting()` names settings with `namer` (a flag, a recipe field path, ...)."""
    token = _setting_namer.set(namer)
    try:
        yield
    finally:
        _setting_namer.reset(token)


def validation_message(exc, prefix: str = "") -> tuple[str, str]:
    """(dotted location, message) of a pydantic ValidationError's first error, e.g. ('data.seq_len', 'Input should be greater than 0')."""
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    return f"{prefix}{location}".strip("."), error["msg"].removeprefix("Value error, ")
