"""The fold algebra: small, pure functions on tensors.

Each function takes and returns tensors, computes in float64 and casts back to the
input dtype, and is tested on its own; :mod:`foldattn.fold` composes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scale_out_channels", "fuse_bn", "fuse_conv_bn"]


def _view_channels(v: Tensor, like: Tensor, dim: int = 0) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.reshape(shape)


def scale_out_channels(t: Tensor, v: Tensor, dim: int = 0) -> Tensor:
    """``t`` with output channel ``c`` (along ``dim``) multiplied by ``v[c]``.

    Folds a per-channel scale into a conv/linear weight (dim 0), a bias, or a
    norm's affine parameters. Computed in float64, returned in ``t``'s dtype.
    """
    if v.dim() != 1 or v.numel() != t.shape[dim]:
        raise ValueError(f"scale vector of shape {tuple(v.shape)} does not match dim {dim} of {tuple(t.shape)}")
    out = t.detach().double() * _view_channels(v.detach().double(), t, dim)
    return out.to(t.dtype)


def fuse_bn(
    running_mean: Tensor, running_var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as a per-channel affine map ``y = s * x + t``; returns ``(s, t)`` in float64."""
    mean, var = running_mean.detach().double(), running_var.detach().double()
    s = torch.rsqrt(var + eps)
    if weight is not None:
        s = s * weight.detach().double()
    t = -mean * s
    if bias is not None:
        t = t + bias.detach().double()
    return s, t


def fuse_conv_bn(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of one conv (or linear) equal to ``BN(conv(x))`` with BN in eval mode.

    Returned in the conv weight's dtype.
    """
    s, t = fuse_bn(running_mean, running_var, eps, bn_weight, bn_bias)
    if s.numel() != conv_weight.shape[0]:
        raise ValueError(f"BatchNorm has {s.numel()} channels, the conv {conv_weight.shape[0]} outputs")
    w = conv_weight.detach().double() * _view_channels(s, conv_weight)
    b = t if conv_bias is None else conv_bias.detach().double() * s + t
    return w.to(conv_weight.dtype), b.to(conv_weight.dtype)
