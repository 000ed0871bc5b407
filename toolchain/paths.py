"""Where the toolchain keeps its caches, and how it writes outputs without ever losing or leaving half of one.

Every stage writes into a temporary directory beside its `--out` and renames it into place when the
output is complete; `--overwrite` replaces an existing output only at that moment, so a failure or
Ctrl-C leaves the old output as it was. Output locations are checked before any work starts.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from toolchain.errors import UserError


def cache_dir() -> Path:
    """Root of every cache (converted built-in models, tokenized data); `MINITRON_CACHE` overrides it."""
    if os.environ.get("MINITRON_CACHE"):
        root = Path(os.environ["MINITRON_CACHE"]).expanduser()
        source = "MINITRON_CACHE"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minitron"
        source = "the cache directory"
    check_output_location(root, source, overwrite=True)
    return root


def check_output_location(out: Path, flag: str = "--out", overwrite: bool = False) -> None:
    """Refuse, before any work, an output directory that cannot be made or written: a file, below a file,
    in a directory that refuses new files, or (without `overwrite`) a non-empty directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; name a directory")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise UserError(f"{flag} {out} exists and is not empty; choose another {flag} or pass --overwrite "
                        "(the old output is replaced only once the new one is complete)")
    existing = next(path for path in (out, *out.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {out} lies below {existing}, which is a file; choose another {flag}")
    try:  # a real write, not os.access: root passes permission checks, yet not a read-only file system
        probe, probe_path = tempfile.mkstemp(prefix=".minitron-write-check-", dir=existing)
        os.close(probe)
        os.unlink(probe_path)
    except OSError as exc:
        raise UserError(f"{flag} {out}: {existing} refuses new files ({exc.strerror}); choose another {flag}") from None


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
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold an object (a config, a manifest); unreadable or other JSON is a user error ending in `fix`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object of settings; {fix}")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
