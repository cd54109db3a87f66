"""Parallel linear branches that read one tensor and are summed, merged into one convolution.

The structural re-parameterization of RepVGG, ACNet and DBB (Ding et al.) for code that
declares none: a sum ``bn1(conv3x3(x)) + bn2(conv1x1(x)) + bn3(x) + avgpool(x) + x`` is, in
eval mode, one affine map of ``x``, so it is one ``Conv2d`` with a bias. :func:`merge_branches`
finds such sums in a ``torch.fx`` trace of the model and rewrites them; the algebra is
:mod:`foldattn.transforms` (float64, cast back).

A branch is one of: ``Conv2d`` (with an eval-mode ``BatchNorm2d`` after it or not), a
``BatchNorm2d`` on the shared input (an identity branch with a norm), ``AvgPool2d`` (with a
norm or not), or the shared input itself. They merge exactly when every conv and pool has the
same stride, zero padding of half its (odd) kernel, no dilation, and the same groups and
channels; identity branches need stride 1 and as many outputs as inputs. A sum that does not
qualify is left as it is and reported with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._utils import first_line, set_submodule
from .transforms import add_branches, avgpool_as_conv, fuse_bn, fuse_conv_bn, identity_as_conv, pad_kernel

__all__ = ["MergedSum", "MergeReport", "merge_branches"]

_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class MergedSum:
    """Parallel branches merged into one conv (named ``into``)."""

    into: str
    branches: list[str]
    kernel_size: tuple[int, int]


@dataclass
class MergeReport:
    """What :func:`merge_branches` merged, and the sums of parallel branches it left, with the reason."""

    merged: list[MergedSum] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} sum(s) of parallel branches, left {len(self.left)}"]
        lines += [f"  merged {' + '.join(m.branches)} into {m.into} ({m.kernel_size[0]}x{m.kernel_size[1]})"
                  for m in self.merged]
        lines += [f"  left   {where}: {why}" for where, why in self.left]
        return "\n".join(lines)


@dataclass
class _Branch:
    kind: str  # "conv", "pool", "identity", "constant"
    nodes: list[fx.Node]  # the branch's own nodes, input side first
    conv: nn.Conv2d | None = None
    pool: nn.AvgPool2d | None = None
    bn: _BatchNorm | None = None
    label: str = ""


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and bool(node.kwargs.get("alpha", 1) == 1)
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _terms(node: fx.Node) -> list[fx.Node]:
    """The leaves of the tree of additions rooted at ``node`` (an addition used only by the next one)."""
    out = []
    for arg in node.args:
        if isinstance(arg, fx.Node) and _is_add(arg) and len(arg.users) == 1:
            out += _terms(arg)
        else:
            out.append(arg)  # type: ignore[arg-type]
    return out


def _adds_of(node: fx.Node) -> list[fx.Node]:
    out = [node]
    for arg in node.args:
        if isinstance(arg, fx.Node) and _is_add(arg) and len(arg.users) == 1:
            out += _adds_of(arg)
    return out


def _single(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _module(gm: fx.GraphModule, node: Any, kind: type[nn.Module]) -> Any:
    """The ``kind`` module ``node`` calls on one tensor (a subclass with a forward of its own does not count)."""
    if isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        m = gm.get_submodule(str(node.target))
        if isinstance(m, kind) and type(m).forward is kind.forward:
            return m
    return None


def _branch(gm: fx.GraphModule, term: Any) -> tuple[_Branch, Any]:
    """The branch a term of the sum is, and the tensor it reads."""
    if not isinstance(term, fx.Node):
        return _Branch("constant", []), None
    bn = _module(gm, term, nn.BatchNorm2d)
    inner = cast(fx.Node, term.args[0]) if bn is not None else term  # the norm module's input
    # a conv or pool whose output only the norm reads is the branch's; otherwise the norm is on the shared input
    owned = bn is None or _single(inner, term)
    conv = _module(gm, inner, nn.Conv2d) if owned else None
    pool = _module(gm, inner, nn.AvgPool2d) if owned and conv is None else None
    if conv is None and pool is None:
        if bn is not None:  # a norm on the shared input
            return _Branch("identity", [term], bn=bn, label=str(term.target)), term.args[0]
        return _Branch("identity", [], label=f"{term.name} (identity)"), term
    nodes = [inner, term] if bn is not None else [inner]
    label = " -> ".join(str(n.target) for n in nodes)
    return _Branch("conv" if conv is not None else "pool", nodes, conv, pool, bn, label), inner.args[0]


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check(branches: list[_Branch], channels: int) -> tuple[str, tuple[int, int], int, int] | str:
    """``(why not, ...)`` or the merged conv's ``("", kernel, stride, groups)``."""
    convs = [b.conv for b in branches if b.conv is not None]
    if not convs:
        return "no convolution among the branches (nothing to merge into)"
    ref = convs[0]
    for c in convs:
        if c.padding_mode != "zeros" or _pair(c.dilation) != (1, 1) or c.transposed:
            return f"a conv with padding_mode={c.padding_mode!r}, dilation={c.dilation} or transposed"
        k, p = _pair(c.kernel_size), c.padding
        if isinstance(p, str) or _pair(p) != (k[0] // 2, k[1] // 2) or k[0] % 2 == 0 or k[1] % 2 == 0:
            return f"a {k[0]}x{k[1]} conv with padding {p}: only odd kernels padded by half merge exactly"
        if (c.in_channels, c.out_channels, c.groups) != (ref.in_channels, ref.out_channels, ref.groups):
            return "convs with different channels or groups"
        if _pair(c.stride) != _pair(ref.stride):
            return f"convs with different strides ({c.stride} vs {ref.stride})"
    stride = _pair(ref.stride)
    if stride[0] != stride[1]:
        return f"an anisotropic stride {ref.stride}"
    kh = max(_pair(c.kernel_size)[0] for c in convs)
    kw = max(_pair(c.kernel_size)[1] for c in convs)
    for b in branches:
        if b.pool is not None:
            k, s, p = _pair(b.pool.kernel_size), _pair(b.pool.stride or b.pool.kernel_size), _pair(b.pool.padding)
            if s != stride or p != (k[0] // 2, k[1] // 2) or k[0] % 2 == 0 or k[1] % 2 == 0 or b.pool.ceil_mode \
                    or not b.pool.count_include_pad or b.pool.divisor_override is not None:
                return (f"an AvgPool2d (kernel {b.pool.kernel_size}, stride {b.pool.stride}, padding "
                        f"{b.pool.padding}) that is not a centred, zero-counting pool with the convs' stride")
            kh, kw = max(kh, k[0]), max(kw, k[1])
        if b.kind in ("identity", "pool") and ref.in_channels != ref.out_channels:
            return f"an identity or pool branch, but the convs map {ref.in_channels} to {ref.out_channels} channels"
        if b.kind == "identity" and stride != (1, 1):
            return f"an identity branch beside convs of stride {stride[0]}"
        if b.bn is not None and (b.bn.running_mean is None or b.bn.running_var is None):
            return f"a BatchNorm without running statistics ({b.label})"
        if b.bn is not None and b.bn.num_features != ref.out_channels:
            return "a BatchNorm of another width"
    del channels
    return "", (kh, kw), stride[0], ref.groups


def _kernel(b: _Branch, size: tuple[int, int], channels: int, groups: int) -> tuple[Tensor, Tensor]:
    """The branch as ``(weight, bias)`` of a ``size`` conv, float64."""
    if b.conv is not None:
        w, bias = b.conv.weight.detach().double(), b.conv.bias
        if b.bn is not None:
            # _check refused norms without running statistics
            mean, var = cast(Tensor, b.bn.running_mean), cast(Tensor, b.bn.running_var)
            w, bias = fuse_conv_bn(w, bias, mean, var, b.bn.eps, b.bn.weight, b.bn.bias)
        return pad_kernel(w, size), (bias.detach().double() if bias is not None
                                     else torch.zeros(w.shape[0], dtype=torch.float64))
    if b.pool is not None:
        w = pad_kernel(avgpool_as_conv(channels, _pair(b.pool.kernel_size), groups), size)
    else:
        w = identity_as_conv(channels, size, groups)
    bias = torch.zeros(channels, dtype=torch.float64)
    if b.bn is not None:
        s, t = fuse_bn(cast(Tensor, b.bn.running_mean), cast(Tensor, b.bn.running_var), b.bn.eps, b.bn.weight,
                       b.bn.bias)
        w, bias = w * s.reshape(-1, 1, 1, 1), t
    return w, bias


@torch.no_grad()
def merge_branches(model: nn.Module) -> tuple[nn.Module, MergeReport]:
    """Merge every sum of parallel linear branches of ``model`` into one conv (eval-mode semantics).

    Returns ``(model, report)``: the model unchanged when nothing merges, else a
    ``torch.fx.GraphModule`` with the sums replaced (the other layers keep their names).
    """
    from .graph import _Tracer

    report = MergeReport()
    try:
        graph = _Tracer(()).trace(model)
    except Exception as e:  # data-dependent control flow, ...
        report.left.append(("<model>", f"torch.fx cannot trace it ({first_line(e)[:120]}), so its sums of parallel "
                                       "branches are not merged"))
        return model, report
    gm = fx.GraphModule(model, graph)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    for root in list(gm.graph.nodes):
        if not _is_add(root) or root.graph is not gm.graph or any(
                _is_add(u) and len(root.users) == 1 for u in root.users):
            continue
        terms = _terms(root)
        found = [_branch(gm, t) for t in terms]
        sources = {id(s) for _, s in found if s is not None}
        kinds = [b.kind for b, _ in found]
        if len(sources) != 1 or "conv" not in kinds or "constant" in kinds:
            if kinds.count("conv") >= 2 and len(sources) == 1:
                report.left.append((str(root.name), "a constant is added to the branches"))
            continue  # not a sum of parallel branches of one tensor (e.g. a residual x + f(x))
        branches = [b for b, _ in found]
        convs = [b.conv for b in branches if b.conv is not None]
        where = " + ".join(b.label for b in branches)
        shared = sorted({str(n.target) for b in branches for n in b.nodes if calls.get(str(n.target), 0) > 1})
        if shared:  # merging rewrites the module for every place that calls it, each with its own sum
            report.left.append((where, f"{', '.join(shared)} is called {calls[shared[0]]} times (a module shared "
                                       "by several places)"))
            continue
        checked = _check(branches, convs[0].out_channels)
        if isinstance(checked, str):
            report.left.append((where, checked))
            continue
        _, size, stride, groups = checked
        ref = convs[0]
        weight, bias = add_branches(*(_kernel(b, size, ref.out_channels, groups) for b in branches))
        merged = nn.Conv2d(ref.in_channels, ref.out_channels, size, stride=stride, padding=(size[0] // 2, size[1] // 2),
                           groups=groups, bias=True, device=ref.weight.device, dtype=ref.weight.dtype)
        merged.weight.copy_(weight.to(ref.weight.dtype))
        merged.bias.copy_(bias.to(ref.weight.dtype))  # type: ignore[union-attr]
        first = next(b for b in branches if b.conv is not None)
        name = str(first.nodes[0].target)
        source = found[0][1]
        with gm.graph.inserting_before(root):
            node = gm.graph.call_module(name, (source,))
        root.replace_all_uses_with(node)
        dead = _adds_of(root) + [n for b in branches for n in reversed(b.nodes)]
        for n in dead:
            if not n.users:
                gm.graph.erase_node(n)
        set_submodule(gm, name, merged)
        report.merged.append(MergedSum(name, [b.label for b in branches], size))
    if not report.merged:
        return model, report
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report
