"""Deployment fusion: every batch-statistics norm folded into the conv or linear layer before it.

In eval mode a BatchNorm is a per-channel affine map, so ``BN(conv(x))`` is one conv with scaled
weights and a bias (:func:`foldattn.transforms.fuse_conv_bn`). This module finds the pairs on the
model's dataflow graph (:mod:`foldattn.graph`) and fuses them: ``BatchNorm1d/2d/3d`` and
``SyncBatchNorm`` after ``Conv1d/2d/3d`` (any groups, dilation, bias or none), ``BatchNorm1d``
after ``Linear``, torchvision's ``FrozenBatchNorm2d`` and timm's ``BatchNormAct2d`` /
``SyncBatchNormAct`` / ``FrozenBatchNorm(Act)2d`` (the norm goes into the conv, the activation and
dropout stay). Every norm it does not fuse is reported with the reason; nothing is skipped silently.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._utils import set_submodule
from .graph import FROZEN_NORM_TYPES, Graph, build_graph
from .transforms import fuse_conv_bn

__all__ = ["FusedPair", "LeftNorm", "FuseReport", "fuse_norms", "norm_pairs", "is_batch_norm"]

# norms with running statistics that are not torch.nn._BatchNorm subclasses (qualified names, so
# the optional packages need not be imported)
_FROZEN = FROZEN_NORM_TYPES
# timm's norm + activation layers: forward is ``act(drop(batch_norm(x)))``
_WITH_ACT = {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct",
             "timm.layers.norm_act.FrozenBatchNormAct2d"}


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def is_batch_norm(m: nn.Module) -> bool:
    """True for the norm layers this module can fuse: torch's BatchNorm family (subclasses included),
    torchvision's and timm's frozen BatchNorm, and timm's BatchNorm + activation layers."""
    return isinstance(m, _BatchNorm) or _qualname(m) in _FROZEN or _qualname(m) in _WITH_ACT


def _statistics(norm: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None] | str:
    """``(running_mean, running_var, eps, weight, bias)``, or why the norm has no fixed affine form."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if (isinstance(norm, _BatchNorm) and not norm.track_running_stats) or mean is None or var is None:
        return "it has no running statistics (track_running_stats=False): it uses batch statistics at inference"
    return mean, var, float(norm.eps), getattr(norm, "weight", None), getattr(norm, "bias", None)


def _replacement(norm: nn.Module) -> nn.Module:
    if _qualname(norm) in _WITH_ACT:  # keep what timm applies after the affine map, under the same names
        return nn.Sequential(OrderedDict(drop=norm.drop, act=norm.act))
    return nn.Identity()


@dataclass
class FusedPair:
    """One norm fused into the layer before it."""

    producer: str
    norm: str
    norm_type: str


@dataclass
class LeftNorm:
    """One norm left in place, and why."""

    norm: str
    norm_type: str
    reason: str


@dataclass
class FuseReport:
    """What :func:`fuse_norms` (``fold(..., fuse_bn=True)``) fused and what it left."""

    fused: list[FusedPair] = field(default_factory=list)
    left: list[LeftNorm] = field(default_factory=list)
    graph: str = "torch.fx trace"
    #: ``fold(fuse_bn=True)``'s earlier steps: modules' own re-parameterization ``(name, method)``, the
    #: merged sums of parallel branches, and third-party scale layers folded ``(layer, into)`` / left
    reparameterized: list[tuple[str, str]] = field(default_factory=list)
    merged: list[Any] = field(default_factory=list)
    merge_left: list[tuple[str, str]] = field(default_factory=list)
    scales: list[tuple[str, str]] = field(default_factory=list)
    scales_left: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = []
        if self.reparameterized:
            lines.append(f"re-parameterized {len(self.reparameterized)} module(s) as they declare: "
                         + ", ".join(f"{n or '<model>'}.{m}()" for n, m in self.reparameterized[:6])
                         + (" ..." if len(self.reparameterized) > 6 else ""))
        lines += [f"merged {' + '.join(m.branches)} into {m.into} ({m.kernel_size[0]}x{m.kernel_size[1]})"
                  for m in self.merged]
        lines += [f"left the branches {where}: {why}" for where, why in self.merge_left]
        lines += [f"folded the scale {s} into {into}" for s, into in self.scales]
        lines += [f"left the scale {s}: {why}" for s, why in self.scales_left]
        lines.append(f"fused {len(self.fused)} norm layer(s), left {len(self.left)} (graph: {self.graph})")
        lines += [f"  fused {p.norm} ({p.norm_type}) into {p.producer}" for p in self.fused]
        lines += [f"  left  {x.norm} ({x.norm_type}): {x.reason}" for x in self.left]
        return "\n".join(lines)


def _why_not(graph: Graph, i: int, calls: dict[str, int]) -> str | None:
    """None when node ``i`` (a norm) can be fused into its input's producer, else the reason."""
    node = graph.nodes[i]
    if calls[node.target] != 1:
        return f"it is called {calls[node.target]} times (one module shared by several places)"
    if len(node.inputs) != 1:
        return "its input does not depend on the model input" if not node.inputs else "it reads several tensors"
    src = graph.nodes[node.inputs[0]]
    if src.kind == "input":
        return "it normalises the model input (no layer before it)"
    if src.kind == "function":
        return f"its input is computed by `{src.target}`, not by a conv or linear layer (e.g. after an addition)"
    producer = graph.module(node.inputs[0])
    users = graph.users(node.inputs[0])
    if len(users) != 1:
        return f"its producer {src.target} feeds {len(users)} consumers, which would all see the fused output"
    if calls.get(src.target, 0) != 1:
        return f"its producer {src.target} is called {calls[src.target]} times"
    norm = graph.modules[node.target]
    channels = getattr(norm, "num_features", None)
    if channels is None:
        channels = norm.running_mean.numel() if getattr(norm, "running_mean", None) is not None else None
    if isinstance(producer, _ConvNd):
        if producer.transposed:
            return f"its producer {src.target} is a transposed convolution"
        if producer.out_channels != channels:
            return f"its producer {src.target} has {producer.out_channels} outputs, the norm {channels} channels"
        return None
    if isinstance(producer, nn.Linear):
        if type(norm) is not nn.BatchNorm1d:
            return f"a Linear ({src.target}) is fused only with a plain BatchNorm1d"
        if producer.out_features != channels:
            return f"its producer {src.target} has {producer.out_features} outputs, the norm {channels} channels"
        return None
    return f"its producer {src.target} is a {type(producer).__name__}, which cannot absorb a per-channel affine map"


def norm_pairs(model: nn.Module, example_inputs: Any = None) -> tuple[list[tuple[str, str]], FuseReport]:
    """``(producer, norm)`` pairs that :func:`fuse_norms` would fuse, and the report of the others.

    Read from the model's dataflow graph (a ``torch.fx`` trace, else one forward pass recorded on
    ``example_inputs`` or the model's ``default_input_size``, else the ``nn.Sequential`` order).
    """
    graph, fx_error = build_graph(model, example_inputs)
    assert graph is not None  # the nn.Sequential fallback always gives one
    report = FuseReport(graph=graph.method)
    if fx_error:
        report.graph += f" (torch.fx failed: {fx_error[:120]})"
    calls = graph.calls()
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        norm = graph.module(i)
        if norm is None or not is_batch_norm(norm) or node.target in seen:
            continue
        seen.add(node.target)
        stats = _statistics(norm)
        reason = stats if isinstance(stats, str) else _why_not(graph, i, calls)
        if reason is None:
            pairs.append((graph.nodes[node.inputs[0]].target, node.target))
        else:
            report.left.append(LeftNorm(node.target, type(norm).__name__, reason))
    named = dict(model.named_modules())
    for name, m in named.items():  # norms the forward pass never reaches
        if name and is_batch_norm(m) and name not in seen and not any(
                name.startswith(f"{n}.") for n in seen):
            report.left.append(LeftNorm(name, type(m).__name__, "the graph never calls it"))
    return pairs, report


@torch.no_grad()
def fuse_norms(model: nn.Module, example_inputs: Any = None) -> FuseReport:
    """Fuse, in place, every norm of ``model`` that directly follows a conv/linear layer.

    The fused layer gets the scaled weights and a bias (products in float64, stored in the
    layer's dtype); the norm becomes ``nn.Identity`` (timm's norm + activation layers become
    ``Sequential(drop, act)``). Exact for eval-mode inference; the result should not be trained.

    Returns:
        A :class:`FuseReport`: each fused pair, and each norm left with the reason.
    """
    pairs, report = norm_pairs(model, example_inputs)
    for producer_name, norm_name in pairs:
        layer, norm = model.get_submodule(producer_name), model.get_submodule(norm_name)
        mean, var, eps, weight, bias = _statistics(norm)  # type: ignore[misc]
        w, b = fuse_conv_bn(layer.weight, layer.bias, mean, var, eps, weight, bias)
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b.to(device=w.device))
        set_submodule(model, norm_name, _replacement(norm))
        report.fused.append(FusedPair(producer_name, norm_name, type(norm).__name__))
    return report
