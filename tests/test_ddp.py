"""Two CPU processes under torchrun (gloo): after a few DDP steps every rank holds the same weights.

The same two ranks as two "nodes" (two torchrun agents on this machine meeting at a c10d rendezvous)
train and resume exactly like one node with two processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from foldattn.train import TrainConfig, build_model
from foldattn.train.checkpoint import load_checkpoint

from .conftest import shared_folder

WORKER = Path(__file__).with_name("ddp_worker.py")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def _torchrun(*args: object) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted two-rank run, shared by the tests that compare against it."""
    return shared_folder(tmp_path_factory, "ddp-full", _torchrun)


def test_two_process_ddp_ranks_agree(full_run: Path) -> None:
    r0, r1 = (torch.load(full_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.endswith("psi") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # the ranks saw different data, so identical weights mean the gradients were all-reduced;
    # and training moved them away from the initialisation
    torch.manual_seed(0)
    init = dict(build_model(TrainConfig(attention="se", asr=True), num_classes=10).named_parameters())
    assert any(not torch.equal(init[k].detach(), r0[k]) for k in r0)
    assert load_checkpoint(full_run)["run"]["world_size"] == 2


@pytest.mark.slow
def test_two_process_ddp_with_the_modern_recipe_options(tmp_path: Path) -> None:
    _torchrun(tmp_path, "modern")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # accumulated gradients all-reduced on the update's last batch
    blob = load_checkpoint(tmp_path)
    assert blob["scheduler"]["updates"] == 2 and blob["model_ema"] is not None
    assert blob["run"]["world_size"] == 2


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_all_ranks_at_the_same_step_and_resumes_exactly(full_run: Path,
                                                                                   tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    _torchrun(cut, "cut")  # Ctrl-C reaches rank 1 only, after its first step
    assert {p.name for p in cut.glob("interrupted-rank*")} == {"interrupted-rank0", "interrupted-rank1"}
    blob = load_checkpoint(cut)
    assert (blob["epoch"], blob["step"]) == (0, 1)
    assert blob["partial"][2] == 16  # images of the one step done, over both ranks (8 each)
    _torchrun(cut, "resume")
    full = torch.load(full_run / "rank0.pt", weights_only=True)
    for r in (0, 1):
        resumed = torch.load(cut / f"rank{r}.pt", weights_only=True)
        for k in full:
            assert torch.equal(full[k], resumed[k]), (r, k)


def test_the_process_group_is_left_after_a_barrier_unless_one_rank_failed(monkeypatch) -> None:
    # a rank that races ahead to interpreter shutdown while a peer still writes the checkpoint
    # aborts in gloo's worker threads; an error may be one rank's alone, so no barrier then
    import torch.distributed as dist

    from foldattn.train.runtime import Distributed, TrainingInterrupted

    calls: list[str] = []
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    for exc, expected in ((None, ["barrier", "destroy"]),
                          (TrainingInterrupted(Path("last.pt")), ["barrier", "destroy"]),
                          (ValueError("one rank's data"), ["destroy"])):
        calls.clear()
        d = Distributed(torch.device("cpu"))
        d.owns_group = True
        d.__exit__(type(exc) if exc else None, exc, None)
        assert calls == expected, exc
        d.close()  # a second close does nothing
        assert calls == expected


# --- two nodes: two torchrun agents on this machine, one rank each ---------------------------------

#: ``foldattn train`` options giving exactly ``ddp_worker.py``'s configuration (checked below)
CLI_OPTIONS = ("--dataset", "digits", "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "16", "--lr", "0.1",
               "--attention", "se", "--asr", "--seed", "0", "--deterministic", "--no-progress")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """The PIDs of ``pid``'s descendants (Linux ``/proc``; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _stop(agents: list[subprocess.Popen[bytes]]) -> None:
    """End the agents still running, and their workers (torchrun starts each in a session of its own)."""
    running = [a for a in agents if a.poll() is None]
    workers = [pid for a in running for pid in _descendants(a.pid)]
    for agent in running:
        agent.terminate()  # an agent passes SIGTERM on to its workers, and waits up to 30 s for them
    deadline = time.monotonic() + 10
    for agent in running:
        try:
            agent.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    for pid in workers:  # gone by now, unless a collective held one past the agent's patience
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _two_nodes(*args: object, timeout: float = 180) -> None:
    """``torchrun --nnodes 2 --nproc_per_node 1 ... ARGS`` twice, side by side: two nodes of one rank each.

    The agents meet at a c10d rendezvous on a free local port (the first to bind it hosts the store,
    the other connects to it); ranks are agreed there.
    """
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"foldattn-test-{port}",
           "--rdzv_conf", "join_timeout=120", *map(str, args)]
    agents: list[subprocess.Popen[bytes]] = []
    # output to files, not pipes: an agent whose pipe is full would stall the other one too
    with tempfile.TemporaryFile() as log0, tempfile.TemporaryFile() as log1:
        try:
            for log in (log0, log1):
                agents.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            codes = [agent.wait(timeout=max(1.0, deadline - time.monotonic())) for agent in agents]
        finally:
            _stop(agents)
        if codes != [0, 0]:
            tails = []
            for log in (log0, log1):
                log.seek(0)
                tails.append(log.read().decode(errors="replace")[-3000:])
            pytest.fail("\n".join(f"--- agent {n} (exit {c}):\n{t}"
                                  for n, (c, t) in enumerate(zip(codes, tails, strict=True))))


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _assert_same_run(a: Path, b: Path) -> None:
    """The two runs' ``last.pt`` hold the same weights, optimizer and schedule states and metrics."""
    x, y = load_checkpoint(a), load_checkpoint(b)
    for entry in ("model", "optimizer", "scheduler", "epoch", "step", "best"):
        _assert_equal(x[entry], y[entry], entry)
    timing = ("epoch_time_s", "images_per_s")
    _assert_equal(*([{k: v for k, v in epoch.items() if k not in timing} for epoch in blob["history"]]
                    for blob in (x, y)), "history")
    assert {k: v for k, v in x["config"].items() if k != "output"} == \
        {k: v for k, v in y["config"].items() if k != "output"}
    assert x["run"]["world_size"] == y["run"]["world_size"] == 2


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``foldattn train`` on two nodes of one rank each, with ``full_run``'s configuration."""
    return shared_folder(tmp_path_factory, "ddp-two-nodes",
                         lambda out: _two_nodes("-m", "foldattn.cli", "train", *CLI_OPTIONS, "-o", out))


@pytest.mark.slow
def test_two_nodes_train_exactly_like_one_node_with_two_processes(full_run: Path, two_node_run: Path) -> None:
    # the same global ranks see the same data, and the all-reduce of two ranks is a + b either way
    _assert_same_run(two_node_run, full_run)
    assert (two_node_run / "metrics.csv").is_file() and not list(two_node_run.glob("*.tmp"))


@pytest.mark.slow
def test_an_interrupted_two_node_run_resumes_exactly(full_run: Path, two_node_run: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    _two_nodes(WORKER, cut, "cut")  # Ctrl-C reaches rank 1 only (the other node's), after its first step
    assert {p.name for p in cut.glob("interrupted-rank*")} == {"interrupted-rank0", "interrupted-rank1"}
    blob = load_checkpoint(cut)
    assert (blob["epoch"], blob["step"]) == (0, 1) and blob["partial"][2] == 16
    _two_nodes("-m", "foldattn.cli", "train", "--resume", cut, "--no-progress")  # the saved options
    _assert_same_run(cut, two_node_run)
    _assert_same_run(cut, full_run)
