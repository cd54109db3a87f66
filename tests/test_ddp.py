"""Two CPU processes under torchrun (gloo): after a few DDP steps every rank holds the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foldattn.train import TrainConfig, build_model
from foldattn.train.checkpoint import load_checkpoint

from .conftest import shared_folder

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(*args: object) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
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


def test_two_process_ddp_with_the_modern_recipe_options(tmp_path: Path) -> None:
    _torchrun(tmp_path, "modern")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # accumulated gradients all-reduced on the update's last batch
    blob = load_checkpoint(tmp_path)
    assert blob["scheduler"]["updates"] == 2 and blob["model_ema"] is not None
    assert blob["run"]["world_size"] == 2


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
