"""The optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._utils import require
from .config import TrainConfig

__all__ = ["create_optimizer", "create_scheduler", "LRSchedule"]


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


class LRSchedule:
    """The run's learning-rate schedule behind one interface: :meth:`step` after every optimizer
    update, :meth:`step_epoch` after every validation (``plateau`` reads the metric there).

    ``--schedule`` (cosine, step, constant) is foldattn's own per-step function, kept because
    the paper reproductions in docs/ were made with it; ``--sched`` takes timm's schedulers
    (``create_scheduler_v2``, stepped per update, warm-up from timm's ``warmup_lr``) or torch's
    ``OneCycleLR`` (timm has none). ``plateau`` is torch's ``ReduceLROnPlateau`` on the validation
    top-1 (timm's does not save its counters, so a resumed run would restart them), after a
    linear warm-up.
    """

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> None:
        self.kind = cfg.sched or "builtin"
        self.updates = 0
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.warm = round(cfg.warmup_epochs * updates_per_epoch)
        self.inner: Any
        if cfg.sched == "plateau":
            self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.gamma, patience=cfg.patience_epochs, min_lr=cfg.min_lr)
            if self.warm:
                self._warm_up()
        elif cfg.sched is None:
            self.inner = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, updates_per_epoch))
        elif cfg.sched == "onecycle":
            pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.3
            total = cfg.epochs * updates_per_epoch
            if not 1 < pct * total < total - 1:  # OneCycleLR divides by each phase's length
                raise ValueError(f"--sched onecycle: {total} updates cannot hold a rise of {pct:.0%} and a fall "
                                 "(train longer, or change --warmup-epochs)")
            self.inner = torch.optim.lr_scheduler.OneCycleLR(
                # one step more than the updates: the trainer steps after the last update as well
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total + 1,
                pct_start=pct, cycle_momentum=False)
        else:
            timm_sched = require("timm.scheduler", "train")
            self.inner, _ = timm_sched.create_scheduler_v2(
                optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs or 1,
                decay_milestones=list(cfg.milestones), decay_rate=cfg.gamma, min_lr=cfg.min_lr,
                warmup_epochs=cfg.warmup_epochs, step_on_epochs=False, updates_per_epoch=updates_per_epoch)

    def _warm_up(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * min(1.0, (self.updates + 1) / self.warm)

    def step(self) -> None:
        """After one optimizer update."""
        self.updates += 1
        if self.kind in ("builtin", "onecycle"):
            self.inner.step()
        elif self.kind == "plateau":
            if self.updates <= self.warm:
                self._warm_up()
        else:
            self.inner.step_update(self.updates)

    def step_epoch(self, epoch: int, metric: float | None = None) -> None:
        """After epoch ``epoch`` (1-based count of finished epochs) was validated with ``metric`` (top-1)."""
        if self.kind == "plateau":
            if self.updates >= self.warm and metric is not None:
                self.inner.step(metric)
        elif self.kind != "builtin" and self.kind != "onecycle":
            self.inner.step(epoch, metric)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "updates": self.updates, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "kind" not in state:  # checkpoints before --sched: the LambdaLR state itself
            state = {"kind": "builtin", "updates": int(state.get("last_epoch", 0)), "inner": state}
        if state["kind"] != self.kind:
            raise ValueError(f"the checkpoint's schedule is {state['kind']}, this run's {self.kind}")
        self.updates = int(state["updates"])
        self.inner.load_state_dict(state["inner"])
        if self.kind == "plateau" and self.updates < self.warm:
            self._warm_up()


def create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRSchedule:
    """The run's :class:`LRSchedule` for ``steps_per_epoch`` optimizer updates per epoch: linear
    warm-up, then ``cfg.schedule`` (cosine, step at ``milestones`` by ``gamma``, constant), or
    ``cfg.sched`` through timm / torch."""
    return LRSchedule(cfg, optimizer, steps_per_epoch)
