"""Zero-cost conversion of a trained input-dependent attention model (the Stripe Observation
applied after training).

Zhong et al. (arXiv 2304.06345; ECCV 2024) observe that trained channel attention
produces nearly the same vector for every input. :func:`calibrate` takes that at its
word: it replaces each attention module by its *expected gate* over a calibration set,
a constant per-channel scale ``v = E_x[a(x)]`` (:class:`ChannelScale`), then folds that
scale into a neighbouring layer so the deployed model costs exactly the backbone:

- backward, into the layer that produced the attention's input when its only use is
  the attention: BatchNorm / GroupNorm affine (``gamma, beta <- v * gamma, v * beta``)
  or a conv's output channels (``W[c], b[c] <- v_c W[c], v_c b[c]``). This is this
  project's CIFAR ResNets (``block.attention`` right after ``bn2``/``bn3``) and timm's
  SE-ResNets;
- forward, into the conv that is the only consumer of the attention's output:
  ``W[:, c] <- v_c W[:, c]`` (input channels; grouped convs too). Exact because zero
  padding commutes with a per-channel scale. This is torchvision's MobileNetV3 /
  EfficientNet / RegNet, where SE sits between the depthwise conv + BN + activation
  and the 1x1 projection conv.

Where neither applies the :class:`ChannelScale` stays (one multiply). The data flow is
read from a ``torch.fx`` trace; where the model does not trace, from ``nn.Sequential``
neighbours. The fold is exact (tested); the *approximation* is replacing ``a(x)`` by
its mean.

This module is the library part: the constants and their folds, from mean gates given to it. Measuring
the gates on data, scoring, fine-tuning and distilling are the app's (:mod:`foldattn.stripe.calibration`,
:mod:`foldattn.stripe.distillation`; ``foldattn calibrate``).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._utils import set_submodule, unwrap_model
from .asr import ASR, absorbing_parameters
from .attention import DIA
from .graph import build_graph
from .transforms import scale_in_channels, scale_out_channels

__all__ = ["ChannelScale", "scale_in_channels", "FoldedLayer", "dropped_part", "constant_model", "fold_scales",
           "mean_gates", "strip_attention"]


class ChannelScale(nn.Module):
    """``x * scale`` with a constant per-channel ``scale`` on dim 1 (the calibrated attention).

    Args:
        scale: the ``(C,)`` vector, stored as a buffer.
        learnable: store it as a parameter instead (the student of :func:`foldattn.stripe.distill`).
    """

    def __init__(self, scale: Tensor, learnable: bool = False) -> None:
        super().__init__()
        if scale.dim() != 1:
            raise ValueError(f"scale must be a vector (C,), got shape {tuple(scale.shape)}")
        self.learnable = learnable
        if learnable:
            self.scale = nn.Parameter(scale.detach().clone())
        else:
            self.register_buffer("scale", scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.scale.numel():
            raise ValueError(f"ChannelScale({self.scale.numel()}) expects (N, {self.scale.numel()}, ...), "
                             f"got {tuple(x.shape)}")
        return x * self.scale.reshape(-1, *([1] * (x.dim() - 2))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


# --------------------------------------------------------------------------------------
# Replacing attention by constants
# --------------------------------------------------------------------------------------
def _check_dia_chains(model: nn.Module, names: set[str]) -> None:
    dia = [(n, m) for n, m in model.named_modules() if isinstance(m, DIA) and not m.is_static]
    chosen = {n for n, _ in dia if n in names}
    if chosen and len(chosen) != len(dia):
        missing = [n for n, _ in dia if n not in chosen]
        raise ValueError(
            f"DIA blocks share one LSTM state along each stage, so they are calibrated together; "
            f"also select {missing} (or select no layer to calibrate them all)"
        )


def mean_gates(result: Any) -> dict[str, Sequence[float]]:
    """``{module name: mean gate}`` of a stripe result (``.layers``, each with ``.name`` and ``.gate.mean``)
    or of a mapping already in that form."""
    if isinstance(result, Mapping):
        return dict(result)
    return {x.name: x.gate.mean for x in result.layers}


def constant_model(model: nn.Module, gates: Any, inplace: bool = False) -> nn.Module:
    """``model`` with each attention module named in ``gates`` replaced by :class:`ChannelScale` (its mean gate).

    ``gates``: ``{name: mean gate}``, or a :class:`foldattn.stripe.StripeResult` (its layers' mean gates).
    A project CBAM loses its spatial half (position-dependent, it has no constant form), as in ASR.
    """
    means = mean_gates(gates)
    model = unwrap_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    _check_dia_chains(model, set(means))
    available = {n for n, _ in model.named_modules()}
    for name, mean in means.items():
        if name not in available:
            raise ValueError(f"the model has no module {name!r} (the gates are of another model)")
        old = model.get_submodule(name)
        # parameter-free modules (GE without MLP) take the model's dtype and device
        ref = next(itertools.chain(old.parameters(), old.buffers(), model.parameters()), None)
        scale = torch.as_tensor(mean, dtype=ref.dtype if ref is not None else torch.float32)
        new = ChannelScale(scale.to(ref.device) if ref is not None else scale)
        if name:
            set_submodule(model, name, new)
        else:
            model = new
    return model


# --------------------------------------------------------------------------------------
# Folding the constants into neighbours
# --------------------------------------------------------------------------------------
@dataclass
class FoldedLayer:
    """Where one calibrated attention went: ``action`` is ``"into-norm"``, ``"into-conv-out"``,
    ``"into-conv-in"``, ``"into-asr-host"`` (folded into ``target``) or ``"kept"`` (a
    :class:`ChannelScale` remains)."""

    name: str
    action: str
    target: str | None
    gate_mean: float = float("nan")
    gate_mean_std: float = float("nan")
    #: what of the module a per-channel constant does not keep besides its dependence on the input
    #: (:func:`dropped_part`); ``None``: the module is a channel gate and all of it became the constant
    dropped: str | None = None


def dropped_part(module: nn.Module) -> str | None:
    """The part of an attention module that has no constant per-channel form, or ``None``.

    A CBAM (this package's or timm's ``CbamModule``) also gates every position with its spatial half,
    which depends on where a pixel is, not only on its channel: a constant cannot stand for it, so
    calibration (like ASR) drops it. SPA's pyramid pools only feed its channel gate: nothing is dropped.
    """
    if isinstance(getattr(module, "spatial", None), nn.Module):
        return "spatial gate (one value per position, no constant form): dropped"
    return None


_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm)
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _absorbs_out(name: str, m: nn.Module | None) -> tuple[str, str] | None:
    """``(action, target)`` when the output channels of ``m`` (called ``name``) can absorb a scale."""
    if isinstance(m, ASR):  # an ASR layer scales its host's parameters; the host absorbs like it does
        return ("into-asr-host", f"{name}.host")
    # exact types only: subclasses (e.g. timm's BatchNormAct2d) may apply more after the affine map
    if type(m) in _NORMS and getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None:
        return ("into-norm", name)
    if type(m) in _CONVS:
        return ("into-conv-out", name)
    return None


def _absorbs_in(m: nn.Module | None) -> bool:
    return type(m) in _CONVS and m.padding_mode == "zeros"  # type: ignore[union-attr]


@torch.no_grad()
def _fold_out(m: nn.Module, v: Tensor) -> None:
    for pname in ("weight", "bias"):
        p = getattr(m, pname, None)
        if isinstance(p, Tensor):
            p.copy_(scale_out_channels(p, v, dim=0))


@torch.no_grad()
def _fold_asr_host(m: nn.Module, v: Tensor) -> None:
    # the parameters an ASR layer itself scales by its vector (dim 0 = output channel)
    for pname in absorbing_parameters(m):
        p = m.get_parameter(pname)
        p.copy_(scale_out_channels(p, v, dim=0))


_FOLDS = {"into-norm": _fold_out, "into-conv-out": _fold_out, "into-asr-host": _fold_asr_host}


@torch.no_grad()
def _fold_in(m: nn.Module, v: Tensor) -> None:
    weight = cast(Tensor, m.weight)  # a conv's (the plan folds into the input side of convs only)
    weight.copy_(scale_in_channels(weight, v, cast(int, m.groups)))


def _plan(model: nn.Module, names: Sequence[str], example_inputs: Any = None) -> dict[str, tuple[str, str]]:
    """Where each scale can go, read from the model's dataflow graph (:mod:`foldattn.graph`): the
    layer that is its only input and whose only use it is (backward), else the conv that is its
    only reader (forward)."""
    graph, _ = build_graph(model, example_inputs, extra_leaves=(ChannelScale,))
    assert graph is not None  # the nn.Sequential fallback always gives one
    calls = graph.calls()
    plan: dict[str, tuple[str, str]] = {}
    for i in graph.module_nodes(ChannelScale):
        name = graph.nodes[i].target
        if name not in names or calls[name] != 1:
            continue
        src = graph.sole_producer(i)
        found = _absorbs_out(graph.nodes[src].target, graph.module(src)) if src is not None else None
        if found is not None:
            plan[name] = found
            continue
        dst = graph.sole_consumer(i)
        if dst is not None and _absorbs_in(graph.module(dst)):
            plan[name] = ("into-conv-in", graph.nodes[dst].target)
    return plan


def _plan_asr_classic(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A classic module inside an ASR layer ("ASR(X) + X" made by :func:`foldattn.attach`) scales the
    ASR layer's output, so the ASR host absorbs it exactly, like the ASR vector itself."""
    plan: dict[str, tuple[str, str]] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        if child == "classic" and parent_name and isinstance(model.get_submodule(parent_name), ASR):
            plan[name] = ("into-asr-host", f"{parent_name}.host")
    return plan


@torch.no_grad()
def fold_scales(model: nn.Module, example_inputs: Any = None) -> list[FoldedLayer]:
    """Fold every :class:`ChannelScale` of ``model`` (in place) into a neighbouring layer where exact.

    ``example_inputs`` (an input batch) lets the dataflow be recorded from one forward pass
    when the model does not trace. Returns one :class:`FoldedLayer` per scale, saying where it went.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, ChannelScale)]
    plan = _plan(model, names, example_inputs)
    plan.update(_plan_asr_classic(model, names))
    used: set[str] = set()
    out = []
    for name in names:
        scale: Tensor = model.get_submodule(name).scale  # type: ignore[assignment]
        action, target = plan.get(name, ("kept", None))
        if target is not None and target in used:  # never fold two scales into one layer's same side
            action, target = "kept", None
        if target is not None:
            layer = model.get_submodule(target)
            _FOLDS.get(action, _fold_in)(layer, scale)
            used.add(target)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else None
            if isinstance(parent, ASR) and child == "classic":
                parent.classic = None  # "ASR(X) + X" is now ASR(X): it folds to the plain host
            elif name:
                set_submodule(model, name, nn.Identity())
        out.append(FoldedLayer(name, action, target))
    return out


def strip_attention(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every attention module replaced by ``nn.Identity`` (the documented rewrite that gives
    architectures without an attention-free builder, such as torchvision's MobileNetV3 or timm's
    EfficientNet, the module tree of a calibrated and folded model, so its ``state_dict`` loads strictly).

    Attention modules are this package's classic ones and the known third-party classes
    (:func:`foldattn.attention.list_known_attentions`); one inside another is replaced with it.
    """
    from .graph import is_existing_attention

    model = unwrap_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if n and is_existing_attention(m) and not isinstance(m, ASR)]
    outer = [n for n in names if not any(n.startswith(f"{o}.") for o in names)]
    for name in outer:
        set_submodule(model, name, nn.Identity())
    return model
