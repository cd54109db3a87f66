"""The ASR layer: a host layer whose output is scaled per channel by ``v = T(psi)``.

ASR, Attention-alike Structural Re-parameterization (Zhong et al., arXiv 2304.06345;
ECCV 2024 as "Stripe Observation Guided Inference Cost-free Attention Mechanism").
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from . import attention as _attention
from ._utils import eval_mode
from .transforms import scale_out_channels

__all__ = ["ASR", "ChannelsLast", "HOST_TYPES", "host_channels", "absorbing_parameters"]

# Hosts whose output is linear in per-output-channel parameters (weight, bias), so
# that scaling those parameters scales the output channel: ``host(x; w*v, b*v) == host(x) * v``.
_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, _InstanceNorm, _ConvNd)
_CHANNEL_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
HOST_TYPES: tuple[type[nn.Module], ...] = _CHANNEL_FIRST + _CHANNEL_LAST
_ABSORBING = ("weight", "bias")


def absorbing_parameters(host: nn.Module) -> list[str]:
    """Dotted names of the host's parameters whose dim 0 is the output channel.

    Scaling exactly these by ``v`` scales the host's output channels by ``v``. Standard
    layers use ``weight`` and ``bias``; a custom module (e.g. a multi-branch
    re-parameterizable block) declares its own by defining ``asr_parameters()``
    returning such names (and may set ``asr_channel_dim``, default 1).
    """
    custom = getattr(host, "asr_parameters", None)
    if callable(custom):
        names = list(custom())
        if not names:
            raise ValueError(f"{type(host).__name__}.asr_parameters() returned no parameter")
        return names
    host_channels(host)
    return [n for n in _ABSORBING if isinstance(getattr(host, n, None), Tensor)]


def _channel_dim(host: nn.Module) -> int:
    if callable(getattr(host, "asr_parameters", None)):
        return int(getattr(host, "asr_channel_dim", 1))
    return -1 if isinstance(host, _CHANNEL_LAST) else 1


def host_channels(host: nn.Module) -> int:
    """Output channels of a host layer; raises ``ValueError`` if it cannot absorb a scale."""
    if callable(getattr(host, "asr_parameters", None)):
        params = dict(host.named_parameters())
        names = absorbing_parameters(host)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{type(host).__name__}.asr_parameters() names unknown parameters {missing}")
        sizes = {params[n].shape[0] for n in names}
        if len(sizes) != 1:
            raise ValueError(f"{type(host).__name__}.asr_parameters() disagree on the channel count: {sorted(sizes)}")
        return sizes.pop()
    if not isinstance(host, HOST_TYPES):
        raise ValueError(
            f"{type(host).__name__} cannot absorb a per-channel scale; ASR hosts are "
            "BatchNorm, SyncBatchNorm, GroupNorm, InstanceNorm (affine), Conv1d/2d/3d, Linear, LayerNorm, RMSNorm"
        )
    if isinstance(host, _ConvNd) and host.transposed:
        raise ValueError(f"{type(host).__name__}: transposed convs are not ASR hosts (their weight is (in, out, ...))")
    weight = getattr(host, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"{type(host).__name__} has no affine weight (affine=False / elementwise_affine=False), so it cannot "
            "absorb a scale; build it with affine parameters or put ASR on another layer"
        )
    if isinstance(host, (nn.LayerNorm, nn.RMSNorm)) and weight.dim() != 1:
        raise ValueError(f"{type(host).__name__} must normalise over one (the channel) dim, got {tuple(weight.shape)}")
    return int(weight.shape[0])


class ChannelsLast(nn.Module):
    """Run a channel-first module ``(N, C, *S)`` on channel-last input ``(N, *S, C)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.movedim(-1, 1)).movedim(1, -1)


class ASR(nn.Module):
    """``host(x) * T(psi)`` along the channel axis, trained as ``host(x; w*v, b*v)``.

    The scale is applied inside the host's own per-channel parameters, which is the
    same function with the same gradients as scaling the output, costs no extra
    pass over the feature map, and makes :meth:`fuse` exact by construction.

    Args:
        host: the layer whose output is scaled: BatchNorm/SyncBatchNorm, GroupNorm,
            InstanceNorm (affine), Conv1d/2d/3d, Linear, LayerNorm, RMSNorm, or any
            module that declares ``asr_parameters()`` (see :func:`absorbing_parameters`).
        attention: a registered attention name (see :func:`foldattn.attention.names`)
            or a :class:`~foldattn.attention.ChannelAttention` instance.
        both: also apply the classic (input-dependent) module on the output,
            "ASR(X) + X"; only the ASR part folds away.
        psi_init: constant the learnable input ``psi`` starts at.
        **attention_kwargs: passed to the attention constructor.

    Example:
        >>> layer = ASR(nn.BatchNorm2d(64), "se")
        >>> host = layer.fuse()  # a BatchNorm2d with gamma*v and beta*v
    """

    def __init__(
        self,
        host: nn.Module,
        attention: str | _attention.ChannelAttention = "se",
        *,
        both: bool = False,
        psi_init: float = 0.1,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(host, ASR):
            raise ValueError("this layer already has ASR; attach ASR once per host")
        channels = host_channels(host)
        if isinstance(attention, str):
            name = attention
            module = _attention.create(attention, channels, **attention_kwargs)
        elif isinstance(attention, _attention.ChannelAttention):
            if attention_kwargs:
                raise TypeError("attention_kwargs only apply when attention is given by name")
            name, module = type(attention).__name__.lower(), attention
        else:
            raise TypeError(f"attention must be a name or a ChannelAttention, got {type(attention).__name__}")
        if module.channels != channels:
            raise ValueError(
                f"channel mismatch: the host {type(host).__name__} has {channels} output channels, "
                f"the attention module {module.channels}"
            )
        if not module.is_static:
            module.make_static(psi_init)
        self._absorbing = absorbing_parameters(host)
        ref = host.get_parameter(self._absorbing[0])
        self.host = host
        self.attention = module.to(device=ref.device, dtype=ref.dtype)
        self.channel_dim = _channel_dim(host)
        self.classic: nn.Module | None = None
        if both:
            classic = _attention.create(name, channels, **attention_kwargs).to(device=ref.device, dtype=ref.dtype)
            self.classic = ChannelsLast(classic) if self.channel_dim == -1 else classic
        self.attention_name = name

    @property
    def channels(self) -> int:
        return self.attention.channels

    def vector(self) -> Tensor:
        """The per-channel scale ``v = T(psi)``, shape ``(C,)`` (differentiable)."""
        return self.attention.static_gate()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        y = self._scaled_host(self.vector(), args, kwargs)
        if self.classic is not None:
            y = self.classic(y)
        return y

    def _scaled_host(self, v: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``host(*args, **kwargs)`` with each absorbing parameter ``p`` replaced by ``p * v``.

        The scaled tensors are put into the owning modules' ``_parameters`` for the call
        and the parameters restored afterwards: the same swap ``torch.func.functional_call``
        does, without its per-call bookkeeping (about a tenth of a millisecond per layer
        and training step on CPU, several per cent of a small model's step; see
        docs/benchmarks.md). ``functional_call`` is still used under ``torch.compile`` and
        for a parameter that is not a plain ``_parameters`` entry (e.g. parametrized).
        """
        slots = []
        for name in self._absorbing:
            prefix, _, leaf = name.rpartition(".")
            owner = self.host.get_submodule(prefix) if prefix else self.host
            p = owner._parameters.get(leaf)
            if p is None:
                slots = None
                break
            slots.append((owner, leaf, p))
        if slots is None or torch.compiler.is_compiling():
            params = {}
            for name in self._absorbing:
                p = self.host.get_parameter(name)
                params[name] = p * v.reshape(-1, *([1] * (p.dim() - 1)))
            return functional_call(self.host, params, args, kwargs)
        try:
            for owner, leaf, p in slots:
                owner._parameters[leaf] = p * v.reshape(-1, *([1] * (p.dim() - 1)))
            return self.host(*args, **kwargs)
        finally:
            for owner, leaf, p in slots:
                owner._parameters[leaf] = p

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The deployed replacement: the host with ``v`` folded into its parameters.

        With ``both=True`` the result is ``nn.Sequential(host, classic)``. Computed
        under ``no_grad`` with the attention in eval mode (modes restored), products
        in float64, cast back to each parameter's dtype. ``self`` is not modified
        (a classic module of ``both=True`` is shared with the result, not copied).
        """
        self._check_host()
        psi = self.attention.psi
        if psi is not None and not torch.isfinite(psi).all():
            raise ValueError("psi contains NaN or Inf; the training diverged, so there is nothing valid to fold")
        with eval_mode(self.attention):
            v = self.vector().detach()
        if not torch.isfinite(v).all():
            raise ValueError(f"the ASR vector contains NaN or Inf ({int((~torch.isfinite(v)).sum())} of {v.numel()})")
        host = copy.deepcopy(self.host)
        for name in self._absorbing:
            p = host.get_parameter(name)
            p.copy_(scale_out_channels(p, v))
        if self.classic is not None:
            # shared, not copied: a classic DIA stays linked to its chain
            return nn.Sequential(host, self.classic)
        return host

    def _check_host(self) -> None:
        """Refuse to fold when ``self.host`` was swapped for a layer ASR was not built for."""
        try:
            names, channels = absorbing_parameters(self.host), host_channels(self.host)
        except ValueError as e:
            raise ValueError(f"its host was replaced by a layer that cannot absorb the scale: {e}") from None
        if names != self._absorbing or channels != self.channels:
            raise ValueError(
                f"its host was replaced after ASR was attached: now {type(self.host).__name__} with {channels} "
                f"channels and parameters {names}, but ASR was built for {self.channels} channels and "
                f"{self._absorbing}; attach ASR to the new layer instead"
            )

    def extra_repr(self) -> str:
        return f"attention={self.attention_name!r}, channels={self.channels}, both={self.classic is not None}"
