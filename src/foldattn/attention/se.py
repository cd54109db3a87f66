"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register

__all__ = ["SE", "reduced_channels"]


def reduced_channels(channels: int, reduction: float, rd_channels: int | None = None) -> int:
    """Hidden width of a bottleneck MLP: ``rd_channels`` or ``round(channels / reduction)``, >= 1."""
    if rd_channels is not None:
        if rd_channels < 1:
            raise ValueError(f"rd_channels must be >= 1, got {rd_channels}")
        return rd_channels
    if reduction <= 0:
        raise ValueError(f"reduction must be > 0, got {reduction}")
    return max(1, round(channels / reduction))


@register("se")
class SE(ChannelAttention):
    """GAP -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid.

    Args:
        channels: channels of the gated feature map.
        reduction: bottleneck ratio ``r`` (hidden width ``round(C / r)``).
        rd_channels: explicit hidden width; overrides ``reduction``.
    """

    def __init__(self, channels: int, reduction: float = 16, rd_channels: int | None = None) -> None:
        super().__init__(channels)
        hidden = reduced_channels(channels, reduction, rd_channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, d: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(d))).sigmoid()
