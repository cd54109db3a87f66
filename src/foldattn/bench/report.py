"""The result of a run: its JSON schema (``foldattn.bench/1``), its markdown rendering, the files written.

A result holds ``config``, ``machine``, one group per (family, attention) with one row
per variant (params, FLOPs, latency/throughput/training-step statistics, peak memory and
``ratio``: each figure divided by plain's in the same group), the PASS/FAIL ``targets``
and optional ``profiles``. :func:`validate_result` checks it before anything is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._utils import atomic_path, write_json
from .family import VARIANTS

__all__ = ["SCHEMA", "validate_result", "render_markdown", "write_outputs"]

SCHEMA = "foldattn.bench/1"

#: the figures of a row's ``ratio`` (value / plain's value), and how to read each from a row
_RATIO_FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "params": lambda r: r["params"],
    "flops": lambda r: r["flops"],
    "latency": lambda r: r["latency_ms"]["median"] if r.get("latency_ms") else None,
    "throughput": lambda r: r.get("throughput_ips"),
    "memory": lambda r: r.get("memory_mib"),
    "train": lambda r: r["train_ms"]["median"] if r.get("train_ms") else None,
    "train_memory": lambda r: r.get("train_memory_mib"),
}
#: the keys of a row and their JSON types
_ROW_KEYS: dict[str, type | tuple[type, ...]] = {
    "variant": str, "label": str, "params": (int, type(None)), "flops": (int, type(None)),
    "latency_ms": dict, "throughput_ms": dict, "throughput_ips": (int, float),
    "train_ms": (dict, type(None)), "memory_mib": (int, float, type(None)),
    "train_memory_mib": (int, float, type(None)), "ratio": dict}
#: the keys of a timing statistic (``latency_ms``, ``throughput_ms``, ``train_ms``), in milliseconds
_STAT_KEYS = ("median", "q1", "q3", "n")


def validate_result(result: object) -> None:
    """Check that ``result`` follows the ``foldattn.bench/1`` JSON schema; ``ValueError`` lists every problem."""
    problems: list[str] = []
    types: type | tuple[type, ...]  # what a key's value must be an instance of

    def need(obj: object, key: str, types: Any, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            problems.append(f"{where}: missing {key!r}")
            return None
        if not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
            return None
        return obj[key]

    if not isinstance(result, dict):
        raise ValueError(f"bench result must be a JSON object, got {type(result).__name__}")
    if result.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA!r}, got {result.get('schema')!r}")
    for key, types in (("date", str), ("config", dict), ("machine", dict), ("groups", list), ("targets", list)):
        need(result, key, types, "result")
    for key in ("latency_batch", "throughput_batch"):
        need(result.get("config"), key, int, "config")
    need(result.get("machine"), "cpu", str, "machine")
    for i, g in enumerate(result.get("groups") or []):
        where = f"groups[{i}]"
        need(g, "family", str, where)
        need(g, "attention", str, where)
        rows = need(g, "rows", list, where) or []
        variants = [r.get("variant") for r in rows if isinstance(r, dict)]
        missing = [v.key for v in VARIANTS if v.key not in variants]
        if missing:
            problems.append(f"{where}: missing variants {missing}")
        for j, r in enumerate(rows):
            rw = f"{where}.rows[{j}]"
            for key, types in _ROW_KEYS.items():
                val = need(r, key, types, rw)
                if isinstance(val, dict) and key.endswith("_ms"):
                    for s in _STAT_KEYS:
                        x = need(val, s, (int, float), f"{rw}.{key}")
                        if x is not None and (not math.isfinite(x) or x < 0):
                            problems.append(f"{rw}.{key}.{s}: not a finite non-negative number ({x})")
            ratio = r.get("ratio") if isinstance(r, dict) else None
            for name in _RATIO_FIELDS:
                need(ratio, name, (int, float, type(None)), f"{rw}.ratio")
            if isinstance(r, dict) and r.get("variant") == "plain" and isinstance(ratio, dict):
                off = [k for k, v in ratio.items() if v is not None and abs(v - 1.0) > 1e-12]
                if off:
                    problems.append(f"{rw}: plain's ratios to itself must be 1, not for {off}")
    for i, prof in enumerate(result.get("profiles") or []):
        need(prof, "tables", dict, f"profiles[{i}]")
    for i, t in enumerate(result.get("targets") or []):
        for key, types in (("name", str), ("passed", bool), ("value", (int, float)), ("text", str)):
            need(t, key, types, f"targets[{i}]")
    if problems:
        raise ValueError("bench result does not follow the schema: " + "; ".join(problems))


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _count_cell(n: int | None, ratio: float | None) -> str:
    return "-" if n is None else f"{_fmt_count(n)} ({ratio:.3f}x)" if ratio is not None else _fmt_count(n)


def _cell(value: float | None, ratio: float | None, fmt: str, noisy: bool = False) -> str:
    if value is None:
        return "-"
    mark = "~" if noisy else ""
    return f"{mark}{value:{fmt}} ({ratio:.2f}x)" if ratio is not None else f"{mark}{value:{fmt}}"


def render_markdown(result: dict[str, Any]) -> str:
    """The result as markdown: a header (command, machine, date, load) and one table per model."""
    cfg, mach = result["config"], result["machine"]
    lb, tb = cfg["latency_batch"], cfg["throughput_batch"]
    lines = []
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    load = ""
    if "load_before" in mach:
        load = f"; load average before {mach['load_before'][0]:.2f}"
        if "load_after" in mach:
            load += f", after {mach['load_after'][0]:.2f}"
    where = mach.get("gpu") or f"{mach['cpu']}, {mach['cores']} cores"
    lines += [
        f"Machine: {where}; device {mach['device']}, {mach['threads']} thread(s); torch {mach['torch']}{load}.",
        f"Date: {result['date']} ({result['seconds']} s). Median of {cfg['reps']} interleaved samples after "
        f"{cfg['warmup']} warm-up round(s), {cfg.get('clock', 'wall')} clock; (x) = ratio to plain in the same group "
        "(for ONNX Runtime, INT8 and torch.compile rows: to plain in the same runtime); "
        "~ = unreliable (quartile spread > 20 % of the median: rerun on an idle machine)."
        + (" channels_last." if cfg["channels_last"] else ""),
        "FLOPs: torch.utils.flop_counter.FlopCounterMode at batch 1 (matmuls and convolutions, 2 per multiply-add; "
        "elementwise work such as BatchNorm, activations and gating products is not counted).",
        "",
    ]
    by_family: dict[str, list[dict[str, Any]]] = {}
    for g in result["groups"]:
        by_family.setdefault(g["family"], []).append(g)
    for fam, groups in by_family.items():
        size = "x".join(str(s) for s in groups[0]["input_size"][1:])
        tr = groups[0].get("train_batch")
        lines += [
            f"### {fam} ({size})",
            "",
            f"| variant | params | FLOPs (b=1) | latency b={lb} ms | throughput b={tb} img/s | "
            f"peak mem b={tb} MiB | train step b={tr or '-'} ms | peak train mem MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in groups:
            for r in g["rows"]:
                q, noisy = dict(r["ratio"]), set(r.get("unreliable") or ())
                q.update(r.get("runtime_ratio") or {})  # a runtime's rows: ratios to plain in that runtime
                lines.append("| " + " | ".join([
                    r["label"] if r["variant"] != "plain" else f"plain ({g['attention'].upper()} group)",
                    _count_cell(r["params"], q["params"]), _count_cell(r["flops"], q["flops"]),
                    _cell(r["latency_ms"]["median"], q["latency"], ".2f", "latency" in noisy),
                    _cell(r["throughput_ips"], q["throughput"], ".1f", "throughput" in noisy),
                    _cell(r["memory_mib"], q["memory"], ".1f"),
                    _cell(r["train_ms"]["median"] if r["train_ms"] else None, q["train"], ".1f", "train" in noisy),
                    _cell(r["train_memory_mib"], q["train_memory"], ".1f"),
                ]) + " |")
            if g.get("note"):
                lines.append(f"| note: {g['note']} |||||||")
        lines.append("")
    if result["targets"]:
        lines += ["Targets (speed = plain time / variant time):", "", "```"]
        lines += [t["text"] for t in result["targets"]]
        lines += ["```", ""]
    for prof in result.get("profiles") or []:
        lines += [f"Profile for `{prof['target']}` (torch.profiler, ops by self time):", ""]
        for key, table in prof["tables"].items():
            lines += [f"{key}:", "", "```", table.rstrip(), "```", ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir`` (created), each atomically."""
    validate_result(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "bench.json", out / "bench.md"
    write_json(paths[0], result)
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(render_markdown(result))
    return paths
