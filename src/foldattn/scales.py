"""Per-channel scale layers folded into the layer that produces their input.

A LayerScale (Touvron et al., "Going deeper with Image Transformers", ICCV 2021) computes
``x * gamma`` with one learnable value per channel. When ``x`` comes straight from a layer
that can absorb a per-channel scale (Linear, Conv, an affine norm: :mod:`foldattn.hosts`),
``gamma`` folds into that layer's output channels exactly
(:func:`foldattn.transforms.scale_out_channels`) and the scale layer becomes ``nn.Identity``.

Two kinds are known: layers that *fold away* (a class attribute ``folds_away = True``, such
as :class:`foldattn.models.vit.LayerScale`: their model's deployed builder has none, so
:func:`foldattn.fold` always folds them and refuses a model where it cannot), and third-party
layers (timm's ``LayerScale``/``LayerScale2d``), folded only for deployment fusion
(``fold(..., fuse_bn=True)``), since removing them changes the model's ``state_dict``.

Between the host and the scale may stand layers that multiply their input by a mask or by one
(dropout, drop-path, ``nn.Identity``): timm's ViT blocks compute ``ls1(proj_drop(proj(x)))``.
A per-channel scale commutes with those exactly, in training as at inference, so the walk passes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._registry import Registry
from ._utils import set_submodule
from .graph import Graph, build_graph
from .hosts import absorbing_parameters, channel_dim, get_tensor, host_channels
from .transforms import scale_out_channels

__all__ = ["ScaleSpec", "scale_spec", "fold_scales", "ScaleReport", "register_scale_type", "unregister_scale_type",
           "list_scale_types", "SCALE_TYPES"]


@dataclass(frozen=True)
class ScaleSpec:
    """How a scale layer stores its scale: the parameter's name and the channel axis it multiplies."""

    parameter: str
    dim: int


#: third-party scale layers by qualified class name (optional packages need not be imported)
SCALE_TYPES: Registry[ScaleSpec] = Registry("scale layer type", case_sensitive=True)
for _name, _spec in (
    ("timm.layers.layer_scale.LayerScale", ScaleSpec("gamma", -1)),
    ("timm.layers.layer_scale.LayerScale2d", ScaleSpec("gamma", 1)),
    ("timm.models.fastvit.LayerScale2d", ScaleSpec("gamma", 1)),  # gamma of shape (C, 1, 1)
):
    SCALE_TYPES.register(_name, _spec)


def register_scale_type(cls: type | str, parameter: str, dim: int) -> None:
    """Declare a layer type computing ``x * parameter`` along channel axis ``dim`` (1 or -1), so that
    ``fold(..., fuse_bn=True)`` folds it into the layer before it."""
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    if dim not in (1, -1):
        raise ValueError(f"dim must be 1 (channels first) or -1 (channels last), got {dim!r}")
    SCALE_TYPES.register(name, ScaleSpec(parameter, dim))


def unregister_scale_type(name: str) -> ScaleSpec:
    """Remove a registered scale layer type (qualified name)."""
    return SCALE_TYPES.unregister(name)


def list_scale_types() -> list[str]:
    """Qualified names of the registered third-party scale layer types."""
    return SCALE_TYPES.names()


def scale_spec(module: nn.Module) -> ScaleSpec | None:
    """The :class:`ScaleSpec` of a scale layer, None for other modules."""
    if getattr(type(module), "folds_away", False):
        return ScaleSpec(getattr(module, "scale_parameter", "gamma"), int(getattr(module, "scale_dim", -1)))
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    return SCALE_TYPES.get(name) if name in SCALE_TYPES else None


#: layers computing ``x * m`` for a mask ``m`` (or ``x``), which any per-channel scale commutes with; not the
#: alpha dropouts, which add a constant where they drop
_COMMUTING_TYPES = frozenset({
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.dropout.Dropout1d",
    "torch.nn.modules.dropout.Dropout2d",
    "torch.nn.modules.dropout.Dropout3d",
    "timm.layers.drop.DropPath",
    "torchvision.ops.stochastic_depth.StochasticDepth",
})


def _host_node(graph: Graph, i: int) -> int | None:
    """The node of the layer that would absorb node ``i``'s scale: its sole producer, walking back through
    layers of :data:`_COMMUTING_TYPES` that are themselves each other's sole producer and reader."""
    src = graph.sole_producer(i)
    while src is not None:
        module = graph.modules[graph.nodes[src].target]
        if f"{type(module).__module__}.{type(module).__qualname__}" not in _COMMUTING_TYPES:
            return src
        src = graph.sole_producer(src)
    return None


@dataclass
class ScaleReport:
    """The scale layers :func:`fold_scales` folded (``(layer, into)``) and those it left, with the reason."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def _why_not(graph: Graph, i: int, spec: ScaleSpec, module: nn.Module) -> str | None:
    node = graph.nodes[i]
    src = _host_node(graph, i)
    if src is None:
        producer = graph.nodes[node.inputs[0]].target if len(node.inputs) == 1 else "several tensors"
        return (f"its input comes from {producer}, not from one layer used once whose only reader it is "
                "(a function, a shared tensor or a layer called twice in between)")
    name = graph.nodes[src].target
    host = graph.modules[name]
    try:
        channels = host_channels(host)
    except ValueError as e:
        return f"{name} cannot absorb a per-channel scale ({str(e).split(';')[0]})"
    gamma = get_tensor(module, spec.parameter)
    if gamma.numel() != channels or channel_dim(host) != spec.dim:
        return (f"{name} has {channels} output channels on axis {channel_dim(host)}, the scale {gamma.numel()} "
                f"values on axis {spec.dim}")
    return None


@torch.no_grad()
def fold_scales(model: nn.Module, *, third_party: bool = False, graph: Graph | None = None) -> ScaleReport:
    """Fold, in place, every scale layer of ``model`` into the layer that produces its input.

    Layers that fold away (``folds_away = True``) are always folded; with ``third_party`` also the
    registered third-party types (timm's LayerScale). Products in float64, cast back.

    Raises:
        ValueError: a layer that must fold away cannot (its input does not come straight from a
            host layer), naming it and why.
    """
    specs = {n: scale_spec(m) for n, m in model.named_modules()}
    wanted = {n: s for n, s in specs.items()
              if s is not None and (third_party or getattr(type(model.get_submodule(n)), "folds_away", False))}
    report = ScaleReport()
    if not wanted:
        return report
    if graph is None:
        graph, _ = build_graph(model)
        assert graph is not None
    done: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if node.kind != "module" or node.target not in wanted or node.target in done:
            continue
        done.add(node.target)
        module, spec = graph.modules[node.target], wanted[node.target]
        why = _why_not(graph, i, spec, module)
        if why is None and graph.calls()[node.target] != 1:
            why = f"it is called {graph.calls()[node.target]} times"
        if why is not None:
            if getattr(type(module), "folds_away", False):
                raise ValueError(f"cannot fold the scale layer {node.target!r} ({type(module).__name__}): {why}")
            report.left.append((node.target, why))
            continue
        host_name = graph.nodes[_host_node(graph, i)].target  # type: ignore[index]
        host = model.get_submodule(host_name)
        gamma = get_tensor(module, spec.parameter).detach().reshape(-1)
        for pname in absorbing_parameters(host):
            p = host.get_parameter(pname)
            p.copy_(scale_out_channels(p, gamma))
        set_submodule(model, node.target, nn.Identity())
        report.folded.append((node.target, host_name))
    for name in wanted:
        if name not in done:
            if getattr(type(model.get_submodule(name)), "folds_away", False):
                raise ValueError(f"cannot fold the scale layer {name!r}: the model's forward never calls it")
            report.left.append((name, "the graph never calls it"))
    return report
