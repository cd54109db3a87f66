"""ASR hosts: the layers that can absorb a per-channel scale, and their scaled forward.

ASR (Zhong et al., arXiv 2304.06345) scales a host's output channels by ``v = T(psi)``.
For a host whose output is linear in per-output-channel parameters (weight, bias),
``host(x) * v == host(x; weight * v, bias * v)``. :func:`scaled_forward` computes the
right-hand side *functionally*: it calls the host type's functional form
(``F.batch_norm``, the conv's ``_conv_forward``, ``F.linear``, ...) with scaled
tensors and the host's own buffers, and never assigns to the host, so threads, hooks,
parametrizations, ``torch.compile`` and FSDP all see an unchanged module.

A host type with a forward of its own (a re-parameterization block, a user's layer)
joins by defining ``asr_parameters()`` (the dotted names of the parameters whose dim 0
is the output channel) and ``forward_scaled(v, *args, **kwargs)`` (its forward with
those parameters multiplied by ``v``). Without ``forward_scaled`` the documented
fallback is :func:`torch.func.functional_call`, which swaps the module's attributes
for the duration of the call (PyTorch's mechanism): correct in one thread, but not for
one module run by several threads at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from ._hooks import call_with_hooks
from ._registry import Registry

__all__ = [
    "HOST_TYPES", "host_channels", "absorbing_parameters", "channel_dim", "scaled_forward",
    "scale_like", "batch_norm", "has_scaled_forward",
]

# Hosts whose output is linear in per-output-channel parameters (weight, bias), so that
# scaling those parameters scales the output channel: ``host(x; w*v, b*v) == host(x) * v``.
_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, _InstanceNorm, _ConvNd)
_CHANNEL_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
HOST_TYPES: tuple[type[nn.Module], ...] = _CHANNEL_FIRST + _CHANNEL_LAST
_ABSORBING = ("weight", "bias")


def _declares_parameters(host: nn.Module) -> bool:
    return callable(getattr(host, "asr_parameters", None))


def absorbing_parameters(host: nn.Module) -> list[str]:
    """Dotted names of the host's parameters whose dim 0 is the output channel.

    Scaling exactly these by ``v`` scales the host's output channels by ``v``. Standard
    layers use ``weight`` and ``bias`` (a parametrized ``weight`` counts: the scale
    applies to its evaluated value); a custom module declares its own by defining
    ``asr_parameters()`` (and may set ``asr_channel_dim``, default 1).
    """
    if _declares_parameters(host):
        names = list(host.asr_parameters())  # type: ignore[operator]
        if not names:
            raise ValueError(f"{type(host).__name__}.asr_parameters() returned no parameter")
        return names
    host_channels(host)
    return [n for n in _ABSORBING if isinstance(getattr(host, n, None), Tensor)]


def channel_dim(host: nn.Module) -> int:
    """The channel axis of the host's output: 1 for channel-first layers, -1 for Linear/LayerNorm/RMSNorm."""
    if _declares_parameters(host):
        return int(getattr(host, "asr_channel_dim", 1))
    return -1 if isinstance(host, _CHANNEL_LAST) else 1


def get_tensor(host: nn.Module, name: str) -> Tensor:
    """The tensor at dotted ``name`` as the host's forward sees it (a parametrized weight evaluated)."""
    prefix, _, leaf = name.rpartition(".")
    owner = host.get_submodule(prefix) if prefix else host
    value = getattr(owner, leaf, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{type(host).__name__} has no tensor {name!r}")
    return value


def host_channels(host: nn.Module) -> int:
    """Output channels of a host layer; raises ``ValueError`` if it cannot absorb a scale."""
    if _declares_parameters(host):
        names = absorbing_parameters(host)
        tensors = {}
        for n in names:
            with contextlib.suppress(AttributeError, ValueError):
                tensors[n] = get_tensor(host, n)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{type(host).__name__}.asr_parameters() names unknown parameters {missing}")
        sizes = {t.shape[0] for t in tensors.values()}
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


def scale_like(p: Tensor | None, v: Tensor) -> Tensor | None:
    """``p`` with output channel ``c`` (dim 0) multiplied by ``v[c]``, differentiably; None stays None."""
    if p is None:
        return None
    return p * v.reshape(-1, *([1] * (p.dim() - 1)))


# --- the functional forms, one per host type ----------------------------------------------
# Each mirrors the module's own forward exactly (same functional call, same buffers, same
# bookkeeping), with the affine parameters passed in instead of read from the module.


def batch_norm(bn: _BatchNorm, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``bn(x)`` with ``weight``/``bias`` in place of its own: the module's own running statistics,
    momentum (``None``: cumulative average), eps, ``num_batches_tracked`` and train/eval rules."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)  # the module's own bookkeeping, as its forward does
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    mean, var = (bn.running_mean, bn.running_var) if track else (None, None)
    if isinstance(bn, nn.SyncBatchNorm) and _needs_sync(bn, use_batch):
        from torch.nn.modules._functions import SyncBatchNorm as _SyncFn

        group = bn.process_group or torch.distributed.group.WORLD
        return _SyncFn.apply(x, weight, bias, mean, var, bn.eps, factor, group,
                             torch.distributed.get_world_size(group))
    return F.batch_norm(x, mean, var, weight, bias, use_batch, factor, bn.eps)


def _needs_sync(bn: nn.SyncBatchNorm, use_batch: bool) -> bool:
    if not (use_batch and bn.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(bn.process_group or torch.distributed.group.WORLD) > 1


def _bn(host: _BatchNorm, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    return batch_norm(host, x, w, b)


def _bn_act(host: nn.Module, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    # timm's BatchNormAct2d: its own copy of BatchNorm2d.forward, then drop and act
    return host.act(host.drop(batch_norm(host, x, w, b)))  # type: ignore[arg-type, operator]


def _conv(host: _ConvNd, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    return host._conv_forward(x, w, b)  # padding modes, groups, dilation


def _linear(host: nn.Linear, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    return F.linear(x, w, b)


def _group_norm(host: nn.GroupNorm, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    return F.group_norm(x, host.num_groups, w, b, host.eps)


def _instance_norm(host: _InstanceNorm, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    host._check_input_dim(x)
    feature_dim = x.dim() - host._get_no_batch_dim()
    if x.size(feature_dim) != host.num_features:
        raise ValueError(f"expected input's size at dim={feature_dim} to match num_features "
                         f"({host.num_features}), but got: {x.size(feature_dim)}.")
    unbatched = x.dim() == host._get_no_batch_dim()
    y = F.instance_norm(x.unsqueeze(0) if unbatched else x, host.running_mean, host.running_var, w, b,
                        host.training or not host.track_running_stats,
                        host.momentum if host.momentum is not None else 0.0, host.eps)
    return y.squeeze(0) if unbatched else y


def _layer_norm(host: nn.LayerNorm, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    return F.layer_norm(x, host.normalized_shape, w, b, host.eps)


def _rms_norm(host: nn.RMSNorm, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    return F.rms_norm(x, host.normalized_shape, w, host.eps)


_Functional = Callable[[Any, Tensor, "Tensor | None", Tensor], Tensor]


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


#: the functional form of each host type, keyed by the qualified name of the ``forward`` function the
#: host's class runs (a subclass with a forward of its own, which may do more than the base layer, is never
#: computed as the base layer), or by the class's qualified name for optional packages' layers
HOST_FORMS: Registry[_Functional] = Registry("host functional form", case_sensitive=True)
for _key, _fn in (
    (_BatchNorm.forward, _bn), (nn.SyncBatchNorm.forward, _bn), (nn.Conv1d.forward, _conv),
    (nn.Conv2d.forward, _conv), (nn.Conv3d.forward, _conv), (nn.Linear.forward, _linear),
    (nn.GroupNorm.forward, _group_norm), (_InstanceNorm.forward, _instance_norm), (nn.LayerNorm.forward, _layer_norm),
    (nn.RMSNorm.forward, _rms_norm), ("timm.layers.norm_act.BatchNormAct2d", _bn_act),
):
    HOST_FORMS.register(_key if isinstance(_key, str) else _qualname(_key), _fn)


def _functional_for(host: nn.Module) -> _Functional | None:
    cls = type(host)
    for key in (_qualname(cls.forward), _qualname(cls)):
        if key in HOST_FORMS:
            return HOST_FORMS.get(key)
    return None


def has_scaled_forward(host: nn.Module) -> bool:
    """True if :func:`scaled_forward` runs ``host`` without touching it (no ``functional_call`` fallback)."""
    return callable(getattr(host, "forward_scaled", None)) or (
        not _declares_parameters(host) and _functional_for(host) is not None
    )


def _scaled_by_functional_call(host: nn.Module, v: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    params = {name: scale_like(get_tensor(host, name), v) for name in absorbing_parameters(host)}
    return functional_call(host, params, args, kwargs)  # type: ignore[arg-type]


def scaled_forward(host: nn.Module, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``host(*args, **kwargs)`` computed with every absorbing parameter ``p`` replaced by ``p * v``.

    Equal to ``host(*args, **kwargs) * v`` along the host's channel axis (for hosts that
    are linear in those parameters), at the cost of the host alone. The host is never
    modified; its forward pre-hooks and forward hooks run as for a normal call and see
    its true parameters (the forward hook receives the scaled output).
    """
    fn = None if _declares_parameters(host) else _functional_for(host)
    if fn is not None:
        def forward(*a: Any, **kw: Any) -> Tensor:
            if kw or len(a) != 1:
                raise TypeError(f"{type(host).__name__} takes one input tensor")
            return fn(host, scale_like(host.weight, v), scale_like(getattr(host, "bias", None), v), a[0])  # type: ignore[arg-type]
    elif callable(getattr(host, "forward_scaled", None)):
        def forward(*a: Any, **kw: Any) -> Tensor:
            return host.forward_scaled(v, *a, **kw)  # type: ignore[operator]
    else:
        return _scaled_by_functional_call(host, v, args, kwargs)
    return call_with_hooks(host, forward, args, kwargs)
