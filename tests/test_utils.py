"""Private helpers that every writer relies on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from foldattn._utils import atomic_path


def test_atomic_path_writes_with_umask_mode(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    with atomic_path(dest) as tmp:
        tmp.write_text("hello")
        assert not dest.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert dest.read_text() == "hello"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"), atomic_path(tmp_path / "no" / "x"):
        pass
