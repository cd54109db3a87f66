"""Helpers shared by the re-parameterization and ViT tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldattn import ASR

#: Leaf module types a deployed conv network may contain.
DEPLOYED_CONV_NET = (nn.Conv2d, nn.Linear, nn.ReLU, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine, random LayerNorm affine, random ``psi``: a model whose
    fold is not trivially the identity."""
    g = torch.Generator().manual_seed(seed)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * (hi - lo) + lo)

    for m in model.modules():
        if isinstance(m, _BatchNorm):
            u(m.running_mean, -0.5, 0.5)
            u(m.running_var, 0.5, 2.0)
            u(m.weight, 0.5, 1.5)
            u(m.bias, -0.5, 0.5)
        elif isinstance(m, nn.LayerNorm):
            u(m.weight, 0.5, 1.5)
            u(m.bias, -0.5, 0.5)
        elif isinstance(m, ASR):
            u(m.attention.psi, -1.0, 1.0)
    return model


def leaf_types(model: nn.Module) -> set[type[nn.Module]]:
    return {type(m) for m in model.modules() if not list(m.children())}
