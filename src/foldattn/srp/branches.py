"""The branch types that re-parameterizable blocks are built from.

Every branch is linear in eval mode and ends in a BatchNorm ``bn``; :meth:`kernel`
returns it as one conv ``(weight, bias)`` in float64, composed from the named
transforms of :mod:`foldattn.transforms`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms import (
    avgpool_as_conv,
    bn_zero_response,
    identity_as_conv,
    merge_1x1_kxk,
    pad_kernel,
    scale_out_channels,
)
from ._base import Branch

__all__ = ["ConvBN", "IdentityBN", "OneByOneThen"]


def _scale(w: Tensor, s: Tensor) -> Tensor:
    # branch kernels are composed in float64 and cast once, at the end of the fold
    return scale_out_channels(w, s, dtype=torch.float64)


class ConvBN(Branch):
    """``BN(conv(x))`` with a bias-free conv of any (possibly rectangular) kernel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: int,
                 padding: tuple[int, int], groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def body(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def kernel(self, kernel_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        s, t = self._bn_affine()
        return pad_kernel(_scale(self.conv.weight, s), kernel_size), t


class IdentityBN(Branch):
    """``BN(x)``: RepVGG's identity branch (needs stride 1 and equal in/out channels)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.bn = nn.BatchNorm2d(channels)

    def body(self, x: Tensor) -> Tensor:
        return x

    def kernel(self, kernel_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        s, t = self._bn_affine()
        eye = identity_as_conv(self.bn.num_features, kernel_size, self.groups).to(s.device)
        return _scale(eye, s), t


class BNAndPad(nn.Module):
    """BatchNorm, then padding with the BN's output at zero input (DBB's BN-and-pad layer).

    Padding with ``BN(0)`` instead of 0 makes "1x1 conv, BN, pad, kxk op" equal to one
    kxk conv on the zero-padded input, so the chain fuses exactly. The pad value comes
    from the running statistics (in eval mode, exactly the BN's output at zero).
    """

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.padding = padding

    def zero_response(self) -> Tensor:
        bn = self.bn
        return bn_zero_response(cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var), bn.eps, bn.weight,
                                bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        p = self.padding
        if p:
            # the border is written into the padded tensor (a fresh one, so autograd allows it):
            # exact, and two passes over the tensor fewer than shifting it by the value and back
            value = self.zero_response().reshape(1, -1, 1, 1).to(y.dtype)
            y = F.pad(y, [p] * 4)
            y[:, :, :p, :] = value
            y[:, :, -p:, :] = value
            y[:, :, p:-p, :p] = value
            y[:, :, p:-p, -p:] = value
        return y


class OneByOneThen(Branch):
    """DBB's sequential branches: ``1x1 conv -> BN-and-pad -> (kxk conv | kxk average pool) -> BN``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, groups: the block's geometry.
        mid_channels: outputs of the 1x1 conv (for ``pool=True`` it must be ``out_channels``).
        pool: use a kxk average pool (stride ``stride``) instead of a kxk conv.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, groups: int, pool: bool = False) -> None:
        super().__init__()
        if pool and mid_channels != out_channels:
            raise ValueError("the average-pool branch keeps its channels: mid_channels must equal out_channels")
        self.groups, self.pooled = groups, pool
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=groups, bias=False)
        self.mid = BNAndPad(mid_channels, padding)
        self.op: nn.Module = (
            nn.AvgPool2d(kernel_size, stride=stride, padding=0)
            if pool
            else nn.Conv2d(mid_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Start the 1x1 conv as the identity when it keeps the channels (DBB's choice, as a plain weight).

        DBB parametrises that conv as identity + a learned delta; here the weight itself
        starts at the identity (weight decay then pulls it towards 0, not towards the
        identity). Called at construction; call again after re-initialising a model.
        """
        if self.conv1.in_channels == self.conv1.out_channels and not self.pooled:
            eye = identity_as_conv(self.conv1.in_channels, 1, self.groups)
            self.conv1.weight.copy_(eye.to(self.conv1.weight))

    def body(self, x: Tensor) -> Tensor:
        return self.op(self.mid(self.conv1(x)))

    def kernel(self, kernel_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        s1, t1 = self._bn_affine(self.mid.bn)
        w1 = _scale(self.conv1.weight, s1)
        if isinstance(self.op, nn.AvgPool2d):
            k = self.op.kernel_size
            w2 = avgpool_as_conv(self.bn.num_features, k, self.groups).to(w1.device)
        else:
            w2 = cast(nn.Conv2d, self.op).weight
        s2, t2 = self._bn_affine()
        w, b = merge_1x1_kxk(w1, t1, _scale(w2, s2), t2, self.groups)
        return pad_kernel(w, kernel_size), b
