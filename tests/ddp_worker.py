"""Run by ``torchrun`` in tests/test_ddp.py: a few DDP steps, then each rank saves its parameters.

``worker.py OUT``: an uninterrupted run. ``worker.py OUT cut``: rank 1 alone gets a Ctrl-C after
its first step (rank 0 does not), so the ranks must agree to stop at the same step; each rank
writes ``OUT/interrupted-rankN``. ``worker.py OUT resume``: continues that run from ``OUT``.
``worker.py OUT modern``: AdamW, timm's cosine, EMA, mixup/cutmix, RandAugment, erasing and
gradient accumulation (2 batches per update).
"""

import os
import signal
import sys
from pathlib import Path

import torch

from foldattn.train import TrainConfig, TrainingInterrupted, train


def main() -> None:
    out = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "full"
    torch.set_num_threads(1)

    def hook(event: str, info: dict) -> None:
        rank = torch.distributed.get_rank()
        if event == "epoch":
            params = {k: v.detach().clone() for k, v in info["model"].named_parameters()}
            torch.save(params, out / f"rank{rank}.pt")
        elif mode == "cut" and rank == 1 and info["step"] == 0:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = TrainConfig(dataset="digits", epochs=1, steps_per_epoch=3, batch_size=16, lr=0.1, attention="se", asr=True,
                      output=str(out), seed=0, deterministic=True)
    if mode == "modern":
        cfg = TrainConfig(**{**cfg.to_dict(), "steps_per_epoch": 4, "opt": "adamw", "lr": 1e-3, "sched": "cosine",
                             "model_ema": True, "model_ema_decay": 0.9, "mixup": 0.8, "cutmix": 1.0,
                             "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "grad_accum_steps": 2})
    try:
        train(cfg, hook=hook, log=None, resume=out if mode == "resume" else None)
    except TrainingInterrupted:
        (out / f"interrupted-rank{os.environ['RANK']}").write_text("")  # the group is closed by now


if __name__ == "__main__":
    main()
