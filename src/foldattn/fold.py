"""Model-level fold: replace every ASR layer by its host with ``v`` folded in.

Then every structural re-parameterization block (:class:`foldattn.srp.RepBlock`:
RepVGG, ACNet, DBB) is replaced by its fused conv, so ASR on a block and the block's
own re-parameterization deploy in one call. Optionally fuse Conv -> BatchNorm pairs
afterwards so the deployed graph has no BatchNorm. The algebra lives in :mod:`foldattn.transforms`.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._utils import set_submodule, unwrap_model
from .asr import ASR
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

    Found from a ``torch.fx`` trace where the model traces; otherwise from
    ``nn.Sequential`` containers only (whose order is their execution order).
    """
    try:
        return _pairs_from_trace(model)
    except Exception:  # tracing fails on data-dependent control flow: fall back
        return _pairs_from_sequentials(model)


def _pairs_from_trace(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        single_use = len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1
        if single_use and _fusable(modules.get(src.target), modules[node.target]):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for (a, conv), (b, bn) in itertools.pairwise(children):
                if _fusable(conv, bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
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
