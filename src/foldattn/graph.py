"""The model's dataflow graph: one engine for every pass that must know what feeds what.

:func:`build_graph` reads a model's dataflow from a ``torch.fx`` trace, or, where the model
does not trace (data-dependent control flow, ...), from one forward pass recorded on
example inputs (a ``TorchFunctionMode`` plus module hooks), or, as the last resort when no
input is known, from the order of ``nn.Sequential`` containers. Every variant yields the
same :class:`Graph` of nodes (``input``, ``module``, ``function``, ``const``) with
producer/consumer queries, used by :func:`foldattn.attach` (residual branches and their last
layer), :func:`foldattn.fold` (conv -> norm pairs), :func:`foldattn.calibrate.fold_scales`
(where a constant gate can go) and the ViT placement.

Layers the graph keeps whole (leaves): ASR layers, attention modules (this package's and the
registered types of torchvision and timm), layers that commute with a channel scale, ASR
hosts, and other atomic layers; containers are traced into.
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import attention as _attention
from ._registry import Registry
from ._utils import eval_mode, first_line
from .hosts import HOST_TYPES

__all__ = [
    "Graph", "Node", "build_graph", "register_attention_type", "register_transparent_type",
    "is_existing_attention", "is_transparent", "is_leaf",
]

# --------------------------------------------------------------------------------------
# Type registries (qualified class names, so that optional packages need not be imported)
# --------------------------------------------------------------------------------------

#: Modules that commute with a positive per-channel scale of their input (or are the identity
#: at inference): the walk from an addition back to its host passes through them.
_TRANSPARENT_TYPES: Registry[str] = Registry("transparent type", case_sensitive=True)
for _name in (
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
    "timm.models.fastvit.LayerScale2d",
    "foldattn.models.vit.LayerScale",
):
    _TRANSPARENT_TYPES.register(_name, _name)

#: Norm layers with buffers only (no parameters, no children) that must stay whole so that
#: deployment fusion (:mod:`foldattn.fuse`) sees them as one layer.
FROZEN_NORM_TYPES: frozenset[str] = frozenset({
    "torchvision.ops.misc.FrozenBatchNorm2d",
    "timm.layers.norm_act.FrozenBatchNorm2d",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _name_of(cls: type | str) -> str:
    name = cls if isinstance(cls, str) else _qualname(cls)
    if "." not in name:
        raise ValueError(f"expected a class or its qualified name 'package.module.Class', got {name!r}")
    return name


def register_attention_type(cls: type | str) -> None:
    """Declare a class (or ``"package.module.Class"``) as an attention module the model
    already has: :func:`attach` never puts ASR on it or inside it and leaves it in place
    (an entry of :mod:`foldattn.attention`'s list of known attention classes)."""
    name = _name_of(cls)
    if name not in _attention.KNOWN:
        _attention.register_known_attention(name)


def register_transparent_type(cls: type | str) -> None:
    """Declare a module type that commutes with a per-channel scale (e.g. a custom
    layer-scale or drop-path): ``where="block"`` walks through it to find the host."""
    name = _name_of(cls)
    _TRANSPARENT_TYPES.register(name, name)


def _matches(module: nn.Module, registry: Registry[Any]) -> bool:
    return any(_qualname(c) in registry for c in type(module).__mro__)


def is_existing_attention(module: nn.Module) -> bool:
    """True for attention modules (SE, ECA, CBAM, ...) that :func:`attach` leaves alone."""
    return isinstance(module, _attention.ChannelAttention) or _attention.known_attention_of(module) is not None


def is_transparent(module: nn.Module) -> bool:
    """True for modules that commute with a positive per-channel scale of their input (dropout,
    drop-path, layer-scale, activations, registered types)."""
    if _matches(module, _TRANSPARENT_TYPES):
        return True
    # activations (not softmax-like normalisers or attention): elementwise, positive-homogeneous
    # or at least applied after the scale in the same place as SE's output would be
    return module.__class__.__module__ == "torch.nn.modules.activation" and not isinstance(
        module, (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
    )


def is_leaf(module: nn.Module, extra: tuple[type[nn.Module], ...] = ()) -> bool:
    """Modules kept whole in the dataflow graph (not traced into); ``extra`` types too."""
    from .asr import ASR  # ASR imports the attention zoo; the graph is imported by fold and attach

    if isinstance(module, (ASR, *extra)) or is_existing_attention(module) or is_transparent(module):
        return True
    if _qualname(type(module)) in FROZEN_NORM_TYPES:
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
# The graph
# --------------------------------------------------------------------------------------


@dataclass
class Node:
    """One operation: ``kind`` is ``"input"``, ``"module"`` (``target``: its dotted name),
    ``"function"`` (``target``: the normalised function or method name) or ``"const"``
    (computed from parameters or constants only)."""

    kind: str
    target: str
    inputs: list[int]  # indices of the live nodes this node reads, in argument order
    live: bool  # depends on the model input


@dataclass
class Graph:
    """A model's dataflow graph with producer/consumer queries (node indices are topological)."""

    method: str
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    nodes: list[Node] = field(default_factory=list)
    _users: list[list[int]] | None = field(default=None, repr=False)
    _ancestors: list[int] | None = field(default=None, repr=False)

    def add(self, kind: str, target: str, inputs: Iterable[int], force_live: bool = False) -> int:
        ins = [i for i in dict.fromkeys(inputs) if self.nodes[i].live]
        live = force_live or bool(ins)
        self.nodes.append(Node(kind if live or kind == "input" else "const", target, ins, live))
        self._users = self._ancestors = None
        return len(self.nodes) - 1

    # --- queries ---------------------------------------------------------------------
    def module(self, i: int) -> nn.Module | None:
        """The module node ``i`` calls (None for other nodes)."""
        node = self.nodes[i]
        return self.modules.get(node.target) if node.kind == "module" else None

    def users(self, i: int) -> list[int]:
        """The nodes that read node ``i``'s output."""
        if self._users is None:
            self._users = [[] for _ in self.nodes]
            for j, node in enumerate(self.nodes):
                for k in node.inputs:
                    self._users[k].append(j)
        return self._users[i]

    def ancestors(self, i: int) -> int:
        """Bitset of every node node ``i`` depends on (bit ``k`` set: node ``k``)."""
        if self._ancestors is None:
            self._ancestors = []
            for node in self.nodes:
                bits = 0
                for k in node.inputs:
                    bits |= self._ancestors[k] | (1 << k)
                self._ancestors.append(bits)
        return self._ancestors[i]

    def calls(self) -> dict[str, int]:
        """How many times each module is called."""
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.kind == "module":
                out[n.target] = out.get(n.target, 0) + 1
        return out

    def called_modules(self) -> set[str]:
        return {n.target for n in self.nodes if n.kind == "module"}

    def module_nodes(self, kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Module) -> list[int]:
        """Indices of the module nodes whose module is a ``kind``."""
        return [i for i in range(len(self.nodes)) if isinstance(self.module(i), kind)]

    def sole_producer(self, i: int) -> int | None:
        """The module node that is node ``i``'s only input and whose only use is node ``i``, called
        once; None otherwise (a shared tensor, a function in between, a module called twice)."""
        node = self.nodes[i]
        if len(node.inputs) != 1:
            return None
        src = node.inputs[0]
        once = self.calls()
        if self.nodes[src].kind != "module" or self.users(src) != [i] or once[self.nodes[src].target] != 1:
            return None
        return src

    def sole_consumer(self, i: int) -> int | None:
        """The module node that is the only reader of node ``i`` and reads nothing else, called once."""
        users = self.users(i)
        if len(users) != 1:
            return None
        dst = self.nodes[users[0]]
        if dst.kind != "module" or dst.inputs != [i] or self.calls()[dst.target] != 1:
            return None
        return users[0]


# --------------------------------------------------------------------------------------
# Building it: torch.fx, a recorded forward pass, or nn.Sequential order
# --------------------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return name.strip("_")


def _func_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    return _norm_name(getattr(target, "__name__", str(target)))


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, blind to other threads.

    While it traces, torch.fx replaces ``nn.Module.__call__`` and ``__getattr__`` for the whole
    process. Calls from any other thread (a server running its models while this one attaches ASR
    to another) are passed straight to the original methods, so they run as if nothing traced.
    """

    def __init__(self, extra: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.extra = extra
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m, self.extra)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:  # another thread's call: run it, do not trace it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def graph_from_fx(model: nn.Module, extra_leaves: tuple[type[nn.Module], ...] = ()) -> Graph:
    """The graph of a ``torch.fx`` symbolic trace (raises what tracing raises)."""
    fx_graph = _Tracer(extra_leaves).trace(model)
    graph = Graph("torch.fx trace", dict(model.named_modules()))
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

    def __init__(self, graph: Graph) -> None:
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


def graph_from_run(model: nn.Module, example_inputs: Any, extra_leaves: tuple[type[nn.Module], ...] = ()) -> Graph:
    """The graph of one eval-mode, no-grad forward pass on ``example_inputs`` (the path it takes)."""
    graph = Graph("recorded forward pass", dict(model.named_modules()))
    rec = _Recorder(graph)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for t in rec.tensors(args):
        rec.produced(t, graph.add("input", "input", [], force_live=True))
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)  # a module shared under two names keeps its first, as torch.fx does
    leaves = {id(m) for m in model.modules() if is_leaf(m, extra_leaves)}
    thread = threading.get_ident()  # the hooks record this thread's pass only (others may run the model too)

    # (*rest: another thread that calls the model while a hook is being added may see it without its
    # with_kwargs flag, and call it with one argument fewer)
    def pre(module: nn.Module, *rest: Any) -> None:
        if id(module) in leaves and threading.get_ident() == thread:
            rec.depth += 1

    def post(module: nn.Module, *rest: Any) -> None:
        if id(module) in leaves and threading.get_ident() == thread:
            a, kw, out = (rest[0], rest[1], rest[2]) if len(rest) == 3 else (rest[0], {}, rest[1])
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


def _edge_ends(m: nn.Module, path: str, last: bool) -> tuple[str, nn.Module]:
    """The first (or last) layer inside nested ``nn.Sequential`` containers."""
    while isinstance(m, nn.Sequential) and len(m):
        key = list(m._modules)[-1 if last else 0]
        path, m = f"{path}.{key}", m._modules[key]
    return path, m


def graph_from_sequentials(model: nn.Module) -> Graph:
    """A partial graph from ``nn.Sequential`` containers alone (their order is their dataflow):
    each child feeds the next. What enters or leaves a container is an unknown ``input``. The last
    resort when the model neither traces nor has example inputs."""
    graph = Graph("nn.Sequential order (no trace, no example inputs)", dict(model.named_modules()))
    index: dict[str, int] = {}
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        for (a, first), (b, second) in itertools.pairwise(seq.named_children()):
            src, _ = _edge_ends(first, prefix + a, last=True)
            dst, _ = _edge_ends(second, prefix + b, last=False)
            if src not in index:
                index[src] = graph.add("module", src, [graph.add("input", "input", [], force_live=True)])
            index[dst] = graph.add("module", dst, [index[src]])
    return graph


def build_graph(model: nn.Module, example_inputs: Any = None, *, extra_leaves: Sequence[type[nn.Module]] = (),
                sequential_fallback: bool = True) -> tuple[Graph | None, str]:
    """The dataflow graph of ``model``, and why a better method failed ("" when fx worked).

    ``torch.fx`` first; then a recorded forward pass on ``example_inputs`` (or, for models that
    declare ``default_input_size``, on a zero batch of that size); then, with
    ``sequential_fallback``, the ``nn.Sequential`` order; otherwise ``(None, reason)``.

    Raises:
        ValueError: the model cannot run on ``example_inputs`` when a recorded pass is needed.
    """
    extra = tuple(extra_leaves)
    try:
        return graph_from_fx(model, extra), ""
    except Exception as e:  # symbolic tracing fails on data-dependent control flow, ...
        fx_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if example_inputs is None:
        size = getattr(model, "default_input_size", None)
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        if size is not None:
            example_inputs = torch.zeros(1, *size, dtype=ref.dtype if ref is not None else None,
                                         device=ref.device if ref is not None else None)
    if example_inputs is None:
        if sequential_fallback:
            return graph_from_sequentials(model), fx_error
        return None, fx_error
    try:
        return graph_from_run(model, example_inputs, extra), fx_error
    except Exception as e:
        first = first_line(e)
        raise ValueError(
            f"torch.fx cannot trace the model ({fx_error[:200]}) and it cannot run on example_inputs "
            f"to record its graph: {first}. Pass inputs shaped like the model's real inputs."
        ) from None
