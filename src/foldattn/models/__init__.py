"""Backbones: the paper's CIFAR ResNets, behind a name registry.

>>> from foldattn.models import create_model, list_models
>>> model = create_model("cifar_resnet20", attention="se", asr=True)
"""

from ._registry import create_model, get_builder, list_models, register_model, unregister_model
from .cifar_resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    cifar_resnet164,
)
from .repvgg import CifarRepVGG, cifar_repvgg_a0
from .srp_resnet import (
    SrpCifarResNet,
    cifar_resnet20_acnet,
    cifar_resnet20_dbb,
    cifar_resnet56_acnet,
    cifar_resnet56_dbb,
)
from .vit import CifarViT, cifar_vit_tiny

__all__ = [
    "create_model", "list_models", "register_model", "unregister_model", "get_builder",
    "CifarResNet", "BasicBlock", "Bottleneck",
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "cifar_resnet164",
    "CifarRepVGG", "SrpCifarResNet", "CifarViT", "cifar_repvgg_a0", "cifar_resnet20_acnet", "cifar_resnet20_dbb",
    "cifar_resnet56_acnet", "cifar_resnet56_dbb", "cifar_vit_tiny",
]
