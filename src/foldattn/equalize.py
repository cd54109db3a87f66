"""Cross-layer equalization of a deployed model, the cure for per-tensor INT8 of merged branches.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV 2019).
Where a conv or linear layer feeds, through a positively homogeneous activation (``ReLU``,
``LeakyReLU``, none), only another conv or linear layer, dividing the first layer's output channel
``c`` by ``s_c > 0`` and multiplying the second layer's input channel ``c`` by ``s_c`` computes the same
function (``relu(x / s) = relu(x) / s``). Choosing ``s`` from the two layers' per-channel ranges
(:func:`foldattn.transforms.equalization_scales`) evens out the ranges, which is what one scale per
weight tensor needs: RepVGG's merged branches leave output channels whose ranges differ by orders of
magnitude, and per-tensor INT8 rounds the small ones to nothing.

    deployed = foldattn.fold(model, fuse_bn=True)
    equalized, pairs = equalize(deployed)          # same outputs (verify), evener ranges
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from .graph import build_graph
from .transforms import (
    equalization_scales,
    in_channel_ranges,
    out_channel_ranges,
    scale_in_channels,
    scale_out_channels,
)

__all__ = ["equalize", "equalization_pairs"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_Layer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
#: activations with f(x / s) == f(x) / s for every s > 0 (module types, and function or method names)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = {"relu", "leaky_relu"}


def _channels_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels  # type: ignore[return-value]


def _channels_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels  # type: ignore[return-value]


def _homogeneous(graph: Any, k: int) -> bool:
    # stateless, so one module called at several places (a block's shared ReLU) is fine
    node = graph.nodes[k]
    if node.kind == "function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return isinstance(graph.module(k), _HOMOGENEOUS)


def equalization_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """``(first, second)`` module names of every conv/linear layer whose output reaches only another
    conv/linear layer, directly or through positively homogeneous activations (``ReLU``, ``LeakyReLU``,
    ``Identity``: a fused norm), the layers called once, every tensor on the way read by nothing else."""
    graph, _ = build_graph(model, example_inputs)
    assert graph is not None  # the nn.Sequential fallback always gives one
    calls = graph.calls()
    pairs: list[tuple[str, str]] = []
    for i, node in enumerate(graph.nodes):
        first = graph.module(i)
        if not isinstance(first, _LAYERS) or calls[node.target] != 1 or len(graph.users(i)) != 1:
            continue
        src, k = i, graph.users(i)[0]
        while _homogeneous(graph, k):  # walk through activations that read one tensor and feed one layer
            if graph.nodes[k].inputs != [src] or len(graph.users(k)) != 1:
                break
            src, k = k, graph.users(k)[0]
        second = graph.module(k)
        if (isinstance(second, _LAYERS) and graph.nodes[k].inputs == [src] and calls[graph.nodes[k].target] == 1
                and _channels_out(first) == _channels_in(second)):
            pairs.append((node.target, graph.nodes[k].target))
    return pairs


@torch.no_grad()
def equalize(model: nn.Module, example_inputs: Any = None, *, iterations: int = 20, tolerance: float = 1e-4,
             inplace: bool = False) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Equalize the per-channel weight ranges of every pair of :func:`equalization_pairs` (in float64).

    Chains (``a -> b -> c``) share layers, so the pass is repeated until no scale moves by more than
    ``tolerance`` (relative) or ``iterations`` passes are done. The model's function is unchanged (up to
    rounding); check it with :func:`foldattn.verify`. Use it on a deployed model (``fold(model,
    fuse_bn=True)``): a norm between the two layers would stop the pair.

    Returns:
        ``(model, pairs)``: the equalized model (a copy unless ``inplace``) and the pairs it equalized.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not inplace:
        model = copy.deepcopy(model)
    pairs = equalization_pairs(model, example_inputs)
    for _ in range(iterations):
        moved = 0.0
        for a, b in pairs:
            # equalization_pairs: convs and linears
            first, second = cast(_Layer, model.get_submodule(a)), cast(_Layer, model.get_submodule(b))
            groups = getattr(second, "groups", 1)
            s = equalization_scales(out_channel_ranges(first.weight), in_channel_ranges(second.weight, groups))
            moved = max(moved, float((s.log().abs()).max()) if s.numel() else 0.0)
            first.weight.copy_(scale_out_channels(first.weight, 1.0 / s))
            if first.bias is not None:
                first.bias.copy_(scale_out_channels(first.bias, 1.0 / s))
            second.weight.copy_(scale_in_channels(second.weight, s, groups))
        if moved < tolerance:
            break
    return model, pairs
