"""CIFAR ResNets whose conv-BN pairs are re-parameterization blocks (ACNet or DBB).

Same layout as :class:`~foldattn.models.CifarResNet` (basic blocks, 16/32/64 planes):
each 3x3 conv + BN is an :mod:`foldattn.srp` block (stem included), the 1x1
projection shortcut a conv-BN block. ASR wraps the second block of each residual
branch (the place of ``bn2`` in the plain ResNet), before the addition; after
:func:`foldattn.fold` the network holds only convs, ReLUs, pooling and the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..attention import Factory, PsiInit
from ..srp import OneByOneThen
from ._registry import register_model
from ._srp_common import check_attention_args, factories, rep_layer

__all__ = ["SrpCifarResNet", "RepBasicBlock"]


class RepBasicBlock(nn.Module):
    """``ReLU(attention(conv2(ReLU(conv1(x)))) + shortcut(x))``; ``conv2`` is the ASR host."""

    def __init__(self, kind: str, inplanes: int, planes: int, stride: int, asr: Factory,
                 classic: Factory, psi_init: PsiInit, deploy: bool) -> None:
        super().__init__()
        self.conv1 = rep_layer(kind, inplanes, planes, 3, stride, None, psi_init, deploy)
        self.conv2 = rep_layer(kind, planes, planes, 3, 1, asr, psi_init, deploy)
        self.attention = classic(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            rep_layer("conv_bn", inplanes, planes, 1, stride, None, psi_init, deploy)
            if stride != 1 or inplanes != planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        if self.attention is not None:
            out = self.attention(out)
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place, as torchvision's ResNet (see cifar_resnet._Block._merge)
        return self.relu(out)


class SrpCifarResNet(nn.Module):
    """Basic-block CIFAR ResNet (depth 6n+2) built from re-parameterization blocks.

    Args:
        depth: 6n+2.
        block: registered :mod:`foldattn.srp` block name for every 3x3 conv (``"acnet"``, ``"dbb"``, ...).
        num_classes, attention, asr, both, psi_init, in_channels, **attention_kwargs: as
            for :class:`~foldattn.models.CifarResNet`.
        deploy: build the inference form (every block a conv with bias, no ASR): the
            module tree of :func:`foldattn.fold` applied to the training form.
        widths: planes of the three stages.
        every: attention in every ``every``-th block only (blocks 0, k, 2k, ...).
    """

    default_input_size = (3, 32, 32)

    def __init__(
        self,
        depth: int,
        block: str,
        num_classes: int = 10,
        attention: str | None = None,
        asr: bool = False,
        both: bool = False,
        psi_init: PsiInit = None,
        deploy: bool = False,
        widths: Sequence[int] = (16, 32, 64),
        in_channels: int = 3,
        every: int = 1,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a basic-block CIFAR ResNet needs depth = 6n + 2 (n >= 1), got {depth}")
        if len(widths) != 3:
            raise ValueError(f"widths needs 3 stages, got {widths}")
        check_attention_args(attention, asr, both, attention_kwargs, psi_init)
        asr_f, classic_f = factories(attention, asr, both, deploy, attention_kwargs, every)
        n = (depth - 2) // 6
        self.conv1 = rep_layer(block, in_channels, widths[0], 3, 1, None, psi_init, deploy)
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        stages = []
        for planes, stride in zip(widths, (1, 2, 2), strict=True):
            asr_f.new_chain()
            classic_f.new_chain()
            blocks = []
            for i in range(n):
                blocks.append(RepBasicBlock(block, inplanes, planes, stride if i == 0 else 1, asr_f, classic_f,
                                            psi_init, deploy))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # as CifarResNet; then DBB's identity start of its 1x1 -> kxk branch
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, OneByOneThen):
                m.reset_identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _builder(depth: int, block: str) -> Any:
    def build(num_classes: int = 10, attention: str | None = None, asr: bool = False, both: bool = False,
              psi_init: PsiInit = None, deploy: bool = False, **kwargs: Any) -> SrpCifarResNet:
        return SrpCifarResNet(depth, block, num_classes, attention, asr, both, psi_init, deploy, **kwargs)

    build.__name__ = f"cifar_resnet{depth}_{block}"
    build.__doc__ = (
        f"CIFAR ResNet-{depth} with {block} blocks. See :class:`SrpCifarResNet` for the arguments;\n"
        "``attention``/``asr``/``both`` choose none, X, ASR(X) or ASR(X) + X."
    )
    return register_model(build)


cifar_resnet20_acnet = _builder(20, "acnet")
cifar_resnet20_dbb = _builder(20, "dbb")
cifar_resnet56_acnet = _builder(56, "acnet")
cifar_resnet56_dbb = _builder(56, "dbb")
