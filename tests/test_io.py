"""Atomic writes: all or nothing, and files as readable as a plain write would make them."""

from __future__ import annotations

import os
import stat

import pytest

from diffprune.io import atomic_dir, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_files_and_folders_get_the_usual_permissions(tmp_path, umask_022):
    write_text(tmp_path / "run.json", "{}")
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "weights").write_bytes(b"w")
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file_and_folder(tmp_path):
    write_text(tmp_path / "run.json", "old")
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "weights").write_bytes(b"old")
    for write in (lambda: write_text(tmp_path / "run.json", object()),  # fails inside the write
                  lambda: _fail_in(atomic_dir(tmp_path / "model"))):
        with pytest.raises(Exception):
            write()
    assert (tmp_path / "run.json").read_text() == "old"
    assert (tmp_path / "model" / "weights").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run.json"]  # no temporaries left


def _fail_in(context) -> None:
    with context as folder:
        (folder / "weights").write_bytes(b"new")
        raise RuntimeError("interrupted")
