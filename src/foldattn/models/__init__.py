"""Backbones: the paper's CIFAR ResNets, behind a name registry.

>>> from foldattn.models import create_model, list_models
>>> model = create_model("cifar_resnet20", attention="se", asr=True)
"""

from ._registry import create_model, list_models, register_model
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

__all__ = [
    "create_model", "list_models", "register_model",
    "CifarResNet", "BasicBlock", "Bottleneck",
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "cifar_resnet164",
]
