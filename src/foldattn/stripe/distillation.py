"""Recovering a calibrated model's accuracy by distillation from the attention model it came from.

:func:`foldattn.stripe.calibrate` replaces each input-dependent attention ``a(x)`` by its mean
``v``: free at inference, but the small input dependence is lost. Fine-tuning on labels at a
restarted learning rate moves the model away from the one it came from. :func:`distill` instead
trains the calibrated model (the *student*) to reproduce the attention model (the *teacher*,
frozen, eval mode): the softened logits (Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015) and, with ``feature_weight``, the features at every attention site.

The student (:func:`distillation_student`) is the backbone with one learnable per-channel scale
per site, starting at the calibrated ``v``, so its first step computes exactly the calibrated
model: where the site's scale folds into the layer before it, that layer becomes an ASR layer
with the ``scale`` attention (``v = psi``); elsewhere (a scale before a conv, as in
MobileNetV3's SE) a learnable :class:`~foldattn.calibrate.ChannelScale`. After every epoch the
student is folded (:func:`deploy_student`) and scored; the best deployed model is kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._utils import eval_mode, set_submodule, unwrap_model
from ..asr import ASR
from ..calibrate import ChannelScale, _plan, fold_scales
from ..fold import fold
from .calibration import announce_duration

__all__ = ["distillation_student", "deploy_student", "distill", "DistillReport", "SiteGap", "site_gaps"]


def distillation_student(constant: nn.Module, example_inputs: Any = None) -> nn.Module:
    """A trainable copy of a calibrated (constant) model that computes exactly what it computes.

    Each :class:`~foldattn.calibrate.ChannelScale` whose scale folds into the layer before it
    (a norm or conv) moves there as ASR with the ``scale`` attention, ``psi`` = the calibrated
    ``v``; the others become learnable :class:`ChannelScale` modules.
    """
    student = copy.deepcopy(unwrap_model(constant))
    names = [n for n, m in student.named_modules() if isinstance(m, ChannelScale)]
    plan = _plan(student, names, example_inputs)
    used: set[str] = set()
    for name in names:
        scale: Tensor = student.get_submodule(name).scale  # type: ignore[assignment]
        action, target = plan.get(name, ("kept", None))
        host = student.get_submodule(target) if target is not None else None
        if action in ("into-norm", "into-conv-out") and target not in used and not isinstance(host, ASR):
            layer = ASR(host, "scale")  # type: ignore[arg-type]
            with torch.no_grad():
                psi = cast(nn.Parameter, layer.attention.psi)  # ASR made its attention static
                psi.copy_(scale.detach().reshape(1, -1).to(psi))
            set_submodule(student, target, layer)  # type: ignore[arg-type]
            set_submodule(student, name, nn.Identity())
            used.add(target)  # type: ignore[arg-type]
        elif name:
            set_submodule(student, name, ChannelScale(scale, learnable=True))
    return student


@torch.no_grad()
def deploy_student(student: nn.Module, example_inputs: Any = None) -> nn.Module:
    """The student's deployed form: learnable scales folded into their neighbours, then ASR layers folded."""
    deployed = copy.deepcopy(unwrap_model(student))
    for name, m in list(deployed.named_modules()):
        if isinstance(m, ChannelScale) and m.learnable:
            set_submodule(deployed, name, ChannelScale(m.scale.detach()))
    with eval_mode(deployed):
        fold_scales(deployed, example_inputs)
    return fold(deployed) if any(isinstance(m, ASR) for m in deployed.modules()) else deployed


@dataclass
class SiteGap:
    """One attention site: its stripe statistics and how far the student's output there is from the
    teacher's (relative squared error, ``||s - t||^2 / ||t||^2`` on validation images)."""

    name: str
    stripe_score: float
    gate_mean: float
    gate_spread: float  # mean over channels of the gate's std across images
    gap_before: float = math.nan
    gap_after: float = math.nan


@dataclass
class DistillReport:
    """What :func:`distill` did: settings, the folded student's top-1 per epoch, the best epoch, the sites."""

    epochs: int
    settings: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    sites: list[SiteGap] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch] if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "settings": self.settings, "history": self.history,
                "best_epoch": self.best_epoch, "top1": self.best.get("top1"), "seconds": self.seconds,
                "sites": [asdict(s) for s in self.sites]}


class _Taps:
    """Forward hooks that keep the outputs of named modules (the attention sites) of one model."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.out: dict[str, Tensor] = {}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: self.out.__setitem__(name, o)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _feature_loss(t: dict[str, Tensor], s: dict[str, Tensor]) -> Tensor:
    losses = [((s[k].float() - t[k].float()) ** 2).mean() / (t[k].float() ** 2).mean().clamp_min(1e-12)
              for k in t if k in s]
    return torch.stack(losses).mean() if losses else torch.zeros(())


@torch.no_grad()
def site_gaps(teacher: nn.Module, student: nn.Module, names: list[str], loader: Iterable[Any],
              max_batches: int = 4) -> dict[str, float]:
    """Relative squared error between teacher and student outputs at each site, over a few batches."""
    from ..train.engine import batch_images

    tt, ts = _Taps(teacher, names), _Taps(student, names)
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    try:
        with eval_mode(teacher), eval_mode(student):
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                x, _ = batch_images(batch)
                teacher(x)
                student(x)
                for k in names:
                    if k in tt.out and k in ts.out:
                        num[k] += float(((ts.out[k].double() - tt.out[k].double()) ** 2).sum())
                        den[k] += float((tt.out[k].double() ** 2).sum())
    finally:
        tt.close()
        ts.close()
    return {k: num[k] / den[k] if den[k] > 0 else math.nan for k in names}


def distill(teacher: nn.Module, student: nn.Module, train: Iterable[Any], val: Iterable[Any], *, epochs: int,
            lr: float = 0.01, temperature: float = 4.0, label_weight: float = 0.0, feature_weight: float = 1.0,
            sites: list[str] | None = None, amp_dtype: torch.dtype | None = None, freeze_norm_stats: bool = False,
            log: Callable[[str], None] | None = print) -> tuple[nn.Module, nn.Module, DistillReport]:
    """Train ``student`` (in place) to reproduce ``teacher``; returns ``(best deployed, student, report)``.

    Args:
        teacher: the attention model (frozen; run in eval mode).
        student: :func:`distillation_student` of its calibrated model.
        train: ``(images, labels)`` batches (augmented training images).
        val: ``(images, labels)`` batches scoring the folded student after every epoch.
        epochs: passes over ``train`` (0: only score the calibrated model).
        lr: SGD learning rate (momentum 0.9, Nesterov, cosine to 0 over all steps, no weight decay).
        temperature: softening of both logits; the KL term is scaled by ``temperature ** 2``.
        label_weight: weight of the cross-entropy on the labels (0: the teacher alone).
        feature_weight: weight of the feature term: the mean over sites of the relative squared error
            between the two models' outputs at each attention site (0: logits only).
        sites: module names present in both models whose outputs are matched (the attention sites).
        amp_dtype: autocast dtype of the forward passes (None: float32).
        freeze_norm_stats: keep the student's BatchNorm layers in eval mode (running statistics fixed).
            Off by default: with fixed statistics the student recovered less, or diverged at this learning
            rate, in the measurements of docs/stripe.md.

    Raises:
        ValueError: ``train`` yields nothing, or the two models disagree on the number of classes.
    """
    from ..train.engine import batch_images, evaluate

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    per_epoch = len(train) if hasattr(train, "__len__") else sum(1 for _ in train)  # type: ignore[arg-type]
    if epochs and per_epoch == 0:
        raise ValueError("the distillation loader yields no training images; give data with a training split")
    say = log or (lambda s: None)
    sites = list(sites or [])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    report = DistillReport(epochs, {"lr": lr, "temperature": temperature, "label_weight": label_weight,
                                    "feature_weight": feature_weight, "optimizer": "SGD momentum 0.9 nesterov, cosine",
                                    "freeze_norm_stats": freeze_norm_stats,
                                    "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none"})
    deployed = deploy_student(student)
    best = deployed
    report.history.append({"epoch": 0, **{k: v for k, v in evaluate(deployed, val).items() if k != "images"}})
    say(f"distill epoch 0 (the calibrated model): folded top-1 {report.history[0]['top1']:.2f}")
    if epochs == 0:
        return best, student, report
    steps = epochs * per_epoch
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    taps_t, taps_s = _Taps(teacher, sites), _Taps(student, sites)
    t0 = time.time()
    timing: float | None = time.perf_counter()  # the first batch is timed: how long all of them will take
    try:
        for epoch in range(1, epochs + 1):
            student.train()
            if freeze_norm_stats:  # the teacher's running statistics stay: only the weights move towards it
                for m in student.modules():
                    if isinstance(m, _BatchNorm):
                        m.eval()
            total = n = 0.0
            for batch in train:
                x, y = batch_images(batch)
                with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    with torch.no_grad():
                        t_logits = teacher(x)
                    s_logits = student(x)
                    if t_logits.shape[-1] != s_logits.shape[-1]:
                        raise ValueError(f"the teacher has {t_logits.shape[-1]} classes, the student "
                                         f"{s_logits.shape[-1]}")
                    kl = F.kl_div(F.log_softmax(s_logits.float() / temperature, dim=1),
                                  F.log_softmax(t_logits.float() / temperature, dim=1), reduction="batchmean",
                                  log_target=True) * temperature ** 2
                    loss = kl
                    if label_weight:
                        loss = loss + label_weight * F.cross_entropy(s_logits.float(), y)
                    if feature_weight and sites:
                        loss = loss + feature_weight * _feature_loss(taps_t.out, taps_s.out)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the distillation loss is {loss.item()} at epoch {epoch}; lower the "
                                             "learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * y.numel()
                n += y.numel()
                if timing is not None:
                    announce_duration(time.perf_counter() - timing, steps, "distillation", say)
                    timing = None
            deployed = deploy_student(student)
            metrics = {k: v for k, v in evaluate(deployed, val).items() if k != "images"}
            report.history.append({"epoch": epoch, "train_loss": total / max(n, 1), **metrics})
            if metrics["top1"] > report.best["top1"]:
                report.best_epoch, best = epoch, deployed
            say(f"distill epoch {epoch}/{epochs}: loss {total / max(n, 1):.4f}, folded top-1 {metrics['top1']:.2f}"
                f"{'  (best)' if report.best_epoch == epoch else ''}")
    finally:
        taps_t.close()
        taps_s.close()
    report.seconds = time.time() - t0
    return best, student, report
