"""`foldattn sweep --launcher ray|slurm` and `--gpus`: the same runs, folders, resume and summary as the local
runner, whatever executes them (docs/ablations.md, "On a cluster")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from foldattn.cli import main
from foldattn.sweep import SweepError
from foldattn.sweep.launchers import GpuPool, LocalLauncher, SlurmLauncher, parse_gpus
from foldattn.sweep.task import RunTask, run_state

from .conftest import shared_folder

# long enough that a run stopped after its first epoch's checkpoint is stopped mid-run
FAST = ["--recipe", "digits", "--epochs", "4", "--steps-per-epoch", "4", "--batch-size", "32"]
RUNS = [("plain", 0), ("asr-se", 0), ("plain", 1), ("asr-se", 1)]


def _sweep_file(folder: Path, extra: str = "") -> Path:
    path = folder / "sweep.yaml"
    path.write_text(f"base: [{', '.join(FAST)}]\narms:\n  plain: []\n  asr-se: [--attention, se, --asr]\n"
                    f"seeds: [0, 1]\nbaseline: plain\njobs: 2\nthreads: 1\n{extra}")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _sweep(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "foldattn.cli", "sweep", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _top1(summary: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    return {arm: {m: entry[m]["values"] for m in ("final_top1", "best_top1")} for arm, entry in summary["arms"].items()}


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The local runner's summary of the sweep, uninterrupted: what every launcher must reproduce."""

    def build(folder: Path) -> None:
        done = _sweep([str(_sweep_file(folder)), "-o", str(folder / "out")])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    folder = shared_folder(tmp_path_factory, "sweep-launchers-local", build)
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["runs_finished"] == 4
    return summary


def _start_and_wait_for_checkpoint(args: list[str], first: Path) -> subprocess.Popen[bytes]:
    driver = subprocess.Popen([sys.executable, "-m", "foldattn.cli", "sweep", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    deadline = time.time() + 240
    while not (first / "last.pt").is_file() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    assert (first / "last.pt").is_file(), "the first run never wrote a checkpoint"
    return driver


def _no_live_lock(out: Path, timeout: float = 60) -> None:
    """Wait for every run folder's lock to be released (its training process gone)."""
    from foldattn.train.runtime import RunLock

    deadline = time.time() + timeout
    folders = [out / "runs" / arm / f"s{seed}" for arm, seed in RUNS]
    while any(RunLock(f).busy() for f in folders) and time.time() < deadline:
        time.sleep(0.1)


def _same_as_local(out: Path, local_summary: dict[str, Any]) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_finished"] == summary["runs_planned"] == 4
    assert _top1(summary) == _top1(local_summary)  # seeded runs, resumed exactly: the same values, not close ones
    assert summary["arms"]["asr-se"]["paired_diff"] == local_summary["arms"]["asr-se"]["paired_diff"]
    assert set(summary) == set(local_summary) and (out / "summary.md").is_file() and (out / "summary.png").is_file()


@pytest.mark.slow
def test_ray_sweep_stopped_mid_run_and_resumed_matches_the_local_runner(tmp_path: Path,
                                                                       local_summary: dict[str, Any]) -> None:
    pytest.importorskip("ray")
    spec, out = _sweep_file(tmp_path), tmp_path / "out"
    args = [str(spec), "-o", str(out), "--launcher", "ray"]
    first = out / "runs" / "plain" / "s0"
    driver = _start_and_wait_for_checkpoint(args, first)
    driver.send_signal(signal.SIGTERM)  # the driver cancels its tasks: each run writes a resumable checkpoint
    assert driver.wait(timeout=120) == 143
    _no_live_lock(out)
    killed_mid_run = run_state(first) == "partial"
    assert json.loads((out / "summary.json").read_text())["runs_finished"] < 4

    done = _sweep(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on a local Ray instance" in done.stdout and "FAILED" not in done.stdout
    if killed_mid_run:
        assert "resume plain-s0" in done.stdout
        assert f"--resume {first.absolute()}" in (out / "logs" / "plain-s0.log").read_text()
    _same_as_local(out, local_summary)


@pytest.mark.slow
def test_slurm_sweep_through_submitits_local_executor_preempted_killed_and_resumed(
        tmp_path: Path, local_summary: dict[str, Any]) -> None:
    pytest.importorskip("submitit")
    spec, out = _sweep_file(tmp_path, "slurm: {executor: local, time: 60}\n"), tmp_path / "out"
    args = [str(spec), "-o", str(out), "--launcher", "slurm"]
    first = out / "runs" / "plain" / "s0"
    driver = _start_and_wait_for_checkpoint(args, first)
    # a time-limit warning, as SLURM sends it to the job: the job checkpoints the run and is requeued
    train_pid = json.loads((first / ".lock").read_text())["pid"]
    job_pid = int(Path(f"/proc/{train_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(job_pid, signal.SIGUSR2)
    driver.kill()  # the driver alone, hard: its jobs are SLURM's (here submitit's local controllers) and go on
    driver.wait()
    assert json.loads((out / "slurm" / "jobs.json").read_text())["jobs"], "the submitted jobs are recorded"

    # a job may finish while no driver watches (its controller goes on): the new driver just keeps it
    finished = {f"{arm}-s{seed}" for arm, seed in RUNS if run_state(out / "runs" / arm / f"s{seed}") == "finished"}
    done = _sweep(args)  # follows the jobs still running, submits the others
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitit's local executor" in done.stdout and "FAILED" not in done.stdout
    log = (out / "logs" / "plain-s0.log").read_text()
    assert "Caught signal" not in log and log.count("\n$ foldattn train") == 2, log  # the requeued attempt ...
    assert f"--resume {first.absolute()}" in log  # ... continued from the checkpoint the warned one wrote
    for key in {f"{arm}-s{seed}" for arm, seed in RUNS} - finished:
        assert key in done.stdout  # followed (still running) or started
    _same_as_local(out, local_summary)
    assert json.loads((out / "slurm" / "jobs.json").read_text())["jobs"] == {}


def test_the_sbatch_script_submitit_writes_carries_the_options(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    submitit = pytest.importorskip("submitit")
    # no srun here: submitit's SLURM executor refuses to be built without one, so pretend for the rendering
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    launcher = SlurmLauncher({"partition": "gpu", "time": 240, "mem_gb": 32, "account": "lab", "qos": "high",
                              "constraint": "a100"}, gpus_per_run=2, threads=4)
    launcher.check(full=False)
    script = launcher.sbatch_script(tmp_path / "slurm", key="asr-se-s1")
    for line in ("--partition=gpu", "--time=240", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB",
                 "--account=lab", "--qos=high", "--constraint=a100", "--nodes=1", "--ntasks-per-node=1",
                 "--job-name=foldattn-asr-se-s1", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "srun" in script and "submitit.core._submit" in script
    assert launcher.ranks == 2  # a 2-GPU run is a 2-rank torchrun inside its job


def test_gpu_assignment_on_the_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec, out = _sweep_file(tmp_path), tmp_path / "out"
    # four GPUs named on a machine without CUDA: the dry run needs none
    assert main(["sweep", str(spec), "-o", str(out), "--gpus", "0,1,2,3", "--gpus-per-run", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["plain-s0", "asr-se-s0", "plain-s1", "asr-se-s1"]
    assert [" ".join(line.split()[2:4]) for line in lines] == ["cuda 0,1", "cuda 2,3", "cuda 0,1", "cuda 2,3"]
    assert all("torchrun --standalone --nproc_per_node 2 -m foldattn.cli train" in line for line in lines)
    assert main(["sweep", str(spec), "-o", str(out), "--gpus", "0-3", "--dry-run"]) == 0
    devices = [" ".join(line.split()[2:4]) for line in capsys.readouterr().out.strip().splitlines()]
    assert devices == ["cuda 0", "cuda 1", "cuda 2", "cuda 3"]
    # on the CPU nothing changes; ray and slurm show what each run asks for
    assert main(["sweep", str(spec), "-o", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(line.split()[2] == "cpu" and " foldattn train " in line for line in lines)
    assert main(["sweep", str(spec), "-o", str(out), "--dry-run", "--launcher", "slurm", "--slurm", "time=30",
                 "--gpus-per-run", "1", "--threads", "4"]) == 0
    assert all(line.split()[2:5] == ["slurm", "cpu=4", "gpu=1"] for line in capsys.readouterr().out.splitlines())
    assert not out.exists()


def test_gpu_pool_hands_out_groups_and_takes_them_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = GpuPool([4, 5, 6, 7], 2, visible=["a", "b", "c", "d", "e", "f", "g", "h"])
    assert pool.slots == 2 and pool.planned(0) == [4, 5] and pool.planned(3) == [6, 7]
    first, second = pool.take(), pool.take()
    assert (first, second) == ([4, 5], [6, 7]) and pool.env(second) == "g,h"
    with pytest.raises(SweepError):
        pool.take()
    pool.give(second)
    pool.give(first)
    assert pool.take() == [4, 5]  # the lowest free ones
    assert parse_gpus("0-2,5") == [0, 1, 2, 5] and parse_gpus("none") == []
    for bad in ("0,0", "x", "3-1", "0-5000", "-1"):
        with pytest.raises(SweepError, match="--gpus"):
            parse_gpus(bad)
    with pytest.raises(SweepError, match="names 2 GPU"):
        GpuPool([0, 1], 4)
    with pytest.raises(SweepError, match="CUDA_VISIBLE_DEVICES makes 2"):
        GpuPool([0, 2], 1, visible=["3", "5"])
    assert LocalLauncher([0, 1, 2], 1).capacity(8) == 3 and LocalLauncher().capacity(8) == 8

    # each started run gets its ids in CUDA_VISIBLE_DEVICES and gives them back when it ends
    monkeypatch.setattr(RunTask, "process_argv", lambda self, resume: [
        sys.executable, "-c", "import os; print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'])"])
    launcher = LocalLauncher([0, 1], 1, visible=["2", "3"])
    tasks = [RunTask(f"r{i}", ("train",), str(tmp_path / f"r{i}"), str(tmp_path / f"r{i}.log")) for i in range(3)]
    for task in tasks[:2]:
        launcher.start(task, resume=False)
    ended: dict[str, int] = {}
    while len(ended) < 2:
        ended.update({t.key: rc for t in tasks[:2] if t.key not in ended and (rc := launcher.poll(t.key)) is not None})
        time.sleep(0.02)
    launcher.start(tasks[2], resume=False)
    while launcher.poll("r2") is None:
        time.sleep(0.02)
    logs = [Path(t.log).read_text() for t in tasks]
    assert ["CVD=2" in logs[0], "CVD=3" in logs[1], "CVD=2" in logs[2]] == [True] * 3
    assert "on cuda 0" in logs[0] and "on cuda 1" in logs[1]


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], message: str, out: Path) -> float:
    t0 = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists(), "a refused sweep created its folder"
    return elapsed


def test_a_launcher_that_cannot_run_is_one_line_and_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec, out = _sweep_file(tmp_path), tmp_path / "new" / "out"
    base = ["sweep", str(spec), "-o", str(out)]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # an address nobody answers: refused in seconds, before Ray is started
    assert _refused(capsys, [*base, "--launcher", "ray", "--address", "127.0.0.1:1"],
                    "--address 127.0.0.1:1: no Ray cluster answers there", out) < 15
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    _refused(capsys, [*base, "--launcher", "ray"], "RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers", out)
    monkeypatch.delenv("RAY_ADDRESS")
    # no sbatch on PATH (the real SLURM executor)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    _refused(capsys, [*base, "--launcher", "slurm", "--slurm", "time=60"], "no `sbatch` on PATH", out)
    monkeypatch.undo()
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    _refused(capsys, [*base, "--launcher", "slurm"], "needs each job's time limit", out)
    monkeypatch.undo()
    # missing extras, the dry run included
    for module, argv in (("ray", ["--launcher", "ray"]), ("submitit", ["--launcher", "slurm", "--slurm",
                                                                        "executor=local"])):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)
            extra = "ray" if module == "ray" else "slurm"
            for dry in ([], ["--dry-run"]):
                _refused(capsys, [*base, *argv, *dry], f"pip install 'foldattn[{extra}]'", out)
    # options of another launcher, bad values
    for argv, message in ((["--launcher", "ray", "--gpus", "0"], "--gpus picks this machine's GPUs"),
                          (["--address", "h:1"], "--address names the Ray cluster"),
                          (["--slurm", "time=5"], "--slurm sets the jobs of --launcher slurm"),
                          (["--launcher", "slurm", "--slurm", "time=0"], "time (minutes): expected an integer in "
                                                                         "[1, 43200]"),
                          (["--launcher", "slurm", "--slurm", "partition=a;b"], "partition: expected a name"),
                          (["--launcher", "slurm", "--slurm", "mem_gb=5000"], "mem_gb: expected an integer in "
                                                                              "[1, 4096]"),
                          (["--gpus-per-run", "2"], "no GPU here"),
                          (["--gpus", "0,1"], "this machine has 0 visible CUDA GPU"),
                          (["--gpus", "0,1", "--gpus-per-run", "3", "--dry-run"], "--gpus names 2 GPU(s)"),
                          (["--gpus", "0-1100", "--dry-run"], "ids are in [0, 1023]")):
        _refused(capsys, [*base, *argv], message, out)
    for argv in (["--gpus-per-run", "65"], ["--slurm", "walltime=5"], ["--launcher", "lsf"]):
        assert main([*base, *argv]) == 2  # argparse's own line
        assert "error:" in capsys.readouterr().err
    bad_block = _sweep_file(tmp_path, "slurm: {partition: gpu, nodes: 4}\n")
    _refused(capsys, ["sweep", str(bad_block), "-o", str(out)], "slurm: unknown key 'nodes'", out)


def test_a_ray_folder_not_on_shared_storage_is_refused(tmp_path: Path) -> None:
    """Every node must read the probe the driver writes into the sweep folder; a node that cannot is named."""
    from foldattn.sweep.launchers import RayLauncher

    N1 = "a" * 56  # Ray's node ids: 28 bytes in hex

    class FakeRay:
        def nodes(self) -> list[dict[str, Any]]:
            return [{"NodeID": N1, "Alive": True, "NodeManagerAddress": "10.0.0.1"},
                    {"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2"},
                    {"NodeID": "c" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.3"}]

        def remote(self, **kw: Any) -> Any:
            class Fn:
                def __init__(self, fn: Any) -> None:
                    self.fn, self.node = fn, ""

                def options(self, scheduling_strategy: Any) -> Any:
                    self.node = scheduling_strategy.node_id
                    return self

                def remote(self, path: str) -> tuple[str, str]:
                    return (self.node, self.fn(path) if self.node == N1 else None)  # the second mounts something else

            return Fn

        def wait(self, refs: list[Any], num_returns: int, timeout: float) -> tuple[list[Any], list[Any]]:
            return refs, []

        def get(self, ref: tuple[str, str]) -> str:
            return ref[1]

    pytest.importorskip("ray")
    launcher = RayLauncher()
    launcher._ray = FakeRay()
    out = tmp_path / "made" / "out"
    with pytest.raises(SweepError, match=r"Ray node\(s\) 10\.0\.0\.2 do not see the sweep folder"):
        launcher._check_shared(out)
    assert not (tmp_path / "made").exists(), "the check removes what it created"
