"""What a model's ASR layers are, and what the training and deployed forms cost."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ._utils import eval_mode, unwrap_model
from .fold import asr_layers, fold

__all__ = ["summary", "Summary", "ASRLayerInfo", "count_params", "count_flops", "latency_ms"]


@dataclass(frozen=True)
class ASRLayerInfo:
    """One ASR layer: where it sits and the statistics of its vector ``v``."""

    name: str
    host: str
    attention: str
    channels: int
    psi_shape: tuple[int, ...]
    v_min: float
    v_mean: float
    v_max: float


@dataclass
class Summary:
    """Parameters and FLOPs of the training and deployed forms, and the ASR layers."""

    layers: list[ASRLayerInfo] = field(default_factory=list)
    params_train: int = 0
    params_deploy: int = 0
    flops_train: int | None = None
    flops_deploy: int | None = None
    #: what the FLOPs were counted on, e.g. "example_inputs (2, 3, 32, 32)"; "" if not counted
    flops_inputs: str = ""

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'host':<14} {'attention':<9} {'C':>5} {'psi':<12} {'v min/mean/max':>22}"]
        for r in self.layers:
            stats = f"{r.v_min:.3f}/{r.v_mean:.3f}/{r.v_max:.3f}"
            lines.append(
                f"{r.name:<28} {r.host:<14} {r.attention:<9} {r.channels:>5} {r.psi_shape!s:<12} {stats:>22}"
            )
        lines.append(f"ASR layers: {len(self.layers)}")
        lines.append(f"parameters: training {self.params_train:,}  deployed {self.params_deploy:,}")
        if self.flops_train is not None:
            lines.append(
                f"FLOPs (matmul/conv, on {self.flops_inputs}): training {self.flops_train:,}  "
                f"deployed {self.flops_deploy:,}"
            )
        else:
            lines.append(
                "FLOPs: not counted (the model has no default_input_size); "
                "pass example_inputs, a batch shaped like its input: summary(model, x)"
            )
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> int:
    """FLOPs of one eval-mode forward, as counted by ``torch.utils.flop_counter``.

    That counter counts matrix multiplications and convolutions (2 per
    multiply-add) and ignores elementwise work (norms, activations, the gating
    products), which is why attention's real cost exceeds its FLOPs. Counted on a copy
    whose parameters need no grad: the counter's module tracker fails on views of a
    parameter that requires grad (such as ``psi``) under ``no_grad``.
    """
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False) as counter:
        model(*args)
    return int(counter.get_total_flops())


@torch.inference_mode()
def latency_ms(model: nn.Module, example: Tensor, repeats: int = 50, warmup: int = 3) -> float:
    """Median wall time of one eval-mode forward on ``example``, in milliseconds (a quick figure for
    reports; ``foldattn bench`` is the careful, interleaved measurement). Restores the modes."""
    with eval_mode(model):
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _shapes(inputs: Tensor | Sequence[Tensor]) -> str:
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in args)


def _default_inputs(model: nn.Module) -> Tensor | None:
    """A zero batch of one ``default_input_size`` input (the foldattn models declare it), or None."""
    size = getattr(model, "default_input_size", None)
    if size is None:
        return None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is None:
        return torch.zeros(1, *size)
    return torch.zeros(1, *size, dtype=ref.dtype, device=ref.device)


def summary(model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | None = None) -> Summary:
    """Describe ``model``'s ASR layers and compare its training and deployed forms.

    Args:
        model: a model with (or without) ASR layers; it is not modified.
        example_inputs: FLOPs of both forms are counted on it. By default on a batch of
            one zero input of the model's ``default_input_size`` (every foldattn model
            has one; FLOPs do not depend on the values); a model without that
            attribute gets no FLOPs (``None``) unless example inputs are given.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary expects an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    rows = []
    for name, layer in asr_layers(model):
        with torch.no_grad(), eval_mode(layer):
            v = layer.vector().detach().double()
        psi = layer.attention.psi
        rows.append(
            ASRLayerInfo(
                name=name,
                host=type(layer.host).__name__,
                attention=layer.attention_name,
                channels=layer.channels,
                psi_shape=tuple(psi.shape) if psi is not None else (),
                v_min=v.min().item(),
                v_mean=v.mean().item(),
                v_max=v.max().item(),
            )
        )
    deployed = fold(model) if rows else model
    result = Summary(rows, count_params(model), count_params(deployed))
    where = "example_inputs"
    if example_inputs is None:
        example_inputs, where = _default_inputs(model), "default_input_size"
    if example_inputs is not None:
        result.flops_train = count_flops(model, example_inputs)
        result.flops_deploy = count_flops(deployed, example_inputs)
        result.flops_inputs = f"{where} {_shapes(example_inputs)}"
    return result
