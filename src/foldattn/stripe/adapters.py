"""How channel-attention modules are recognised and read: a registry of :class:`AttentionKind`
(this project's modules, torchvision's ``SqueezeExcitation``, timm's channel gates) and the
sites found in a model."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._registry import Registry
from .._utils import unwrap_model
from ..attention import ChannelAttention, known_attention_of


class NoAttentionError(ValueError):
    """The model has no channel-attention module of a supported kind."""


# --------------------------------------------------------------------------------------
# What a hook delivers: the gate and the descriptor of each call, per forward pass
# --------------------------------------------------------------------------------------
class Tap:
    """Receives the gates ``(N, C)`` and descriptors ``(N, C)`` a module produces in one forward.

    An :class:`AttentionKind`'s hooks call :meth:`add_gate` and :meth:`add_descriptor`.
    """

    def __init__(self) -> None:
        self.gates: list[Tensor] = []
        self.descriptors: list[Tensor] = []

    def add_gate(self, t: Tensor) -> None:
        self.gates.append(t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64))

    def add_descriptor(self, t: Tensor) -> None:
        self.descriptors.append(t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64))

    def take(self) -> tuple[list[Tensor], list[Tensor]]:
        """What was caught so far; empties the tap."""
        out = (self.gates, self.descriptors)
        self.gates, self.descriptors = [], []
        return out


class _Handle:
    """Removable handle for a method patched on one instance."""

    def __init__(self, module: nn.Module, attr: str) -> None:
        self.module, self.attr = module, attr

    def remove(self) -> None:
        self.module.__dict__.pop(self.attr, None)


def _pooled(x: Tensor) -> Tensor:
    return x.flatten(2).mean(dim=2)


def _descriptor_pre_hook(tap: Tap) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 3:
            tap.add_descriptor(_pooled(args[0]))

    return hook


def _output_hook(add: Callable[[Tensor], None]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor):
            add(out)

    return hook


@dataclass(frozen=True)
class AttentionKind:
    """One kind of channel-attention module the recorder knows how to tap.

    Args:
        name: short identifier, e.g. ``"torchvision.SqueezeExcitation"``.
        matches: ``matches(module) -> bool``.
        attach: ``attach(module, tap) -> handles``: hooks that call ``tap.add_gate``
            with the gate ``(N, C, ...)`` and ``tap.add_descriptor`` with the pooled input.
        channels: ``channels(module) -> C``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    attach: Callable[[nn.Module, Tap], list[Any]]
    channels: Callable[[nn.Module], int]


KINDS: Registry[AttentionKind] = Registry("attention kind", case_sensitive=True)
_ORDER: list[str] = []  # kinds are tried in registration order (a subclass kind before its base's)


def register_kind(kind: AttentionKind) -> AttentionKind:
    """Add a kind of attention module to the search (kinds are tried in registration order)."""
    if kind.name in KINDS:
        raise ValueError(f"attention kind {kind.name!r} is already registered")
    KINDS.register(kind.name, kind)
    _ORDER.append(kind.name)
    return kind


def unregister_kind(name: str) -> AttentionKind:
    """Remove a registered kind (plug-ins, tests); returns it."""
    kind = KINDS.unregister(name)
    _ORDER.remove(name)
    return kind


def list_attention_kinds() -> list[str]:
    """Names of the kinds of attention module :func:`find_attention` searches for, in search order."""
    return list(_ORDER)


def get_attention_kind(name: str) -> AttentionKind:
    """The kind registered as ``name``."""
    return KINDS.get(name)


# the package-wide naming; the short names are foldattn 0.1's
register_attention_kind = register_kind
unregister_attention_kind = unregister_kind
attention_kinds = list_attention_kinds


def _kinds() -> list[AttentionKind]:
    return [KINDS.get(n) for n in _ORDER]


# --- this project's classic ChannelAttention -------------------------------------------
def _is_foldattn(m: nn.Module) -> bool:
    return isinstance(m, ChannelAttention) and not m.is_static


def _attach_foldattn(m: nn.Module, tap: Tap) -> list[Any]:
    original = type(cast(ChannelAttention, m)).gate.__get__(m)  # the class's gate, bound to this instance

    def gate(d: Tensor) -> Tensor:
        a = original(d)
        tap.add_gate(a)
        return a

    m.__dict__["gate"] = gate  # instance attribute shadows the method until removed
    return [_Handle(m, "gate"), m.register_forward_pre_hook(_descriptor_pre_hook(tap))]


register_kind(AttentionKind("foldattn", _is_foldattn, _attach_foldattn,
                            lambda m: int(cast(ChannelAttention, m).channels)))


# --- torchvision SqueezeExcitation (MobileNetV3, EfficientNet, RegNet) -------------------
def _is_torchvision_se(m: nn.Module) -> bool:
    entry = known_attention_of(m)
    return entry is not None and entry.recorded == "torchvision-se"


def _attach_torchvision_se(m: nn.Module, tap: Tap) -> list[Any]:
    return [
        cast(nn.Module, m.avgpool).register_forward_hook(_output_hook(tap.add_descriptor)),
        cast(nn.Module, m.scale_activation).register_forward_hook(_output_hook(tap.add_gate)),
    ]


register_kind(AttentionKind(
    "torchvision.SqueezeExcitation", _is_torchvision_se, _attach_torchvision_se,
    lambda m: int(cast(nn.Conv2d, m.fc2).out_channels)
))


# --- timm channel gates: the module's `gate` submodule holds the attention ---------------
def _is_timm_gate(m: nn.Module) -> bool:
    # the known-attention list (foldattn.attention) says which timm classes apply their `gate`
    entry = known_attention_of(m)
    return entry is not None and entry.recorded == "timm-gate" and isinstance(getattr(m, "gate", None), nn.Module)


def _attach_timm_gate(m: nn.Module, tap: Tap) -> list[Any]:
    return [
        m.register_forward_pre_hook(_descriptor_pre_hook(tap)),
        cast(nn.Module, m.gate).register_forward_hook(_output_hook(tap.add_gate)),  # _is_timm_gate checked it
    ]


def _timm_channels(m: nn.Module) -> int:
    for attr in ("fc2", "fc", "conv_expand"):
        sub = getattr(m, attr, None)
        if isinstance(sub, nn.Conv2d):
            return int(sub.out_channels)
    return -1  # ECA: only known once it runs


register_kind(AttentionKind("timm (SEModule, EffectiveSEModule, EcaModule, CecaModule, CBAM ChannelAttn, "
                            "EfficientNet SqueezeExcite)", _is_timm_gate, _attach_timm_gate, _timm_channels))


# --------------------------------------------------------------------------------------
# Finding and selecting the modules
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a model: its dotted name, the module, and its kind."""

    name: str
    module: nn.Module
    kind: AttentionKind


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every supported channel-attention module of ``model``, in module order.

    ASR layers (static attention, constant by construction) are not included.

    Raises:
        NoAttentionError: none found; the message lists the kinds searched for.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    sites = []
    for name, m in unwrap_model(model).named_modules():
        kind = next((k for k in _kinds() if k.matches(m)), None)
        if kind is not None:
            sites.append(AttentionSite(name, m, kind))
    if not sites:
        raise NoAttentionError(
            f"no input-dependent channel-attention module found in {type(model).__name__}; searched for: "
            + "; ".join(attention_kinds())
            + ". (ASR layers are constant by construction and are not recorded; register another kind "
            "with foldattn.stripe.register_kind.)"
        )
    return sites


def select_sites(sites: Sequence[AttentionSite], layers: Iterable[str] | None) -> list[AttentionSite]:
    """The sites whose name equals, or matches as a glob pattern (``layer1.*``), one of ``layers``.

    Raises:
        ValueError: a pattern matches nothing (the available names are listed).
    """
    if layers is None:
        return list(sites)
    patterns = [p for p in layers if p]
    if not patterns:
        return list(sites)
    names = [s.name for s in sites]
    unmatched = [p for p in patterns if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(
            f"layer name(s) {unmatched} match no attention module; available: {', '.join(names)} "
            "(exact names or glob patterns such as 'layer2.*')"
        )
    return [s for s in sites if any(s.name == p or fnmatch.fnmatchcase(s.name, p) for p in patterns)]
