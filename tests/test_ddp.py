"""Two CPU processes under torchrun (gloo): after a few DDP steps every rank holds the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from foldattn.checkpoint import load_checkpoint
from foldattn.train import TrainConfig, build_model

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp_ranks_agree(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.endswith("psi") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # the ranks saw different data, so identical weights mean the gradients were all-reduced;
    # and training moved them away from the initialisation
    torch.manual_seed(0)
    init = dict(build_model(TrainConfig(attention="se", asr=True), num_classes=10).named_parameters())
    assert any(not torch.equal(init[k].detach(), r0[k]) for k in r0)
    assert load_checkpoint(tmp_path)["run"]["world_size"] == 2
