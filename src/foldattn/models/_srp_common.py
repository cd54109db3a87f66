"""Shared pieces of the re-parameterization backbones (private)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import srp as _srp
from ..asr import ASR
from ..attention import Factory, PsiInit
from .cifar_resnet import check_attention_args

__all__ = ["check_attention_args", "factories", "rep_layer"]


def factories(attention: str | None, asr: bool, both: bool, deploy: bool, kwargs: dict[str, Any],
              every: int = 1) -> tuple[Factory, Factory]:
    """``(asr_factory, classic_factory)``; the deploy form has no ASR (it is folded away)."""
    asr_factory = Factory(attention if asr and not deploy else None, every=every, **kwargs)
    classic_factory = Factory(attention if (both or not asr) else None, every=every, **kwargs)
    return asr_factory, classic_factory


def rep_layer(kind: str, in_channels: int, out_channels: int, kernel_size: int, stride: int,
              asr: Factory | None, psi_init: PsiInit, deploy: bool) -> nn.Module:
    """Block ``kind`` (or its deploy conv), wrapped in ASR when ``asr`` yields a module."""
    layer = _srp.create(kind, in_channels, out_channels, kernel_size, stride, deploy=deploy)
    static = asr(out_channels) if asr is not None else None
    if static is not None:
        static.make_static(psi_init)
        layer = ASR(layer, static)
    return layer
