"""Efficient channel attention (Wang et al., "ECA-Net", CVPR 2020)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register

__all__ = ["ECA", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size: the odd number nearest ``|log2(C)/gamma + beta/gamma|``."""
    k = int(abs(math.log2(channels) / gamma + beta / gamma))
    return max(k if k % 2 else k + 1, 1)


@register("eca")
class ECA(ChannelAttention):
    """GAP -> 1-D conv of size k across channels (no bias) -> sigmoid.

    Args:
        channels: channels of the gated feature map.
        kernel_size: conv size; by default chosen from ``channels`` as in the paper.
    """

    def __init__(self, channels: int, kernel_size: int | None = None) -> None:
        super().__init__(channels)
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ECA kernel_size must be a positive odd integer, got {k}")
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def gate(self, d: Tensor) -> Tensor:
        return self.conv(d.unsqueeze(1)).squeeze(1).sigmoid()
