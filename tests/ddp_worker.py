"""Run by ``torchrun`` in tests/test_ddp.py: a few DDP steps, then each rank saves its parameters."""

import sys
from pathlib import Path

import torch

from foldattn.train import TrainConfig, train


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)

    def hook(event: str, info: dict) -> None:
        if event == "epoch":
            rank = torch.distributed.get_rank()
            params = {k: v.detach().clone() for k, v in info["model"].named_parameters()}
            torch.save(params, out / f"rank{rank}.pt")

    cfg = TrainConfig(dataset="digits", epochs=1, steps_per_epoch=3, batch_size=16, lr=0.1, attention="se", asr=True,
                      output=str(out), seed=0)
    train(cfg, hook=hook, log=None)


if __name__ == "__main__":
    main()
