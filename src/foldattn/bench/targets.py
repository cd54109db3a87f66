"""The targets a run is checked against (PASS/FAIL lines), and profiles of the variants that miss one.

ASR's claim is "the attention's accuracy at the backbone's cost". In speed terms
(speed = plain time / variant time, from the same group of the same run):

- ASR(X) folded is the plain backbone again, so it must be as fast, up to timing noise
  (:data:`FOLDED_MIN_SPEED`), at the latency and at the throughput batch;
- folded with ``fuse_bn`` removes the BatchNorm passes, so it must be faster than plain
  at the latency batch (:data:`FUSED_MIN_SPEED`);
- ASR(X)'s training form scales the host's parameters, not its output, so a training
  step may cost only a little more than plain's (:data:`ASR_MAX_TRAIN_TIME`).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch

from .config import BenchConfig
from .family import _VARIANT, Family, get_family
from .timing import _sync_for
from .workload import _inputs, _prepare, _train_step

__all__ = [
    "Target", "TARGETS", "FOLDED_MIN_SPEED", "FUSED_MIN_SPEED", "ASR_MAX_TRAIN_TIME", "check_targets",
    "profile_variant",
]

#: ASR(X) folded must reach at least this fraction of plain's speed (the 2% are timing noise)
FOLDED_MIN_SPEED = 0.98
#: ASR(X) folded + fuse_bn must be faster than plain: its speed ratio strictly above this
FUSED_MIN_SPEED = 1.0
#: ASR(X)'s training step may take at most this multiple of plain's step time
ASR_MAX_TRAIN_TIME = 1.05


class Target(NamedTuple):
    """One check of each group: ``variant``'s ``figure`` ratio compared (``op``) with ``threshold``."""

    name: str
    variant: str  # a Variant key
    figure: str  # a ratio field: "latency", "throughput" (speed targets) or "train" (time target)
    op: str  # ">=", ">" or "<="
    threshold: float
    description: str  # "{lb}" / "{tb}": the latency / throughput batch; "X": the attention's name


TARGETS: tuple[Target, ...] = (
    Target("folded_speed_latency", "asr_folded", "latency", ">=", FOLDED_MIN_SPEED,
           "ASR(X) folded speed at batch {lb}"),
    Target("folded_speed_throughput", "asr_folded", "throughput", ">=", FOLDED_MIN_SPEED,
           "ASR(X) folded speed at batch {tb}"),
    Target("fused_faster_latency", "asr_fused", "latency", ">", FUSED_MIN_SPEED,
           "ASR(X) folded+fuse_bn speed at batch {lb}"),
    Target("asr_train_step", "asr", "train", "<=", ASR_MAX_TRAIN_TIME, "ASR(X) training step time"),
)

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, ">": operator.gt, "<=": operator.le}


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, one entry per group: speed = plain time / variant time.

    A target whose figure was not measured (no ratio, e.g. ``--no-train``) is skipped.
    """
    cfg = result["config"]
    out = []
    for g in result["groups"]:
        rows = {r["variant"]: r for r in g["rows"]}
        for name, variant, figure, op, threshold, desc in TARGETS:
            ratio = rows[variant]["ratio"].get(figure)
            if ratio is None:
                continue
            # speed targets compare plain/variant time; the training target compares time/plain
            value = 1.0 / ratio if figure == "latency" else ratio
            passed = _OPS[op](value, threshold)
            text = desc.format(lb=cfg["latency_batch"], tb=cfg["throughput_batch"]).replace(
                "X", g["attention"].upper())
            unit = "x plain time" if figure == "train" else "x plain speed"
            out.append({
                "name": name, "family": g["family"], "attention": g["attention"], "value": value,
                "op": op, "threshold": threshold, "passed": bool(passed),
                "text": f"{'PASS' if passed else 'FAIL'} {g['family']}: {text} = {value:.3f}{unit} "
                        f"(target {op} {threshold})",
            })
    return out


# --- profiles of missed targets ----------------------------------------------------------
#: figure -> the config field with its batch size (None: the training step's batch)
_TARGET_WORK = {"latency": "latency_batch", "throughput": "throughput_batch", "train": None}
#: untimed calls before profiling
_PROFILE_WARMUP = 2


def profile_variant(family: Family, attention: str, variant: str, what: str, cfg: BenchConfig,
                    calls: int = 3, row_limit: int = 12) -> dict[str, str]:
    """``torch.profiler`` tables (ops by self CPU time) of plain and ``variant`` doing ``what``.

    Args:
        what: ``"latency"`` / ``"throughput"`` (an inference forward at that batch) or
            ``"train"`` (one training step).
        calls: profiled calls, after two warm-up calls.

    Returns:
        ``{variant key: table text}`` for ``"plain"`` and ``variant``.
    """
    cfg = cfg.validated()
    device = torch.device(cfg.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tables = {}
    for key in ("plain", variant):
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _prepare(_VARIANT[key].build(family, attention), cfg, device)
        if what == "train":
            fn: Callable[[], object] = _train_step(model, family, cfg.train_batch or family.train_batch, cfg, device)[0]
            mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            x = _inputs(family, getattr(cfg, cast(str, _TARGET_WORK[what])), cfg, device)  # None: "train" only
            fn, mode = functools.partial(model, x), torch.inference_mode()
        with mode:
            for _ in range(_PROFILE_WARMUP):
                fn()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(calls):
                    fn()
                _sync_for(device)()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[key] = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    return tables


def _profile_failures(result: dict[str, Any], cfg: BenchConfig, log: Callable[[str], None]) -> None:
    """Add ``result["profiles"]``: :func:`profile_variant` tables for every target that FAILed."""
    variants = {name: (variant, figure) for name, variant, figure, *_ in TARGETS}
    result["profiles"] = []
    for t in result["targets"]:
        if t["passed"]:
            continue
        variant, figure = variants[t["name"]]
        log(f"profiling {t['family']} / {t['attention']}: {variant} vs plain ({figure})")
        tables = profile_variant(get_family(t["family"]), t["attention"], variant, figure, cfg)
        result["profiles"].append({"target": t["text"], "family": t["family"], "attention": t["attention"],
                                   "variant": variant, "work": figure, "tables": tables})
