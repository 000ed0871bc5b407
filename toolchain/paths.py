"""Where the toolchain keeps its caches, and how it writes outputs without ever losing or leaving half of one.

Every stage writes into a temporary directory beside its `--out` and renames it into place when the
output is complete; `--overwrite` replaces an existing output only at that moment, so a failure or
Ctrl-C leaves the old output as it was. Output locations are checked before any work starts.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from toolchain.errors import UserError


def cache_dir() -> Path:
    """Root of every cache (converted built-in models, tokenized data); `MINITRON_CACHE` overrides it."""
    if os.environ.get("MINITRON_CACHE"):
        root = Path(os.environ["MINITRON_CACHE"]).expanduser()
        source = f"MINITRON_CACHE={root}"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minitron"
        source = f"the cache directory {root}"
    check_output_location(root, source, overwrite=True)
    return root


def check_output_location(out: Path, name: str | None = None, overwrite: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work: a file where a directory goes, a
    parent that is a file or not writable, or (without `overwrite`) a non-empty directory."""
    out = Path(out)
    name = name or f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UserError(f"{name} is a file; it must be a directory (or not exist yet): choose another path")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise UserError(f"{name} exists and is not empty; choose another path or pass --overwrite (the old output is replaced once the new one is complete)")
    existing = out if out.exists() else next(parent for parent in out.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{name} cannot be created: {existing} is a file, not a directory; choose another path")
    try:  # a real write, not os.access: root passes permission checks, yet not on a read-only file system
        probe, probe_path = tempfile.mkstemp(prefix=".minitron-write-check-", dir=existing)
        os.close(probe)
        os.unlink(probe_path)
    except OSError as exc:
        raise UserError(f"{name} cannot be written: {existing} refuses new files ({exc.strerror}); choose another path") from None


def replace_path(target: Path, new: Path) -> None:
    """Move `new` to `target`; an existing `target` is removed only once `new` is in place."""
    target, new = Path(target), Path(new)
    if not target.exists():
        new.rename(target)
        return
    backup = target.parent / f".{target.name}.old-{os.getpid()}"
    target.rename(backup)
    new.rename(target)
    if backup.is_dir():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()


def make_temporary_dir(beside: Path, label: str) -> Path:
    """A fresh hidden directory next to `beside`, with the permissions a plain mkdir would give (not mkdtemp's 0700)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.{label}-", dir=beside.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside `out` and rename it to `out` only if the block succeeds.

    An existing non-empty `out` is refused unless `overwrite`, and replaced only then; on failure
    nothing is left at `out` that was not there before.
    """
    out = Path(out)
    check_output_location(out, overwrite=overwrite)
    tmp = make_temporary_dir(out, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(out, tmp)


def directory_bytes(directory: Path, pattern: str = "**/*") -> int:
    """Bytes of the files under `directory` that match `pattern`."""
    return sum(path.stat().st_size for path in Path(directory).glob(pattern) if path.is_file())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
