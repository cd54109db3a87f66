"""Style-based recalibration (Lee et al., "SRM: A Style-based Recalibration Module", ICCV 2019).

Descriptor: per-channel mean and standard deviation, shape ``(N, C, 2)``. Gate: a
channel-wise FC over the two statistics, BatchNorm, sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import ChannelAttention
from ._registry import register

__all__ = ["SRM"]


@register("srm")
class SRM(ChannelAttention):
    """Style pooling (mean, std) -> channel-wise FC (C x 2) -> BN -> sigmoid.

    In the ASR form the input is one learnable ``psi`` of shape ``(1, C, 2)``; a batch
    statistic over one sample is meaningless, so the BatchNorm then always applies
    its running statistics (which stay at their initial mean 0, variance 1) and acts
    as a learnable per-channel affine map.

    Args:
        channels: channels of the gated feature map.
        eps: added to the variance before the square root of the style std.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels)
        self.eps = eps
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm1d(channels)

    def descriptor(self, x: Tensor) -> Tensor:
        flat = x.flatten(2)
        mean = flat.mean(dim=2)
        std = (flat.var(dim=2, unbiased=False) + self.eps).sqrt()
        return torch.stack((mean, std), dim=2)

    def descriptor_shape(self) -> tuple[int, ...]:
        return (self.channels, 2)

    def gate(self, d: Tensor) -> Tensor:
        z = (d * self.cfc).sum(dim=2)
        use_batch_stats = self.training and not self.is_static
        z = F.batch_norm(
            z, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
            use_batch_stats, self.bn.momentum if self.bn.momentum is not None else 0.1, self.bn.eps,
        )
        return z.sigmoid()
