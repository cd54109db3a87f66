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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast, overload

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import attention as _attention
from ._utils import set_submodule, unwrap_model
from .asr import ASR, host_channels
from .graph import (
    Graph,
    build_graph,
    is_existing_attention,
    is_transparent,
    register_attention_type,
    register_transparent_type,
)
from .srp import RepBlock

__all__ = [
    "attach", "find_sites", "AttachReport", "Site", "Skipped",
    "register_attention_type", "register_transparent_type", "is_existing_attention",
]

log = logging.getLogger(__name__)

Where = Literal["block", "transformer", "norms"] | None

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
#: what is the identity at inference, for the terms of a sum of branches
_EVAL_IDENTITY_FUNCS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
                                  "stochastic_depth", "drop_path", "contiguous", "clone"})
_EVAL_IDENTITY_TYPES = frozenset({"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "DropPath",
                                  "StochasticDepth"})
#: layers linear in their input (at inference): the parts of a re-parameterizable branch
_LINEAR_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, _BatchNorm, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                                              nn.Identity)
_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


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


def _channels(module: nn.Module) -> int:
    return module.channels if isinstance(module, ASR) else host_channels(module)


def _graph_for(model: nn.Module, example_inputs: Any, need: bool) -> tuple[Graph | None, str]:
    """The dataflow graph (see :mod:`foldattn.graph`); where="block" cannot do without one."""
    graph, fx_error = build_graph(model, example_inputs, sequential_fallback=False)
    if graph is None and need:
        raise ValueError(
            f"where='block' needs the model's dataflow graph, but torch.fx cannot trace this model "
            f"({fx_error[:300]}). Pass example_inputs=<a small input batch> so attach can record one "
            "forward pass instead."
        )
    return graph, fx_error


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
    group: int | None = None  # sites of one sum of parallel branches share one attention module (one v)


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
    """Applies the ``where="block"`` rules to a :class:`~foldattn.graph.Graph`."""

    def __init__(self, model: nn.Module, graph: Graph, branch_input: bool = False) -> None:
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.branch_input = branch_input  # where="transformer": the branch's first host if its last is none
        self.anc = [graph.ancestors(i) for i in range(len(graph.nodes))]  # bitset of ancestors per node

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
        last, start = "", idx
        while True:
            node = nodes[idx]
            if idx <= split or not node.live or node.kind not in ("module", "function"):
                return None, last or "<residual branch>", "no layer on the residual branch can absorb a channel scale"
            if node.kind == "module":
                m = self.modules.get(node.target)
                if m is not None and (isinstance(m, ASR) or _is_host(m)):
                    return node.target, ", ".join(notes), ""
                if m is not None and (is_existing_attention(m) or is_transparent(m)) and len(node.inputs) == 1:
                    if is_existing_attention(m):
                        notes.append(f"before the existing {type(m).__name__} {node.target!r}")
                    last, idx = node.target, node.inputs[0]
                    continue
                if isinstance(m, nn.MultiheadAttention):
                    why = "nn.MultiheadAttention uses out_proj's weights directly, so no layer inside it can be wrapped"
                    first = self._first_host(start, split) if self.branch_input else None
                    if first is not None:
                        return first, f"at the branch input: {node.target!r} ({why.split(',')[0]})", ""
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

    def _first_host(self, operand: int, split: int) -> str | None:
        """The first layer of the residual branch (after the split) that can host ASR, e.g. a pre-norm."""
        members = self.anc[operand] | (1 << operand)
        for i in _bits(members):
            if i > split and (self.anc[i] >> split) & 1 and self.graph.nodes[i].kind == "module":
                m = self.modules.get(self.graph.nodes[i].target)
                if m is not None and (isinstance(m, ASR) or _is_host(m)):
                    return self.graph.nodes[i].target
        return None

    # --- sums of parallel linear branches (RepVGG, MobileOne, ACNet, DBB): one ASR per sum ------------
    def _is_add(self, i: int) -> bool:
        node = self.graph.nodes[i]
        return node.kind == "function" and node.target in _ADD_FUNCS and len(node.inputs) in (1, 2)

    def _eval_identity(self, i: int) -> bool:
        """A node that is the identity at inference (dropout, drop-path, Identity) with one input."""
        node = self.graph.nodes[i]
        if len(node.inputs) != 1:
            return False
        if node.kind == "module":
            m = self.modules.get(node.target)
            return m is not None and type(m).__name__ in _EVAL_IDENTITY_TYPES
        return node.kind == "function" and (node.target in _EVAL_IDENTITY_FUNCS or (
            node.target in _ADD_FUNCS))  # an addition of a constant (0 in MobileOne's sum) passes

    def _sum_terms(self, i: int, adds: set[int]) -> list[int]:
        """The terms of the tree of additions at ``i``, through inference-time identities."""
        while self._eval_identity(i) and not (self._is_add(i) and len(self.graph.nodes[i].inputs) == 2):
            if self._is_add(i):
                adds.add(i)
            i = self.graph.nodes[i].inputs[0]
        node = self.graph.nodes[i]
        if self._is_add(i) and len(node.inputs) == 2 and (not adds or len(self.graph.users(i)) == 1):
            adds.add(i)
            return [t for j in node.inputs for t in self._sum_terms(j, adds)]
        return [i]

    def _sum_root(self, i: int) -> int:
        """The last addition of the tree ``i`` belongs to (following single users through identities)."""
        root, j = i, i
        while True:
            users = self.graph.users(j)
            if len(users) != 1:
                return root
            j = users[0]
            if self._is_add(j) and len(self.graph.nodes[j].inputs) == 2:
                root = j
            elif not self._eval_identity(j):
                return root

    def _linear(self, term: int, split: int) -> bool:
        """Every operation between ``split`` and ``term`` is linear (convs, norms, pools, identities)."""
        members = self.anc[term] | (1 << term)
        for i in _bits(members):
            if i <= split or not (self.anc[i] >> split) & 1:
                continue
            node = self.graph.nodes[i]
            if node.kind == "module":
                m = self.modules.get(node.target)
                host = m.host if isinstance(m, ASR) else m
                linear = isinstance(host, _LINEAR_TYPES) and not (isinstance(host, _ConvNd) and host.transposed)
                if not linear and not (m is not None and type(m).__name__ in _EVAL_IDENTITY_TYPES):
                    return False
            elif node.kind == "function" and node.target not in _EVAL_IDENTITY_FUNCS | _ADD_FUNCS | {"pad"}:
                return False
        return True

    def _branch_sum(self, terms: list[int]) -> list[tuple[str, str]] | str:
        """The hosts of a sum of parallel linear branches of one tensor, or why it is not one."""
        common = -1
        for t in terms:
            common &= self.anc[t] | (1 << t)
        if len(terms) < 2 or common <= 0:
            return "not a sum of branches of one tensor"
        split = common.bit_length() - 1
        if split in terms:
            return "a term is the shared input itself (a residual connection)"
        if not all(self._linear(t, split) for t in terms):
            return "a branch is not linear (an activation inside: a residual branch)"
        hosts = []
        for t in terms:
            site, note, why = self._walk(t, split)
            if why or site is None:
                return f"a branch has no layer to absorb v ({why or note})"
            hosts.append((site, note))
        if len({h for h, _ in hosts}) != len(hosts):
            return "two branches end in the same layer"
        return hosts

    def find(self) -> tuple[list[tuple[str, str, int | None]], list[Skipped]]:
        sites: list[tuple[str, str, int | None]] = []
        skipped: list[Skipped] = []
        nodes = self.graph.nodes
        grouped: set[int] = set()
        groups = 0
        for idx in range(len(nodes)):  # sums of parallel linear branches first: one shared v per sum
            if idx in grouped or not self._is_add(idx) or len(nodes[idx].inputs) != 2:
                continue
            adds: set[int] = set()
            terms = self._sum_terms(self._sum_root(idx), adds)
            found = self._branch_sum(terms)
            if isinstance(found, str):
                continue
            grouped |= adds
            names = [h for h, _ in found]
            for host, note in found:
                if host not in (s for s, _, _ in sites):
                    others = ", ".join(n for n in names if n != host)
                    sites.append((host, ", ".join(filter(None, [note, f"branch sum, v shared with {others}"])),
                                  groups))
            groups += 1
        for idx, node in enumerate(nodes):
            if node.kind != "function" or node.target not in _ADD_FUNCS or len(node.inputs) != 2 or idx in grouped:
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
            elif site is not None and site not in (s for s, _, _ in sites):
                sites.append((site, note, None))
        if not any(g is None for _, _, g in sites):  # no x + f(x): blocks that sum branches inside are the sites
            for i in self.graph.module_nodes(RepBlock):
                name = nodes[i].target
                if name not in (s for s, _, _ in sites):
                    sites.append((name, "sums parallel branches inside (a re-parameterization block)", None))
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


@dataclass
class _Found:
    """Candidate sites of one placement mode, before the filters."""

    names: list[str]
    looked_for: str
    skipped: list[Skipped] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)  # the branches of one sum share one v


def _check_arguments(model: Any, where: Where, every: Any, include: Any, exclude: Any) -> tuple[list[str], list[str]]:
    """The include/exclude patterns, once every argument is checked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if where not in ("block", "transformer", "norms", None):
        raise ValueError(f"where must be 'block', 'transformer', 'norms' or None (then include= names the sites), "
                         f"got {where!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (keep every k-th site), got {every!r}")
    includes, excludes = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    if where is None and not includes:
        raise ValueError("where=None selects exactly the modules named by include=, but include is empty")
    return includes, excludes


def _residual_sites(model: nn.Module, graph: Graph, where: Where) -> _Found:
    """``where="block"``/``"transformer"``: the graph's residual branches and sums of parallel branches."""
    found, skipped = _BlockFinder(model, graph, branch_input=where == "transformer").find()
    return _Found(
        [n for n, _, _ in found],
        "additions x + f(x) whose residual branch f ends (before the addition) in a BatchNorm, GroupNorm, "
        "LayerNorm, InstanceNorm, Conv, Linear or RMSNorm, and sums of parallel linear branches (RepVGG-style) "
        "each ending in one",
        skipped, {n: note for n, note, _ in found if note}, {n: g for n, _, g in found if g is not None})


def _named_sites(modules: dict[str, nn.Module], where: Where, includes: list[str],
                 called: set[str] | None) -> _Found:
    """``where="norms"``: every affine norm; ``where=None``: the modules ``include`` names."""
    asr_names = [n for n, m in modules.items() if isinstance(m, ASR)]
    attn_names = [n for n, m in modules.items() if is_existing_attention(m) and not isinstance(m, ASR)]
    if where == "norms":
        pool = [n for n, m in modules.items()
                if isinstance(m, _NORM_TYPES) or (isinstance(m, ASR) and isinstance(m.host, _NORM_TYPES))]
        looked_for = "BatchNorm, GroupNorm and LayerNorm layers (with affine parameters)"
    else:
        for p in includes:
            if not any(fnmatch.fnmatchcase(n, p) for n in modules if n):
                raise ValueError(f"include pattern {p!r} matches no module name (names look like "
                                 f"{', '.join(n for n in list(modules)[1:4])})")
        pool = [n for n in modules if n and _match_any(n, includes)]
        looked_for = f"modules matching {includes}"
    found = _Found([], looked_for)
    for n in pool:
        m = modules[n]
        owner = _inside(n, asr_names) or _inside(n, attn_names)
        if owner is not None:
            if not (where == "norms" and owner in asr_names):  # an ASR's own host is the ASR site
                found.skipped.append(Skipped(n, f"inside {type(modules[owner]).__name__} {owner!r}, left as it is"))
            continue
        if not isinstance(m, ASR) and not _is_host(m):
            found.skipped.append(Skipped(n, _host_problem(m).split(";")[0]))
            continue
        if called is not None and n not in called and not isinstance(m, ASR):
            found.skipped.append(Skipped(n, "not called as a module in forward (a parent may use its weights "
                                            "directly, as nn.MultiheadAttention does), so ASR there would do nothing"))
            continue
        found.names.append(n)
    return found


def _filter(found: _Found, modules: dict[str, nn.Module], where: Where, includes: list[str],
            excludes: list[str], every: int) -> list[str]:
    """Apply include (with a placement mode), exclude and every-k-th (a sum of branches counts once)."""
    candidates = found.names
    if where is not None and includes:
        for p in includes:
            if not any(fnmatch.fnmatchcase(c, p) for c in candidates):
                raise ValueError(f"include pattern {p!r} matches none of the {len(candidates)} '{where}' sites "
                                 f"(e.g. {', '.join(candidates[:4])})")
        found.skipped += [Skipped(c, "not in include") for c in candidates if not _match_any(c, includes)]
        candidates = [c for c in candidates if _match_any(c, includes)]
    for p in excludes:
        if not any(fnmatch.fnmatchcase(n, p) for n in modules if n):
            raise ValueError(f"exclude pattern {p!r} matches no module name (names look like "
                             f"{', '.join(n for n in list(modules)[1:4])})")
    found.skipped += [Skipped(c, "excluded") for c in candidates if _match_any(c, excludes)]
    candidates = [c for c in candidates if not _match_any(c, excludes)]
    if not candidates:
        raise ValueError(f"include/exclude leave no site out of those found for where={where!r}")
    unit = {c: i for i, c in enumerate(dict.fromkeys(found.groups.get(c, f"site:{c}") for c in candidates))}
    position = {c: unit[found.groups.get(c, f"site:{c}")] for c in candidates}
    found.skipped += [Skipped(c, f"every={every}") for c in candidates if position[c] % every]
    return [c for c in candidates if position[c] % every == 0]


def find_sites(
    model: nn.Module,
    where: Where = "block",
    *,
    every: int = 1,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    graph: Graph | None = None,
    allow_existing: bool = False,
) -> AttachReport:
    """Where :func:`attach` would put ASR, as an :class:`AttachReport`; the model is not changed.

    Arguments are those of :func:`attach`; ``graph`` is a dataflow graph built beforehand
    (:func:`foldattn.graph.build_graph`, ``graph_from_run``, ...) to use instead of building one;
    ``allow_existing`` reports sites that already have ASR (the rule applied to an attached model)
    instead of refusing them. Raises ``ValueError`` when no site is eligible (saying what was
    looked for), when a pattern matches nothing, or when a selected site already has ASR.
    """
    includes, excludes = _check_arguments(model, where, every, include, exclude)
    return _find_sites(unwrap_model(model), where, every, includes, excludes, example_inputs, graph, allow_existing)


def _find_sites(model: nn.Module, where: Where, every: int, includes: list[str], excludes: list[str],
                example_inputs: Any, graph: Graph | None, allow_existing: bool) -> AttachReport:
    """:func:`find_sites` on an unwrapped model with checked arguments."""
    modules = dict(model.named_modules())
    why_not = ""
    if graph is None:
        graph, why_not = _graph_for(model, example_inputs, need=where in ("block", "transformer"))
    method = graph.method if graph is not None else "module tree (no graph: " + why_not[:120] + ")"
    if where in ("block", "transformer"):
        assert graph is not None
        found = _residual_sites(model, graph, where)
    else:
        found = _named_sites(modules, where, includes, graph.called_modules() if graph is not None else None)
    if not found.names:
        extra = "" if where not in ("block", "transformer") else (
            " If the model has no residual connections, try where='norms'; if its branches end in a module of "
            "your own (an attention x * gate, a layer-scale), declare it with "
            "foldattn.register_attention_type(cls) or foldattn.register_transparent_type(cls).")
        raise ValueError(f"no eligible ASR site: looked for {found.looked_for} (graph: {method}).{extra}"
                         + (f" Skipped: {'; '.join(f'{s.name}: {s.reason}' for s in found.skipped[:5])}"
                            if found.skipped else ""))
    candidates = _filter(found, modules, where, includes, excludes, every)
    already = [c for c in candidates if isinstance(modules[c], ASR)]
    if already and not allow_existing:
        raise ValueError(
            f"{len(already)} selected site(s) already have ASR ({', '.join(already[:5])}); attach ASR once per "
            "host: fold the model first, or exclude= these sites"
        )
    calls = graph.calls() if graph is not None else {}
    sites = [Site(c, type(modules[c]).__name__, _channels(modules[c]), calls.get(c, 1), found.notes.get(c, ""),
                  found.groups.get(c)) for c in candidates]
    return AttachReport(where=str(where) if where else "include", method=method, sites=sites, skipped=found.skipped)


@overload
def attach(
    model: nn.Module, attention: str | Callable[[int], _attention.ChannelAttention] = ..., *, where: Where = ...,
    every: int = ..., include: str | Sequence[str] | None = ..., exclude: str | Sequence[str] | None = ...,
    both: bool = ..., psi_init: _attention.PsiInit = ..., inplace: bool = ...,
    example_inputs: Tensor | Sequence[Tensor] | None = ..., return_report: Literal[False] = ...,
    preserve_outputs: bool = ..., **attention_kwargs: Any,
) -> nn.Module: ...
@overload
def attach(
    model: nn.Module, attention: str | Callable[[int], _attention.ChannelAttention] = ..., *, where: Where = ...,
    every: int = ..., include: str | Sequence[str] | None = ..., exclude: str | Sequence[str] | None = ...,
    both: bool = ..., psi_init: _attention.PsiInit = ..., inplace: bool = ...,
    example_inputs: Tensor | Sequence[Tensor] | None = ..., return_report: Literal[True],
    preserve_outputs: bool = ..., **attention_kwargs: Any,
) -> tuple[nn.Module, AttachReport]: ...
@overload
def attach(
    model: nn.Module, attention: str | Callable[[int], _attention.ChannelAttention] = ..., *, where: Where = ...,
    every: int = ..., include: str | Sequence[str] | None = ..., exclude: str | Sequence[str] | None = ...,
    both: bool = ..., psi_init: _attention.PsiInit = ..., inplace: bool = ...,
    example_inputs: Tensor | Sequence[Tensor] | None = ..., return_report: bool,
    preserve_outputs: bool = ..., **attention_kwargs: Any,
) -> nn.Module | tuple[nn.Module, AttachReport]: ...
def attach(
    model: nn.Module,
    attention: str | Callable[[int], _attention.ChannelAttention] = "se",
    *,
    where: Where = "block",
    every: int = 1,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    both: bool = False,
    psi_init: _attention.PsiInit = None,
    inplace: bool = False,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    return_report: bool = False,
    preserve_outputs: bool = False,
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
            (SE's place); ``"transformer"``: the same, and where a branch ends in a module
            that uses its weights directly (``nn.MultiheadAttention``), the branch's first
            layer (its pre-norm) instead: two sites per ViT block (timm's ``attn.proj`` and
            ``mlp.fc2``; torchvision's ``ln_1`` and the MLP's last Linear); ``"norms"``:
            every BatchNorm, GroupNorm and LayerNorm; ``None``: exactly the modules matched
            by ``include``.
        every: keep every k-th site in forward order (the 1st, (k+1)-th, ...).
        include: module names or glob patterns (``"layer3.*"``) the sites must match.
        exclude: module names or glob patterns removed from the sites.
        both: also apply the classic attention module ("ASR(X) + X"); only ASR folds.
        psi_init: initial value of the learnable input ``psi``: a number, ``"random"``, or None for
            the attention module's default (0.1, the paper's; 1 for ``scale``).
        inplace: modify ``model``; by default a deep copy is returned.
        example_inputs: an input batch, used to record the graph when ``torch.fx``
            cannot trace the model (data-dependent control flow, ...).
        return_report: also return the :class:`AttachReport`.
        preserve_outputs: the attached model computes exactly what ``model`` computed (each
            host's parameters divided by its initial ``v0``; :meth:`foldattn.ASR.preserve_host_outputs`).
            Use it to fine-tune a trained model; not with ``both=True``.
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
    if both and preserve_outputs:
        raise ValueError("preserve_outputs=True cannot keep ASR(X) + X exact (the classic X changes the outputs); "
                         "use one of both=True and preserve_outputs=True")
    if isinstance(attention, str):
        _attention.get(attention)  # unknown names fail here, before any work
    elif not callable(attention):
        raise TypeError(f"attention must be a registered name or a callable channels -> module, got {name}")
    includes, excludes = _check_arguments(model, where, every, include, exclude)
    model = unwrap_model(model)  # where the model enters
    report = _find_sites(model, where, every, includes, excludes, example_inputs, None, False)
    report.attention = name
    if not inplace:
        model = copy.deepcopy(model)
    # one factory per role: DIA modules share a cell along consecutive sites of equal width
    asr_f = _attention.Factory(attention, **attention_kwargs) if isinstance(attention, str) else None
    classic_f = _attention.Factory(attention, **attention_kwargs) if both and isinstance(attention, str) else None
    shared: dict[int, tuple[_attention.ChannelAttention, Any]] = {}
    for site in report.sites:
        host = model.get_submodule(site.name)
        if site.group is not None and site.group in shared:  # a branch of a sum: the sum's one v
            module, classic = shared[site.group]
            layer = ASR(host, module, psi_init=psi_init, classic=classic)
            set_submodule(model, site.name, layer)
            continue
        # asr_f is None exactly when attention is a callable
        built = asr_f(site.channels) if asr_f is not None else cast(Callable[[int], object], attention)(site.channels)
        if not isinstance(built, _attention.ChannelAttention):
            raise TypeError(f"the attention factory returned {type(built).__name__}, not a ChannelAttention")
        module = built
        classic = classic_f(site.channels) if classic_f is not None else None
        if site.group is not None:
            shared[site.group] = (module, classic)
        layer = ASR(host, module, psi_init=psi_init, classic=classic)
        set_submodule(model, site.name, layer)
    if preserve_outputs:  # after all sites exist: a DIA block's v0 depends on the blocks before it
        for site in report.sites:
            cast(ASR, model.get_submodule(site.name)).preserve_host_outputs()
    log.info("%s", report)
    return (model, report) if return_report else model
