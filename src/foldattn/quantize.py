"""Post-training INT8 quantization of a deployed model, through a runtime's own tools, with its accuracy measured.

The deployed model (ASR folded, norms fused: :func:`foldattn.fold` with ``fuse_bn=True``) is
exported to ONNX (:func:`foldattn.export_onnx`, dynamic batch, checked) and quantized
statically by ONNX Runtime's tools (``quantize_static``, QDQ format, int8 weights and uint8
activations): per-channel weights by default, per-tensor on request; activation ranges
calibrated on real images with MinMax, Entropy or Percentile. ``runtime="openvino"`` writes an
OpenVINO IR quantized by NNCF instead, ``runtime="executorch"`` an XNNPACK program quantized by the
PT2E flow (:mod:`foldattn.runtimes`). The INT8 model is then run, never assumed: :func:`quantize`
measures the top-1 of both files on the validation images, their latency in that runtime (one
thread) and their sizes.

Why folding an attention vector is INT8-neutral with per-channel weights: a positive scale
``v_c`` folded into output channel ``c`` multiplies that channel's weights, their range and
therefore their quantization step by ``v_c``; the integers are the same
(:func:`fake_quantize_per_channel` makes this testable). Per-tensor quantization shares one
step across channels, so channels with small gates keep fewer levels:
:func:`weight_ranges` reports, per layer, the spread of the per-channel ranges that decides it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ._utils import atomic_path, require, unwrap_model
from .asr import ASR
from .fold import fold
from .runtimes import (
    INT8_METHODS,
    ExecuTorchRunner,
    OpenVINORunner,
    _check_method,
    export_executorch,
    export_openvino,
    lower_executorch,
    median_ms,
    quantize_executorch,
    quantize_openvino,
)
from .verify import EquivalenceError, verify

__all__ = ["METHODS", "RUNTIMES", "calibration_methods", "QuantizeReport", "quantize", "quantize_onnx", "weight_ranges",
           "fake_quantize_per_channel", "fake_quantize_per_tensor", "OrtRunner", "EqualizationError",
           "NonFiniteWeights"]


class EqualizationError(EquivalenceError):
    """Cross-layer equalization (``equalize=True``) changed the deployed model's outputs."""


class NonFiniteWeights(ValueError):
    """The model's weights hold NaN or Inf: no quantization step can represent them."""


def _nonfinite(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold NaN or Inf."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]

#: calibration methods of ONNX Runtime's ``CalibrationMethod``
METHODS = ("minmax", "entropy", "percentile")


def fake_quantize_per_channel(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization (what ONNX Runtime does to weights): ``(integers, steps)``."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(dim=1).clamp_min(1e-30) / qmax
    return torch.round(w / step[:, None]).clamp(-qmax, qmax).reshape(weight.shape), step


def fake_quantize_per_tensor(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-tensor quantization: ``(integers, step)``."""
    w = weight.detach().double()
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().max().clamp_min(1e-30) / qmax
    return torch.round(w / step).clamp(-qmax, qmax), step


def weight_ranges(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per conv/linear layer: the smallest and largest per-output-channel range (max |w|) and their ratio
    (``spread``). A large spread costs per-tensor quantization bits in the small channels."""
    out = {}
    for name, m in unwrap_model(model).named_modules():  # a public entry: wrappers are removed here
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            r = m.weight.detach().double().reshape(m.weight.shape[0], -1).abs().amax(dim=1)
            lo, hi = float(r.min()), float(r.max())
            out[name] = {"min_range": lo, "max_range": hi, "spread": hi / lo if lo > 0 else math.inf}
    return out


def _unscaled(model: nn.Module) -> nn.Module:
    """``model`` with every ASR layer replaced by its host as trained, without ``v`` (what the weights
    would be if the vector were not folded in)."""
    from ._utils import set_submodule

    copy_ = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in copy_.named_modules() if isinstance(m, ASR)]:
        set_submodule(copy_, name, layer.host)
    return copy_


class _Reader:
    """An ONNX Runtime ``CalibrationDataReader`` over batches of images."""

    def __init__(self, name: str, batches: Iterable[Tensor]) -> None:
        self.name = name
        self._it: Iterator[Tensor] = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x.detach().float().contiguous().numpy()}


def quantize_onnx(fp32: str | os.PathLike[str], int8: str | os.PathLike[str], calibration: Iterable[Tensor], *,
                  per_channel: bool = True, method: str = "minmax") -> None:
    """Quantize the ONNX model ``fp32`` into ``int8`` (QDQ, int8 weights, uint8 activations), its
    activation ranges calibrated on ``calibration`` (batches of model inputs). Written atomically."""
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    import onnx

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    dest = Path(int8)
    with tempfile.TemporaryDirectory(prefix="foldattn-quant-") as tmp, atomic_path(dest) as out, \
            warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        batches = list(calibration)
        cache: dict[str, Any] = {}
        if method == "entropy":
            cache["calibration_cache_path"] = _entropy_ranges(pre, Path(tmp), name, batches)
        quantize_static(str(pre), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calib,
                        extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False}, **cache)


def _entropy_ranges(model: Path, tmp: Path, name: str, batches: list[Tensor]) -> Path:
    """Entropy (KL) activation ranges over a 2,048-bin histogram, written where ``quantize_static`` reads
    calibration ranges from. ``quantize_static`` itself gives the entropy calibrator 128 bins and 128
    quantized bins, where the KL search has a single candidate, the whole range: it would be minmax."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise RuntimeError("--method entropy needs a newer onnxruntime (this one's quantize_static takes no "
                           "calibration_cache_path); upgrade it, or use --method minmax or percentile")
    calibrator = create_calibrator(str(model), augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": 2048, "num_quantized_bins": 128, "symmetric": False})
    calibrator.collect_data(_Reader(name, batches))
    path = tmp / "entropy-ranges.json"
    save_tensors_data(calibrator.compute_data(), path)
    return path


class OrtRunner:
    """An ONNX Runtime session on CPU with a fixed thread count: ``runner(x) -> logits``."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().float().contiguous().numpy()})[0])

    def latency_ms(self, x: Tensor, reps: int = 20, min_s: float = 0.05) -> float:
        """Median milliseconds per call over ``reps`` samples (each repeated to last at least ``min_s``)."""
        feed = {self.input: x.detach().float().contiguous().numpy()}
        return median_ms(lambda: self.session.run(None, feed), reps, min_s)


def _top1(run: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, int, int]:
    correct = total = nonfinite = 0
    for x, y in batches:
        logits = run(x)
        nonfinite += int((~torch.isfinite(logits)).any(dim=1).sum())
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1), total, nonfinite


class _Runner(Protocol):
    def __call__(self, x: Tensor) -> Tensor: ...

    def latency_ms(self, x: Tensor, reps: int = 20, min_s: float = 0.05) -> float: ...


@dataclass
class _Files:
    """The float and INT8 files one runtime wrote, and a runner of each."""

    paths: dict[str, Path]
    runners: dict[str, _Runner]
    precision: str = "f32"

    def file_bytes(self) -> dict[str, int]:
        # an OpenVINO IR is an .xml beside its .bin: both count
        return {k: p.stat().st_size + (p.with_suffix(".bin").stat().st_size if p.suffix == ".xml" else 0)
                for k, p in self.paths.items()}


def _ort_files(deployed: nn.Module, example: Tensor, calib: list[Tensor], out: Path, per_channel: bool, method: str,
               threads: int, say: Callable[[str], None]) -> _Files:
    """``model.onnx`` (checked against PyTorch) and ``model.int8.onnx`` (ONNX Runtime's ``quantize_static``)."""
    from .export import export_onnx

    fp32, int8 = out / "model.onnx", out / "model.int8.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            export_onnx(deployed, example, fp32, fold_asr=False, input_names=["input"], output_names=["logits"])
        except EquivalenceError as e:
            raise EquivalenceError(f"the exported ONNX model does not reproduce the deployed model: {e}") from None
    say(f"exported {fp32}")
    quantize_onnx(fp32, int8, calib, per_channel=per_channel, method=method)
    say(f"quantized {int8} (ONNX Runtime, {'per-channel' if per_channel else 'per-tensor'}, {method}, "
        f"{sum(x.shape[0] for x in calib)} calibration images)")
    return _Files({"fp32": fp32, "int8": int8}, {"fp32": OrtRunner(fp32, threads), "int8": OrtRunner(int8, threads)})


def _openvino_files(deployed: nn.Module, example: Tensor, calib: list[Tensor], out: Path, per_channel: bool,
                    method: str, threads: int, say: Callable[[str], None]) -> _Files:
    """``openvino/model.xml`` (checked against PyTorch in f32) and ``openvino/model.int8.xml`` (NNCF)."""
    folder = out / "openvino"
    try:
        export_openvino(deployed, example, folder, fold_asr=False)
    except EquivalenceError as e:
        raise EquivalenceError(f"the OpenVINO IR does not reproduce the deployed model: {e}") from None
    fp32, int8 = folder / "model.xml", folder / "model.int8.xml"
    say(f"exported {fp32}")
    quantize_openvino(fp32, int8, calib, per_channel=per_channel, method=method)
    say(f"quantized {int8} (NNCF, {'per-channel' if per_channel else 'per-tensor'}, {method}, "
        f"{sum(x.shape[0] for x in calib)} calibration images)")
    return _Files({"fp32": fp32, "int8": int8},
                  {"fp32": OpenVINORunner(fp32, threads), "int8": OpenVINORunner(int8, threads)})


def _executorch_files(deployed: nn.Module, example: Tensor, calib: list[Tensor], out: Path, per_channel: bool,
                      method: str, threads: int, say: Callable[[str], None]) -> _Files:
    """``model.pte`` (checked against PyTorch) and ``model.int8.pte`` (the PT2E flow with the XNNPACK quantizer),
    both XNNPACK programs at batch 1."""
    fp32, int8 = out / "model.pte", out / "model.int8.pte"
    one = example[:1].contiguous()
    try:
        export_executorch(deployed, one, fp32, fold_asr=False)
    except EquivalenceError as e:
        raise EquivalenceError(f"the ExecuTorch program does not reproduce the deployed model: {e}") from None
    say(f"exported {fp32}")
    quantized = quantize_executorch(deployed, calib[0], calib, per_channel=per_channel, method=method)
    program = lower_executorch(quantized, one)
    with atomic_path(int8) as tmp:
        tmp.write_bytes(program)
    say(f"quantized {int8} (PT2E, XNNPACKQuantizer, {'per-channel' if per_channel else 'per-tensor'}, {method}, "
        f"{sum(x.shape[0] for x in calib)} calibration images)")
    return _Files({"fp32": fp32, "int8": int8},
                  {"fp32": ExecuTorchRunner(fp32.read_bytes(), deployed, threads),
                   "int8": ExecuTorchRunner(program, quantized, threads)})


def calibration_methods(runtime: str) -> tuple[str, ...]:
    """The activation calibration methods ``runtime`` (a key of :data:`RUNTIMES`) offers."""
    return METHODS if runtime == "ort" else INT8_METHODS[runtime]


#: where :func:`quantize` quantizes and measures: runtime name -> the writer of its two files
RUNTIMES: dict[str, Callable[..., _Files]] = {"ort": _ort_files, "openvino": _openvino_files,
                                              "executorch": _executorch_files}


@dataclass
class QuantizeReport:
    """What :func:`quantize` measured (``quantize.json``)."""

    top1_fp32: float
    top1_int8: float
    drop: float
    per_channel: bool
    method: str
    calib_images: int
    val_images: int
    latency_ms: dict[str, dict[str, float]]
    file_bytes: dict[str, int]
    nonfinite_int8: int
    weight_ranges: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: layer pairs whose ranges :func:`foldattn.equalize.equalize` evened out before export (``equalize=True``)
    equalized_pairs: int = 0
    #: where both files ran: ``ort`` (ONNX Runtime), ``openvino`` or ``executorch`` (:data:`RUNTIMES`)
    runtime: str = "ort"
    #: the two files, relative to the output folder
    files: dict[str, str] = field(default_factory=dict)
    #: the precision the runtime ran the float parts in (OpenVINO's CPU plugin is asked for f32)
    precision: str = "f32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize(model: nn.Module, calibration: Iterable[Tensor], validation: Iterable[tuple[Tensor, Tensor]],
             out_dir: str | os.PathLike[str], *, example: Tensor, per_channel: bool = True, method: str = "minmax",
             threads: int = 1, latency_batches: tuple[int, ...] = (1, 64), max_drop: float = 1.0,
             equalize: bool = False, runtime: str = "ort", log: Callable[[str], None] | None = None
             ) -> QuantizeReport:
    """Deploy, export and quantize ``model`` with ``runtime``'s own tools; measure both files there.

    ``runtime="ort"``: ``out_dir/model.onnx`` and ``out_dir/model.int8.onnx`` (ONNX Runtime's ``quantize_static``,
    QDQ); ``"openvino"``: ``out_dir/openvino/model.xml`` and ``model.int8.xml`` (NNCF); ``"executorch"``:
    ``out_dir/model.pte`` and ``model.int8.pte`` (the PT2E flow with the XNNPACK quantizer, batch 1; other batch
    sizes are lowered in memory for timing). Each float file is checked against PyTorch as it is written.
    Returns the report (the caller writes ``quantize.json``).

    Args:
        model: the trained model (ASR layers and norms are folded on a copy).
        calibration: batches of input images (normalised as in training) for the activation ranges.
        validation: ``(images, labels)`` batches on which both files are scored.
        example: one input batch for the export (its shape after the batch dim is the model's input).
        per_channel: per-output-channel weight scales (else one per tensor).
        equalize: cross-layer equalization of the deployed model before export (:mod:`foldattn.equalize`),
            checked with :func:`foldattn.verify`: the cure for per-tensor scales on merged branches.
        method: activation calibration: ``minmax``, ``entropy`` or ``percentile`` for ONNX Runtime,
            ``minmax``, ``mean-minmax`` or ``percentile`` for OpenVINO, ``minmax`` for ExecuTorch.
        runtime: ``ort``, ``openvino`` (extra ``foldattn[openvino]``) or ``executorch`` (``foldattn[executorch]``).
        max_drop: an INT8 top-1 drop above this many points is recorded in ``warnings`` (and logged).
    """
    from ._argtypes import MAX_BATCH, MAX_THREADS

    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}] (4 per CPU core, 256 at most), got "
                         f"{threads!r}")
    if not latency_batches or not all(isinstance(b, int) and 1 <= b <= MAX_BATCH for b in latency_batches):
        raise ValueError(f"latency_batches must be batch sizes in [1, {MAX_BATCH}], got {latency_batches!r}")
    model = unwrap_model(model)  # where the model enters: the helpers below take it unwrapped
    bad = _nonfinite(model)
    if bad:  # said here: later it would surface as a failed equivalence check of some stage
        more = f", ... ({len(bad) - 4} more)" if len(bad) > 4 else ""
        raise NonFiniteWeights(f"the model's weights hold NaN or Inf ({', '.join(bad[:4])}{more}); it cannot be "
                               "quantized: use a checkpoint from before the training diverged")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "ort" and method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if runtime != "ort":
        _check_method(runtime, method)  # the runtime's own message
    out = Path(out_dir)
    say = log or (lambda s: None)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        deployed = fold(model, fuse_bn=True, example_inputs=example)  # proves the shape-dependent norm pairs
        pairs: list[tuple[str, str]] = []
        if equalize:
            from .equalize import equalize as equalize_ranges

            equalized, pairs = equalize_ranges(deployed, example)
            try:
                verify(deployed, equalized, example)  # past float32 tolerance: a model at its limits
            except EquivalenceError as e:
                raise EqualizationError(f"cross-layer equalization changed the model's outputs ({e}); quantize "
                                        "without equalize") from None
            deployed = equalized
    if equalize:
        say(f"equalized the weight ranges of {len(pairs)} layer pair(s) (outputs verified unchanged)")
    calib = list(calibration)
    files = RUNTIMES[runtime](deployed, example, calib, out, per_channel, method, threads, say)
    runners = files.runners
    val = list(validation)
    scores = {k: _top1(r, val) for k, r in runners.items()}
    report_warnings = []
    if scores["int8"][2]:
        report_warnings.append(f"the INT8 model gives NaN/Inf logits for {scores['int8'][2]} images")
    drop = scores["fp32"][0] - scores["int8"][0]
    if drop > max_drop:
        report_warnings.append(f"INT8 top-1 drops {drop:.2f} points (> {max_drop:g})")
    for w in report_warnings:
        say(f"WARNING: {w}")
    latency = {}
    for key, r in runners.items():
        latency[key] = {f"batch_{b}": r.latency_ms(example[:1].expand(b, *example.shape[1:]).contiguous())
                        for b in latency_batches}
    ranges = {"folded": weight_ranges(deployed)}
    if any(isinstance(m, ASR) for m in model.modules()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranges["unfolded"] = weight_ranges(fold(_unscaled(model), fuse_bn=True))
    return QuantizeReport(
        top1_fp32=scores["fp32"][0], top1_int8=scores["int8"][0], drop=drop, per_channel=per_channel, method=method,
        calib_images=sum(x.shape[0] for x in calib), val_images=scores["fp32"][1], latency_ms=latency,
        file_bytes=files.file_bytes(), nonfinite_int8=scores["int8"][2],
        weight_ranges=ranges, warnings=report_warnings, equalized_pairs=len(pairs), runtime=runtime,
        files={k: str(v.relative_to(out)) for k, v in files.paths.items()}, precision=files.precision)
