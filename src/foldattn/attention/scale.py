"""A learnable per-channel scale: the control for ASR's attention function.

``T(psi) = psi``: the ASR vector ``v`` is a free per-channel vector, the scale that
LayerScale (Touvron et al., "Going deeper with Image Transformers", ICCV 2021) puts on a
residual branch. It goes wherever ASR goes and folds the same way, so comparing ASR(X)
with ASR(scale) separates what the attention function ``T`` contributes from what any
learnable per-channel scale contributes. It has no input-dependent (classic) form.
"""

from __future__ import annotations

from torch import Tensor

from ._base import ChannelAttention
from ._registry import register

__all__ = ["Scale"]


@register("scale")
class Scale(ChannelAttention):
    """``v = psi``: a learnable per-channel scale, ``psi`` starting at 1 (the identity).

    Args:
        channels: channels of the scaled feature map.
    """

    default_psi_init = 1.0
    has_classic_form = False

    def gate(self, d: Tensor) -> Tensor:
        return d

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError("the 'scale' attention is a learnable constant: it has only the ASR form (asr=True); "
                        "there is no input-dependent 'scale' module to apply")
