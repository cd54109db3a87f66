"""Gather-excite with global extent (Hu et al., "Gather-Excite", NeurIPS 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register
from .se import reduced_channels

__all__ = ["GE"]


@register("ge")
class GE(ChannelAttention):
    """Global-extent gather (average) -> optional excite MLP -> sigmoid.

    ``mlp=False`` is the parameter-free GE-theta-minus; ``mlp=True`` adds the
    bottleneck MLP of GE-theta-plus.

    Args:
        channels: channels of the gated feature map.
        mlp: add the excite MLP.
        reduction: MLP bottleneck ratio (with ``mlp=True``).
    """

    def __init__(self, channels: int, mlp: bool = False, reduction: float = 16) -> None:
        super().__init__(channels)
        self.excite: nn.Module = (
            nn.Sequential(
                nn.Linear(channels, reduced_channels(channels, reduction)),
                nn.ReLU(inplace=True),
                nn.Linear(reduced_channels(channels, reduction), channels),
            )
            if mlp
            else nn.Identity()
        )

    def gate(self, d: Tensor) -> Tensor:
        return self.excite(d).sigmoid()
