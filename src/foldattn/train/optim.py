"""The optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._utils import require
from .config import TrainConfig

__all__ = ["create_optimizer", "create_scheduler"]


def _param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels (attention MLP weights included: they are ordinary
    weights); none on norms, biases and ASR's psi, unless ``decay_all`` (the paper's recipes)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.decay_all:
        return [{"params": [p for _, p in params], "weight_decay": cfg.weight_decay}]
    decay = [p for n, p in params if p.ndim > 1 and not n.endswith("psi")]
    rest = [p for n, p in params if not (p.ndim > 1 and not n.endswith("psi"))]
    return [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer: ``sgd`` is torch's SGD (momentum, ``--nesterov``); any other name goes
    through timm's optimizer factory (``adamw``, ``lamb``, ``lion``, ...), with the same
    parameter groups (see :func:`_param_groups`)."""
    groups = _param_groups(cfg, model)
    if cfg.opt == "sgd":  # torch's, as before: timm's "sgd" would mean Nesterov
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    timm_optim = require("timm.optim", "train")
    if cfg.opt not in timm_optim.list_optimizers():
        raise ValueError(f"--opt {cfg.opt!r}: not an optimizer of timm's factory; choose sgd or one of "
                         f"{', '.join(o for o in timm_optim.list_optimizers() if not o.startswith(('bnb', 'c')))}")
    return timm_optim.create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          momentum=cfg.momentum)


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
