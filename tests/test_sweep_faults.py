"""`foldattn sweep` under faults: no run outlives its sweep, and no run is reported both finished and failed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foldattn.cli import main

FAST = ["--recipe", "digits", "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "32"]
LINUX = pytest.mark.skipif(sys.platform != "linux", reason="children follow their sweep through PR_SET_PDEATHSIG")


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: [{', '.join(FAST)}]\narms:\n  plain: []\n  asr-se: [--attention, se, --asr]\n"
                    "seeds: [0]\nbaseline: plain\n")
    return path


def _children(pid: int) -> list[int]:
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in found.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, here init, has not reaped it yet)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@LINUX
@pytest.mark.slow
def test_a_sweep_killed_hard_takes_its_runs_with_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec, out = _sweep_file(tmp_path), tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "foldattn.cli", "sweep", str(spec), "-o", str(out), "--jobs",
                               "2", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    runs = [out / "runs" / arm / "s0" for arm in ("plain", "asr-se")]
    while not all((r / "last.pt").is_file() for r in runs) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    children = _children(driver.pid)
    assert len(children) == 2, "both runs should be training when the sweep is killed"
    driver.send_signal(signal.SIGKILL)  # the driver alone: nothing can forward a SIGKILL
    driver.wait()
    deadline = time.time() + 60
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "a run outlived its sweep"
    assert all((r / "last.pt").is_file() for r in runs)

    with pytest.warns(UserWarning, match="stale lock"):  # the killed driver's
        assert main(["sweep", str(spec), "-o", str(out), "--jobs", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed and "busy" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_finished"] == summary["runs_planned"] == 2


@pytest.mark.slow
def test_a_run_held_by_another_process_is_busy_not_failed(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec, out = _sweep_file(tmp_path), tmp_path / "out"
    from foldattn.sweep import load_sweep, prepare_folder

    prepare_folder(load_sweep(spec), out, str(spec))  # the sweep's folder, as its first start makes it
    held = out / "runs" / "plain" / "s0"
    held.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (held / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        capsys.readouterr()
        assert main(["sweep", str(spec), "-o", str(out), "--jobs", "1", "--threads", "1"]) == 1
        printed, err = capsys.readouterr()
        assert f"busy   plain-s0: its folder is in use by PID {holder.pid}" in printed
        assert "FAILED" not in printed and "1 run(s) not started" in err
        assert not (held / "last.pt").exists(), "the held folder was written to"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runs_finished"] == 1 and summary["runs_planned"] == 2
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone, the same command finishes the sweep (its run takes the stale lock over)
    assert main(["sweep", str(spec), "-o", str(out), "--jobs", "1", "--threads", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["runs_finished"] == 2


@pytest.mark.parametrize("planted", ["log-file", "logs-folder", "runs-folder"])
def test_a_link_planted_in_the_sweep_folder_is_not_followed(tmp_path: Path, planted: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from foldattn.sweep import load_sweep, prepare_folder

    spec, out = _sweep_file(tmp_path), tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("somebody's file")
    prepare_folder(load_sweep(spec), out, str(spec))
    if planted == "log-file":
        (out / "logs").mkdir()
        for key in ("plain-s0", "asr-se-s0"):
            (out / "logs" / f"{key}.log").symlink_to(victim / "notes.txt")
    else:
        (out / planted.split("-")[0]).symlink_to(victim, target_is_directory=True)
    code = main(["sweep", str(spec), "-o", str(out), "--jobs", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "symbolic link" in err and "Traceback" not in err
    assert [p.name for p in victim.iterdir()] == ["notes.txt"]
    assert (victim / "notes.txt").read_text() == "somebody's file"
