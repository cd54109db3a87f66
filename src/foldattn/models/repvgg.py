"""RepVGG for CIFAR (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).

A plain stack of 3x3 re-parameterization blocks, each followed by ReLU. ASR wraps
every block of the four stages (the stem excepted): ``ReLU(block(x) * v)``, with
``v`` absorbed by the block's branch BatchNorms during training, so :func:`foldattn.fold`
yields one 3x3 conv + ReLU per block -- the RepVGG deploy network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..attention import PsiInit
from ._registry import register_model
from ._srp_common import check_attention_args, factories, rep_layer

__all__ = ["CifarRepVGG", "RepUnit"]


class RepUnit(nn.Module):
    """``ReLU(attention(conv(x)))``: ``conv`` is a block, ASR(block) or the deploy conv."""

    def __init__(self, conv: nn.Module, attention: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv
        self.attention = attention
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.attention is not None:
            x = self.attention(x)
        return self.relu(x)


class CifarRepVGG(nn.Module):
    """RepVGG for 32x32 inputs: a stride-1 stem and four stages (strides 1, 2, 2, 2).

    Args:
        num_blocks: blocks per stage (RepVGG-A0: 2, 4, 14, 1).
        widths: channels per stage (RepVGG-A0: 48, 96, 192, 1280).
        num_classes: classifier outputs.
        attention: a registered attention name, or None.
        asr: wrap every stage block in ASR with ``attention``.
        both: with ``asr=True``, also keep the classic module ("ASR(X) + X").
        psi_init: initial value of every ``psi`` (a number, ``"random"``, or None: the attention's default).
        block: registered :mod:`foldattn.srp` block name (``"repvgg"``, ``"acnet"``, ``"dbb"``, ...).
        deploy: build the inference form (each block a 3x3 conv with bias, no ASR), the
            module tree of :func:`foldattn.fold` applied to the training form.
        stem_width: stem channels; default ``min(64, widths[0])``.
        in_channels: image channels.
        every: attention in every ``every``-th stage block only (blocks 0, k, 2k, ... in forward order).
        **attention_kwargs: passed to the attention constructor.
    """

    default_input_size = (3, 32, 32)

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 4, 14, 1),
        widths: Sequence[int] = (48, 96, 192, 1280),
        num_classes: int = 10,
        attention: str | None = None,
        asr: bool = False,
        both: bool = False,
        psi_init: PsiInit = None,
        block: str = "repvgg",
        deploy: bool = False,
        stem_width: int | None = None,
        in_channels: int = 3,
        every: int = 1,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(widths) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks and widths need 4 stages (>= 1 block each), got {num_blocks}, {widths}")
        check_attention_args(attention, asr, both, attention_kwargs, psi_init)
        asr_f, classic_f = factories(attention, asr, both, deploy, attention_kwargs, every)
        stem = min(64, widths[0]) if stem_width is None else stem_width
        self.stem = RepUnit(rep_layer(block, in_channels, stem, 3, 1, None, psi_init, deploy), None)
        inplanes = stem
        stages = []
        for n, width, stride in zip(num_blocks, widths, (1, 2, 2, 2), strict=True):
            asr_f.new_chain()
            classic_f.new_chain()
            units = []
            for i in range(n):
                conv = rep_layer(block, inplanes, width, 3, stride if i == 0 else 1, asr_f, psi_init, deploy)
                units.append(RepUnit(conv, classic_f(width)))
                inplanes = width
            stages.append(nn.Sequential(*units))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def cifar_repvgg_a0(num_classes: int = 10, attention: str | None = None, asr: bool = False, both: bool = False,
                    psi_init: PsiInit = None, deploy: bool = False, **kwargs: Any) -> CifarRepVGG:
    """RepVGG-A0 widths and depths (48, 96, 192, 1280; 2, 4, 14, 1) with a stride-1 stem for CIFAR.

    See :class:`CifarRepVGG` for the arguments.
    """
    return CifarRepVGG(num_classes=num_classes, attention=attention, asr=asr, both=both, psi_init=psi_init,
                       deploy=deploy, **kwargs)
