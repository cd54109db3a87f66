"""The two primitives every loop of the package is made of: one training step, one evaluation.

:class:`~foldattn.train.Trainer` composes them (with accumulation, clipping, EMA, ...);
``foldattn.stripe.finetune`` and ``foldattn bench``'s training-step timing call
:func:`training_step` as it is; ``foldattn eval``, the trainer's validation and
``foldattn.stripe.evaluate`` call :func:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import eval_mode

__all__ = ["forward_loss", "backward", "optimizer_step", "training_step", "evaluate", "batch_images"]

Criterion = Callable[[Tensor, Tensor], Tensor]


class _Reducer(Protocol):
    def sum(self, values: list[float]) -> list[float]: ...


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def forward_loss(model: nn.Module, x: Tensor, y: Tensor, criterion: Criterion = F.cross_entropy,
                 amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(loss, logits)`` of one forward pass, under autocast in ``amp_dtype`` (None: full precision).
    The loss is computed in float32 from the logits."""
    with _autocast(x.device, amp_dtype):
        logits = model(x)
        loss = criterion(logits.float(), y)
    return loss, logits


def backward(loss: Tensor, scaler: torch.amp.GradScaler | None = None, scale: float = 1.0) -> None:
    """Backpropagate ``loss * scale`` (``scale``: 1 / accumulation steps), through the gradient scaler if any."""
    loss = loss * scale if scale != 1.0 else loss
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None,
                   clip_grad: float | None = None, clip_mode: str = "norm") -> None:
    """Unscale, clip (``clip_mode``: ``norm``, ``value`` or ``agc``, timm's ``dispatch_clip_grad``), step, zero."""
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if clip_mode == "norm":  # torch's own; timm's dispatcher calls the same for "norm"
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                  criterion: Criterion = F.cross_entropy, *, amp_dtype: torch.dtype | None = None,
                  scaler: torch.amp.GradScaler | None = None, clip_grad: float | None = None) -> tuple[Tensor, Tensor]:
    """One forward, backward and optimizer step; returns ``(loss, logits)`` (the loss detached)."""
    loss, logits = forward_loss(model, x, y, criterion, amp_dtype)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; training diverged (lower the learning rate, or check "
                                 "the data)")
    backward(loss, scaler)
    optimizer_step(optimizer, scaler, clip_grad)
    return loss.detach(), logits.detach()


def batch_images(batch: Any) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of a batch given as ``(images, labels, ...)``; a clear error otherwise."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], Tensor) \
            and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    raise TypeError("evaluation and training need a loader yielding (images, labels) batches, "
                    f"got {type(batch).__name__}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], amp_dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, dist: _Reducer | None = None,
             max_images: int | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) and the image count of ``model`` (eval mode, restored) over ``loader``.

    Args:
        model: the model to evaluate.
        loader: ``(images, labels)`` batches.
        amp_dtype: autocast dtype (None: full precision).
        device: where to run (default: the model's parameters' device).
        dist: sums the totals over the ranks of a process group.
        max_images: stop after this many images.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top1, top5, count
    with eval_mode(model):
        for batch in loader:
            x, y = batch_images(batch)
            if max_images is not None:
                x, y = x[: max_images - int(totals[3])], y[: max_images - int(totals[3])]
            x = x.to(device, non_blocking=True)
            if ref is not None and x.is_floating_point() and amp_dtype is None:
                x = x.to(ref.dtype)
            y = y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top.eq(y[:, None])
            totals[1] += hit[:, 0].sum().item()
            totals[2] += hit.any(dim=1).sum().item()
            totals[3] += y.numel()
            if max_images is not None and totals[3] >= max_images:
                break
    if dist is not None:
        totals = dist.sum(totals)
    if totals[3] == 0:
        raise ValueError("the evaluation loader yielded no images")
    n = totals[3]
    return {"loss": totals[0] / n, "top1": 100 * totals[1] / n, "top5": 100 * totals[2] / n, "images": n}
