"""Model-level fold: replace every ASR layer by its host with ``v`` folded in.

Then every structural re-parameterization block (:class:`foldattn.srp.RepBlock`:
RepVGG, ACNet, DBB) is replaced by its fused conv, so ASR on a block and the block's
own re-parameterization deploy in one call. Optionally fuse Conv -> BatchNorm pairs
afterwards so the deployed graph has no BatchNorm. The algebra lives in :mod:`foldattn.transforms`.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._utils import set_submodule, unwrap_model
from .asr import ASR
from .graph import build_graph
from .srp import rep_blocks, reparameterize
from .transforms import fuse_conv_bn

__all__ = ["fold", "asr_layers", "conv_bn_pairs", "has_foldable"]


def _has_rep_blocks(model: nn.Module) -> bool:
    return next(rep_blocks(model), None) is not None


def has_foldable(model: nn.Module) -> bool:
    """True if :func:`fold` changes ``model``: it has ASR layers or re-parameterization blocks
    (a plain RepVGG/ACNet/DBB network still deploys fused)."""
    model = unwrap_model(model)
    return bool(asr_layers(model)) or _has_rep_blocks(model)


def asr_layers(model: nn.Module) -> list[tuple[str, ASR]]:
    """``(name, layer)`` for every ASR layer of ``model``, in module order."""
    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, ASR)]


@torch.no_grad()
def fold(model: nn.Module, inplace: bool = False, fuse_bn: bool = False, reparam: bool = True) -> nn.Module:
    """The deployed form of ``model``: each ASR layer replaced by its folded host.

    DataParallel/DDP and ``torch.compile`` wrappers are removed first. Without
    ``fuse_bn`` (and with no re-parameterization block) the result has exactly the
    plain backbone's module tree, so its ``state_dict()`` loads with ``strict=True``
    into the model built without ASR. Re-parameterization blocks
    (:class:`foldattn.srp.RepBlock`) are then fused into single convs: the result
    loads strictly into the model built with ``deploy=True``.

    Args:
        model: a model containing :class:`~foldattn.ASR` layers and/or RepBlocks.
        inplace: modify ``model`` itself; by default a deep copy is folded.
        fuse_bn: also fuse every Conv -> BatchNorm pair (BN replaced by Identity).
        reparam: fuse every :class:`~foldattn.srp.RepBlock` (after the ASR fold);
            ``False`` keeps the blocks' training form.

    Returns:
        The folded model; the caller's train/eval modes are kept. Folding a model
        without ASR layers returns it unchanged (with a warning), so ``fold`` is
        idempotent.

    Raises:
        ValueError: an ASR layer's ``psi`` or vector holds NaN/Inf (the layer is named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    layers = asr_layers(model)
    has_blocks = reparam and _has_rep_blocks(model)
    if not layers and not fuse_bn and not has_blocks:
        warnings.warn("fold: the model has no ASR layer; returned unchanged", stacklevel=3)
    for name, layer in layers:
        try:
            replacement = layer.fuse()
        except ValueError as e:
            raise ValueError(f"cannot fold ASR layer {name!r}: {e}") from None
        if name:
            set_submodule(model, name, replacement)
        else:
            model = replacement
    if has_blocks:
        model = reparameterize(model, inplace=True)
    if fuse_bn:
        _fuse_conv_bn_pairs(model)
    return model


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs where the BN's only input is the conv's only use.

    Read from the model's dataflow graph (:func:`foldattn.graph.build_graph`: a ``torch.fx``
    trace, else a recorded pass on the model's ``default_input_size``, else the order of
    ``nn.Sequential`` containers).
    """
    graph, _ = build_graph(model)
    assert graph is not None  # the nn.Sequential fallback always gives one
    calls = graph.calls()
    pairs = []
    for i in graph.module_nodes(_BatchNorm):
        src = graph.sole_producer(i)
        bn_name = graph.nodes[i].target
        if src is None or calls[bn_name] != 1:
            continue
        conv_name = graph.nodes[src].target
        if _fusable(graph.modules.get(conv_name), graph.modules[bn_name]):
            pairs.append((conv_name, bn_name))
    return pairs


def _fusable(conv: nn.Module | None, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _ConvNd)
        and not conv.transposed
        and isinstance(bn, _BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _fuse_conv_bn_pairs(model: nn.Module) -> None:
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w, b = fuse_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b)
        set_submodule(model, bn_name, nn.Identity())
