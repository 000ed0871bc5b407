"""Where the toolchain keeps its caches, and how it writes outputs without ever leaving half of one."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from toolchain.errors import UserError


def cache_dir() -> Path:
    """Root of every cache (converted built-in models, tokenized data); `MINITRON_CACHE` overrides it."""
    if os.environ.get("MINITRON_CACHE"):
        return Path(os.environ["MINITRON_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minitron"


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_location(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output directory that cannot be made: a file, below a file, or not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; name a directory")
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {out} lies below {existing}, which is a file; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {existing} is not writable by this user; choose another {flag}")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside `out` and rename it to `out` only if the block succeeds.

    An existing non-empty `out` is refused unless `overwrite`; on failure nothing is left at `out`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it drwx------; an output gets the mode mkdir would give it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
