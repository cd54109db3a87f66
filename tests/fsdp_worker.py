"""Run by ``torchrun`` in tests/test_hosts.py: FSDP2 (``fully_shard``) on a model with ASR layers.

Two CPU processes (gloo). Each rank trains two SGD steps on its half of a fixed batch with the
model sharded three ways (the root only; each ASR layer and the root; each ASR *host* and the
root), gathers the full parameters and saves them with those of an unsharded copy trained on
the whole batch, which FSDP's averaged gradients must reproduce.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from foldattn import ASR


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), ASR(nn.GroupNorm(2, 8), "se"), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ASR(nn.Linear(8, 16), "eca"), nn.ReLU(), nn.Linear(16, 4),
    )


def steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
    ref = build()
    steps(ref, x, y)
    results = {"reference": {k: v.detach().clone() for k, v in ref.state_dict().items()}}
    for how in ("root", "asr", "host"):
        model = build()
        layers = [m for m in model.modules() if isinstance(m, ASR)] if how != "root" else []
        for layer in layers:
            fully_shard(layer if how == "asr" else layer.host)
        fully_shard(model)
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        steps(model, x[part], y[part])
        full = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
        results[how] = full
        results[how + "_param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    if rank == 0:
        torch.save(results, out / "fsdp.pt")
    # both ranks reach this point before gloo's threads are torn down (an early exit of one rank
    # aborted the other with "terminate called without an active exception" on a loaded machine)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
