"""ONNX export of a deployed (folded) model, checked with onnxruntime.

After :func:`foldattn.fold`, an ASR model (Zhong et al., arXiv 2304.06345) is the plain
backbone, so its ONNX graph has exactly the operators of the plain backbone's graph;
:func:`export_onnx` folds, exports, runs the file with onnxruntime against PyTorch and
reports the operator counts.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import atomic_path, eval_mode, first_line, require, unwrap_model
from .fold import asr_layers, fold, has_foldable
from .verify import TOLERANCES, EquivalenceError, _as_args, _flatten, _output_error

__all__ = ["export_onnx", "export_program", "onnx_op_counts", "ExportReport", "ProgramReport"]


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
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    dynamic_batch: bool = True

    @property
    def ops(self) -> int:
        return sum(self.op_counts.values())

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"{self.path}: {self.ops} ONNX nodes (opset {self.opset}, {self.exporter} exporter); "
                 f"{self.folded_layers} ASR layer(s) folded before export", f"  operators: {ops}"]
        if self.max_rel is not None:
            batches = "at two batch sizes" if self.dynamic_batch else "at the example batch"
            lines.append(f"  onnxruntime vs PyTorch {batches}: max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} "
                         f"(tolerance {self.tolerance:.0e})")
        lines.append(f"  inputs {', '.join(self.input_names)}, outputs {', '.join(self.output_names)}; batch "
                     + ("dynamic" if self.dynamic_batch else "fixed"))
        return "\n".join(lines)


def onnx_op_counts(model_or_path: Any) -> dict[str, int]:
    """``{op_type: count}`` over an ONNX model's graph and all its subgraphs."""
    onnx = require("onnx", "onnx")
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


def _check_opset(opset: int | None, dynamo: bool) -> None:
    # the range each exporter of this torch accepts; refused here rather than deep inside torch.onnx
    from torch.onnx import _constants

    low = 18 if dynamo else _constants.ONNX_MIN_OPSET
    high = _constants.ONNX_MAX_OPSET if dynamo else _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"opset_version={opset!r} is not supported by the {'dynamo' if dynamo else 'TorchScript'} "
                         f"exporter of torch {torch.__version__}: choose {low}..{high} (or None for its default)")


def _names(given: Sequence[str] | None, n: int, stem: str) -> list[str]:
    if given is not None:
        names = list(given)
        if len(names) != n or len(set(names)) != n or not all(isinstance(x, str) and x for x in names):
            raise ValueError(f"{stem}_names must be {n} distinct non-empty strings, got {given!r}")
        return names
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


def _other_batch(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The example inputs at another batch size (their samples repeated), for the dynamic-batch check."""
    n = next(a.shape[0] for a in args if isinstance(a, Tensor))
    idx = torch.arange(n + 3) % n
    return tuple(a[idx.to(a.device)] if isinstance(a, Tensor) else a for a in args)


def _at_least_two(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """torch.export specializes a dimension of size 1 to a constant: trace a dynamic batch on two samples."""
    n = next(a.shape[0] for a in args if isinstance(a, Tensor))
    if n > 1:
        return args
    return tuple(a[torch.zeros(2, dtype=torch.long, device=a.device)] if isinstance(a, Tensor) else a for a in args)


def _export(model: nn.Module, args: tuple[Any, ...], path: Path, opset: int | None, dynamo: bool,
            input_names: list[str], output_names: list[str], dynamic_batch: bool) -> None:
    kwargs: dict[str, Any] = {"dynamo": dynamo, "input_names": input_names, "output_names": output_names}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (*input_names, *output_names)}
    if dynamo:
        kwargs["external_data"] = False  # one self-contained file (models under 2 GB)
        kwargs["verbose"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        try:
            torch.onnx.export(model, _at_least_two(args) if dynamic_batch and dynamo else args, str(path), **kwargs)
        except Exception as e:
            first = first_line(e)
            other = "dynamo=True" if not dynamo else "dynamo=False"
            raise RuntimeError(
                f"ONNX export failed ({'dynamo' if dynamo else 'TorchScript'} exporter): {type(e).__name__}: "
                f"{first[:300]}. Try {other}, or check that the model runs on the example inputs."
            ) from None


def _deployed(model: nn.Module, fold_asr: bool, allow_unfolded: bool, fuse_bn: bool,
              example_inputs: tuple[Any, ...] | None = None) -> tuple[nn.Module, int]:
    """The model ``fold`` would deploy (ASR folded, re-parameterization blocks fused), and its ASR count.
    ``example_inputs`` (the export's own) prove the shape-dependent norm pairs of ``fuse_bn``."""
    model = unwrap_model(model)
    layers = asr_layers(model)
    if layers and not fold_asr and not allow_unfolded:
        raise ValueError(
            f"the model has {len(layers)} unfolded ASR layer(s) (e.g. {layers[0][0]!r}); their attention modules "
            "would be exported and run at inference. Fold them (fold_asr=True, or foldattn.fold(model) first), "
            "or pass allow_unfolded=True to export the training form on purpose"
        )
    if fold_asr and (has_foldable(model) or fuse_bn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no ASR layer" for a plain re-parameterizable model
            model = fold(model, fuse_bn=fuse_bn, example_inputs=example_inputs if fuse_bn else None)
        return model, len(layers)
    return model, 0


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    fold_asr: bool = True,
    allow_unfolded: bool = False,
    fuse_bn: bool = False,
    check: bool = True,
    tolerance: float = 1e-5,
    opset_version: int | None = None,
    dynamo: bool = False,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportReport:
    """Deploy ``model`` as :func:`foldattn.fold` would, export it to ONNX at ``path`` and check the file.

    Args:
        model: a model with or without ASR layers (wrappers are removed; not modified).
        example_inputs: a tensor or a tuple of positional input tensors (batch first).
        path: the ``.onnx`` file to write (atomically; nothing is written if a check fails).
        fold_asr: export the deployed form: ASR layers folded and re-parameterization blocks
            (RepVGG, ACNet, DBB) fused, on a copy.
        allow_unfolded: with ``fold_asr=False``, export ASR layers as they are (the
            training form); refused otherwise. The TorchScript exporter keeps the attention
            modules in the graph; the dynamo one constant-folds most of the static attention.
        fuse_bn: also fuse the norm layers into the convs (``fold(..., fuse_bn=True)``).
        check: validate the file with ``onnx.checker`` and run it with onnxruntime (CPU) against
            PyTorch in float32, at the example batch and (with ``dynamic_batch``) at another one.
        tolerance: largest accepted ``max |ort - torch| / max |torch|``.
        opset_version: ONNX opset (exporter default if None); validated against the exporter.
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript one.
        dynamic_batch: a symbolic batch dimension (``"batch"``) on every input and output;
            ``False`` fixes the example's batch size.
        input_names, output_names: graph input and output names (default ``input``/``output``,
            numbered ``input_0, ...`` when there are several).

    Returns:
        An :class:`ExportReport` with the operator counts and the measured error.

    Raises:
        ValueError: unfolded ASR layers without permission, an unsupported opset, bad names.
        EquivalenceError: onnxruntime's outputs differ from PyTorch's beyond ``tolerance``, or
            either is not finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    _check_opset(opset_version, dynamo)
    args = _as_args(example_inputs)
    model, folded = _deployed(model, fold_asr, allow_unfolded, fuse_bn, args)
    if any(isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float32 for a in args) and check:
        raise ValueError("the onnxruntime check runs in float32: pass float32 example inputs (or check=False)")
    try:
        with torch.no_grad(), eval_mode(model):
            outputs = len(_flatten(model(*args)))
    except Exception as e:
        first = first_line(e)
        raise RuntimeError(f"ONNX export failed: the model does not run on the example inputs "
                           f"({type(e).__name__}: {first[:300]})") from None
    names_in = _names(input_names, sum(isinstance(a, Tensor) for a in args), "input")
    names_out = _names(output_names, outputs, "output")
    dest = Path(path)
    with eval_mode(model), atomic_path(dest) as tmp:
        _export(model, args, tmp, opset_version, dynamo, names_in, names_out, dynamic_batch)
        onnx = require("onnx", "onnx")
        proto = onnx.load(str(tmp))
        counts = onnx_op_counts(proto)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
        max_abs = max_rel = None
        if check:
            try:
                onnx.checker.check_model(proto)
            except onnx.checker.ValidationError as e:
                raise RuntimeError(f"the exported ONNX file is invalid: {str(e).splitlines()[0]}") from None
            max_abs = max_rel = 0.0
            for batch_args in (args, _other_batch(args)) if dynamic_batch else (args,):
                a, r = _compare_with_ort(model, batch_args, tmp)
                max_abs, max_rel = max(max_abs, a), max(max_rel, r)
            if not max_rel <= tolerance:
                raise EquivalenceError(
                    f"onnxruntime differs from PyTorch: max abs {max_abs:.3e}, max rel {max_rel:.3e} "
                    f"(tolerance {tolerance:.0e}); the file was not written"
                )
    return ExportReport(dest, counts, folded, "dynamo" if dynamo else "TorchScript",
                        opset, max_abs, max_rel, tolerance if check else None, tuple(names_in), tuple(names_out),
                        dynamic_batch)


@dataclass(frozen=True)
class ProgramReport:
    """What :func:`export_program` wrote and checked."""

    path: Path
    folded_layers: int
    batches: tuple[int, ...]
    max_abs: float
    max_rel: float
    tolerance: float

    def __str__(self) -> str:
        return (f"{self.path}: torch.export program, {self.folded_layers} ASR layer(s) folded before export; "
                f"loaded back and run at batch {', '.join(map(str, self.batches))}: max abs {self.max_abs:.3e}, "
                f"max rel {self.max_rel:.3e} (tolerance {self.tolerance:.0e})")


def export_program(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    fold_asr: bool = True,
    fuse_bn: bool = False,
    dynamic_batch: bool = True,
    tolerance: float | None = None,
) -> ProgramReport:
    """Deploy ``model`` as :func:`foldattn.fold` would and save it as a ``torch.export`` program (``.pt2``).

    The file is written with ``torch.export.save`` (atomically), loaded back with
    ``torch.export.load`` and run against the deployed PyTorch model at the example batch and,
    with ``dynamic_batch``, at another one; outputs must agree within ``tolerance`` (the
    :data:`~foldattn.verify.TOLERANCES` of the inputs' dtype by default) and be finite.
    Load it with ``torch.export.load(path).module()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_program expects an nn.Module, got {type(model).__name__}")
    args = _as_args(example_inputs)
    model, folded = _deployed(model, fold_asr, False, fuse_bn, args)
    tensors = [a for a in args if isinstance(a, Tensor)]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    tol = tolerance if tolerance is not None else TOLERANCES.get(dtype, 1e-5)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if isinstance(a, Tensor) else None for a in args)
    dest = Path(path)
    with eval_mode(model), torch.no_grad(), atomic_path(dest) as tmp:
        try:
            program = torch.export.export(model, _at_least_two(args) if dynamic_batch else args,
                                          dynamic_shapes=dynamic_shapes)
        except Exception as e:
            first = first_line(e)
            raise RuntimeError(f"torch.export failed: {type(e).__name__}: {first[:300]}"
                               + (" (try dynamic_batch=False)" if dynamic_batch else "")) from None
        # through a buffer: torch.export wants file names ending in .pt2, the temporary file does not
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        tmp.write_bytes(buffer.getvalue())
        with open(tmp, "rb") as f:
            loaded = torch.export.load(io.BytesIO(f.read())).module()
        max_abs = max_rel = 0.0
        batches = []
        for batch_args in (args, _other_batch(args)) if dynamic_batch else (args,):
            err, rel = _output_error(_flatten(model(*batch_args)), _flatten(loaded(*batch_args)), "exported program")
            max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
            batches.append(next(t.shape[0] for t in batch_args if isinstance(t, Tensor)))
        if not max_rel <= tol:
            raise EquivalenceError(f"the exported program differs from PyTorch: max abs {max_abs:.3e}, max rel "
                                   f"{max_rel:.3e} (tolerance {tol:.0e}); the file was not written")
    return ProgramReport(dest, folded, tuple(batches), max_abs, max_rel, tol)


@torch.no_grad()
def _compare_with_ort(model: nn.Module, args: tuple[Any, ...], path: Path) -> tuple[float, float]:
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, Tensor)]
    feeds = {inp.name: t.detach().cpu().numpy() for inp, t in zip(session.get_inputs(), tensors, strict=False)}
    got = [torch.from_numpy(g) for g in session.run(None, feeds)]
    return _output_error(_flatten(model(*args)), got, "onnxruntime")
