"""The deployed model in the runtimes deployers ship beside ONNX Runtime: OpenVINO (Intel CPUs) and ExecuTorch
with the XNNPACK delegate (phones), each file checked against PyTorch before it is kept.

After :func:`foldattn.fold` an ASR model (Zhong et al., arXiv 2304.06345) is the plain backbone, so whatever a
runtime runs for the plain network it runs for the folded one. :func:`export_openvino` writes an OpenVINO IR
folder (``model.xml`` and ``model.bin``, float32 weights) and :func:`export_executorch` an ExecuTorch program
(``.pte``); both read their own file back, run it on the example inputs and compare with PyTorch in float32
(``max |runtime - torch| / max |torch|``), and write nothing when that fails.

INT8 with each runtime's own post-training tools: :func:`quantize_openvino` (NNCF on the IR) and
:func:`quantize_executorch` (the PT2E flow with ExecuTorch's XNNPACK quantizer, then :func:`lower_executorch`);
:class:`OpenVINORunner` and :class:`ExecuTorchRunner` score and time either form. ``foldattn quantize --runtime``
(:func:`foldattn.quantize.quantize`) puts them together with the accuracy measured.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import TMP_MARK, atomic_path, eval_mode, first_line, require
from .export import _deployed, _other_batch
from .verify import EquivalenceError, _as_args, _flatten, _output_error

__all__ = ["export_openvino", "export_executorch", "RuntimeReport", "quantize_openvino", "quantize_executorch",
           "lower_executorch", "OpenVINORunner", "ExecuTorchRunner", "INT8_METHODS"]

#: the files of an OpenVINO IR folder written by :func:`export_openvino`
OPENVINO_FILES = ("model.xml", "model.bin")


@dataclass(frozen=True)
class RuntimeReport:
    """What :func:`export_openvino` or :func:`export_executorch` wrote and checked."""

    runtime: str
    path: Path
    folded_layers: int
    batches: tuple[int, ...]
    max_abs: float
    max_rel: float
    tolerance: float
    #: the precision the check ran in (OpenVINO's CPU plugin would pick bfloat16 on CPUs that have it)
    precision: str = "f32"

    def __str__(self) -> str:
        return (f"{self.path}: {self.runtime}, {self.folded_layers} ASR layer(s) folded before export; read back and "
                f"run in {self.precision} at batch {', '.join(map(str, self.batches))}: max abs {self.max_abs:.3e}, "
                f"max rel {self.max_rel:.3e} (tolerance {self.tolerance:.0e})")


def _prepare(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], fold_asr: bool, fuse_bn: bool,
             what: str) -> tuple[nn.Module, int, tuple[Any, ...]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(model).__name__}")
    args = _as_args(example_inputs)
    if not all(isinstance(a, Tensor) for a in args):
        raise TypeError(f"{what}: the example inputs must be tensors (a tensor or a tuple of tensors)")
    if any(a.is_floating_point() and a.dtype != torch.float32 for a in args):
        raise ValueError(f"{what}: the check runs in float32: pass float32 example inputs")
    model, folded = _deployed(model, fold_asr, False, fuse_bn, args)
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args)
    except Exception as e:
        raise RuntimeError(f"{what}: the model does not run on the example inputs "
                           f"({type(e).__name__}: {first_line(e)[:300]})") from None
    return model, folded, args


@contextlib.contextmanager
def _staged_ir(dest: Path) -> Iterator[Path]:
    """Where to save an OpenVINO IR that becomes ``dest`` (an ``.xml``, its ``.bin`` beside it) if the block
    succeeds: ``model.xml`` in a temporary folder beside ``dest``, named like :func:`atomic_path`'s temporaries so
    the folder's lock removes what a killed write left. The weights move first: an ``.xml`` is only ever beside
    the ``.bin`` it was saved with. Nothing is left when the block fails."""
    stage = dest.parent / f".{dest.stem}{TMP_MARK}{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    try:
        yield stage / "model.xml"
        os.replace(stage / "model.bin", dest.with_suffix(".bin"))
        os.replace(stage / "model.xml", dest)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(stage)


def export_openvino(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    folder: str | os.PathLike[str],
    *,
    fold_asr: bool = True,
    fuse_bn: bool = False,
    dynamic_batch: bool = True,
    tolerance: float = 1e-5,
) -> RuntimeReport:
    """Deploy ``model`` as :func:`foldattn.fold` would and write it as an OpenVINO IR into ``folder``.

    ``folder/model.xml`` and ``folder/model.bin`` (float32 weights: OpenVINO's ``save_model`` would halve them to
    float16 by default) are converted with ``openvino.convert_model``, read back with ``openvino.Core`` and run
    on the CPU plugin in float32 (``INFERENCE_PRECISION_HINT=f32``; left to itself the plugin runs in bfloat16
    on CPUs that have it, about 1 % of the output scale away) against the deployed PyTorch model, at the
    example batch and, with ``dynamic_batch``, at another one. Nothing is left in ``folder`` when a check fails;
    other files there are not touched, ``model.xml``/``model.bin`` of an earlier export are replaced.

    Args:
        model: a model with or without ASR layers (wrappers are removed; not modified).
        example_inputs: a float32 tensor or a tuple of tensors (batch first).
        folder: the IR folder (created if missing).
        fold_asr: export the deployed form (ASR folded, re-parameterization blocks fused) on a copy.
        fuse_bn: also fuse the norm layers into the convs.
        dynamic_batch: a dynamic batch dimension on every input (``False``: the example's batch).
        tolerance: largest accepted ``max |openvino - torch| / max |torch|``.

    Raises:
        ImportError: the ``openvino`` extra is missing (``pip install 'foldattn[openvino]'``).
        EquivalenceError: OpenVINO's outputs differ from PyTorch's beyond ``tolerance``, or are not finite.
    """
    model, folded, args = _prepare(model, example_inputs, fold_asr, fuse_bn, "export_openvino")
    ov = require("openvino", "openvino")
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    with _staged_ir(dest / "model.xml") as staged, torch.no_grad(), eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings of the conversion
        shapes = [ov.PartialShape([-1 if dynamic_batch else a.shape[0], *a.shape[1:]]) for a in args]
        try:
            converted = ov.convert_model(model, example_input=args if len(args) > 1 else args[0], input=shapes)
        except Exception as e:
            raise RuntimeError(f"OpenVINO conversion failed: {type(e).__name__}: {first_line(e)[:300]}") from None
        ov.save_model(converted, str(staged), compress_to_fp16=False)
        compiled = ov.Core().compile_model(str(staged), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type: what the plugin runs in
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        max_abs = max_rel = 0.0
        batches = []
        for batch_args in (args, _other_batch(args)) if dynamic_batch else (args,):
            result = compiled([a.numpy() for a in batch_args])
            got = [torch.from_numpy(result[out].copy()) for out in compiled.outputs]
            a_err, r_err = _output_error(_flatten(model(*batch_args)), got, "OpenVINO")
            max_abs, max_rel = max(max_abs, a_err), max(max_rel, r_err)
            batches.append(batch_args[0].shape[0])
        del compiled
        if not max_rel <= tolerance:
            raise EquivalenceError(f"OpenVINO differs from PyTorch: max abs {max_abs:.3e}, max rel {max_rel:.3e} "
                                   f"(tolerance {tolerance:.0e}); nothing was written")
    return RuntimeReport("OpenVINO IR", dest / "model.xml", folded, tuple(batches), max_abs, max_rel, tolerance,
                         precision)


def export_executorch(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    fold_asr: bool = True,
    fuse_bn: bool = False,
    tolerance: float = 1e-5,
) -> RuntimeReport:
    """Deploy ``model`` as :func:`foldattn.fold` would and write it as an ExecuTorch program (``.pte``) whose
    operators the XNNPACK delegate runs.

    ``torch.export`` at the example inputs' shapes (the program's batch is the example's: a phone runs batch 1),
    lowered with ExecuTorch's ``XnnpackPartitioner``; the file is read back into ExecuTorch's Python runtime
    and run against the deployed PyTorch model in float32. Written atomically; nothing when a check fails.

    Raises:
        ImportError: the ``executorch`` extra is missing (``pip install 'foldattn[executorch]'``).
        EquivalenceError: ExecuTorch's outputs differ from PyTorch's beyond ``tolerance``, or are not finite.
    """
    model, folded, args = _prepare(model, example_inputs, fold_asr, fuse_bn, "export_executorch")
    exir = require("executorch.exir", "executorch")
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch")
    runtime = require("executorch.runtime", "executorch")
    dest = Path(path)
    with torch.no_grad(), eval_mode(model), atomic_path(dest) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, args)
                lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
                buffer = lowered.to_executorch().buffer
        except Exception as e:
            raise RuntimeError(f"ExecuTorch lowering failed: {type(e).__name__}: {first_line(e)[:300]}") from None
        tmp.write_bytes(buffer)
        # the bytes and the program stay referenced while the method runs: ExecuTorch's Python runtime reads
        # them in place and does not keep them alive (a chained call segfaults)
        data = tmp.read_bytes()
        loaded = runtime.Runtime.get().load_program(data)
        method = loaded.load_method("forward")
        got = [t for t in method.execute(list(args)) if isinstance(t, Tensor)]
        del method, loaded, data
        max_abs, max_rel = _output_error(_flatten(model(*args)), got, "ExecuTorch")
        if not max_rel <= tolerance:
            raise EquivalenceError(f"ExecuTorch differs from PyTorch: max abs {max_abs:.3e}, max rel {max_rel:.3e} "
                                   f"(tolerance {tolerance:.0e}); the file was not written")
    return RuntimeReport("ExecuTorch program (XNNPACK)", dest, folded, (args[0].shape[0],), max_abs, max_rel,
                         tolerance)



# --- INT8 through each runtime's own post-training quantizer --------------------------------------------------

#: activation calibration each runtime's quantizer offers (ONNX Runtime's are in foldattn.quantize.METHODS)
INT8_METHODS: dict[str, tuple[str, ...]] = {"openvino": ("minmax", "mean-minmax", "percentile"),
                                            "executorch": ("minmax",)}


def _check_method(runtime: str, method: str) -> None:
    if method not in INT8_METHODS[runtime]:
        raise ValueError(f"{runtime} calibrates activations with {' or '.join(INT8_METHODS[runtime])}, not "
                         f"{method!r}: choose one of those (entropy is ONNX Runtime's only)")


def quantize_openvino(fp32: str | os.PathLike[str], int8: str | os.PathLike[str], calibration: Sequence[Tensor], *,
                      per_channel: bool = True, method: str = "minmax") -> None:
    """INT8 of the OpenVINO IR ``fp32`` (``model.xml``) by NNCF's post-training quantization, written as the IR
    ``int8`` (its ``.bin`` beside it, the weights first, then the ``.xml``).

    NNCF's defaults otherwise (its CPU preset: symmetric int8 weights and activations, fast bias correction);
    ``per_channel`` picks the weights' scales, ``method`` the activations' range estimator (``minmax``: the
    extremes seen over all batches, as ONNX Runtime's minmax; ``mean-minmax``: the mean over batches of each
    batch's extremes, NNCF's own choice; ``percentile``: NNCF's mean-quantile estimator).
    """
    _check_method("openvino", method)
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    batches = [x.detach().float().contiguous().numpy() for x in calibration]
    if not batches:
        raise ValueError("quantize_openvino needs at least one calibration batch")
    estimator = {"minmax": RangeEstimatorParametersSet.MINMAX, "mean-minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
                 "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE}[method]
    params = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=per_channel),
        activations_range_estimator_params=estimator)
    with _staged_ir(Path(int8)) as staged, warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # and NNCF's progress bars go to stderr
        quantized = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset(batches),
                                  subset_size=len(batches),  # items, not images
                                  preset=nncf.QuantizationPreset.PERFORMANCE, advanced_parameters=params)
        ov.save_model(quantized, str(staged), compress_to_fp16=False)


def quantize_executorch(model: nn.Module, example: Tensor, calibration: Sequence[Tensor], *,
                        per_channel: bool = True, method: str = "minmax") -> nn.Module:
    """The deployed ``model`` quantized for ExecuTorch's XNNPACK delegate by the PT2E flow (torchao's
    ``prepare_pt2e``/``convert_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``): int8 weights (per output channel
    or per tensor, symmetric), int8 activations whose ranges are the extremes seen on ``calibration``.

    Returns the converted module (quantize/dequantize pairs around each op, any batch size), which
    :func:`lower_executorch` turns into a program.
    """
    _check_method("executorch", method)
    require("executorch.exir", "executorch")
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from ._argtypes import MAX_BATCH

    config = get_symmetric_quantization_config(is_per_channel=per_channel)
    # the quantizer's default activation observer is a histogram search; minmax is what was asked for
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    config = dataclasses.replace(config, input_activation=act, output_activation=act)
    with torch.no_grad(), eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
        for x in calibration:
            prepared(x)
        return convert_pt2e(prepared)


def lower_executorch(model: nn.Module, example: Tensor) -> bytes:
    """An ExecuTorch program (XNNPACK delegate) of ``model`` at the shape of ``example``."""
    exir = require("executorch.exir", "executorch")
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, (example,))
            lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
            return bytes(lowered.to_executorch().buffer)
        except Exception as e:
            raise RuntimeError(f"ExecuTorch lowering failed: {type(e).__name__}: {first_line(e)[:300]}") from None


def median_ms(call: Callable[[], object], reps: int = 20, min_s: float = 0.05) -> float:
    """Median milliseconds per ``call()`` over ``reps`` samples, each repeated to last at least ``min_s``
    (one warm-up call first)."""
    call()
    samples = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            call()
            n += 1
            if time.perf_counter() - t0 >= min_s:
                break
        samples.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(samples)


class OpenVINORunner:
    """An OpenVINO IR compiled for the CPU plugin with a fixed thread count: ``runner(x) -> logits``.

    ``precision`` is the plugin's inference precision hint: ``f32`` (the float model checked against PyTorch;
    the INT8 model's int8 parts run in int8 whatever the hint), or ``bf16``, the plugin's own choice on CPUs
    that have it.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 1, precision: str = "f32") -> None:
        ov = require("openvino", "openvino")
        self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                   "INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def __call__(self, x: Tensor) -> Tensor:
        self.request.infer([x.detach().float().contiguous().numpy()])
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())

    def latency_ms(self, x: Tensor, reps: int = 20, min_s: float = 0.05) -> float:
        """Median milliseconds per inference of ``x`` (see :func:`median_ms`)."""
        feed = [x.detach().float().contiguous().numpy()]
        return median_ms(lambda: self.request.infer(feed), reps, min_s)


class ExecuTorchRunner:
    """ExecuTorch programs of one model (XNNPACK, ``threads`` threads): ``runner(x) -> logits``.

    ``program`` (the bytes of a batch-1 ``.pte``) scores images one at a time, as a phone runs them; timing
    another batch size lowers ``model`` at that size first (an ExecuTorch program has fixed shapes).
    """

    def __init__(self, program: bytes, model: nn.Module, threads: int = 1) -> None:
        self._runtime = require("executorch.runtime", "executorch")
        portable = require("executorch.extension.pybindings.portable_lib", "executorch")
        portable._unsafe_reset_threadpool(threads)  # XNNPACK's pool, else one thread per core
        self.model = model
        # each entry keeps its bytes and program referenced: ExecuTorch reads them in place while a method runs
        self._methods: dict[int, tuple[Any, Any, bytes]] = {}
        self._load(1, program)

    def _load(self, batch: int, data: bytes) -> Any:
        program = self._runtime.Runtime.get().load_program(data)
        method = program.load_method("forward")
        self._methods[batch] = (method, program, data)
        return method

    def _method(self, example: Tensor) -> Any:
        batch = example.shape[0]
        if batch not in self._methods:
            self._load(batch, lower_executorch(self.model, example))
        return self._methods[batch][0]

    def __call__(self, x: Tensor) -> Tensor:
        method = self._method(x[:1])
        x = x.detach().float().contiguous()
        return torch.cat([method.execute([x[i:i + 1]])[0] for i in range(x.shape[0])])

    def latency_ms(self, x: Tensor, reps: int = 20, min_s: float = 0.05) -> float:
        """Median milliseconds per inference of ``x`` (see :func:`median_ms`)."""
        x = x.detach().float().contiguous()
        method = self._method(x)
        return median_ms(lambda: method.execute([x]), reps, min_s)
