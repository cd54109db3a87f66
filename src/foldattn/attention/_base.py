"""The contract every channel-attention module of the zoo follows.

A channel-attention module computes a gate ``a = gate(descriptor(x))`` of shape
``(N, C)`` and returns ``x * a`` (broadcast over the spatial dims). ASR feeds the
gate a learnable input ``psi`` that lives in *descriptor space* instead of a
descriptor of the data; :meth:`ChannelAttention.make_static` switches a module
into that form.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["ChannelAttention", "global_avg", "check_psi_init", "PsiInit"]

#: how ``psi`` starts: a constant, ``"random"`` (standard normal per entry, from torch's global
#: generator, so a seeded run is reproducible), or None (the module's ``default_psi_init``)
PsiInit = float | str | None


def check_psi_init(psi_init: object) -> PsiInit:
    """``psi_init`` if it is a finite number, ``"random"`` or None; ``ValueError`` otherwise."""
    if psi_init is None or psi_init == "random":
        return None if psi_init is None else "random"
    if isinstance(psi_init, bool) or not isinstance(psi_init, (int, float)) or not math.isfinite(psi_init):
        raise ValueError(f"psi_init must be a finite number, 'random' or None (the module's default), got {psi_init!r}")
    return float(psi_init)


def global_avg(x: Tensor) -> Tensor:
    """Mean over every dim after the channel dim: ``(N, C, *S) -> (N, C)``."""
    return x.flatten(2).mean(dim=2)


def _broadcast(gate: Tensor, like: Tensor) -> Tensor:
    return gate.reshape(*gate.shape, *([1] * (like.dim() - gate.dim())))


class ChannelAttention(nn.Module):
    """Base class: subclasses define :meth:`descriptor` and :meth:`gate`.

    Args:
        channels: number of channels ``C`` of the feature map the module gates.
    """

    channels: int
    psi: nn.Parameter | None
    #: where ``psi`` starts when the caller gives no value (the ASR paper: 0.1)
    default_psi_init: ClassVar[float] = 0.1
    #: False for modules that exist only in the ASR form (e.g. ``scale``): no ``X`` nor ``ASR(X) + X``
    has_classic_form: ClassVar[bool] = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.channels = channels
        self.psi = None

    # --- the two pieces a subclass provides -------------------------------------------
    def descriptor(self, x: Tensor) -> Tensor:
        """Summary of a feature map ``(N, C, *S)`` that :meth:`gate` consumes."""
        return global_avg(x)

    def gate(self, d: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Attention vector ``(N, C)`` for a descriptor batch."""
        raise NotImplementedError

    def descriptor_shape(self) -> tuple[int, ...]:
        """Shape of one descriptor (batch dim excluded); the shape of ``psi``."""
        return (self.channels,)

    # --- classic (input-dependent) form -----------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return x * _broadcast(self.gate(self.descriptor(x)), x)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__}({self.channels}) expects a feature map (N, {self.channels}, ...), "
                f"got shape {tuple(x.shape)}"
            )

    # --- ASR (static-input) form -------------------------------------------------------
    @property
    def is_static(self) -> bool:
        """True once :meth:`make_static` gave the module a learnable input."""
        return self.psi is not None

    def make_static(self, psi_init: PsiInit = None) -> ChannelAttention:
        """Give the module a learnable input ``psi`` (ASR form); returns ``self``.

        ``psi_init``: a constant, ``"random"`` (standard normal entries from torch's global
        generator) or None for :attr:`default_psi_init`.
        """
        if self.is_static:
            raise RuntimeError(f"{type(self).__name__} is already in ASR (static) form")
        psi_init = check_psi_init(psi_init)
        ref = next(self.parameters(), None)
        kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        shape = (1, *self.descriptor_shape())
        if psi_init == "random":
            psi = torch.randn(shape).to(**kw)
        else:
            psi = torch.full(shape, self.default_psi_init if psi_init is None else float(psi_init), **kw)
        self.psi = nn.Parameter(psi)
        self._on_static()
        return self

    def _on_static(self) -> None:
        """Hook: drop or freeze what the static form does not use."""

    def static_gate(self) -> Tensor:
        """The constant attention vector ``v = T(psi)`` of shape ``(C,)``."""
        if self.psi is None:
            raise RuntimeError(f"{type(self).__name__} has no psi: call make_static() first")
        return self.gate(self.psi)[0]

    def extra_repr(self) -> str:
        return f"channels={self.channels}" + (", static" if self.is_static else "")
