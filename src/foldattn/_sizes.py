"""The memory a batch and its forward pass will take, estimated before anything is allocated (private).

A batch's size comes from options (``--batch-size``, ``bench --throughput-batch``) and from files
(the image size a checkpoint records); each is bounded alone (:mod:`foldattn._argtypes`, the
checkpoint's structure check), but their product is what is allocated: a recorded 8192x8192
image made ``fold``'s verify batch 19 GB. :func:`check_forward` multiplies them out first: the
input batch's bytes, plus the activations of one forward pass traced on the ``meta`` device
(shapes only: no memory, no arithmetic), and refuses in one line past :func:`memory_limit`,
naming what to pass instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MAX_BATCH_BYTES", "TooLarge", "memory_limit", "leaf_output_bytes", "activation_bytes", "combine",
           "check_forward", "check_bytes", "gib"]

#: the most one command's batch and its forward may take, on any machine (less where the machine has less)
MAX_BATCH_BYTES = 16 << 30


class TooLarge(ValueError):
    """A batch (and its forward) would take more memory than :func:`memory_limit` allows."""


def gib(n: float) -> str:
    """``n`` bytes, readably."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def memory_limit(device: torch.device | str | None = None) -> tuple[int, str]:
    """``(bytes, why)``: :data:`MAX_BATCH_BYTES`, or half this machine's memory (90 % of the GPU's memory on
    CUDA) where that is less: the rest is the model, its copies and everything else running."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        total, where = int(torch.cuda.get_device_properties(dev).total_memory * 0.9), "90% of the GPU's memory"
    else:
        mem = _physical_memory()
        total, where = (mem // 2, "half this machine's memory") if mem else (MAX_BATCH_BYTES, "")
    if total >= MAX_BATCH_BYTES:
        return MAX_BATCH_BYTES, "foldattn's limit for one batch"
    return total, where


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def leaf_output_bytes(model: nn.Module, sample_shape: Sequence[int], batch: int) -> list[int] | None:
    """The bytes of every leaf module's output in ``model(x)``, ``x`` of shape ``(batch, *sample_shape)``.

    The forward pass runs on the ``meta`` device (the parameters and buffers swapped for meta
    tensors of the same shapes by :func:`torch.func.functional_call`): it costs neither memory nor
    arithmetic. None when the model cannot run on the meta device (data-dependent Python).
    """
    outputs: list[int] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        outputs.append(sum(t.numel() * t.element_size() for t in _tensors(out)))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        state = {k: torch.empty_like(v, device="meta") for k, v in
                 [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.empty((batch, *sample_shape), device="meta", dtype=dtype)
        with torch.no_grad():
            torch.func.functional_call(model, state, (x,), strict=False)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    return outputs


def activation_bytes(model: nn.Module, sample_shape: Sequence[int], batch: int, *,
                     training: bool = False) -> int | None:
    """Estimated bytes of the activations of ``model(x)`` (:func:`leaf_output_bytes`): their sum with
    ``training`` (all kept for the backward pass), else three times the largest (a layer's input, its
    output and a residual branch alive together). None when the model cannot run on the meta device."""
    outputs = leaf_output_bytes(model, sample_shape, batch)
    if outputs is None:
        return None
    return combine(outputs, training)


def combine(outputs: Sequence[int], training: bool) -> int:
    """The activation estimate of :func:`activation_bytes` from the leaf outputs' bytes."""
    if not outputs:
        return 0
    return sum(outputs) if training else 3 * max(outputs)


def check_bytes(need: int, what: str, hint: str, device: torch.device | str | None = None) -> None:
    """Refuse (:class:`TooLarge`, one line) ``need`` bytes past :func:`memory_limit`, saying ``hint``."""
    limit, why = memory_limit(device)
    if need > limit:
        raise TooLarge(f"{what} would take about {gib(need)}, over the limit of {gib(limit)}"
                       f"{f' ({why})' if why else ''}; {hint}")


def check_forward(model: nn.Module | None, sample_shape: Sequence[int], batch: int, what: str, hint: str, *,
                  device: torch.device | str | None = None, training: bool = False, copies: int = 1,
                  bytes_per_value: int = 4) -> int:
    """Refuse a batch of ``batch`` inputs of ``sample_shape`` whose bytes, plus the activations of
    ``copies`` forward passes of ``model`` (estimated, :func:`activation_bytes`), pass
    :func:`memory_limit`; before anything of that size is allocated. Returns the estimate (bytes).

    Raises:
        TooLarge: a ValueError naming ``what``, the estimate, the limit and ``hint`` (what to lower).
    """
    sample = math.prod(int(s) for s in sample_shape)
    need = batch * sample * bytes_per_value
    shape = f"{batch} x {'x'.join(str(int(s)) for s in sample_shape)}"
    check_bytes(need, f"{what} ({shape} values)", hint, device)  # the input alone: no need to trace
    if model is not None:
        acts = activation_bytes(model, sample_shape, batch, training=training)
        if acts:
            need += copies * acts
            check_bytes(need, f"{what} ({shape} values) and its forward pass's activations", hint, device)
    return need
