"""Deployment fusion: every batch-statistics norm folded into the conv or linear layer before it.

In eval mode a BatchNorm is a per-channel affine map, so ``BN(conv(x))`` is one conv with scaled
weights and a bias (:func:`foldattn.transforms.fuse_conv_bn`). This module finds the pairs on the
model's dataflow graph (:mod:`foldattn.graph`) and fuses them: ``BatchNorm1d/2d/3d`` and
``SyncBatchNorm`` after ``Conv1d/2d/3d`` (any groups, dilation, bias or none), ``BatchNorm1d``
after ``Linear``, torchvision's ``FrozenBatchNorm2d`` and timm's ``BatchNormAct2d`` /
``SyncBatchNormAct`` / ``FrozenBatchNorm(Act)2d`` (the norm goes into the conv, the activation and
dropout stay). Every norm it does not fuse is reported with the reason; nothing is skipped silently.

A pair is fused only where the fusion is proven exact. The graph proves that the norm reads the
producer's output and nothing else does; the channel axes are proven either by the types (a
``BatchNorm2d``/``BatchNorm3d`` accepts only 4-D/5-D input, so a ``Conv2d``/``Conv3d`` before it ran
on a batch and wrote its channels on axis 1) or, for the norms that accept several ranks
(``BatchNorm1d``, ``SyncBatchNorm``, the frozen BatchNorms) and for every ``Linear``, by the shapes
recorded on one forward pass of example inputs: a ``Linear`` writes its features on the last axis,
so ``Linear -> BatchNorm1d`` is exact on ``(N, F)`` and wrong on ``(N, L, F)``. Without example
inputs such a pair is left with the reason "input shape unknown". A pair where either module has
hooks is left too: the fusion would remove the norm's hooks or change what the producer's see.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._hooks import hook_kinds
from ._utils import eval_mode, first_line, set_submodule
from .graph import FROZEN_NORM_TYPES, Graph, build_graph
from .transforms import fuse_conv_bn

__all__ = ["FusedPair", "LeftNorm", "FuseReport", "fuse_norms", "norm_pairs", "is_batch_norm"]

# norms with running statistics that are not torch.nn._BatchNorm subclasses (qualified names, so
# the optional packages need not be imported)
_FROZEN = FROZEN_NORM_TYPES
# timm's norm + activation layers: forward is ``act(drop(batch_norm(x)))``
_WITH_ACT = {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct",
             "timm.layers.norm_act.FrozenBatchNormAct2d"}
# norms that accept one input rank only (exact types: a subclass may accept others): a ConvNd before
# one of rank N + 2 ran on a batch, so its channels are on axis 1 where the norm normalises
_FIXED_RANK = {"torch.nn.modules.batchnorm.BatchNorm2d": 4, "torch.nn.modules.batchnorm.BatchNorm3d": 5,
               "timm.layers.norm_act.BatchNormAct2d": 4}
#: the reason given where the fusion depends on shapes nobody recorded
SHAPE_UNKNOWN = "input shape unknown"


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def is_batch_norm(m: nn.Module) -> bool:
    """True for the norm layers this module can fuse: torch's BatchNorm family (subclasses included),
    torchvision's and timm's frozen BatchNorm, and timm's BatchNorm + activation layers."""
    return isinstance(m, _BatchNorm) or _qualname(m) in _FROZEN or _qualname(m) in _WITH_ACT


#: ``(running_mean, running_var, eps, weight, bias)`` of a norm layer
_Statistics = tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]


def _statistics(norm: nn.Module) -> _Statistics | str:
    """``(running_mean, running_var, eps, weight, bias)``, or why the norm has no fixed affine form."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if (isinstance(norm, _BatchNorm) and not norm.track_running_stats) or mean is None or var is None:
        return "it has no running statistics (track_running_stats=False): it uses batch statistics at inference"
    return mean, var, float(cast(float, norm.eps)), getattr(norm, "weight", None), getattr(norm, "bias", None)


def _replacement(norm: nn.Module) -> nn.Module:
    if _qualname(norm) in _WITH_ACT:  # keep what timm applies after the affine map, under the same names
        return nn.Sequential(OrderedDict(drop=cast(nn.Module, norm.drop), act=cast(nn.Module, norm.act)))
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


def _hooks_named(m: nn.Module) -> str:
    return "/".join(hook_kinds(m))


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
    channels = _channels(norm)
    if isinstance(producer, _ConvNd):
        if producer.transposed:
            return f"its producer {src.target} is a transposed convolution"
        if producer.out_channels != channels:
            return f"its producer {src.target} has {producer.out_channels} outputs, the norm {channels} channels"
    elif isinstance(producer, nn.Linear):
        if type(norm) is not nn.BatchNorm1d:
            return f"a Linear ({src.target}) is fused only with a plain BatchNorm1d"
        if producer.out_features != channels:
            return f"its producer {src.target} has {producer.out_features} outputs, the norm {channels} channels"
    else:
        return (f"its producer {src.target} is a {type(producer).__name__}, which cannot absorb a per-channel "
                "affine map")
    # hooks see what the module computes: fusing would drop the norm's and change what the producer's see
    if hook_kinds(norm):
        return f"it has {_hooks_named(norm)} hook(s), which the fusion would remove"
    if hook_kinds(producer):
        return f"its producer {src.target} has {_hooks_named(producer)} hook(s), which would see the fused output"
    return None


def _channels(norm: nn.Module) -> int | None:
    channels = getattr(norm, "num_features", None)
    if channels is None and getattr(norm, "running_mean", None) is not None:
        channels = cast(Tensor, norm.running_mean).numel()
    return channels


def _axes_proven(producer: nn.Module, norm: nn.Module) -> bool:
    """Whether the types alone prove that the norm normalises the producer's channel axis."""
    if _channels(norm) == 1 and isinstance(norm, _BatchNorm):
        return True  # one channel: the same affine map for every element, wherever the axis is
    if isinstance(producer, _ConvNd):
        return _FIXED_RANK.get(_qualname(norm)) == len(producer.kernel_size) + 2
    return False  # a Linear writes its features on the last axis, which only a 2-D input makes axis 1


@dataclass
class _Seen:
    """What one forward pass showed of a producer -> norm pair."""

    out: Tensor | None = None  # the producer's output
    version: int = 0  # its version counter when returned (an in-place change bumps it)
    norm_in: Tensor | None = None
    same: bool = False  # the norm read exactly that tensor, unchanged
    norm_out: tuple[int, ...] | None = None
    calls: int = 0


def _record(model: nn.Module, example_inputs: Any, pairs: list[tuple[str, str]]) -> dict[str, _Seen]:
    """Run ``model`` once (eval mode, no grad) on ``example_inputs``; what each pair's modules saw, by norm."""
    seen = {norm: _Seen() for _, norm in pairs}
    thread = threading.get_ident()  # another thread running the model meanwhile is not recorded

    def producer_hook(norm: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if threading.get_ident() == thread and isinstance(out, Tensor):
                seen[norm].out, seen[norm].version = out, out._version
        return hook

    def norm_pre(norm: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if threading.get_ident() == thread:
                s = seen[norm]
                s.calls += 1
                s.norm_in = args[0] if len(args) == 1 and isinstance(args[0], Tensor) else None
                s.same = s.out is not None and s.norm_in is s.out and s.out._version == s.version
        return hook

    def norm_post(norm: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if threading.get_ident() == thread and isinstance(out, Tensor):
                seen[norm].norm_out = tuple(out.shape)
        return hook

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    handles = []
    try:
        for producer, norm in pairs:
            handles.append(model.get_submodule(producer).register_forward_hook(producer_hook(norm)))
            handles.append(model.get_submodule(norm).register_forward_pre_hook(norm_pre(norm)))
            handles.append(model.get_submodule(norm).register_forward_hook(norm_post(norm)))
        with torch.no_grad(), eval_mode(model):
            model(*args)
    finally:
        for h in handles:
            h.remove()
    for s in seen.values():
        s.out = None  # the activations are not kept
    return seen


def _shape_reason(producer_name: str, producer: nn.Module, norm: nn.Module, s: _Seen) -> str | None:
    """None when the recorded pass proves the fusion exact, else why not."""
    if s.calls != 1 or s.norm_in is None or s.norm_out is None:
        return f"the recorded forward pass on example_inputs called it {s.calls} times, not once on one tensor"
    if not s.same:
        return (f"in the recorded forward pass its input was not exactly {producer_name}'s output (replaced or "
                "changed in place between them)")
    shape = tuple(s.norm_in.shape)
    rank = len(shape)
    if s.norm_out != shape:
        return f"it turns a {shape} tensor into {s.norm_out} (it broadcasts), which the fused layer would not"
    # a Linear writes its features on the last axis; a ConvNd its channels on axis 1, or 0 when unbatched
    spatial = len(producer.kernel_size) if isinstance(producer, _ConvNd) else 0
    axis = rank - 1 if isinstance(producer, nn.Linear) else (1 if rank == spatial + 2 else 0)
    norm_axis = 1 if isinstance(norm, _BatchNorm) else rank - 3  # frozen norms: (1, C, 1, 1) broadcast
    if _channels(norm) == 1 or axis == norm_axis:
        return None
    return (f"it normalises axis {norm_axis} of the {shape} output of {producer_name}, whose channels are on axis "
            f"{axis} (e.g. a BatchNorm1d on (N, L, F)), so it is not a per-channel map of {producer_name}")


def _default_inputs(model: nn.Module) -> Any:
    """A zero batch of the model's ``default_input_size`` (foldattn's models declare it), or None."""
    size = getattr(model, "default_input_size", None)
    if size is None:
        return None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.zeros(1, *size, dtype=ref.dtype if ref is not None else None,
                       device=ref.device if ref is not None else None)


def _sequential_reason(model: nn.Module, producer: str, norm: str) -> str | None:
    """On a graph read from ``nn.Sequential`` order: why the pair is not proven adjacent (a container
    on the way overrides ``forward``, so the order of its layers need not be its dataflow)."""
    a, b = producer.split("."), norm.split(".")
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    paths = {".".join(a[:k]) for k in range(common, len(a))} | {".".join(b[:k]) for k in range(common, len(b))}
    for path in sorted(paths):
        container = model.get_submodule(path) if path else model
        if isinstance(container, nn.Sequential) and type(container).forward is not nn.Sequential.forward:
            return (f"it sits in {path or 'the model'} ({type(container).__name__}), a Sequential with its own "
                    "forward, so its order is not proven to be its dataflow (torch.fx cannot trace the model; "
                    "pass example_inputs=)")
    return None


def norm_pairs(model: nn.Module, example_inputs: Any = None) -> tuple[list[tuple[str, str]], FuseReport]:
    """``(producer, norm)`` pairs that :func:`fuse_norms` would fuse, and the report of the others.

    Read from the model's dataflow graph (a ``torch.fx`` trace, else one forward pass recorded on
    ``example_inputs`` or the model's ``default_input_size``, else the ``nn.Sequential`` order).
    A pair whose exactness depends on shapes the types do not fix (every ``Linear -> BatchNorm1d``,
    ``Conv1d -> BatchNorm1d``, ``SyncBatchNorm``, frozen BatchNorms) is checked on one eval-mode
    forward pass of ``example_inputs`` (or of the ``default_input_size`` batch); with neither it is
    left, with the reason ``"input shape unknown"``.

    Raises:
        ValueError: the model cannot run on the given ``example_inputs``.
    """
    graph, fx_error = build_graph(model, example_inputs)
    assert graph is not None  # the nn.Sequential fallback always gives one
    report = FuseReport(graph=graph.method)
    if fx_error:
        report.graph += f" (torch.fx failed: {fx_error[:120]})"
    calls = graph.calls()
    candidates: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}
    seen: set[str] = set()
    order: list[tuple[str, nn.Module]] = []
    for i, node in enumerate(graph.nodes):
        norm = graph.module(i)
        if norm is None or not is_batch_norm(norm) or node.target in seen:
            continue
        seen.add(node.target)
        order.append((node.target, norm))
        stats = _statistics(norm)
        reason = stats if isinstance(stats, str) else _why_not(graph, i, calls)
        producer = graph.nodes[node.inputs[0]].target if reason is None else ""
        if reason is None and graph.method.startswith("nn.Sequential order"):
            reason = _sequential_reason(model, producer, node.target)
        if reason is None:
            candidates.append((producer, node.target))
        else:
            reasons[node.target] = reason
    unproven = [(p, n) for p, n in candidates
                if not _axes_proven(model.get_submodule(p), model.get_submodule(n))]
    if unproven:
        inputs = example_inputs if example_inputs is not None else _default_inputs(model)
        recorded: dict[str, _Seen] | None = None
        if inputs is not None:
            try:
                recorded = _record(model, inputs, unproven)
            except Exception as e:
                if example_inputs is not None:
                    raise ValueError(f"the model cannot run on example_inputs to record the shapes of its norms: "
                                     f"{first_line(e)}; pass inputs shaped like the model's real inputs") from None
        for p, n in unproven:
            if recorded is None:
                reasons[n] = (f"{SHAPE_UNKNOWN}: whether it normalises the channels of {p} depends on the shape "
                              "of its input (e.g. Linear -> BatchNorm1d is exact on (N, F) only); pass "
                              "example_inputs= to prove it")
            else:
                why = _shape_reason(p, model.get_submodule(p), model.get_submodule(n), recorded[n])
                if why is not None:
                    reasons[n] = why
    pairs = [(p, n) for p, n in candidates if n not in reasons]
    report.left += [LeftNorm(name, type(norm).__name__, reasons[name]) for name, norm in order if name in reasons]
    named = dict(model.named_modules())
    for name, m in named.items():  # norms the forward pass never reaches
        if name and is_batch_norm(m) and name not in seen and not any(
                name.startswith(f"{n}.") for n in seen):
            report.left.append(LeftNorm(name, type(m).__name__, "the graph never calls it"))
    return pairs, report


@torch.no_grad()
def fuse_norms(model: nn.Module, example_inputs: Any = None) -> FuseReport:
    """Fuse, in place, every norm of ``model`` that directly follows a conv/linear layer, where exact.

    The fused layer gets the scaled weights and a bias (products in float64, stored in the
    layer's dtype); the norm becomes ``nn.Identity`` (timm's norm + activation layers become
    ``Sequential(drop, act)``). Exact for eval-mode inference; the result should not be trained.
    ``example_inputs`` (a tensor or a tuple of positional inputs) prove the shapes where the
    exactness depends on them (see :func:`norm_pairs`); without them, and without the model's
    ``default_input_size``, such pairs are left with the reason "input shape unknown".

    Returns:
        A :class:`FuseReport`: each fused pair, and each norm left with the reason.

    Raises:
        ValueError: the model cannot run on the given ``example_inputs``.
    """
    pairs, report = norm_pairs(model, example_inputs)
    for producer_name, norm_name in pairs:
        # norm_pairs keeps conv/linear producers, and norms with running statistics
        layer, norm = cast("_ConvNd | nn.Linear", model.get_submodule(producer_name)), model.get_submodule(norm_name)
        mean, var, eps, weight, bias = cast(_Statistics, _statistics(norm))
        w, b = fuse_conv_bn(layer.weight, layer.bias, mean, var, eps, weight, bias)
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b.to(device=w.device))
        set_submodule(model, norm_name, _replacement(norm))
        report.fused.append(FusedPair(producer_name, norm_name, type(norm).__name__))
    return report
