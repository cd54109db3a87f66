"""CBAM (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018).

Channel gate: ``sigmoid(MLP(avgpool) + MLP(maxpool))`` with a bias-free shared MLP;
then a spatial gate from a 7x7 conv over the channel-wise mean and max maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register
from .se import reduced_channels

__all__ = ["CBAM", "SpatialGate"]


class SpatialGate(nn.Module):
    """``sigmoid(BN(conv7x7([mean_c(x), max_c(x)])))``, one gate per position."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        return x * self.bn(self.conv(pooled)).sigmoid()


@register("cbam")
class CBAM(ChannelAttention):
    """Channel gate (avg and max descriptors, shape ``(N, C, 2)``), then a spatial gate.

    The spatial gate depends on the position, not only on the channel, so no constant
    vector can stand in for it: the ASR form keeps the channel gate only and drops
    the spatial half (``make_static`` removes it).

    Args:
        channels: channels of the gated feature map.
        reduction: MLP bottleneck ratio.
        rd_channels: explicit hidden width; overrides ``reduction``.
        spatial_kernel: kernel size of the spatial gate's conv.
    """

    def __init__(
        self, channels: int, reduction: float = 16, rd_channels: int | None = None, spatial_kernel: int = 7
    ) -> None:
        super().__init__(channels)
        hidden = reduced_channels(channels, reduction, rd_channels)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.spatial: SpatialGate | None = SpatialGate(spatial_kernel)

    def descriptor(self, x: Tensor) -> Tensor:
        flat = x.flatten(2)
        return torch.stack((flat.mean(dim=2), flat.amax(dim=2)), dim=2)

    def descriptor_shape(self) -> tuple[int, ...]:
        return (self.channels, 2)

    def gate(self, d: Tensor) -> Tensor:
        both = self.fc2(self.act(self.fc1(d.transpose(1, 2))))  # (N, 2, C)
        return both.sum(dim=1).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.spatial is not None:
            if x.dim() != 4:
                raise ValueError(f"CBAM's spatial gate needs a 2-D feature map (N, C, H, W), got {tuple(x.shape)}")
            x = self.spatial(x)
        return x

    def _on_static(self) -> None:
        self.spatial = None
