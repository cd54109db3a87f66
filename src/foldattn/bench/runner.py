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
from typing import Any

import torch
from torch import nn

from ..export import export_onnx
from ..summary import count_flops, count_params
from ..verify import verify
from .config import BenchConfig
from .family import ONNX_ROWS, VARIANTS, Family, get_family
from .memory import MIB, peak_memory
from .report import _RATIO_FIELDS, SCHEMA, validate_result
from .targets import check_targets
from .timing import _CLOCKS, _stats, _sync_for, interleaved
from .workload import _inputs, _prepare, _train_step

__all__ = ["bench_group", "run_bench", "UNRELIABLE_SPREAD", "REFERENCE_LABEL", "REFERENCE_DEPLOYED_LABEL"]

#: ONNX opset of the exported models of the ``--onnx`` rows
_ONNX_OPSET = 17
#: a timing whose interquartile range is more than this fraction of its median is flagged unreliable
UNRELIABLE_SPREAD = 0.2
#: the label of the row of the plain network written the usual way (see :mod:`.reference`)
REFERENCE_LABEL = "plain, reference implementation"
#: the label of the row of plain's deployed network written the usual way (re-parameterization backbones)
REFERENCE_DEPLOYED_LABEL = "plain deployed, reference implementation"


@contextlib.contextmanager
def _onnx_sessions(models: dict[str, nn.Module], family: Family, cfg: BenchConfig, threads: int,
                   batches: Sequence[int]) -> Iterator[dict[tuple[str, int], Callable[[], object]]]:
    """ONNX Runtime runners ``(row key, batch) -> run`` for the exported models (temp files).

    Exported with :func:`foldattn.export_onnx` (folds ASR layers, TorchScript exporter,
    checks the file with onnxruntime against PyTorch), one file per batch size.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("--onnx needs onnxruntime: pip install 'foldattn[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if cfg.device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--onnx with --device cuda needs onnxruntime-gpu (no CUDAExecutionProvider here)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    runners: dict[tuple[str, int], Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="foldattn-bench-") as tmp:
        for row, _, source in ONNX_ROWS:
            model = models[source].cpu().float().eval()
            for batch in batches:
                path = Path(tmp) / f"{row}-{batch}.onnx"
                x = _inputs(family, batch, replace(cfg, device="cpu", channels_last=False), torch.device("cpu"))
                with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                    warnings.simplefilter("ignore")
                    export_onnx(model, (x,), path, input_names=["x"], output_names=["y"], opset_version=_ONNX_OPSET)
                sess = ort.InferenceSession(str(path), opts, providers=providers)
                feed = {"x": x.numpy()}
                runners[(row, batch)] = lambda s=sess, f=feed: s.run(None, f)
            models[source].to(cfg.device)
            if cfg.channels_last:
                models[source].to(memory_format=torch.channels_last)
        yield runners


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
    for key, label, _ in ONNX_ROWS if cfg.onnx else ():
        rows[key] = {"variant": key, "label": label.replace("{X}", attention.upper()), "params": None, "flops": None}

    with contextlib.ExitStack() as stack:
        ort_runners = (
            stack.enter_context(_onnx_sessions(models, family, cfg, threads,
                                               (cfg.latency_batch, cfg.throughput_batch)))
            if cfg.onnx else {}
        )
        for what, batch, x in (("latency", cfg.latency_batch, x1), ("throughput", cfg.throughput_batch, xb)):
            log(f"  {what} (batch {batch})")
            runners: dict[str, Callable[[], object]] = {k: (lambda m=m, x=x: m(x)) for k, m in models.items()}
            runners.update({row: run for (row, b), run in ort_runners.items() if b == batch})
            with torch.inference_mode():
                samples = interleaved(runners, cfg.reps, cfg.warmup, sync, cfg.min_sample_s, _CLOCKS[cfg.clock])
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
        for key, s in interleaved(steps, cfg.reps, cfg.warmup, sync, clock=_CLOCKS[cfg.clock]).items():
            rows[key]["train_ms"] = _stats(s)
    del models
    gc.collect()

    note = None
    if cfg.memory:
        log("  peak memory")
        mem, note = peak_memory(family, attention, cfg, train_batch, threads)
        for key, m in (mem or {}).items():
            rows[key]["memory_mib"] = m["inference"] / MIB
            rows[key]["train_memory_mib"] = None if m["train"] is None else m["train"] / MIB
    _add_ratios(rows)
    _flag_unreliable(rows)
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


def _add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """``ratio[figure] = value / plain's value`` (same group, same run); None where undefined."""
    plain = rows["plain"]
    for row in rows.values():
        ratios: dict[str, float | None] = {}
        for name, get in _RATIO_FIELDS.items():
            a, b = get(row), get(plain)
            ratios[name] = None if a is None or not b else a / b
        row["ratio"] = ratios


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
    t_start = time.perf_counter()
    user_log = log

    def log(message: str) -> None:
        user_log(f"[{time.perf_counter() - t_start:6.0f} s] {message}")

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


