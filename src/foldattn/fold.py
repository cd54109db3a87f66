"""Model-level fold: replace every ASR layer by its host with ``v`` folded in.

Then every structural re-parameterization block (:class:`foldattn.srp.RepBlock`:
RepVGG, ACNet, DBB) is replaced by its fused conv, so ASR on a block and the block's
own re-parameterization deploy in one call. Optionally fuse Conv -> BatchNorm pairs
afterwards so the deployed graph has no BatchNorm. The algebra lives in :mod:`foldattn.transforms`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal, cast, overload

import torch
from torch import nn

from ._hooks import CALL_KINDS, carry_hooks, carry_problem, hook_kinds, hook_memo, rebind_hooks
from ._utils import set_submodule, unwrap_model
from .asr import ASR
from .fuse import FuseReport, fuse_norms, norm_pairs
from .merge import merge_branches
from .scales import fold_scales
from .srp import rep_blocks, reparameterize
from .srp.declared import reparameterize_declared

__all__ = ["fold", "asr_layers", "conv_bn_pairs", "has_foldable", "HookNotCarriedError"]


class HookNotCarriedError(ValueError):
    """``fold`` would lose a hook registered on a module it replaces, or change what the hook sees."""


def _refuse(name: str, module: nn.Module, problem: str, fate: str) -> HookNotCarriedError:
    return HookNotCarriedError(
        f"fold: {name or 'the model'} ({type(module).__name__}) has {problem}; fold {fate}, so the hook cannot "
        "be kept exactly: remove it (handle.remove()) before fold and register it on the folded model"
    )


class _Hooks:
    """The hooked modules when fold starts, and which of them reached their replacement."""

    def __init__(self, model: nn.Module, inplace: bool) -> None:
        self.hooked = {id(m): (n, m) for n, m in model.named_modules() if hook_kinds(m)}
        self.carried: set[int] = set()
        # the refusals that come after a change say so (the ones before any change cannot)
        self.changed = " (the model was already changed in place)" if inplace else ""

    def check_asr(self, name: str, layer: ASR) -> None:
        """Before anything changes: the ASR layer's hooks can move to its replacement, and no hook is on a
        part of it that fold deletes (its attention; a host's parametrizations)."""
        if not self.hooked:
            return
        problem = carry_problem(layer, layer.host if layer.classic is None else None)
        if problem:
            raise _refuse(name, layer, problem, "replaces the ASR layer by its host")
        kept = {id(m) for m in layer.host.modules()} | {id(m) for m in (layer.classic or nn.Module()).modules()}
        for n, m in layer.host.named_modules():
            if "parametrizations" in n.split("."):  # _plain_copy evaluates and drops them
                kept.discard(id(m))
        for n, m in layer.named_modules():
            if n and id(m) not in kept and hook_kinds(m):
                raise _refuse(f"{name}.{n}" if name else n, m, f"a {'/'.join(hook_kinds(m))} hook",
                              f"deletes it when it folds the ASR layer {name or 'the model'}")

    def check_block(self, name: str, block: nn.Module) -> None:
        """Before anything changes: a re-parameterization block's hooks can move to its fused conv."""
        if not self.hooked:
            return
        problem = carry_problem(block, None)
        if problem:
            raise _refuse(name, block, problem, "replaces the block by one conv")
        for n, m in block.named_modules():
            if n and hook_kinds(m):
                raise _refuse(f"{name}.{n}" if name else n, m, f"a {'/'.join(hook_kinds(m))} hook",
                              f"merges the block {name or 'the model'} into one conv and deletes it")

    def carry(self, name: str, old: nn.Module, new: nn.Module, fate: str) -> None:
        if not hook_kinds(old) or new is old:
            return
        problem = carry_problem(old, new)
        if problem:
            raise _refuse(name, old, problem, fate + self.changed)
        carry_hooks(old, new)
        self.carried.add(id(old))

    def finish(self, model: nn.Module, scaled: list[tuple[str, str]]) -> None:
        """After the fold: every hooked module is still there or its hooks reached its replacement, and
        no hooked layer had a scale folded into its output."""
        if not self.hooked:
            return
        for scale, into in scaled:
            m = model.get_submodule(into)
            if set(hook_kinds(m)) & CALL_KINDS:
                raise _refuse(into, m, f"a {'/'.join(hook_kinds(m))} hook",
                              f"folded the scale layer {scale} into its output{self.changed}")
        present = {id(m) for m in model.modules()}
        for key, (n, m) in self.hooked.items():
            if key not in present and key not in self.carried:
                raise _refuse(n, m, f"a {'/'.join(hook_kinds(m))} hook", f"merged or deleted that module{self.changed}")


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
@overload
def fold(model: nn.Module, *, inplace: bool = ..., fuse_bn: bool = ..., reparam: bool = ...,
         return_report: Literal[False] = ..., example_inputs: Any = ...) -> nn.Module: ...
@overload
def fold(model: nn.Module, *, inplace: bool = ..., fuse_bn: bool = ..., reparam: bool = ...,
         return_report: Literal[True], example_inputs: Any = ...) -> tuple[nn.Module, FuseReport | None]: ...
@overload
def fold(model: nn.Module, *, inplace: bool = ..., fuse_bn: bool = ..., reparam: bool = ...,
         return_report: bool, example_inputs: Any = ...) -> nn.Module | tuple[nn.Module, FuseReport | None]: ...
def fold(model: nn.Module, *, inplace: bool = False, fuse_bn: bool = False, reparam: bool = True,
         return_report: bool = False, example_inputs: Any = None) -> nn.Module | tuple[nn.Module, FuseReport | None]:
    """The deployed form of ``model``: each ASR layer replaced by its folded host.

    DataParallel/DDP and ``torch.compile`` wrappers are removed first. Without
    ``fuse_bn`` (and with no re-parameterization block) the result has exactly the
    plain backbone's module tree, so its ``state_dict()`` loads with ``strict=True``
    into the model built without ASR. Re-parameterization blocks
    (:class:`foldattn.srp.RepBlock`) are then fused into single convs: the result
    loads strictly into the model built with ``deploy=True``.

    Hooks (``register_forward_hook`` and the others) are kept exactly or refused, never dropped:
    the copy keeps the user's hook objects themselves (a recorder's bound method records into the
    same recorder). A module that fold replaces (an ASR layer by its host, a RepBlock or a block
    with ``fuse()`` by its deploy form, the root by a ``GraphModule``) hands its forward-pre,
    forward, full backward and backward-pre hooks to its replacement, which computes the same
    tensors (the hook's ``module`` argument is the replacement); the host's own hooks stay on the
    host, which sees the same (scaled) output as before. Refused, with
    :class:`HookNotCarriedError` naming the module and the hook kind: state-dict hooks
    (``state_dict``/``load_state_dict`` pre/post) on a replaced module (its replacement has
    other keys), legacy ``register_backward_hook`` hooks on one, a hook on a part that fold deletes
    (an ASR layer's attention, a block's branches, a norm or branch that ``fuse_bn`` merges), a
    hook on a layer into which a scale layer is folded, and combinations whose order cannot be
    kept (a backward hook on a replaced module whose replacement has hooks too). ASR layers and
    RepBlocks are checked before anything changes; a refusal from the ``fuse_bn`` steps comes after
    them (with ``inplace=True`` the model is then already changed). A norm whose conv or itself has
    hooks is not fused (reported).

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
            layer before it where that is proven exact (:func:`foldattn.fuse.fuse_norms`). What
            cannot be fused or merged stays, with a warning that names it and the reason.
        reparam: fuse every :class:`~foldattn.srp.RepBlock` (after the ASR fold), and with
            ``fuse_bn`` apply steps (1) and (2); ``False`` keeps the blocks' training form.
        return_report: also return the :class:`~foldattn.fuse.FuseReport` (``None`` without
            ``fuse_bn``).
        example_inputs: with ``fuse_bn``, inputs shaped like the model's (a tensor or a tuple of
            positional inputs), run once in eval mode under ``no_grad`` where a pair's exactness
            depends on shapes (``Linear -> BatchNorm1d``, ``Conv1d -> BatchNorm1d``,
            ``SyncBatchNorm``, frozen BatchNorms), to prove it; the model's hooks see that pass too.
            By default a zero batch of the model's ``default_input_size`` where it declares one,
            else such pairs are left with the reason "input shape unknown".

    Returns:
        The folded model (and the report); the caller's train/eval modes are kept. Folding a
        model without ASR layers returns it unchanged (with a warning), so ``fold`` is
        idempotent.

    Raises:
        ValueError: an ASR layer's ``psi`` or vector holds NaN/Inf (the layer is named); the model
            cannot run on ``example_inputs``.
        HookNotCarriedError: a hook that cannot be kept exactly (see above).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    flags = {"inplace": inplace, "fuse_bn": fuse_bn, "reparam": reparam, "return_report": return_report}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"fold: {name} must be True or False, got {flag!r}")
    if example_inputs is not None and not fuse_bn:
        raise ValueError("fold: example_inputs only serve fuse_bn=True (to prove the shapes of norm fusions); "
                         "drop it or pass fuse_bn=True")
    model = unwrap_model(model)  # where the model enters: the helpers below take it unwrapped
    if not inplace:
        model = copy.deepcopy(model, hook_memo(model))  # the copy calls the user's hook objects, not copies
    layers = _asr_layers(model)
    has_blocks = reparam and _has_rep_blocks(model)
    if not layers and not fuse_bn and not has_blocks and not _has_scale_layers(model):
        warnings.warn("fold: the model has no ASR layer; returned unchanged", stacklevel=3)
    hooks = _Hooks(model, inplace)
    for name, layer in layers:  # every refusal that can be known before the model changes
        hooks.check_asr(name, layer)
    for name, block in rep_blocks(model) if has_blocks else ():
        hooks.check_block(name, block)
    for name, layer in layers:
        try:
            replacement = layer.fuse()
        except ValueError as e:
            raise ValueError(f"cannot fold ASR layer {name!r}: {e}") from None
        if hooks.hooked:
            host = replacement if layer.classic is None else cast(nn.Sequential, replacement)[0]
            hooks.carried.update(id(m) for m in rebind_hooks(layer.host, host))  # fuse() deep-copied them
            hooks.carry(name, layer, replacement, "replaces the ASR layer by its host")
        if name:
            set_submodule(model, name, replacement)
        else:
            model = replacement
    if has_blocks:
        blocks = list(rep_blocks(model))
        model = reparameterize(model, inplace=True)
        for name, block in blocks:
            hooks.carry(name, block, model.get_submodule(name) if name else model, "replaces the block by one conv")
    declared: list[tuple[str, str]] = []
    merges = None
    if fuse_bn and reparam:  # the smallest form: what modules declare, then sums of branches that declare nothing
        before = dict(model.named_modules()) if hooks.hooked else {}
        model, declared = reparameterize_declared(model)
        for path, method in declared if hooks.hooked else ():
            if method == "fuse":
                hooks.carry(path, before[path], model.get_submodule(path) if path else model,
                            "replaces the module by what its fuse() returns")
        root = model
        model, merges = merge_branches(model)
        hooks.carry("", root, model, "rebuilds the model as a torch.fx GraphModule to merge its branches")
    # training-time scale layers (LayerScale) into the layer before them; timm's too when fusing for deployment
    scales = fold_scales(model, third_party=fuse_bn)
    report = None
    if fuse_bn:
        report = fuse_norms(model, example_inputs)
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
    hooks.finish(model, scales.folded)
    return (model, report) if return_report else model


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, norm)`` pairs that ``fold(..., fuse_bn=True)`` fuses (see :func:`foldattn.fuse.norm_pairs`)."""
    return norm_pairs(model)[0]
