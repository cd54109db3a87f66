"""Running the benchmark: one group (a family and an attention X) at a time, then the whole run.

:func:`bench_group` builds every variant of :data:`~foldattn.bench.family.VARIANTS`
from the same seed, counts parameters and FLOPs, times inference at the latency and
throughput batch sizes and the training step (interleaved, :mod:`.timing`), measures
peak memory (:mod:`.memory`) and divides every figure by plain's (``ratio``).
:func:`run_bench` runs the groups, records the machine, checks the targets
(:mod:`.targets`) and validates the result (:mod:`.report`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._sizes import check_bytes, combine, leaf_output_bytes
from .._utils import require
from ..export import export_onnx
from ..fold import fold
from ..summary import count_flops, count_params
from ..verify import verify
from .config import BenchConfig
from .family import VARIANTS, Family, get_family, runtime_rows
from .memory import MIB, peak_memory
from .report import _RATIO_FIELDS, SCHEMA, validate_result
from .targets import check_targets
from .timing import _CLOCKS, _stats, _sync_for, interleaved
from .workload import _inputs, _prepare, _train_step

__all__ = ["bench_group", "run_bench", "check_memory", "UNRELIABLE_SPREAD", "REFERENCE_LABEL",
           "REFERENCE_DEPLOYED_LABEL"]

#: ONNX opset of the exported models of the ``--onnx`` rows
_ONNX_OPSET = 17
#: a timing whose interquartile range is more than this fraction of its median is flagged unreliable
UNRELIABLE_SPREAD = 0.2
#: the label of the row of the plain network written the usual way (see :mod:`.reference`)
REFERENCE_LABEL = "plain, reference implementation"
#: the label of the row of plain's deployed network written the usual way (re-parameterization backbones)
REFERENCE_DEPLOYED_LABEL = "plain deployed, reference implementation"


@contextlib.contextmanager
def _runtime_runners(models: dict[str, nn.Module], family: Family, attention: str, cfg: BenchConfig, threads: int,
                     batches: Sequence[int], log: Callable[[str], None]
                     ) -> Iterator[tuple[dict[tuple[str, int], Callable[[], object]], list[str]]]:
    """Runners ``(row key, batch) -> run`` of the deployed models in the other runtimes, and notes on
    what could not run there.

    ONNX Runtime: exported with :func:`foldattn.export_onnx` (folds ASR layers and fuses norms, checks the
    file against PyTorch), one file per batch size; INT8: that file quantized by
    :func:`foldattn.quantize.quantize_onnx` (per-channel, calibrated on a few random batches);
    ``torch.compile``: the deployed model compiled once and warmed up at both batch sizes.
    """
    runners: dict[tuple[str, int], Callable[[], object]] = {}
    notes: list[str] = []
    ort_rows = [r for rt in ("ort", "ort-int8") if rt in cfg.runtimes for r in runtime_rows(rt)]
    with tempfile.TemporaryDirectory(prefix="foldattn-bench-") as tmp:
        if ort_rows:
            try:
                import onnxruntime as ort
            except ImportError:
                raise ValueError("--runtime ort/ort-int8 needs onnxruntime: pip install 'foldattn[onnx]'") from None
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            providers = ["CPUExecutionProvider"]
            if cfg.device.startswith("cuda"):
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise ValueError("--runtime ort with --device cuda needs onnxruntime-gpu (no CUDAExecutionProvider "
                                     "here)")
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            cpu = replace(cfg, device="cpu", channels_last=False)
            for key, src in {src: src for _, _, src in ort_rows}.items():
                model = models[key].cpu().float().eval()
                for batch in batches:
                    path = Path(tmp) / f"{src}-{batch}.onnx"
                    x = _inputs(family, batch, cpu, torch.device("cpu"))
                    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                        warnings.simplefilter("ignore")
                        export_onnx(model, (x,), path, input_names=["x"], output_names=["y"],
                                    opset_version=_ONNX_OPSET, fuse_bn=True)
                    feed = {"x": x.numpy()}
                    for row, _, row_src in ort_rows:
                        if row_src != src:
                            continue
                        file = path
                        if row.startswith("ortq_"):
                            from ..quantize import quantize_onnx

                            file = path.with_suffix(".int8.onnx")
                            if not file.exists():
                                calib = [_inputs(family, 8, replace(cpu, seed=cpu.seed + 100 + i),
                                                 torch.device("cpu")) for i in range(4)]
                                quantize_onnx(path, file, calib)
                        sess = ort.InferenceSession(str(file), opts, providers=providers)
                        runners[(row, batch)] = functools.partial(sess.run, None, feed)
                models[key].to(cfg.device)
                if cfg.channels_last:
                    models[key].to(memory_format=torch.channels_last)
        if any(r.startswith(("openvino", "executorch")) for r in cfg.runtimes):
            _other_runtime_runners(models, family, cfg, threads, batches, Path(tmp), runners, notes, log)
        if "compile" in cfg.runtimes:
            for row, _, src in runtime_rows("compile"):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        deployed = fold(models[src], fuse_bn=True)  # every row in its smallest form
                        compiled = torch.compile(deployed)
                        for batch in batches:
                            x = _inputs(family, batch, cfg, torch.device(cfg.device))
                            with torch.inference_mode():
                                compiled(x)  # compile (and warm up) outside the timing
                            runners[(row, batch)] = functools.partial(compiled, x)
                except Exception as e:  # no C++ compiler, an unsupported op, ...
                    notes.append(f"torch.compile: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
                                 if str(e).strip() else f"torch.compile: {type(e).__name__}")
                    log(f"  {notes[-1]}")
                    for b in batches:
                        runners.pop((row, b), None)
                    break
        yield runners, notes


def _other_runtime_runners(models: dict[str, nn.Module], family: Family, cfg: BenchConfig, threads: int,
                           batches: Sequence[int], tmp: Path, runners: dict[tuple[str, int], Callable[[], object]],
                           notes: list[str], log: Callable[[str], None]) -> None:
    """OpenVINO (the IR of :func:`foldattn.export_openvino`, norms fused, compiled for the CPU plugin in f32 with
    ``threads`` threads) and ExecuTorch (a ``.pte`` per batch size from :func:`foldattn.export_executorch`, XNNPACK
    with a ``threads``-thread pool); each float file is checked against PyTorch when it is written. The INT8 rows
    quantize that model with the runtime's own tools (NNCF; the PT2E flow with the XNNPACK quantizer),
    per-channel, calibrated on a few random batches as the ONNX Runtime INT8 rows are."""
    from ..runtimes import (
        OpenVINORunner,
        export_executorch,
        export_openvino,
        lower_executorch,
        quantize_executorch,
        quantize_openvino,
    )

    if cfg.device != "cpu":
        raise ValueError("--runtime openvino/executorch time the CPU: use --device cpu")
    cpu = replace(cfg, device="cpu", channels_last=False)
    calib = [_inputs(family, 8, replace(cpu, seed=cpu.seed + 100 + i), torch.device("cpu")) for i in range(4)]
    rows = {rt: {src: row for row, _, src in runtime_rows(rt)} for rt in
            ("openvino", "openvino-int8", "executorch", "executorch-int8")}
    for src in sorted(rows["openvino"]):
        # the smallest form (ASR folded, norms fused), as the ONNX rows; the exports work on a copy
        model = models[src].cpu().float().eval()
        if "openvino" in cfg.runtimes or "openvino-int8" in cfg.runtimes:
            folder = tmp / f"ov-{src}"
            export_openvino(model, _inputs(family, 1, cpu, torch.device("cpu")), folder, fuse_bn=True)
            files = {"openvino": folder / "model.xml"}
            if "openvino-int8" in cfg.runtimes:
                quantize_openvino(folder / "model.xml", folder / "model.int8.xml", calib)
                files["openvino-int8"] = folder / "model.int8.xml"
            for rt, file in files.items():
                if rt not in cfg.runtimes:
                    continue
                compiled = OpenVINORunner(file, threads).compiled  # f32 hint, ``threads`` threads
                for batch in batches:
                    request = compiled.create_infer_request()
                    feed = _inputs(family, batch, cpu, torch.device("cpu")).numpy()
                    runners[(rows[rt][src], batch)] = functools.partial(request.infer, [feed])
        if "executorch" in cfg.runtimes or "executorch-int8" in cfg.runtimes:
            runtime = require("executorch.runtime", "executorch")
            portable = require("executorch.extension.pybindings.portable_lib", "executorch")
            portable._unsafe_reset_threadpool(threads)  # XNNPACK's pool, else one thread per core
            quantized = None
            if "executorch-int8" in cfg.runtimes:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantized = quantize_executorch(fold(model, fuse_bn=True), calib[0], calib)
            for batch in batches:
                x = _inputs(family, batch, cpu, torch.device("cpu"))
                programs = {}
                if "executorch" in cfg.runtimes:
                    path = tmp / f"et-{src}-{batch}.pte"
                    export_executorch(model, x, path, fuse_bn=True)
                    programs["executorch"] = path.read_bytes()
                if quantized is not None:
                    programs["executorch-int8"] = lower_executorch(quantized, x)
                for rt, data in programs.items():
                    program = runtime.Runtime.get().load_program(data)
                    method = program.load_method("forward")
                    # the partial holds the bytes and the program: ExecuTorch reads them in place while it runs
                    runners[(rows[rt][src], batch)] = functools.partial(_execute, method, [x], program, data)
    log(f"  OpenVINO/ExecuTorch: {threads} thread(s), f32 (INT8 rows: int8 where quantized, f32 elsewhere)")


def _execute(method: Any, inputs: list[Tensor], *keep: object) -> object:
    return method.execute(inputs)


def bench_group(family: Family, attention: str, cfg: BenchConfig, threads: int,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every variant of ``family`` with attention ``attention``; one JSON-able group."""
    device = torch.device(cfg.device)
    sync = _sync_for(device)
    train_batch = cfg.train_batch or family.train_batch
    models: dict[str, nn.Module] = {}
    for v in VARIANTS:
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[v.key] = _prepare(v.build(family, attention), cfg, device)
    # the same plain network written the usual way, and (re-parameterization backbones) its deployed
    # network, to compare with "+ASR(X) folded"; each must compute what plain computes
    for key, make in (("reference", family.reference), ("reference_deployed", family.reference_deployed)):
        if make is not None:
            models[key] = _prepare(make(models["plain"]), cfg, device)
            with torch.inference_mode():
                verify(models["plain"], models[key], _inputs(family, 2, cfg, device))
    x1 = _inputs(family, cfg.latency_batch, cfg, device)
    xb = _inputs(family, cfg.throughput_batch, cfg, device)
    flops_x = _inputs(family, 1, replace(cfg, channels_last=False), device)
    rows: dict[str, dict[str, Any]] = {}
    labels = ({v.key: v.title(attention) for v in VARIANTS}
              | {"reference": REFERENCE_LABEL, "reference_deployed": REFERENCE_DEPLOYED_LABEL})
    for key, m in models.items():
        rows[key] = {"variant": key, "label": labels[key], "params": count_params(m), "flops": count_flops(m, flops_x)}
    with contextlib.ExitStack() as stack:
        ort_runners, runtime_notes = (
            stack.enter_context(_runtime_runners(models, family, attention, cfg, threads,
                                                 (cfg.latency_batch, cfg.throughput_batch), log))
            if cfg.runtimes else ({}, [])
        )
        for runtime in cfg.runtimes:
            for key, label, src in runtime_rows(runtime):
                if (key, cfg.latency_batch) in ort_runners:
                    rows[key] = {"variant": key, "label": label.replace("{X}", attention.upper()),
                                 "params": rows[src]["params"] if src != "asr" else rows["asr_fused"]["params"],
                                 "flops": None, "runtime": runtime}
        for what, batch, x in (("latency", cfg.latency_batch, x1), ("throughput", cfg.throughput_batch, xb)):
            log(f"  {what} (batch {batch})")
            runners: dict[str, Callable[[], object]] = {k: functools.partial(m, x) for k, m in models.items()}
            runners.update({row: run for (row, b), run in ort_runners.items() if b == batch})
            with torch.inference_mode():
                samples = interleaved(runners, cfg.reps, cfg.warmup, sync, cfg.min_sample_s,
                                      _CLOCKS[cast(str, cfg.clock)])  # validated() set the clock
            for key, s in samples.items():
                st = _stats(s)
                rows[key][f"{what}_ms"] = st
                if what == "throughput":
                    rows[key]["throughput_ips"] = batch / (st["median"] / 1e3)

    for key in rows:
        rows[key].setdefault("train_ms", None)
        rows[key]["memory_mib"] = rows[key]["train_memory_mib"] = None
    if cfg.train:
        log(f"  training step (batch {train_batch})")
        trains = [v.key for v in VARIANTS if v.trains] + (["reference"] if "reference" in models else [])
        steps = {key: _train_step(models[key], family, train_batch, cfg, device)[0] for key in trains}
        for key, s in interleaved(steps, cfg.reps, cfg.warmup, sync, clock=_CLOCKS[cast(str, cfg.clock)]).items():
            rows[key]["train_ms"] = _stats(s)
    del models
    gc.collect()

    note = None
    if cfg.memory:
        log("  peak memory")
        mem, note = peak_memory(family, attention, cfg, train_batch, threads)
        for key, peaks in (mem or {}).items():
            rows[key]["memory_mib"] = peaks["inference"] / MIB
            rows[key]["train_memory_mib"] = None if peaks["train"] is None else peaks["train"] / MIB
    _add_ratios(rows)
    _add_runtime_ratios(rows)
    _flag_unreliable(rows)
    note = "; ".join(filter(None, [note, *runtime_notes])) or None
    return {"family": family.name, "attention": attention, "input_size": list(family.input_size),
            "train_batch": train_batch if cfg.train else None, "rows": list(rows.values()), "note": note}


def _flag_unreliable(rows: dict[str, dict[str, Any]]) -> None:
    """``row["unreliable"]``: the timings whose quartile spread exceeds :data:`UNRELIABLE_SPREAD` of the median
    (another process took the CPU during some samples: the median and its ratios may be off)."""
    for row in rows.values():
        noisy = [what for what in ("latency", "throughput", "train")
                 if (st := row.get(f"{what}_ms")) and st["median"] > 0
                 and (st["q3"] - st["q1"]) / st["median"] > UNRELIABLE_SPREAD]
        row["unreliable"] = noisy


def _add_runtime_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """``runtime_ratio``: a runtime row's latency and throughput over the same runtime's plain row."""
    for row in rows.values():
        runtime = row.get("runtime")
        if runtime is None:
            continue
        base = next((r for r in rows.values() if r.get("runtime") == runtime and r["variant"].endswith("_plain")),
                    None)
        row["runtime_ratio"] = {
            name: (None if base is None or not _RATIO_FIELDS[name](base) or _RATIO_FIELDS[name](row) is None
                   else _RATIO_FIELDS[name](row) / _RATIO_FIELDS[name](base))
            for name in ("latency", "throughput")}


def _add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """``ratio[figure] = value / plain's value`` (same group, same run); None where undefined."""
    plain = rows["plain"]
    for row in rows.values():
        ratios: dict[str, float | None] = {}
        for name, get in _RATIO_FIELDS.items():
            a, b = get(row), get(plain)
            ratios[name] = None if a is None or not b else a / b
        row["ratio"] = ratios


def check_memory(cfg: BenchConfig) -> None:
    """Refuse, before any model is built for real, a batch whose inputs and activations would pass the
    memory limit (:func:`foldattn._sizes.memory_limit`): the throughput batch's forward pass and the
    training step's, of each model's plain form traced on the meta device (the attention adds little)."""
    device = torch.device(cfg.device)
    for name in cfg.models:
        family = get_family(name)
        per_image = 4 * int(torch.Size(family.input_size).numel())
        shape = "x".join(map(str, family.input_size))
        batches = [("--throughput-batch", cfg.throughput_batch, False), ("--latency-batch", cfg.latency_batch, False)]
        if cfg.train:
            batches.append(("--train-batch", cfg.train_batch or family.train_batch, True))
        for option, batch, _ in batches:  # the inputs alone first: no model needed
            check_bytes(batch * per_image, f"{name}: {option} {batch} of {shape} inputs",
                        f"lower {option}", device)
        outputs = None
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outputs = leaf_output_bytes(family.build(None, False, False).eval(), family.input_size, 1)
        except Exception:
            outputs = None
        if not outputs:
            continue
        for option, batch, training in batches:
            need = batch * (per_image + combine(outputs, training))
            check_bytes(need, f"{name}: {option} {batch} of {shape} inputs and the activations of "
                        f"{'a training step' if training else 'a forward pass'}", f"lower {option}", device)


# --- the whole run -----------------------------------------------------------------------
def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _machine(cfg: BenchConfig, threads: int) -> dict[str, Any]:
    """What the run ran on: CPU, cores, threads, platform, versions, device (and GPU), load average."""
    dev = torch.device(cfg.device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError, AttributeError):
        info["load_before"] = list(os.getloadavg())
    return info


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda s: None,
              command: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (see :func:`~foldattn.bench.validate_result` for its schema)."""
    cfg = config.validated()
    check_memory(cfg)  # before anything of the batches' size is allocated
    t_start = time.perf_counter()
    user_log = log

    def stamped(message: str) -> None:
        user_log(f"[{time.perf_counter() - t_start:6.0f} s] {message}")

    log = stamped

    old_threads = torch.get_num_threads()
    threads = cfg.threads or old_threads
    torch.set_num_threads(threads)
    try:
        machine = _machine(cfg, threads)
        started = _dt.datetime.now(_dt.timezone.utc)
        groups = []
        for name in cfg.models:
            family = get_family(name)
            for attention in cfg.attentions:
                log(f"{name} / {attention}")
                groups.append(bench_group(family, attention, cfg, threads, log))
        with contextlib.suppress(OSError, AttributeError):
            machine["load_after"] = list(os.getloadavg())
    finally:
        torch.set_num_threads(old_threads)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1),
        "config": asdict(cfg),
        "machine": machine,
        "groups": groups,
    }
    result["targets"] = check_targets(result)
    validate_result(result)
    noisy = [f"{g['family']}/{g['attention']} {r['label']}: {', '.join(r['unreliable'])}"
             for g in groups for r in g["rows"] if r.get("unreliable")]
    if noisy:
        log(f"warning: {len(noisy)} row(s) with unreliable timings (quartile spread > {UNRELIABLE_SPREAD:.0%} of the "
            f"median; marked ~ in bench.md): {'; '.join(noisy[:6])}{' ...' if len(noisy) > 6 else ''}. Rerun on an "
            "idle machine, or with more --reps")
    return result


