"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Basic-block ResNet-20/32/44/56/110 (depth 6n+2) and the bottleneck ResNet-164
(depth 9n+2) the ASR paper uses. Attention sits where SE-ResNet puts it, on the
output of the residual branch's last BatchNorm before the addition; ASR wraps that
BatchNorm (the paper's ``bn3``), so the folded model is exactly the plain one.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .. import attention as _attention
from ..asr import ASR
from ._registry import register_model

__all__ = ["CifarResNet", "BasicBlock", "Bottleneck"]


def check_attention_args(attention: str | None, asr: bool, both: bool, attention_kwargs: dict[str, Any] | None = None,
                         psi_init: _attention.PsiInit = None) -> None:
    """Reject inconsistent ``attention`` / ``asr`` / ``both`` builder arguments, a bad ``psi_init``, attention
    without a classic form used classically, and keyword arguments that no constructor takes (a builder passes
    its unknown ones to the attention)."""
    if (asr or both) and attention is None:
        raise ValueError("asr=True and both=True need an attention module, e.g. attention='se'")
    if both and not asr:
        raise ValueError("both=True means ASR(X) + X and needs asr=True; for X alone use asr=False")
    _attention.check_psi_init(psi_init)
    if attention is not None and (both or not asr) and not _attention.get(attention).has_classic_form:
        raise ValueError(f"attention {attention!r} is a learnable constant with no input-dependent form: "
                         "use it as ASR alone (asr=True, both=False)")
    extra = sorted(attention_kwargs or {})
    if attention is None:
        # arguments of some attention (reduction=8, ...) may come with attention=None (a script that builds
        # plain and attention variants alike); a name no attention takes is a typo
        known = {n for name in _attention.names() for n in inspect.signature(_attention.get(name).__init__).parameters}
        unknown = [k for k in extra if k not in known]
        if unknown:
            raise ValueError(f"unknown keyword argument(s) {', '.join(unknown)}: not an argument of the model nor "
                             "of any attention module")
        return
    cls = _attention.get(attention)  # unknown names fail here, listing the valid ones
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n in params if n not in ("self", "channels")]
        unknown = [k for k in extra if k not in params]
        if unknown:
            raise ValueError(f"unknown keyword argument(s) {', '.join(unknown)}: neither the model nor "
                             f"{cls.__name__} takes them ({cls.__name__} takes {', '.join(valid) or 'none'})")


class _Block(nn.Module):
    expansion = 1

    def _finish(self, out_bn: nn.Module, last: str, asr: _attention.Factory, classic: _attention.Factory,
                psi_init: _attention.PsiInit, inplanes: int, planes: int, stride: int) -> None:
        static = asr(planes * self.expansion)
        if static is not None:
            static.make_static(psi_init)
            out_bn = ASR(out_bn, static)
        setattr(self, last, out_bn)
        self.attention = classic(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        out = planes * self.expansion
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inplanes != out
            else None
        )

    def _merge(self, out: Tensor, x: Tensor) -> Tensor:
        if self.attention is not None:
            out = self.attention(out)
        identity = x if self.downsample is None else self.downsample(x)
        # in place, as torchvision's ResNet: the backward of BN, of ASR's functional BN and of the
        # attention's product saves their inputs, not this output, so autograd allows it; a new
        # tensor here cost ~12 % of a plain ResNet-164's throughput on one CPU thread
        out += identity
        return self.relu(out)


class BasicBlock(_Block):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN (``bn2``: the ASR host) -> [attention] -> + x."""

    expansion = 1
    bn2: nn.Module  # set by _finish: the BatchNorm, or ASR around it

    def __init__(self, inplanes: int, planes: int, stride: int, asr: _attention.Factory,
                 classic: _attention.Factory, psi_init: _attention.PsiInit) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self._finish(nn.BatchNorm2d(planes), "bn2", asr, classic, psi_init, inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._merge(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    """1x1 -> 3x3 -> 1x1 (x4) convs with BN; ``bn3`` is the ASR host."""

    expansion = 4
    bn3: nn.Module  # set by _finish: the BatchNorm, or ASR around it

    def __init__(self, inplanes: int, planes: int, stride: int, asr: _attention.Factory,
                 classic: _attention.Factory, psi_init: _attention.PsiInit) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self._finish(nn.BatchNorm2d(planes * 4), "bn3", asr, classic, psi_init, inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._merge(self.bn3(self.conv3(out)), x)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem (16 channels), three stages (16, 32, 64 planes).

    Args:
        depth: 6n+2 with ``block="basic"``, 9n+2 with ``block="bottleneck"``.
        num_classes: classifier outputs.
        block: ``"basic"`` or ``"bottleneck"``.
        attention: a registered attention name, or None.
        asr: put ``attention`` in ASR form on each block's last BatchNorm.
        both: with ``asr=True``, also keep the classic module ("ASR(X) + X").
        psi_init: initial value of every ``psi`` (a number, ``"random"``, or None: the attention's default).
        in_channels: image channels.
        every: attention (ASR and classic) in every ``every``-th block only (blocks 0, k, 2k, ...).
        attention_sites: attention in these blocks only (0-based indices over all stages); None: every block.
        **attention_kwargs: passed to the attention constructor.
    """

    default_input_size = (3, 32, 32)

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        block: str = "basic",
        attention: str | None = None,
        asr: bool = False,
        both: bool = False,
        psi_init: _attention.PsiInit = None,
        in_channels: int = 3,
        every: int = 1,
        attention_sites: list[int] | None = None,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        block_cls: type[_Block] = {"basic": BasicBlock, "bottleneck": Bottleneck}.get(block)  # type: ignore[assignment]
        if block_cls is None:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        per = 6 if block == "basic" else 9
        if depth < per + 2 or (depth - 2) % per:
            raise ValueError(f"a {block} CIFAR ResNet needs depth = {per}n + 2 (n >= 1), got {depth}")
        check_attention_args(attention, asr, both, attention_kwargs, psi_init)
        n = (depth - 2) // per
        asr_factory = _attention.Factory(attention if asr else None, every=every, sites=attention_sites,
                                         **attention_kwargs)
        classic_factory = _attention.Factory(attention if (both or not asr) else None, every=every,
                                             sites=attention_sites, **attention_kwargs)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            asr_factory.new_chain()
            classic_factory.new_chain()
            blocks = []
            for i in range(n):
                stride_i = stride if i == 0 else 1
                blocks.append(block_cls(inplanes, planes, stride_i, asr_factory, classic_factory, psi_init))
                inplanes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def attention_site_indices(self, names: Sequence[str]) -> list[int]:
        """The ``attention_sites`` indices of the blocks holding the attention modules ``names``
        (``layer2.0.attention`` -> the block's index over all stages), sorted."""
        blocks = {n: i for i, n in enumerate(n for n, m in self.named_modules() if isinstance(m, _Block))}
        out = set()
        for name in names:
            block = name.rpartition(".")[0]
            if block not in blocks:
                raise ValueError(f"{name!r} is not an attention module of a block; blocks: {', '.join(blocks)}")
            out.add(blocks[block])
        return sorted(out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _builder(depth: int, block: str) -> Any:
    def build(num_classes: int = 10, attention: str | None = None, asr: bool = False, both: bool = False,
              psi_init: _attention.PsiInit = None, **kwargs: Any) -> CifarResNet:
        return CifarResNet(depth, num_classes, block, attention, asr, both, psi_init, **kwargs)

    build.__name__ = f"cifar_resnet{depth}"
    build.__doc__ = (
        f"CIFAR ResNet-{depth} ({block} blocks). See :class:`CifarResNet` for the arguments;\n"
        "``attention``/``asr``/``both`` choose none, X, ASR(X) or ASR(X) + X."
    )
    return register_model(build)


cifar_resnet20 = _builder(20, "basic")
cifar_resnet32 = _builder(32, "basic")
cifar_resnet44 = _builder(44, "basic")
cifar_resnet56 = _builder(56, "basic")
cifar_resnet110 = _builder(110, "basic")
cifar_resnet164 = _builder(164, "bottleneck")
