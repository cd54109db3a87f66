"""Calibration on data: a trained attention model's mean gates measured, replaced and folded away.

The app part of :mod:`foldattn.calibrate` (which holds the constants and their folds): :func:`calibrate`
records each attention module's mean gate over calibration images (:func:`foldattn.stripe.record_stripes`),
replaces it (:func:`foldattn.calibrate.constant_model`) and folds it (:func:`foldattn.calibrate.fold_scales`);
:func:`evaluate` scores a model, :func:`finetune` trains it on labels. The recovery that keeps the accuracy,
distillation from the original model, is :mod:`foldattn.stripe.distillation`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._utils import eval_mode, unwrap_model
from ..calibrate import ChannelScale, FoldedLayer, constant_model, dropped_part, fold_scales
from .adapters import find_attention, select_sites
from .recorder import _device_of, _images, _to_model, record_stripes
from .results import StripeResult

__all__ = ["CalibrationReport", "calibrate", "evaluate", "finetune", "ChannelScale", "announce_duration"]

#: a recovery expected to run longer than this says how long before it goes on (seconds)
ANNOUNCE_AFTER_S = 3600.0


def _readable(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.0f} days"
    return f"{seconds / 3600:,.1f} hours" if seconds >= 3600 else f"{seconds / 60:.0f} minutes"


def announce_duration(first_batch_s: float, batches: int, what: str, log: Callable[[str], None] | None) -> float:
    """Say how long ``batches`` batches will take, from the first one's time, where that is past
    :data:`ANNOUNCE_AFTER_S` (one line on ``log``); returns the estimate in seconds."""
    total = first_batch_s * batches
    if log is not None and total > ANNOUNCE_AFTER_S:
        log(f"{what}: about {_readable(total)} expected ({batches:,} batches at {first_batch_s:.3g} s, the first "
            "one timed); Ctrl-C stops it")
    return total


def evaluate(model: nn.Module, loader: Iterable[Any], max_images: int | None = None) -> dict[str, float]:
    """Top-1 accuracy (%), mean cross-entropy and image count of ``model`` (eval mode, restored) over
    ``loader`` (``(images, labels)`` batches): :func:`foldattn.train.evaluate`."""
    from ..train.engine import evaluate as _evaluate

    return _evaluate(unwrap_model(model), loader, max_images=max_images)


def finetune(model: nn.Module, loader: Iterable[Any], epochs: int, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 1e-4, log: Callable[[str], None] | None = None) -> list[float]:
    """Train ``model`` (in place) with SGD and a cosine schedule for ``epochs``; mean loss per epoch.

    Meant for a few epochs on the folded model, to recover what replacing ``a(x)`` by its mean
    cost. Each step is :func:`foldattn.train.training_step`. A run expected (from its first batch)
    to last more than an hour says so on ``log`` (:func:`announce_duration`).
    """
    from ..train.engine import batch_images, training_step

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    dev = _device_of(model)
    losses = []
    was_training = model.training
    model.train()
    per_epoch = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    t0: float | None = time.perf_counter()
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            for batch in loader:
                x, y = batch_images(batch)
                loss, _ = training_step(model, _to_model(x, model, dev), y.to(dev), opt)
                total += float(loss) * x.shape[0]
                n += x.shape[0]
                if t0 is not None:  # after the first batch: how long all of them will take
                    if per_epoch:
                        announce_duration(time.perf_counter() - t0, epochs * per_epoch, "fine-tuning", log)
                    t0 = None
            if n == 0:
                raise ValueError("the fine-tuning loader yielded no images")
            sched.step()
            losses.append(total / n)
    finally:
        model.train(was_training)
    return losses


# --------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: per-layer fold actions, the calibration images, the stripes."""

    num_images: int
    layers: list[FoldedLayer]
    stripes: StripeResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def folded(self) -> int:
        return sum(x.action != "kept" for x in self.layers)

    def table(self) -> str:
        rows = [f"{'layer':<30} {'gate mean':>9} {'gate std':>9}  fold"]
        for x in self.layers:
            where = "kept as ChannelScale" if x.action == "kept" else f"{x.action} {x.target}"
            if x.dropped:
                where += f"; {x.dropped}"
            rows.append(f"{x.name:<30} {x.gate_mean:>9.4f} {x.gate_mean_std:>9.4f}  {where}")
        rows.append(f"{self.folded} of {len(self.layers)} attention modules folded away; "
                    f"calibrated on {self.num_images} images")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "folded": self.folded,
                "layers": [asdict(x) for x in self.layers], **self.extra}


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Iterable[str] | None = None,
    max_images: int | None = None,
    fold: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, CalibrationReport]:
    """Turn input-dependent channel attention into zero-cost constants.

    Records the mean gate ``E_x[a(x)]`` of each attention module over ``loader``
    (:func:`~foldattn.stripe.record_stripes`), replaces the module by that constant
    (:class:`ChannelScale`) and, with ``fold=True``, folds it into a neighbouring layer
    (:func:`fold_scales`).

    Args:
        model: a trained model with supported attention modules (any kind
            :func:`~foldattn.stripe.find_attention` finds).
        loader: calibration images (``(images, labels)`` or image batches).
        layers: names or glob patterns of the modules to convert (default all).
        max_images: calibration images to use (default the whole loader).
        fold: fold the constants; otherwise leave :class:`ChannelScale` modules.
        inplace: modify ``model``; by default a deep copy is converted.

    Returns:
        ``(converted model, CalibrationReport)``.
    """
    model = unwrap_model(model)
    select_sites(find_attention(model), layers)  # clear errors before any data is read
    modules = dict(model.named_modules())
    result = record_stripes(model, loader, layers=layers, max_images=max_images, max_samples=0)
    converted = constant_model(model, result, inplace=inplace)
    summaries = result.summary()
    if fold:
        example = None  # lets the dataflow be recorded where the model does not trace
        if not isinstance(loader, Iterator):  # a one-shot iterator was consumed by the recording
            batch = next(iter(loader), None)
            if batch is not None:
                example = _to_model(_images(batch)[:2], converted, _device_of(converted))
        with eval_mode(converted):
            folded = fold_scales(converted, example)
    else:
        folded = [FoldedLayer(x.name, "kept", None) for x in result.layers]
    for f in folded:
        f.gate_mean = summaries[f.name]["gate_mean"]
        f.gate_mean_std = summaries[f.name]["gate_mean_std"]
        f.dropped = dropped_part(modules[f.name]) if f.name in modules else None
    return converted, CalibrationReport(result.num_images, folded, result)
