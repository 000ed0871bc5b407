"""Progress bars for long jobs, on stderr, silent when stderr is not a terminal (logs and CI stay clean)."""

import contextlib
import os
import sys

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "batch"):
    """A tqdm bar; `MINITRON_PROGRESS=1` forces it on, `0` off."""
    forced = os.environ.get("MINITRON_PROGRESS")
    disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    with tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True) as bar:
        yield bar
