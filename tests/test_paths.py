"""Output locations: atomic output directories get the mode mkdir would give them; impossible outputs are refused up front."""

import os
from pathlib import Path

import pytest

from toolchain.errors import UserError
from toolchain.paths import atomic_output_dir, cache_dir, check_output_location


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_atomic_output_dir_respects_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "file").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    assert (tmp_path / "out" / "file").read_text() == "x"


def test_output_locations_that_cannot_become_directories_are_refused(tmp_path):
    check_output_location(tmp_path / "new" / "deeper")  # made on demand
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UserError, match=r"--out .*file is a file; name a directory"):
        check_output_location(tmp_path / "file")
    with pytest.raises(UserError, match=r"--out .*file is a file; name a directory"):
        check_output_location(tmp_path / "file", overwrite=True)
    with pytest.raises(UserError, match=r"--repo-only .*file/sub lies below .*file, which is a file; choose another --repo-only"):
        check_output_location(tmp_path / "file" / "sub", "--repo-only")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; choose another --out or pass --overwrite"):
        check_output_location(tmp_path / "used")
    check_output_location(tmp_path / "used", overwrite=True)
    # a directory that refuses new files even to root (tests may run as root, which passes permission checks)
    with pytest.raises(UserError, match="--out /proc/minitron/out: /proc refuses new files"):
        check_output_location(Path("/proc/minitron/out"))
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "used" / "mine.txt").read_text() == "mine"
    assert not [path for path in tmp_path.rglob(".minitron-write-check-*")]


def test_a_cache_directory_that_is_a_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="MINITRON_CACHE .*cache is a file"):
        cache_dir()
