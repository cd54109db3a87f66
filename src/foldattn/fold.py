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

from ._utils import set_submodule, unwrap_model
from .asr import ASR
from .fuse import FuseReport, fuse_norms, norm_pairs
from .merge import merge_branches
from .scales import fold_scales
from .srp import rep_blocks, reparameterize
from .srp.declared import reparameterize_declared

__all__ = ["fold", "asr_layers", "conv_bn_pairs", "has_foldable"]


def _has_rep_blocks(model: nn.Module) -> bool:
    return next(rep_blocks(model), None) is not None


def _has_scale_layers(model: nn.Module) -> bool:
    return any(getattr(type(m), "folds_away", False) for m in model.modules())


def has_foldable(model: nn.Module) -> bool:
    """True if :func:`fold` changes ``model``: it has ASR layers, re-parameterization blocks (a plain
    RepVGG/ACNet/DBB network still deploys fused) or training-time scale layers (LayerScale)."""
    return _has_foldable(unwrap_model(model))


def _has_foldable(model: nn.Module) -> bool:
    return bool(_asr_layers(model)) or _has_rep_blocks(model) or _has_scale_layers(model)


def asr_layers(model: nn.Module) -> list[tuple[str, ASR]]:
    """``(name, layer)`` for every ASR layer of ``model``, in module order."""
    return _asr_layers(unwrap_model(model))


def _asr_layers(model: nn.Module) -> list[tuple[str, ASR]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ASR)]


@torch.no_grad()
def fold(model: nn.Module, *, inplace: bool = False, fuse_bn: bool = False, reparam: bool = True,
         return_report: bool = False) -> nn.Module | tuple[nn.Module, FuseReport | None]:
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
        fuse_bn: the smallest exact deployed form, for inference only: after the ASR fold and
            the RepBlocks, (1) every module's own declared re-parameterization (timm's protocol:
            ``fuse()``, ``reparameterize()``, ``switch_to_deploy()``: RepVGG, MobileOne, RepViT,
            FastViT, RepGhost, ...), (2) sums of parallel linear branches that declare nothing
            (conv+norm, 1x1 conv+norm, a norm on the identity, avg-pool) merged into one conv
            (:func:`foldattn.merge.merge_branches`; the model becomes a ``torch.fx.GraphModule``
            when one merges), (3) third-party scale layers (timm's LayerScale) folded into the
            layer before them, (4) every norm with running statistics fused into the conv/linear
            layer before it (:func:`foldattn.fuse.fuse_norms`). What cannot be fused or merged
            stays, with a warning that names it and the reason.
        reparam: fuse every :class:`~foldattn.srp.RepBlock` (after the ASR fold), and with
            ``fuse_bn`` apply steps (1) and (2); ``False`` keeps the blocks' training form.
        return_report: also return the :class:`~foldattn.fuse.FuseReport` (``None`` without
            ``fuse_bn``).

    Returns:
        The folded model (and the report); the caller's train/eval modes are kept. Folding a
        model without ASR layers returns it unchanged (with a warning), so ``fold`` is
        idempotent.

    Raises:
        ValueError: an ASR layer's ``psi`` or vector holds NaN/Inf (the layer is named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    flags = {"inplace": inplace, "fuse_bn": fuse_bn, "reparam": reparam, "return_report": return_report}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"fold: {name} must be True or False, got {flag!r}")
    model = unwrap_model(model)  # where the model enters: the helpers below take it unwrapped
    if not inplace:
        model = copy.deepcopy(model)
    layers = _asr_layers(model)
    has_blocks = reparam and _has_rep_blocks(model)
    if not layers and not fuse_bn and not has_blocks and not _has_scale_layers(model):
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
    declared: list[tuple[str, str]] = []
    merges = None
    if fuse_bn and reparam:  # the smallest form: what modules declare, then sums of branches that declare nothing
        model, declared = reparameterize_declared(model)
        model, merges = merge_branches(model)
    # training-time scale layers (LayerScale) into the layer before them; timm's too when fusing for deployment
    scales = fold_scales(model, third_party=fuse_bn)
    report = None
    if fuse_bn:
        report = fuse_norms(model)
        report.reparameterized, report.scales, report.scales_left = declared, scales.folded, scales.left
        if merges is not None:
            report.merged, report.merge_left = merges.merged, merges.left
        if report.left:
            shown = "; ".join(f"{x.norm}: {x.reason}" for x in report.left[:3])
            more = f" (and {len(report.left) - 3} more)" if len(report.left) > 3 else ""
            warnings.warn(f"fold(fuse_bn=True) fused {len(report.fused)} norm layer(s) and left "
                          f"{len(report.left)}: {shown}{more}; fold(..., return_report=True) lists all",
                          stacklevel=3)
        if report.merge_left:
            where, why = report.merge_left[0]
            warnings.warn(f"fold(fuse_bn=True) left {len(report.merge_left)} sum(s) of parallel branches unmerged, "
                          f"e.g. {where}: {why}", stacklevel=3)
    return (model, report) if return_report else model


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, norm)`` pairs that ``fold(..., fuse_bn=True)`` fuses (see :func:`foldattn.fuse.norm_pairs`)."""
    return norm_pairs(model)[0]
