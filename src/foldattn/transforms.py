"""The fold algebra: small, pure functions on tensors.

Each function takes and returns tensors, computes in float64 and casts back to the
input dtype, and is tested on its own; :mod:`foldattn.fold` composes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "scale_out_channels", "scale_in_channels", "fuse_bn", "fuse_conv_bn", "bn_zero_response",
    "pad_kernel", "add_branches", "merge_1x1_kxk", "avgpool_as_conv", "identity_as_conv",
    "in_channel_ranges", "out_channel_ranges", "equalization_scales",
]


def _view_channels(v: Tensor, like: Tensor, dim: int = 0) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.reshape(shape)


def scale_out_channels(t: Tensor, v: Tensor, dim: int = 0, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` with output channel ``c`` (along ``dim``) multiplied by ``v[c]``.

    Folds a per-channel scale into a conv/linear weight (dim 0), a bias, or a
    norm's affine parameters. Computed in float64, returned in ``dtype`` (default: ``t``'s).
    """
    if v.dim() != 1 or t.dim() == 0 or v.numel() != t.shape[dim]:
        raise ValueError(f"scale vector of shape {tuple(v.shape)} does not match dim {dim} of {tuple(t.shape)}")
    out = t.detach().double() * _view_channels(v.detach().double(), t, dim)
    return out.to(dtype or t.dtype)


def scale_in_channels(weight: Tensor, v: Tensor, groups: int = 1) -> Tensor:
    """A conv/linear ``weight`` ``(out, in / groups, ...)`` whose *input* channel ``c`` is scaled by ``v[c]``.

    ``conv(x * v) == conv'(x)`` for any zero-padded conv. Computed in float64, returned in
    ``weight``'s dtype.
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must be at least 2-D (out, in, ...), got shape {tuple(weight.shape)}")
    out_ch, per_group = weight.shape[0], weight.shape[1]
    if groups < 1 or out_ch % groups or v.dim() != 1 or v.numel() != per_group * groups:
        raise ValueError(
            f"scale of {v.numel()} channels does not fit a weight {tuple(weight.shape)} with groups={groups}"
        )
    # output channel o belongs to group o // (out / groups) and reads inputs [g * per_group, (g+1) * per_group)
    v_og = v.detach().double().reshape(groups, 1, per_group).expand(groups, out_ch // groups, per_group)
    v_og = v_og.reshape(out_ch, per_group, *([1] * (weight.dim() - 2)))
    return (weight.detach().double() * v_og).to(weight.dtype)


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


def bn_zero_response(
    running_mean: Tensor, running_var: Tensor, eps: float, weight: Tensor, bias: Tensor
) -> Tensor:
    """An eval-mode BatchNorm's output at zero input, ``bias - mean * weight / sqrt(var + eps)``.

    Unlike the other transforms this one is differentiable and keeps the inputs' dtype: DBB's
    BN-and-pad layer pads with it during training, so gradients flow into ``weight`` and ``bias``.
    """
    return bias - running_mean * weight * torch.rsqrt(running_var + eps)


# --- structural re-parameterization (RepVGG, ACNet, DBB) -------------------------------
# Ding et al.: "ACNet" (ICCV 2019), "RepVGG" (CVPR 2021), "Diverse Branch Block" (CVPR 2021).
# Kernels are conv weights ``(out, in / groups, kh, kw)``.


def _pair(k: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (k, k) if isinstance(k, int) else tuple(k)
    if len(pair) != 2 or any(not isinstance(i, int) or isinstance(i, bool) or i < 1 for i in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {k!r}")
    return pair


def pad_kernel(weight: Tensor, kernel_size: int | tuple[int, int]) -> Tensor:
    """``weight (..., kh, kw)`` zero-padded, centred, to ``kernel_size`` (e.g. 1x1 or 1x3 -> 3x3).

    A conv with the padded kernel and padding ``p`` equals the conv with the small
    kernel and padding ``p - (K - k) / 2`` per side, so the size difference must be
    even and non-negative in both dims. Returned in ``weight``'s dtype.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    h, w = weight.shape[-2:]
    dh, dw = kh - h, kw - w
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(
            f"cannot centre a {h}x{w} kernel in {kh}x{kw}: the size difference must be even and >= 0 "
            "(use an odd target kernel for 1x1 / 1xk branches)"
        )
    out = torch.nn.functional.pad(weight.detach().double(), (dw // 2, dw // 2, dh // 2, dh // 2))
    return out.to(weight.dtype)


def add_branches(*branches: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor]:
    """Sum of parallel convs ``(weight, bias)`` with equal kernel shapes: one conv, in float64.

    ``conv(x; W1, b1) + conv(x; W2, b2) == conv(x; W1 + W2, b1 + b2)`` when both
    convs share stride, padding and groups. Pad smaller kernels with :func:`pad_kernel` first.
    """
    if not branches:
        raise ValueError("add_branches needs at least one (weight, bias) pair")
    shape = branches[0][0].shape
    weight = torch.zeros(shape, dtype=torch.float64, device=branches[0][0].device)
    bias = torch.zeros(shape[0], dtype=torch.float64, device=weight.device)
    for i, (w, b) in enumerate(branches):
        if w.shape != shape:
            raise ValueError(
                f"branch {i} has kernel shape {tuple(w.shape)}, branch 0 {tuple(shape)}; pad kernels to one size first"
            )
        weight = weight + w.detach().double()
        if b is not None:
            if b.shape != (shape[0],):
                raise ValueError(f"branch {i} bias has shape {tuple(b.shape)}, expected ({shape[0]},)")
            bias = bias + b.detach().double()
    return weight, bias


def merge_1x1_kxk(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """One conv equal to a 1x1 conv ``(w1, b1)`` followed by a kxk conv ``(w2, b2)``, in float64.

    Both convs have ``groups`` groups; the kxk conv has stride ``s`` and no padding of
    its own, its input padded with the 1x1 conv's *output at zero input* (``b1``, as
    DBB's BN-and-pad layer does). The result is then a kxk conv of the original input
    with stride ``s`` and the padding that was applied in between.
    """
    if w1.dim() != 4 or w1.shape[-2:] != (1, 1):
        raise ValueError(f"w1 must be a 1x1 conv weight (M, C/groups, 1, 1), got {tuple(w1.shape)}")
    if w2.dim() != 4:
        raise ValueError(f"w2 must be a conv weight (O, M/groups, kh, kw), got {tuple(w2.shape)}")
    m, o = w1.shape[0], w2.shape[0]
    if groups < 1 or m % groups or o % groups or w2.shape[1] * groups != m:
        raise ValueError(
            f"shapes do not chain with groups={groups}: w1 {tuple(w1.shape)} has {m} outputs, "
            f"w2 {tuple(w2.shape)} expects {w2.shape[1] * groups} inputs"
        )
    g, kh, kw = groups, w2.shape[2], w2.shape[3]
    a = w1.detach().double().reshape(g, m // g, w1.shape[1])
    b = w2.detach().double().reshape(g, o // g, m // g, kh, kw)
    weight = torch.einsum("gomhw,gmc->gochw", b, a).reshape(o, w1.shape[1], kh, kw)
    bias = torch.zeros(o, dtype=torch.float64, device=w2.device)
    if b1 is not None:
        bias = bias + torch.einsum("gomhw,gm->go", b, b1.detach().double().reshape(g, m // g)).reshape(o)
    if b2 is not None:
        bias = bias + b2.detach().double()
    return weight, bias


def _per_channel_kernel(channels: int, kernel_size: int | tuple[int, int], groups: int) -> Tensor:
    if not isinstance(channels, int) or channels < 1 or groups < 1 or channels % groups:
        raise ValueError(f"channels ({channels}) must be a positive multiple of groups ({groups})")
    kh, kw = _pair(kernel_size, "kernel_size")
    return torch.zeros(channels, channels // groups, kh, kw, dtype=torch.float64)


def avgpool_as_conv(channels: int, kernel_size: int | tuple[int, int], groups: int = 1) -> Tensor:
    """The kernel ``(C, C/groups, kh, kw)`` of a conv equal to ``AvgPool2d(kernel_size)`` on ``C`` channels.

    Padding of the pool must be zero (or zero-padding counted, ``count_include_pad=True``);
    stride is the conv's. float64.
    """
    w = _per_channel_kernel(channels, kernel_size, groups)
    c = torch.arange(channels)
    w[c, c % (channels // groups)] = 1.0 / (w.shape[2] * w.shape[3])
    return w


def identity_as_conv(channels: int, kernel_size: int | tuple[int, int] = 1, groups: int = 1) -> Tensor:
    """The kernel ``(C, C/groups, kh, kw)`` of a conv equal to the identity (stride 1, padding ``k // 2``).

    The kernel size must be odd so that the 1 sits in the centre. float64.
    """
    w = _per_channel_kernel(channels, kernel_size, groups)
    kh, kw = w.shape[2], w.shape[3]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"an identity kernel needs an odd size to have a centre, got {kh}x{kw}")
    c = torch.arange(channels)
    w[c, c % (channels // groups), kh // 2, kw // 2] = 1.0
    return w


def out_channel_ranges(weight: Tensor) -> Tensor:
    """The largest absolute weight of each output channel of a conv/linear ``weight`` (float64)."""
    return weight.detach().double().flatten(1).abs().amax(dim=1)


def in_channel_ranges(weight: Tensor, groups: int = 1) -> Tensor:
    """The largest absolute weight reading each *input* channel of a conv/linear ``weight`` ``(out, in / groups,
    ...)`` (float64): over the output channels of the input's group."""
    out_ch, per_group = weight.shape[0], weight.shape[1]
    if groups < 1 or out_ch % groups:
        raise ValueError(f"groups={groups} does not divide the {out_ch} output channels of {tuple(weight.shape)}")
    w = weight.detach().double().abs().reshape(groups, out_ch // groups, per_group, -1)
    return w.amax(dim=(1, 3)).reshape(groups * per_group)


def equalization_scales(r1: Tensor, r2: Tensor) -> Tensor:
    """Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
    Correction", ICCV 2019): per channel ``s = sqrt(r1 / r2)``, so that after dividing the first layer's output
    channel by ``s`` and multiplying the second layer's input channel by ``s`` both have the range
    ``sqrt(r1 * r2)``. Channels where either range is zero keep ``s = 1``."""
    if r1.shape != r2.shape or r1.dim() != 1:
        raise ValueError(f"ranges must be two vectors of one length, got {tuple(r1.shape)} and {tuple(r2.shape)}")
    r1, r2 = r1.double(), r2.double()
    ok = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
    return torch.where(ok, (r1 / torch.where(ok, r2, 1.0)).sqrt(), torch.ones_like(r1))
