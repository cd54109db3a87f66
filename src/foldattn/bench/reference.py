"""The plain networks written the usual way, for the benchmark's ``reference`` row.


The ASR authors' code trains the CIFAR ResNets of He et al. 2016 in the layout of the
pytorch-classification project: each block computes its branch, adds the shortcut *in place*
and applies a ReLU; no attention hooks, no ASR wrapper. Every foldattn model deploys to the
plain :class:`~foldattn.models.CifarResNet`, so that network must cost what this one costs;
the benchmark times both in the same group, with the same weights (the ``state_dict`` keys
are the same) and checks that their outputs agree. ``cifar_vit_tiny``'s reference is timm's
``VisionTransformer`` of the same size (no class token, mean pooling after the final norm).

The re-parameterization backbones (RepVGG, the ACNet and DBB ResNets) have two: the training
form with each block written as its paper's code lays it out (named conv-BN branches summed,
DBB's BN-and-pad filling the border in place), and the deployed network as a plain
torchvision-style stack of biased convs and ReLUs. Both are built from the model itself
(:func:`reference_srp`, :func:`reference_srp_deployed`) and take its weights in state-dict
order, so any geometry foldattn builds has its reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..models import CifarViT
    from ..models.vit import ViTBlock
    from ..srp import RepBlock

__all__ = ["reference_cifar_resnet", "reference_vit", "reference_srp", "reference_srp_deployed"]


def _shortcut(inplanes: int, out: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return self.relu(out)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += residual
        return self.relu(out)


class _ReferenceResNet(nn.Module):
    def __init__(self, depth: int, block: str, num_classes: int = 10) -> None:
        super().__init__()
        kind = _Bottleneck if block == "bottleneck" else _Basic
        n = (depth - 2) // (9 if block == "bottleneck" else 6)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        inplanes, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(kind(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * kind.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def reference_cifar_resnet(depth: int, block: str, num_classes: int = 10) -> nn.Module:
    """The plain CIFAR ResNet-``depth`` (``block``: ``"basic"`` or ``"bottleneck"``) in the reference layout."""
    return _ReferenceResNet(depth, block, num_classes)


def reference_vit(plain: nn.Module) -> nn.Module:
    """timm's ``VisionTransformer`` with the size of ``plain`` (a :class:`~foldattn.models.CifarViT`) and its weights.

    Only the patch embedding is named differently (``patch_embed.proj`` in timm). timm's LayerNorms
    use eps 1e-6 where torch's default is 1e-5: the outputs agree to ~1e-6 relative, not bit for bit.
    """
    from .._utils import require

    timm_vit = require("timm.models.vision_transformer", "timm")
    vit = cast("CifarViT", plain)
    block = cast("ViTBlock", vit.blocks[0])
    c, h, _ = vit.default_input_size
    patch = vit.patch_embed.kernel_size[0]
    dim = vit.patch_embed.out_channels
    ref = timm_vit.VisionTransformer(
        img_size=h, patch_size=patch, in_chans=c, embed_dim=dim, depth=len(vit.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / dim,
        num_classes=vit.head.out_features, class_token=False, global_pool="avg", fc_norm=False)
    state = {("patch_embed.proj" + k[len("patch_embed"):] if k.startswith("patch_embed.") else k): v
             for k, v in plain.state_dict().items()}
    ref.load_state_dict(state)
    return ref


# --- re-parameterization backbones -------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int,
             padding: int | tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(cout))


class _RepVGGBlock(nn.Module):
    """RepVGG's training block: ``dense(x) + one_by_one(x) + identity(x)``."""

    def __init__(self, cin: int, cout: int, stride: int, identity: bool) -> None:
        super().__init__()
        self.rbr_dense = _conv_bn(cin, cout, 3, stride, 1)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, 0)
        self.rbr_identity = nn.BatchNorm2d(cout) if identity else None

    def forward(self, x: Tensor) -> Tensor:
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.rbr_dense(x) + self.rbr_1x1(x) + identity


class _ACBlock(nn.Module):
    """ACNet's block: ``3x3 + 1x3 + 3x1``, each conv-BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.square = _conv_bn(cin, cout, 3, stride, 1)
        self.hor = _conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = _conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


class _BNAndPad(nn.Module):
    """BatchNorm, then a border of the BN's response to zero, written into the padded tensor."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        p = self.pad
        if p:
            bn = self.bn
            mean, var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)  # tracked: the defaults
            value = (bn.bias - mean * bn.weight / torch.sqrt(var + bn.eps)).view(1, -1, 1, 1)
            y = F.pad(y, [p] * 4)
            y[:, :, :p, :] = value
            y[:, :, -p:, :] = value
            y[:, :, :, :p] = value
            y[:, :, :, -p:] = value
        return y


class _DBBlock(nn.Module):
    """DBB's block: ``kxk + 1x1 + (1x1, BN-and-pad, avg pool) + (1x1, BN-and-pad, kxk)``, each ending in BN."""

    def __init__(self, cin: int, cout: int, stride: int, mid: int) -> None:
        super().__init__()
        self.dbb_origin = _conv_bn(cin, cout, 3, stride, 1)
        self.dbb_1x1 = _conv_bn(cin, cout, 1, stride, 0)
        self.dbb_avg = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _BNAndPad(cout, 1),
                                     nn.AvgPool2d(3, stride=stride), nn.BatchNorm2d(cout))
        self.dbb_1x1_kxk = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _BNAndPad(mid, 1),
                                         nn.Conv2d(mid, cout, 3, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)


def _reference_block(block: RepBlock) -> nn.Module:
    """The paper-layout module of one foldattn RepBlock (same geometry, parameters in the same order)."""
    from ..srp import ACBlock, ConvBNBlock, DBBlock, OneByOneThen, RepVGGBlock

    cin, cout, stride = block.in_channels, block.out_channels, block.stride
    if block.groups != 1 or (block.kernel_size != 3 and not isinstance(block, ConvBNBlock)):
        raise ValueError(f"no reference layout for {block!r} (3x3 ungrouped blocks only)")
    if isinstance(block, ConvBNBlock):
        return _conv_bn(cin, cout, block.kernel_size, stride, block.padding)
    if isinstance(block, RepVGGBlock):
        return _RepVGGBlock(cin, cout, stride, "identity" in block.branches)
    if isinstance(block, ACBlock):
        return _ACBlock(cin, cout, stride)
    if isinstance(block, DBBlock):
        return _DBBlock(cin, cout, stride, cast(OneByOneThen, block.branches["one_by_one_kxk"]).conv1.out_channels)
    raise ValueError(f"no reference layout for block type {type(block).__name__}")


def _deployed_conv(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                     padding=conv.padding, bias=True)  # type: ignore[arg-type]


class _RepVGG(nn.Module):
    """A stem and four stages of ``ReLU(block(x))``; global pooling and a linear classifier."""

    stage1: nn.Sequential  # set by setattr in __init__
    stage2: nn.Sequential
    stage3: nn.Sequential
    stage4: nn.Sequential

    def __init__(self, stem: nn.Module, stages: list[list[nn.Module]], fc: nn.Linear) -> None:
        super().__init__()
        self.stem = nn.Sequential(stem, nn.ReLU(inplace=True))
        for i, blocks in enumerate(stages, start=1):
            setattr(self, f"stage{i}", nn.Sequential(*(nn.Sequential(b, nn.ReLU(inplace=True)) for b in blocks)))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(fc.in_features, fc.out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.linear(self.gap(x).flatten(1))


class _SrpBasic(nn.Module):
    def __init__(self, conv1: nn.Module, conv2: nn.Module, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.conv1(x)))
        out += residual
        return self.relu(out)


class _SrpResNet(nn.Module):
    def __init__(self, stem: nn.Module, stages: list[list[nn.Module]], fc: nn.Linear) -> None:
        super().__init__()
        self.conv1 = stem
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*blocks) for blocks in stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(fc.in_features, fc.out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.conv1(x)))))
        return self.fc(self.avgpool(x).flatten(1))


def _layer(module: nn.Module, deployed: bool) -> nn.Module:
    if deployed:
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"the deployed network should hold only convs here, found {type(module).__name__}")
        return _deployed_conv(module)
    return _reference_block(cast("RepBlock", module))  # the training form's units are RepBlocks


def _build_like(model: nn.Module, deployed: bool) -> nn.Module:
    from ..models import CifarRepVGG, SrpCifarResNet

    if isinstance(model, CifarRepVGG):
        units = [list(getattr(model, f"stage{i}")) for i in range(1, 5)]
    elif isinstance(model, SrpCifarResNet):
        units = [list(layer) for layer in (model.layer1, model.layer2, model.layer3)]
    else:
        raise ValueError(f"no re-parameterization reference for {type(model).__name__}")
    if any(u.attention is not None for stage in units for u in stage):
        raise ValueError("the reference is the plain network: build the model without classic attention")
    if isinstance(model, CifarRepVGG):
        stages = [[_layer(u.conv, deployed) for u in stage] for stage in units]
        return _RepVGG(_layer(model.stem.conv, deployed), stages, model.fc)
    stages = [[_SrpBasic(_layer(b.conv1, deployed), _layer(b.conv2, deployed),
                         None if b.downsample is None else _layer(b.downsample, deployed)) for b in stage]
              for stage in units]
    return _SrpResNet(_layer(model.conv1, deployed), stages, model.fc)


def _load_in_order(ref: nn.Module, model: nn.Module) -> nn.Module:
    """``ref`` with ``model``'s state, matched by position (the two lay their tensors out in the same order)."""
    ours, theirs = model.state_dict(), ref.state_dict()
    pairs = list(zip(theirs.items(), ours.items(), strict=False))
    if len(ours) != len(theirs) or any(a.shape != b.shape for (_, a), (_, b) in pairs):
        raise ValueError(f"the reference of {type(model).__name__} does not lay out its state as the model does")
    ref.load_state_dict({k: v for (k, _), (_, v) in pairs})
    return ref


def reference_srp(plain: nn.Module) -> nn.Module:
    """The training form of a plain :class:`~foldattn.models.CifarRepVGG` or :class:`~foldattn.models.SrpCifarResNet`,
    each block written as its paper's code writes it, with ``plain``'s weights and statistics."""
    return _load_in_order(_build_like(plain, deployed=False), plain).train(plain.training)


def reference_srp_deployed(plain: nn.Module) -> nn.Module:
    """The deployed network of ``plain`` (every block fused) as a plain stack of biased convs and ReLUs."""
    from .._utils import eval_mode
    from ..srp import reparameterize

    with eval_mode(plain):  # the fold uses the running statistics; the caller's module keeps its mode
        deployed = reparameterize(plain)
    return _load_in_order(_build_like(deployed, deployed=True), deployed).eval()
