"""The ASR layer: a host layer whose output is scaled per channel by ``v = T(psi)``.

ASR, Attention-alike Structural Re-parameterization (Zhong et al., arXiv 2304.06345;
ECCV 2024 as "Stripe Observation Guided Inference Cost-free Attention Mechanism").
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import attention as _attention
from ._utils import eval_mode
from .hosts import HOST_TYPES, absorbing_parameters, channel_dim, get_tensor, host_channels, scaled_forward
from .transforms import scale_out_channels

__all__ = ["ASR", "ChannelsLast", "HOST_TYPES", "host_channels", "absorbing_parameters"]


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

    The host is run functionally (:func:`foldattn.hosts.scaled_forward`): its type's
    functional form called with the scaled tensors and its own buffers. Nothing is ever
    assigned to the host, so one model may run in several threads, hooks on the host see
    its true parameters, and parametrized hosts (weight_norm, spectral_norm) work.

    Args:
        host: the layer whose output is scaled: BatchNorm/SyncBatchNorm, GroupNorm,
            InstanceNorm (affine), Conv1d/2d/3d, Linear, LayerNorm, RMSNorm, or any
            module that declares ``asr_parameters()`` and ``forward_scaled(v, x)``
            (see :mod:`foldattn.hosts`).
        attention: a registered attention name (see :func:`foldattn.attention.names`)
            or a :class:`~foldattn.attention.ChannelAttention` instance.
        both: also apply the classic (input-dependent) module on the output,
            "ASR(X) + X"; only the ASR part folds away.
        psi_init: where the learnable input ``psi`` starts: a constant, ``"random"`` (standard
            normal entries) or None for the attention module's ``default_psi_init`` (0.1, the
            paper's value; 1 for ``scale``).
        classic: a classic module instance for "ASR(X) + X" (instead of ``both=True``,
            which builds one from the attention's name); e.g. a DIA module of a chain.
        preserve_outputs: start from the host's own function: divide the host's absorbing
            parameters by the initial ``v0 = T(psi0)`` (:meth:`preserve_host_outputs`), so
            the layer computes what the host computed. For fine-tuning a trained model; the
            paper's from-scratch setting leaves it off.
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
        psi_init: _attention.PsiInit = None,
        classic: _attention.ChannelAttention | None = None,
        preserve_outputs: bool = False,
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
        ref = get_tensor(host, self._absorbing[0])
        self.host = host
        self.attention = module.to(device=ref.device, dtype=ref.dtype)
        self.channel_dim = channel_dim(host)
        self.classic: nn.Module | None = None
        if both and classic is None:
            classic = _attention.create(name, channels, **attention_kwargs)
        if classic is not None:
            if isinstance(classic, _attention.ChannelAttention) and not classic.has_classic_form:
                raise ValueError(f"{type(classic).__name__} has no input-dependent form, so ASR(X) + X does not exist "
                                 "for it; use it in the ASR form alone (both=False)")
            if not isinstance(classic, _attention.ChannelAttention) or classic.channels != channels:
                raise ValueError(f"classic must be a ChannelAttention for {channels} channels, got {classic!r}")
            classic = classic.to(device=ref.device, dtype=ref.dtype)
            self.classic = ChannelsLast(classic) if self.channel_dim == -1 else classic
        self.attention_name = name
        if preserve_outputs:
            self.preserve_host_outputs()

    @torch.no_grad()
    def preserve_host_outputs(self, min_abs: float = 1e-3) -> Tensor:
        """Divide the host's absorbing parameters by the current ``v`` (in place); returns that ``v``.

        Afterwards ``self(x)`` equals what the host computed before (to float rounding), so ASR
        can be attached to a trained model without changing it at step 0; training then moves
        ``psi`` and the host together. Call it after loading the trained weights into the host.

        Raises:
            ValueError: a channel of ``v`` has ``|v| < min_abs`` (dividing by it would blow the
                parameter up), the layer keeps a classic module (``both=True``: that part would
                still change the outputs), or a parameter to divide is parametrized.
        """
        if self.classic is not None:
            raise ValueError("preserve_outputs cannot make ASR(X) + X exact: the classic X still changes the "
                             "outputs; use it with ASR alone")
        with eval_mode(self.attention):
            v = self.vector().detach()
        small = int((v.abs() < min_abs).sum())
        if small or not torch.isfinite(v).all():
            raise ValueError(
                f"preserve_outputs: {small} of {v.numel()} channels of the initial vector v0 = T(psi0) are "
                f"below {min_abs:g} in magnitude (min |v0| = {v.abs().min().item():.3g}), too small to divide the "
                "host's parameters by; start psi elsewhere (psi_init=...) or leave preserve_outputs off"
            )
        for name in self._absorbing:
            owner, _, leaf = name.rpartition(".")
            module = self.host.get_submodule(owner) if owner else self.host
            if parametrize.is_parametrized(module, leaf):
                first = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[leaf])[0]
                raise ValueError(f"preserve_outputs: the host's {name!r} is parametrized "
                                 f"({type(first).__name__}); it cannot be divided in place")
            p = self.host.get_parameter(name)
            p.copy_(scale_out_channels(p, 1.0 / v.double()))  # dim 0, as in fuse()
        return v

    @property
    def channels(self) -> int:
        return self.attention.channels

    def vector(self) -> Tensor:
        """The per-channel scale ``v = T(psi)``, shape ``(C,)`` (differentiable)."""
        return self.attention.static_gate()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        y = scaled_forward(self.host, self.vector(), *args, **kwargs)
        if self.classic is not None:
            y = self.classic(y)
        return y

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The deployed replacement: the host with ``v`` folded into its parameters.

        With ``both=True`` the result is ``nn.Sequential(host, classic)``. A parametrized
        weight (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, ...) is
        evaluated in eval mode and stored as a plain parameter, scaled: the result has no
        parametrization, since ``v`` cannot be folded into the parametrization's inputs. Computed
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
        host = _plain_copy(self.host)
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


def _plain_copy(host: nn.Module) -> nn.Module:
    """A deep copy of ``host`` whose parametrized tensors are plain parameters holding their values.

    ``torch.nn.utils.parametrize`` parametrizations are evaluated in eval mode (so spectral
    norm does no power iteration) and dropped. (The deprecated hook-based
    ``torch.nn.utils.weight_norm`` cannot be deep-copied at all, a PyTorch limitation: use
    ``torch.nn.utils.parametrizations.weight_norm``.) ``remove_parametrizations`` is not
    used on the copy: a deep copy shares the original's generated ``Parametrized*`` class, and
    that function deletes the property from the class, which would break the original.
    """
    copy_ = copy.deepcopy(host)
    for m in list(copy_.modules()):
        if parametrize.is_parametrized(m):
            plist = cast(nn.ModuleDict, m.parametrizations)  # added by register_parametrization
            with eval_mode(m), torch.no_grad():
                values = {name: getattr(m, name).detach().clone() for name in plist}
            grads = {name: any(p.requires_grad for p in plist[name].parameters()) for name in values}
            m.__class__ = next(c for c in type(m).__mro__ if not getattr(c, "__module__", "").startswith(
                "torch.nn.utils.parametrize"))
            del m._modules["parametrizations"]
            for name, value in values.items():
                m.register_parameter(name, nn.Parameter(value, requires_grad=grads[name]))
    return copy_
