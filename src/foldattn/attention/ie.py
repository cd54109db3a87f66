"""Instance enhancement (Liang et al., "Instance Enhancement Batch Normalization", AAAI 2020).

A per-channel affine map of the pooled feature followed by a sigmoid: two
parameters per channel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register

__all__ = ["IE"]


@register("ie")
class IE(ChannelAttention):
    """``sigmoid(w_c * GAP_c + b_c)``; ``w`` starts at 0 and ``b`` at -1 as in IEBN.

    Args:
        channels: channels of the gated feature map.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.full((channels,), -1.0))

    def gate(self, d: Tensor) -> Tensor:
        return torch.sigmoid(d * self.weight + self.bias)
