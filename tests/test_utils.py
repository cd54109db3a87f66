"""Private helpers that every writer relies on."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from foldattn._utils import atomic_path, strict_json


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


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync " + ("dir" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                                           else "file")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    with atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("data")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "f.txt").read_text() == "data"


def test_strict_json_writes_null_for_nan_and_inf() -> None:
    import json

    text = strict_json({"loss": float("nan"), "x": [1.0, float("inf")], "ok": 2.5})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [1.0, None], "ok": 2.5}


def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path: Path) -> None:
    import json
    import socket
    import subprocess
    import sys

    from foldattn.train.runtime import RunLock, RunLockedError

    # a live holder: another process
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "t"}))
        with pytest.raises(RunLockedError, match=f"in use by PID {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: stale, taken over with a warning; leftovers of killed writes removed
    (tmp_path / ".last.pt.foldattn-abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".someone-elses.tmp").write_bytes(b"not ours")
    with pytest.warns(UserWarning, match="stale lock"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".last.pt.foldattn-abc123.tmp").exists()
    assert (tmp_path / ".someone-elses.tmp").exists()  # only foldattn's own temporaries are removed
    lock.release()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"pid": 99999999999999999999, "host": "h"}', b"not json {",
                                     b"", b'{"pid": "12", "host": "h"}', b'{"pid": true, "host": "h"}',
                                     b"[" * 5000, b"x" * 10_000, b'{"pid": 1}'],
                         ids=["list", "huge-pid", "not-json", "empty", "pid-string", "pid-bool", "deep", "big",
                              "no-host"])
def test_a_lock_that_does_not_parse_is_stale(tmp_path: Path, content: bytes) -> None:
    from foldattn.train.runtime import RunLock

    (tmp_path / ".lock").write_bytes(content)
    with pytest.warns(UserWarning, match="unreadable lock file"):
        lock = RunLock(tmp_path).acquire()
    assert lock.held
    lock.release()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),  # what torch.save raises on a full disk
    OSError(28, "No space left on device"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
    # torch.save when the disk fills before its end-of-file record, and libstdc++'s stream failure
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 531712 vs 531608"),
    RuntimeError("basic_ios::clear: iostream error"),
], ids=["torch.save", "oserror", "safetensors", "torch.save-end-of-file", "iostream"])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 error: Exception) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10, used=10, free=0))
    with pytest.raises(OSError, match="No space left on device") as info, atomic_path(tmp_path / "last.pt"):
        raise error
    assert str(tmp_path / "last.pt") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_other_errors_pass_through_atomic_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a write"), atomic_path(tmp_path / "x"):
        raise ValueError("not a write")


def test_cli_train_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import torch

    from foldattn.cli import main

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10, used=10, free=0))
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8", "--no-progress",
                 "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "No space left on device" in err and str(out / "last.pt") in err
    assert not out.exists(), "no temporary file, and no folder of the failed command's making, is left"


def test_check_output_folder_refuses_a_file_in_the_way_and_creates_nothing(tmp_path: Path) -> None:
    from foldattn._utils import check_output_folder

    assert check_output_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists(), "checking must not create the folder"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*/f: is a file"):
        check_output_folder(tmp_path / "f", "--out")
    with pytest.raises(ValueError, match=r"is under .*/f, which is a file"):
        check_output_folder(tmp_path / "f" / "sub" / "deeper", "--out")
    assert (tmp_path / "f").read_text() == "x"
