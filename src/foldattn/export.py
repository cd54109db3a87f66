"""ONNX export of a deployed (folded) model, checked with onnxruntime.

After :func:`foldattn.fold`, an ASR model (Zhong et al., arXiv 2304.06345) is the plain
backbone, so its ONNX graph has exactly the operators of the plain backbone's graph;
:func:`export_onnx` folds, exports, runs the file with onnxruntime against PyTorch and
reports the operator counts.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import atomic_path, eval_mode, unwrap_model
from .fold import asr_layers, fold
from .verify import EquivalenceError, _as_args, _flatten, check_finite

__all__ = ["export_onnx", "onnx_op_counts", "ExportReport"]


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and checked."""

    path: Path
    op_counts: dict[str, int]
    folded_layers: int
    exporter: str
    opset: int
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None

    @property
    def ops(self) -> int:
        return sum(self.op_counts.values())

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"{self.path}: {self.ops} ONNX nodes (opset {self.opset}, {self.exporter} exporter); "
                 f"{self.folded_layers} ASR layer(s) folded before export", f"  operators: {ops}"]
        if self.max_rel is not None:
            lines.append(f"  onnxruntime vs PyTorch: max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} "
                         f"(tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def onnx_op_counts(model_or_path: Any) -> dict[str, int]:
    """``{op_type: count}`` over an ONNX model's graph and all its subgraphs."""
    import onnx

    proto = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    counts: Counter[str] = Counter()

    def walk(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type if not node.domain else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    return dict(counts)


def _export(model: nn.Module, args: tuple[Any, ...], path: Path, opset: int | None, dynamo: bool,
            input_names: Sequence[str] | None, output_names: Sequence[str] | None) -> None:
    kwargs: dict[str, Any] = {"dynamo": dynamo}
    if opset is not None:
        kwargs["opset_version"] = opset
    if input_names is not None:
        kwargs["input_names"] = list(input_names)
    if output_names is not None:
        kwargs["output_names"] = list(output_names)
    if dynamo:
        kwargs["external_data"] = False  # one self-contained file (models under 2 GB)
        kwargs["verbose"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        try:
            torch.onnx.export(model, args, str(path), **kwargs)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            other = "dynamo=True" if not dynamo else "dynamo=False"
            raise RuntimeError(
                f"ONNX export failed ({'dynamo' if dynamo else 'TorchScript'} exporter): {type(e).__name__}: "
                f"{first[:300]}. Try {other}, or check that the model runs on the example inputs."
            ) from None


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    fold_asr: bool = True,
    allow_unfolded: bool = False,
    check: bool = True,
    tolerance: float = 1e-5,
    opset_version: int | None = None,
    dynamo: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportReport:
    """Fold ``model``'s ASR layers, export it to ONNX at ``path`` and check the file.

    Args:
        model: a model with or without ASR layers (wrappers are removed; not modified).
        example_inputs: a tensor or a tuple of positional input tensors.
        path: the ``.onnx`` file to write (atomically; nothing is written if a check fails).
        fold_asr: fold ASR layers on a copy before exporting (the deployed form).
        allow_unfolded: with ``fold_asr=False``, export ASR layers as they are (the
            training form); refused otherwise. The TorchScript exporter keeps the attention
            modules in the graph; the dynamo one constant-folds most of the static attention.
        check: validate the file with ``onnx.checker`` and run it with onnxruntime
            (CPU) against PyTorch in float32.
        tolerance: largest accepted ``max |ort - torch| / max |torch|``.
        opset_version: ONNX opset (exporter default if None).
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript one.
        input_names, output_names: graph input and output names.

    Returns:
        An :class:`ExportReport` with the operator counts and the measured error.

    Raises:
        ValueError: the model has unfolded ASR layers and folding was not allowed.
        EquivalenceError: onnxruntime's outputs differ from PyTorch's beyond ``tolerance``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    args = _as_args(example_inputs)
    layers = asr_layers(model)
    if layers and fold_asr:
        model = fold(model)
    elif layers and not allow_unfolded:
        raise ValueError(
            f"the model has {len(layers)} unfolded ASR layer(s) (e.g. {layers[0][0]!r}); their attention modules "
            "would be exported and run at inference. Fold them (fold_asr=True, or foldattn.fold(model) first), "
            "or pass allow_unfolded=True to export the training form on purpose"
        )
    if any(isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float32 for a in args) and check:
        raise ValueError("the onnxruntime check runs in float32: pass float32 example inputs (or check=False)")
    dest = Path(path)
    with eval_mode(model), atomic_path(dest) as tmp:
        _export(model, args, tmp, opset_version, dynamo, input_names, output_names)
        import onnx

        proto = onnx.load(str(tmp))
        counts = onnx_op_counts(proto)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
        max_abs = max_rel = None
        if check:
            try:
                onnx.checker.check_model(proto)
            except onnx.checker.ValidationError as e:
                raise RuntimeError(f"the exported ONNX file is invalid: {str(e).splitlines()[0]}") from None
            max_abs, max_rel = _compare_with_ort(model, args, tmp)
            if not max_rel <= tolerance:
                raise EquivalenceError(
                    f"onnxruntime differs from PyTorch: max abs {max_abs:.3e}, max rel {max_rel:.3e} "
                    f"(tolerance {tolerance:.0e}); the file was not written"
                )
    return ExportReport(dest, counts, len(layers) if fold_asr else 0, "dynamo" if dynamo else "TorchScript",
                        opset, max_abs, max_rel, tolerance if check else None)


@torch.no_grad()
def _compare_with_ort(model: nn.Module, args: tuple[Any, ...], path: Path) -> tuple[float, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, Tensor)]
    feeds = {inp.name: t.detach().cpu().numpy() for inp, t in zip(session.get_inputs(), tensors, strict=False)}
    got = session.run(None, feeds)
    ref = _flatten(model(*args))
    check_finite(ref, "PyTorch")
    check_finite([torch.from_numpy(g) for g in got], "onnxruntime")
    if len(ref) != len(got):
        raise ValueError(f"onnxruntime returned {len(got)} output(s), PyTorch {len(ref)}")
    max_abs, scale = 0.0, 0.0
    for r, g in zip(ref, got, strict=True):
        r64 = r.detach().cpu().double()
        g64 = torch.from_numpy(g).double()
        if r64.shape != g64.shape:
            raise ValueError(f"output shape differs: onnxruntime {tuple(g64.shape)}, PyTorch {tuple(r64.shape)}")
        if r64.numel():
            max_abs = max(max_abs, (r64 - g64).abs().max().item())
            scale = max(scale, r64.abs().max().item())
    return max_abs, (max_abs / scale if scale > 0 else max_abs)
