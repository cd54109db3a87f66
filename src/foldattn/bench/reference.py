"""The plain networks written the usual way, for the benchmark's ``reference`` row.


The ASR authors' code trains the CIFAR ResNets of He et al. 2016 in the layout of the
pytorch-classification project: each block computes its branch, adds the shortcut *in place*
and applies a ReLU; no attention hooks, no ASR wrapper. Every foldattn model deploys to the
plain :class:`~foldattn.models.CifarResNet`, so that network must cost what this one costs;
the benchmark times both in the same group, with the same weights (the ``state_dict`` keys
are the same) and checks that their outputs agree. ``cifar_vit_tiny``'s reference is timm's
``VisionTransformer`` of the same size (no class token, mean pooling after the final norm).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["reference_cifar_resnet", "reference_vit"]


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
    block = plain.blocks[0]
    c, h, _ = plain.default_input_size
    patch = plain.patch_embed.kernel_size[0]
    dim = plain.patch_embed.out_channels
    ref = timm_vit.VisionTransformer(
        img_size=h, patch_size=patch, in_chans=c, embed_dim=dim, depth=len(plain.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / dim,
        num_classes=plain.head.out_features, class_token=False, global_pool="avg", fc_norm=False)
    state = {("patch_embed.proj" + k[len("patch_embed"):] if k.startswith("patch_embed.") else k): v
             for k, v in plain.state_dict().items()}
    ref.load_state_dict(state)
    return ref
