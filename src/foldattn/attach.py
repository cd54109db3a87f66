"""Insert ASR layers into an arbitrary PyTorch model, without editing its source.

ASR, Attention-alike Structural Re-parameterization (Zhong et al., arXiv 2304.06345;
ECCV 2024). :func:`attach` finds *sites* (layers whose output ASR will scale) and wraps
each in :class:`~foldattn.ASR`; :func:`find_sites` is the same search as a dry run.

``where="block"`` puts ASR where SE-Net puts its attention: on the last layer of each
residual branch, before the addition. The sites are read from the model's dataflow graph,
obtained from a ``torch.fx`` trace or, where the model does not trace (data-dependent
control flow, ...), from one recorded forward pass on ``example_inputs``. The rules are in
``docs/any-model.md``; in short, for every addition ``a + b`` of two computed tensors:

1. the branch with more parametrised layers since the two operands split is the residual
   branch (the other is the shortcut); equal counts are ambiguous and skipped;
2. walking back from the residual operand, the first layer reached is the site if it can
   absorb a per-channel scale (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, Conv, Linear,
   RMSNorm, or a module with ``asr_parameters()``); anything else (e.g.
   ``nn.MultiheadAttention``) is reported as skipped, with the reason. The walk passes
   dropout, drop-path, permute/reshape, multiplication by a constant (such as ConvNeXt's
   layer-scale), ReLU and LeakyReLU, which commute with a positive per-channel scale, and other
   activations (GELU, SiLU, Hardswish, ...) and existing attention modules, which do not:
   there ASR scales their input, still exactly foldable but a slightly different function
   from attention after them.

Attention modules the model already has (torchvision's ``SqueezeExcitation``, timm's
SE/ECA/CBAM/..., foldattn's) are never hosts and are left as they are.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import attention as _attention
from ._utils import eval_mode, set_submodule, unwrap_model
from .asr import ASR, HOST_TYPES, ChannelsLast, host_channels

__all__ = [
    "attach", "find_sites", "AttachReport", "Site", "Skipped",
    "register_attention_type", "register_transparent_type", "is_existing_attention",
]

log = logging.getLogger(__name__)

Where = Literal["block", "norms"] | None

# --------------------------------------------------------------------------------------
# Type registries (qualified class names, so that optional packages need not be imported)
# --------------------------------------------------------------------------------------

#: Attention modules a model may already contain: never hosts, never entered, passed through
#: when walking back from an addition (ASR then sits before them: "ASR(X) + X").
_ATTENTION_TYPES: set[str] = {
    "torchvision.ops.misc.SqueezeExcitation",
    "timm.layers.squeeze_excite.SEModule",
    "timm.layers.squeeze_excite.EffectiveSEModule",
    "timm.layers.squeeze_excite.SqueezeExcite",
    "timm.layers.squeeze_excite.SqueezeExciteCl",
    "timm.layers.eca.EcaModule",
    "timm.layers.eca.CecaModule",
    "timm.layers.cbam.CbamModule",
    "timm.layers.cbam.LightCbamModule",
    "timm.layers.gather_excite.GatherExcite",
    "timm.layers.global_context.GlobalContext",
    "timm.models._efficientnet_blocks.SqueezeExcite",
}

#: Modules that commute with a positive per-channel scale of their input (or are the identity
#: at inference): the walk from an addition back to its host passes through them.
_TRANSPARENT_TYPES: set[str] = {
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.dropout.Dropout1d",
    "torch.nn.modules.dropout.Dropout2d",
    "torch.nn.modules.dropout.Dropout3d",
    "torch.nn.modules.dropout.AlphaDropout",
    "torch.nn.modules.dropout.FeatureAlphaDropout",
    "torch.nn.modules.flatten.Flatten",
    "torchvision.ops.stochastic_depth.StochasticDepth",
    "torchvision.ops.misc.Permute",
    "timm.layers.drop.DropPath",
    "timm.layers.layer_scale.LayerScale",
    "timm.layers.layer_scale.LayerScale2d",
}

#: Function / method names (normalised: without leading/trailing underscores) the walk passes.
_TRANSPARENT_FUNCS = frozenset({
    "permute", "transpose", "reshape", "view", "flatten", "contiguous", "clone", "to", "float",
    "type_as", "squeeze", "unsqueeze", "getitem", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "feature_dropout", "alpha_dropout", "stochastic_depth", "drop_path", "relu", "relu6", "gelu",
    "silu", "hardswish", "leaky_relu", "mish", "elu", "roll", "pad", "narrow",
})
#: Binary operations the walk passes when the other operand is a constant (a parameter, ...).
_SCALE_FUNCS = frozenset({"mul", "imul", "rmul", "truediv", "itruediv", "div", "div_"})
_ADD_FUNCS = frozenset({"add", "iadd", "radd"})
_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(registry: set[str], cls: type | str) -> None:
    name = cls if isinstance(cls, str) else _qualname(cls)
    if "." not in name:
        raise ValueError(f"expected a class or its qualified name 'package.module.Class', got {name!r}")
    registry.add(name)


def register_attention_type(cls: type | str) -> None:
    """Declare a class (or ``"package.module.Class"``) as an attention module the model
    already has: :func:`attach` never puts ASR on it or inside it and leaves it in place."""
    _register(_ATTENTION_TYPES, cls)


def register_transparent_type(cls: type | str) -> None:
    """Declare a module type that commutes with a per-channel scale (e.g. a custom
    layer-scale or drop-path): ``where="block"`` walks through it to find the host."""
    _register(_TRANSPARENT_TYPES, cls)


def _matches(module: nn.Module, registry: set[str]) -> bool:
    return any(_qualname(c) in registry for c in type(module).__mro__)


def is_existing_attention(module: nn.Module) -> bool:
    """True for attention modules (SE, ECA, CBAM, ...) that :func:`attach` leaves alone."""
    return isinstance(module, _attention.ChannelAttention) or _matches(module, _ATTENTION_TYPES)


def _is_transparent_module(module: nn.Module) -> bool:
    if _matches(module, _TRANSPARENT_TYPES):
        return True
    # activations (not softmax-like normalisers or attention): elementwise, positive-homogeneous
    # or at least applied after the scale in the same place as SE's output would be
    return module.__class__.__module__ == "torch.nn.modules.activation" and not isinstance(
        module, (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
    )


def _is_host(module: nn.Module) -> bool:
    try:
        host_channels(module)
    except ValueError:
        return False
    return True


def _host_problem(module: nn.Module) -> str:
    try:
        host_channels(module)
    except ValueError as e:
        return str(e)
    return ""


def _is_leaf(module: nn.Module) -> bool:
    """Modules kept whole in the dataflow graph (not traced into)."""
    if isinstance(module, ASR) or is_existing_attention(module) or _is_transparent_module(module):
        return True
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if isinstance(module, (*HOST_TYPES, nn.MultiheadAttention)) or callable(getattr(module, "asr_parameters", None)):
        return True
    if any(True for _ in module.children()):
        return False  # containers (also torch.nn ones such as TransformerEncoderLayer) are traced into
    # torch.nn layers, and custom layers with their own parameters, are atomic operations
    return type(module).__module__.startswith(("torch.nn.", "torch.ao.nn.")) or any(
        True for _ in module.parameters(recurse=False)
    )


# --------------------------------------------------------------------------------------
# A small dataflow graph, built from torch.fx or from a recorded forward pass
# --------------------------------------------------------------------------------------


@dataclass
class _Node:
    kind: str  # "input" | "module" | "function" | "const"
    target: str  # module name, or normalised function name
    inputs: list[int]  # indices of the live nodes this node reads
    live: bool  # depends on the model input


class _Graph:
    def __init__(self, method: str) -> None:
        self.method = method
        self.nodes: list[_Node] = []

    def add(self, kind: str, target: str, inputs: Iterable[int], force_live: bool = False) -> int:
        ins = [i for i in dict.fromkeys(inputs) if self.nodes[i].live]
        live = force_live or bool(ins)
        self.nodes.append(_Node(kind if live or kind == "input" else "const", target, ins, live))
        return len(self.nodes) - 1

    def called_modules(self) -> set[str]:
        return {n.target for n in self.nodes if n.kind == "module"}


def _norm_name(name: str) -> str:
    return name.strip("_")


def _func_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    return _norm_name(getattr(target, "__name__", str(target)))


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m)


def _graph_from_fx(model: nn.Module) -> _Graph:
    fx_graph = _Tracer().trace(model)
    graph = _Graph("torch.fx trace")
    index: dict[torch.fx.Node, int] = {}

    def inputs_of(node: torch.fx.Node) -> list[int]:
        found: list[int] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(index[a]) if a in index else None)
        return found

    for node in fx_graph.nodes:
        if node.op == "placeholder":
            index[node] = graph.add("input", node.target, [], force_live=True)
        elif node.op == "get_attr":
            index[node] = graph.add("const", node.target, [])
        elif node.op == "call_module":
            index[node] = graph.add("module", str(node.target), inputs_of(node))
        elif node.op in ("call_function", "call_method"):
            name = _norm_name(node.target) if node.op == "call_method" else _func_name(node.target)
            index[node] = graph.add("function", name, inputs_of(node))
    return graph


class _Recorder(TorchFunctionMode):
    """Records tensor operations run outside leaf modules; leaf modules are recorded by hooks."""

    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.graph = graph
        self.producer: dict[int, int] = {}
        self.keep: list[Tensor] = []  # keeps ids unique while recording
        self.depth = 0

    def tensors(self, tree: Any) -> list[Tensor]:
        return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]

    def inputs(self, tree: Any) -> list[int]:
        return [self.producer[id(t)] for t in self.tensors(tree) if id(t) in self.producer]

    def produced(self, out: Any, node: int) -> None:
        for t in self.tensors(out):
            self.producer[id(t)] = node
            self.keep.append(t)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and self.tensors(out):
            node = self.graph.add("function", _func_name(func), self.inputs((args, kwargs)))
            self.produced(out, node)
        return out


def _graph_from_run(model: nn.Module, example_inputs: Any) -> _Graph:
    graph = _Graph("recorded forward pass")
    rec = _Recorder(graph)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for t in rec.tensors(args):
        rec.produced(t, graph.add("input", "input", [], force_live=True))
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)  # a module shared under two names keeps its first, as torch.fx does
    leaves = {id(m) for m in model.modules() if _is_leaf(m)}

    def pre(module: nn.Module, a: Any, kw: Any) -> None:
        if id(module) in leaves:
            rec.depth += 1

    def post(module: nn.Module, a: Any, kw: Any, out: Any) -> None:
        if id(module) in leaves:
            rec.depth -= 1
            if rec.depth == 0:
                rec.produced(out, graph.add("module", names.get(id(module), "?"), rec.inputs((a, kw))))

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad(), eval_mode(model), rec:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return graph


def _build_graph(model: nn.Module, example_inputs: Any, need: bool) -> tuple[_Graph | None, str]:
    """The dataflow graph: torch.fx first, then a recorded forward pass. Returns (graph, why-not)."""
    try:
        return _graph_from_fx(model), ""
    except Exception as e:  # symbolic tracing fails on data-dependent control flow, ...
        fx_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if example_inputs is None:
        if need:
            raise ValueError(
                f"where='block' needs the model's dataflow graph, but torch.fx cannot trace this model "
                f"({fx_error[:300]}). Pass example_inputs=<a small input batch> so attach can record one "
                "forward pass instead."
            ) from None
        return None, fx_error
    try:
        return _graph_from_run(model, example_inputs), ""
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"torch.fx cannot trace the model ({fx_error[:200]}) and it cannot run on example_inputs "
            f"to record its graph: {first}. Pass inputs shaped like the model's real inputs."
        ) from None


# --------------------------------------------------------------------------------------
# Site search
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A layer chosen to host ASR: its dotted name, type, output channels and call count."""

    name: str
    host_type: str
    channels: int
    calls: int = 1
    note: str = ""


@dataclass(frozen=True)
class Skipped:
    """A candidate that did not get ASR, and why."""

    name: str
    reason: str


@dataclass
class AttachReport:
    """What :func:`attach` did (or, from :func:`find_sites`, would do)."""

    where: str
    method: str
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    attention: str = ""

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        head = f"ASR sites ({self.where}, found by {self.method}): {len(self.sites)}"
        if self.attention:
            head += f", attention={self.attention!r}"
        lines = [head]
        width = max((len(s.name) for s in self.sites), default=0)
        for s in self.sites:
            extra = f"  called {s.calls}x" if s.calls > 1 else ""
            note = f"  ({s.note})" if s.note else ""
            lines.append(f"  + {s.name:<{width}}  {s.host_type}({s.channels}){extra}{note}")
        if self.skipped:
            lines.append(f"skipped: {len(self.skipped)}")
            lines += [f"  - {k.name}: {k.reason}" for k in self.skipped]
        return "\n".join(lines)


def _bits(n: int) -> Iterable[int]:
    i = 0
    while n:
        if n & 1:
            yield i
        n >>= 1
        i += 1


class _BlockFinder:
    """Applies the ``where="block"`` rules to a :class:`_Graph`."""

    def __init__(self, model: nn.Module, graph: _Graph) -> None:
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.anc: list[int] = []  # bitset of ancestors per node
        for node in graph.nodes:
            bits = 0
            for i in node.inputs:
                bits |= self.anc[i] | (1 << i)
            self.anc.append(bits)

    def _weight(self, idx: int) -> bool:
        node = self.graph.nodes[idx]
        if node.kind != "module":
            return False
        m = self.modules.get(node.target)
        return m is not None and any(True for _ in m.parameters())

    def _branch_weight(self, operand: int, split: int) -> int:
        members = self.anc[operand] | (1 << operand)
        return sum(1 for i in _bits(members) if i > split and (self.anc[i] >> split) & 1 and self._weight(i))

    def _walk(self, idx: int, split: int) -> tuple[str | None, str, str]:
        """Walk back from ``idx``. Returns ``(site, note, "")`` or ``(None, where it stopped, why)``."""
        notes: list[str] = []
        nodes = self.graph.nodes
        last = ""
        while True:
            node = nodes[idx]
            if idx <= split or not node.live or node.kind not in ("module", "function"):
                return None, last or "<residual branch>", "no layer on the residual branch can absorb a channel scale"
            if node.kind == "module":
                m = self.modules.get(node.target)
                if m is not None and (isinstance(m, ASR) or _is_host(m)):
                    return node.target, ", ".join(notes), ""
                if m is not None and (is_existing_attention(m) or _is_transparent_module(m)) and len(node.inputs) == 1:
                    if is_existing_attention(m):
                        notes.append(f"before the existing {type(m).__name__} {node.target!r}")
                    last, idx = node.target, node.inputs[0]
                    continue
                if isinstance(m, nn.MultiheadAttention):
                    why = "nn.MultiheadAttention uses out_proj's weights directly, so no layer inside it can be wrapped"
                else:
                    why = _host_problem(m).split(";")[0] if m is not None else "unknown module"
                return None, node.target, f"the branch ends in {type(m).__name__}, which is not an ASR host ({why})"
            # data first: further live inputs of a transparent op are sizes read from the input's shape
            passes = node.target in _TRANSPARENT_FUNCS or (len(node.inputs) == 1 and node.target in _SCALE_FUNCS)
            if node.inputs and passes:
                idx = node.inputs[0]
                continue
            where = f"<{node.target} after {last}>" if last else f"<{node.target}>"
            return None, where, f"the branch ends in the operation {node.target!r}, not in a layer"

    def find(self) -> tuple[list[tuple[str, str]], list[Skipped]]:
        sites: list[tuple[str, str]] = []
        skipped: list[Skipped] = []
        nodes = self.graph.nodes
        for idx, node in enumerate(nodes):
            if node.kind != "function" or node.target not in _ADD_FUNCS or len(node.inputs) != 2:
                continue
            a, b = node.inputs
            common = (self.anc[a] | (1 << a)) & (self.anc[b] | (1 << b))
            if not common:
                continue  # two independent inputs: not a residual connection
            split = common.bit_length() - 1
            wa, wb = self._branch_weight(a, split), self._branch_weight(b, split)
            where = f"<addition #{idx}>"
            if wa == wb:
                if wa:
                    skipped.append(Skipped(where, f"both operands pass {wa} layer(s); cannot tell the residual "
                                                  "branch from the shortcut"))
                continue
            site, note, why = self._walk(a if wa > wb else b, split)
            if why:
                skipped.append(Skipped(note, why))
            elif site is not None and site not in (s for s, _ in sites):
                sites.append((site, note))
        return sites, skipped


def _inside(name: str, prefixes: Sequence[str]) -> str | None:
    for p in prefixes:
        if p and name.startswith(p + "."):
            return p
    return None


def _match_any(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(value: str | Sequence[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{arg} must be a module name, a glob pattern or a list of them, got {type(value).__name__}")


def find_sites(
    model: nn.Module,
    where: Where = "block",
    *,
    every: int = 1,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
) -> AttachReport:
    """Where :func:`attach` would put ASR, as an :class:`AttachReport`; the model is not changed.

    Arguments are those of :func:`attach`. Raises ``ValueError`` when no site is eligible
    (saying what was looked for), when a pattern matches nothing, or when a selected site
    already has ASR.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if where not in ("block", "norms", None):
        raise ValueError(f"where must be 'block', 'norms' or None (then include= names the sites), got {where!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (keep every k-th site), got {every!r}")
    includes, excludes = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    if where is None and not includes:
        raise ValueError("where=None selects exactly the modules named by include=, but include is empty")
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    asr_names = [n for n, m in modules.items() if isinstance(m, ASR)]
    attn_names = [n for n, m in modules.items() if is_existing_attention(m) and not isinstance(m, ASR)]
    graph, why_not = _build_graph(model, example_inputs, need=where == "block")
    method = graph.method if graph is not None else "module tree (no graph: " + why_not[:120] + ")"
    called: set[str] | None = graph.called_modules() if graph is not None else None
    calls: dict[str, int] = {}
    if graph is not None:
        for n in graph.nodes:
            if n.kind == "module":
                calls[n.target] = calls.get(n.target, 0) + 1

    skipped: list[Skipped] = []
    notes: dict[str, str] = {}
    if where == "block":
        assert graph is not None
        found, skipped = _BlockFinder(model, graph).find()
        candidates = [n for n, _ in found]
        notes = {n: note for n, note in found if note}
        looked_for = (
            "additions x + f(x) whose residual branch f ends (before the addition) in a BatchNorm, GroupNorm, "
            "LayerNorm, InstanceNorm, Conv, Linear or RMSNorm"
        )
    else:
        if where == "norms":
            pool = [
                n for n, m in modules.items()
                if isinstance(m, _NORM_TYPES) or (isinstance(m, ASR) and isinstance(m.host, _NORM_TYPES))
            ]
            looked_for = "BatchNorm, GroupNorm and LayerNorm layers (with affine parameters)"
        else:
            for p in includes:
                if not any(fnmatch.fnmatchcase(n, p) for n in modules if n):
                    raise ValueError(f"include pattern {p!r} matches no module name (names look like "
                                     f"{', '.join(n for n in list(modules)[1:4])})")
            pool = [n for n in modules if n and _match_any(n, includes)]
            looked_for = f"modules matching {includes}"
        candidates = []
        for n in pool:
            m = modules[n]
            owner = _inside(n, asr_names) or _inside(n, attn_names)
            if owner is not None:
                if not (where == "norms" and owner in asr_names):  # an ASR's own host is the ASR site
                    skipped.append(Skipped(n, f"inside {type(modules[owner]).__name__} {owner!r}, left as it is"))
                continue
            if not isinstance(m, ASR) and not _is_host(m):
                skipped.append(Skipped(n, _host_problem(m).split(";")[0]))
                continue
            if called is not None and n not in called and not isinstance(m, ASR):
                skipped.append(Skipped(n, "not called as a module in forward (a parent may use its weights "
                                          "directly, as nn.MultiheadAttention does), so ASR there would do nothing"))
                continue
            candidates.append(n)

    if not candidates:
        extra = "" if where != "block" else (
            " If the model has no residual connections, try where='norms'; if its branches end in a module of "
            "your own (an attention x * gate, a layer-scale), declare it with "
            "foldattn.register_attention_type(cls) or foldattn.register_transparent_type(cls).")
        raise ValueError(f"no eligible ASR site: looked for {looked_for} (graph: {method}).{extra}"
                         + (f" Skipped: {'; '.join(f'{s.name}: {s.reason}' for s in skipped[:5])}" if skipped else ""))

    if where is not None and includes:
        for p in includes:
            if not any(fnmatch.fnmatchcase(c, p) for c in candidates):
                raise ValueError(f"include pattern {p!r} matches none of the {len(candidates)} '{where}' sites "
                                 f"(e.g. {', '.join(candidates[:4])})")
        skipped += [Skipped(c, "not in include") for c in candidates if not _match_any(c, includes)]
        candidates = [c for c in candidates if _match_any(c, includes)]
    for p in excludes:
        if not any(fnmatch.fnmatchcase(n, p) for n in modules if n):
            raise ValueError(f"exclude pattern {p!r} matches no module name (names look like "
                             f"{', '.join(n for n in list(modules)[1:4])})")
    skipped += [Skipped(c, "excluded") for c in candidates if _match_any(c, excludes)]
    candidates = [c for c in candidates if not _match_any(c, excludes)]
    if not candidates:
        raise ValueError(f"include/exclude leave no site out of those found for where={where!r}")
    skipped += [Skipped(c, f"every={every}") for i, c in enumerate(candidates) if i % every]
    candidates = [c for i, c in enumerate(candidates) if i % every == 0]

    already = [c for c in candidates if isinstance(modules[c], ASR)]
    if already:
        raise ValueError(
            f"{len(already)} selected site(s) already have ASR ({', '.join(already[:5])}); attach ASR once per "
            "host: fold the model first, or exclude= these sites"
        )
    sites = [
        Site(c, type(modules[c]).__name__, host_channels(modules[c]), calls.get(c, 1), notes.get(c, ""))
        for c in candidates
    ]
    return AttachReport(where=str(where) if where else "include", method=method, sites=sites, skipped=skipped)


def attach(
    model: nn.Module,
    attention: str | Callable[[int], _attention.ChannelAttention] = "se",
    where: Where = "block",
    every: int = 1,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    both: bool = False,
    psi_init: float = 0.1,
    inplace: bool = False,
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    return_report: bool = False,
    **attention_kwargs: Any,
) -> nn.Module | tuple[nn.Module, AttachReport]:
    """Insert ASR layers into any ``nn.Module`` without editing its source.

    ASR (Zhong et al., arXiv 2304.06345) trains channel attention on a learnable input so
    it folds into the host layer afterwards (:func:`foldattn.fold`).

    Args:
        model: any model; DataParallel/DDP/``torch.compile`` wrappers are removed first.
        attention: a registered attention name (``foldattn.attention.names()``), or a
            callable ``channels -> ChannelAttention``.
        where: ``"block"``: the last layer of each residual branch, before the addition
            (SE's place); ``"norms"``: every BatchNorm, GroupNorm and LayerNorm; ``None``:
            exactly the modules matched by ``include``.
        every: keep every k-th site in forward order (the 1st, (k+1)-th, ...).
        include: module names or glob patterns (``"layer3.*"``) the sites must match.
        exclude: module names or glob patterns removed from the sites.
        both: also apply the classic attention module ("ASR(X) + X"); only ASR folds.
        psi_init: initial value of the learnable input ``psi``.
        inplace: modify ``model``; by default a deep copy is returned.
        example_inputs: an input batch, used to record the graph when ``torch.fx``
            cannot trace the model (data-dependent control flow, ...).
        return_report: also return the :class:`AttachReport`.
        **attention_kwargs: passed to the attention constructor (e.g. ``reduction=8``).

    Returns:
        The model with ASR layers (and the report if ``return_report``). The report is
        also logged at INFO level on ``foldattn.attach``.

    Example:
        >>> model = torchvision.models.resnet18()
        >>> model, report = foldattn.attach(model, "se", return_report=True)
        >>> print(report)  # layer1.0.bn2 BatchNorm2d(64), ...
    """
    name = attention if isinstance(attention, str) else getattr(attention, "__name__", type(attention).__name__)
    if both and not isinstance(attention, str):
        raise ValueError("both=True needs attention given by name (the classic twin is built from that name)")
    if isinstance(attention, str):
        _attention.get(attention)  # unknown names fail here, before any work
    elif not callable(attention):
        raise TypeError(f"attention must be a registered name or a callable channels -> module, got {name}")
    report = find_sites(model, where, every=every, include=include, exclude=exclude, example_inputs=example_inputs)
    report.attention = name
    model = unwrap_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    chain_dia = isinstance(attention, str) and _attention.get(attention) is _attention.DIA
    previous: _attention.ChannelAttention | None = None
    previous_classic: _attention.ChannelAttention | None = None
    for site in report.sites:
        host = model.get_submodule(site.name)
        if chain_dia:  # DIA shares one LSTM cell along a stage: chain consecutive sites of equal width
            prev = previous if previous is not None and previous.channels == site.channels else None
            module = _attention.create("dia", site.channels, previous=prev, **attention_kwargs)
            layer = ASR(host, module, psi_init=psi_init)
            previous = module
            if both:  # the classic twins form their own chain (their own cell per stage)
                prev_c = previous_classic if prev is not None else None
                classic = _attention.create("dia", site.channels, previous=prev_c, **attention_kwargs)
                psi = layer.attention.psi
                classic = classic.to(device=psi.device, dtype=psi.dtype)
                layer.classic = ChannelsLast(classic) if layer.channel_dim == -1 else classic
                previous_classic = classic
        elif isinstance(attention, str):
            layer = ASR(host, attention, both=both, psi_init=psi_init, **attention_kwargs)
        else:
            module = attention(site.channels)
            if not isinstance(module, _attention.ChannelAttention):
                raise TypeError(f"the attention factory returned {type(module).__name__}, not a ChannelAttention")
            layer = ASR(host, module, psi_init=psi_init)
        set_submodule(model, site.name, layer)
    log.info("%s", report)
    return (model, report) if return_report else model
