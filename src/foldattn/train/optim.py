"""The optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["create_optimizer", "create_scheduler"]


def create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with the run's learning rate, momentum, Nesterov flag and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    bounds = [m * steps_per_epoch for m in cfg.milestones]
    if cfg.schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"--schedule must be cosine, step or constant; got {cfg.schedule!r}")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= b for b in bounds)
        return 1.0

    return factor


def create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                     steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule: linear warm-up, then cosine, step (``milestones``, ``gamma``) or constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
