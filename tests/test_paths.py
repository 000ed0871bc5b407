"""Output locations: atomic output directories get the mode mkdir would give them; impossible outputs are refused up front."""

import os

import pytest

from toolchain.errors import UserError
from toolchain.paths import atomic_output_dir, check_output_location


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


def test_output_locations_that_cannot_become_directories_are_refused(tmp_path, monkeypatch):
    check_output_location(tmp_path / "new" / "deeper")  # made on demand
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UserError, match=r"--out .*file is a file; name a directory"):
        check_output_location(tmp_path / "file")
    with pytest.raises(UserError, match=r"--repo-only .*file/sub lies below .*file, which is a file; choose another --repo-only"):
        check_output_location(tmp_path / "file" / "sub", "--repo-only")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a user without write permission (tests run as root)
    with pytest.raises(UserError, match=f"{tmp_path} is not writable by this user"):
        check_output_location(tmp_path / "new")
    assert (tmp_path / "file").read_text() == "keep"
