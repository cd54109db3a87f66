"""Spatial pyramid attention (Guo et al., "SPANet: Spatial Pyramid Attention Network", ICME 2020).

Descriptor: adaptive average pools of 1x1, 2x2 and 4x4 bins per channel,
concatenated into 21 values per channel, shape ``(N, C, 21)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register
from .se import reduced_channels

__all__ = ["SPA"]


@register("spa")
class SPA(ChannelAttention):
    """Pyramid pooling -> FC(21C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid.

    Args:
        channels: channels of the gated feature map.
        reduction: MLP bottleneck ratio.
        levels: pyramid bin sizes (1, 2, 4 gives 21 bins per channel).
    """

    def __init__(self, channels: int, reduction: float = 16, levels: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__(channels)
        self.levels = tuple(levels)
        self.bins = sum(b * b for b in self.levels)
        hidden = reduced_channels(channels, reduction)
        self.fc1 = nn.Linear(self.bins * channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def descriptor(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SPA pools 2-D feature maps (N, C, H, W), got shape {tuple(x.shape)}")
        return torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in self.levels], dim=2)

    def descriptor_shape(self) -> tuple[int, ...]:
        return (self.channels, self.bins)

    def gate(self, d: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(d.flatten(1)))).sigmoid()
