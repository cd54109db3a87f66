"""The summary of a sweep: per arm mean +- std over seeds, paired differences to the baseline, a plot,
and the learning curves (validation top-1 per epoch, mean and range over seeds, per arm).

Only finished runs count. ``final`` is the last epoch's validation top-1 of the folded model,
``best`` the highest over the epochs (picked on the validation split: report both); with
``--model-ema`` the EMA's are given as well. The paired difference of an arm is taken seed by
seed against the baseline run of the same seed, so the spread the two share cancels; the file's
``contrasts`` (e.g. ASR(SE) against ASR(scale)) are paired the same way.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import statistics
from pathlib import Path
from typing import Any

from .._files import load_json_file, read_bounded
from .._utils import atomic_path, write_json
from .runner import command_for, run_state
from .spec import Run, SweepSpec
from .task import MAX_METRICS_BYTES

__all__ = ["summarize", "write_summary", "stats", "markdown", "plot_summary", "plot_curves"]

_METRICS = ("final_top1", "best_top1", "final_ema_top1", "best_ema_top1")


def stats(values: list[float]) -> dict[str, Any]:
    """``{mean, std, values}``; ``std`` is the sample standard deviation (None for one value)."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": list(values)}


def _history(folder: Path) -> list[dict[str, float]]:
    text = read_bounded(folder / "metrics.csv", "metrics file", MAX_METRICS_BYTES).decode("utf-8", errors="replace")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed = {}
        for k, v in row.items():
            try:
                parsed[k] = float(v)
            except (TypeError, ValueError):
                continue
        rows.append(parsed)
    return rows


def _run_metrics(folder: Path) -> dict[str, Any] | None:
    if run_state(folder) != "finished":
        return None
    summary = load_json_file(folder / "summary.json", "run summary")
    hist = _history(folder)
    if not hist:
        return None
    out: dict[str, Any] = {
        "final_top1": hist[-1].get("val_top1"), "best_top1": max(h.get("val_top1", -math.inf) for h in hist),
        "time_per_epoch_s": summary.get("time_per_epoch_s"),
        "params_trained": (summary.get("run") or {}).get("params_train"),
        "params_deployed": (summary.get("run") or {}).get("params_deployed"),
        "epochs": len(hist),
        "curve": [h.get("val_top1") for h in hist],
    }
    if all("ema_val_top1" in h for h in hist):
        out["ema_curve"] = [h["ema_val_top1"] for h in hist]
    if "ema_val_top1" in hist[-1]:
        out["final_ema_top1"] = hist[-1]["ema_val_top1"]
        out["best_ema_top1"] = max(h.get("ema_val_top1", -math.inf) for h in hist)
    return out


def _paired(per_run: dict[tuple[str, int], dict[str, Any]], first: str, second: str,
            seeds: tuple[int, ...]) -> dict[str, Any]:
    """``first`` minus ``second``, seed by seed, over the seeds both finished."""
    paired = [s for s in seeds if (first, s) in per_run and (second, s) in per_run]
    diff: dict[str, Any] = {"seeds": paired}
    for metric in _METRICS:
        pairs = [(per_run[(first, s)].get(metric), per_run[(second, s)].get(metric)) for s in paired]
        if pairs and all(a is not None and b is not None for a, b in pairs):
            diff[metric] = stats([a - b for a, b in pairs if a is not None and b is not None])  # all: checked above
    return diff


def _curve(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Per epoch the mean, min and max over the runs of one arm; only where every run has every epoch's value
    (runs of one arm share their schedule; a run of another length leaves the arm without a curve)."""
    curves: list[list[float]] = [r[key] for r in rows if r.get(key) is not None]
    if not curves or len(curves) != len(rows) or any(len(c) != len(curves[0]) or None in c for c in curves):
        return None
    per_epoch = list(zip(*curves, strict=True))
    return {"epochs": len(per_epoch), "mean": [statistics.fmean(v) for v in per_epoch],
            "min": [min(v) for v in per_epoch], "max": [max(v) for v in per_epoch]}


def summarize(spec: SweepSpec, out: Path, threads: int = 0, source: str = "SWEEP.yaml") -> dict[str, Any]:
    """The sweep's summary (what ``summary.json`` holds) from the finished runs in ``out``."""
    per_run: dict[tuple[str, int], dict[str, Any]] = {}
    for run in spec.runs():
        m = _run_metrics(run.folder(out))
        if m is not None:
            per_run[(run.arm, run.seed)] = m
    arms: dict[str, Any] = {}
    for arm in spec.arms:
        seeds = [s for s in arm.seeds if (arm.name, s) in per_run]
        rows = [per_run[(arm.name, s)] for s in seeds]
        entry: dict[str, Any] = {"args": list(arm.args), "seeds": seeds, "planned_seeds": list(arm.seeds)}
        for metric in _METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            if len(values) == len(rows) and values:
                entry[metric] = stats(values)
        times = [r["time_per_epoch_s"] for r in rows if r.get("time_per_epoch_s") is not None]
        entry["time_per_epoch_s"] = stats(times)
        if rows:
            entry["params_trained"], entry["params_deployed"] = rows[0]["params_trained"], rows[0]["params_deployed"]
            entry["epochs"] = rows[0]["epochs"]
        for key in ("curve", "ema_curve"):
            curve = _curve(rows, key)
            if curve is not None:
                entry[key] = curve
        entry["commands"] = {str(s): shlex.join(command_for(spec, Run(arm.name, s), out, threads)) for s in seeds}
        if spec.baseline is not None and arm.name != spec.baseline:
            entry["paired_diff"] = _paired(per_run, arm.name, spec.baseline, arm.seeds)
        arms[arm.name] = entry
    contrasts = [{"arms": [a, b], **_paired(per_run, a, b, spec.arm(a).seeds)} for a, b in spec.contrasts]
    return {"format": "foldattn-sweep-summary", "version": 1, "baseline": spec.baseline, "seeds": list(spec.seeds),
            "base": list(spec.base), "command": f"foldattn sweep {source} -o {out}", "arms": arms,
            "contrasts": contrasts, "runs_finished": len(per_run), "runs_planned": len(spec.runs())}


def _ms(s: dict[str, Any] | None, signed: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "-"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    text = fmt.format(s["mean"])
    if s.get("std") is not None:
        text += f" ± {s['std']:.2f}"
    return text


def _per_seed(d: dict[str, Any], key: str) -> str:
    per = d.get(key, {}).get("values", [])
    return _ms(d.get(key), signed=True) + (f" ({', '.join(f'{v:+.2f}' for v in per)})" if per else "")


def _contrast_table(summary: dict[str, Any], ema: bool) -> list[str]:
    key = "final_ema_top1" if ema else "final_top1"
    best = "best_ema_top1" if ema else "best_top1"
    lines = ["", "Contrasts (first arm minus second, paired by seed):", "",
             f"| contrast | seeds | {'final EMA' if ema else 'final'} top-1 difference (per seed) | "
             f"{'best EMA' if ema else 'best'} top-1 difference |", "|---|---|---|---|"]
    for c in summary.get("contrasts", []):
        lines.append(f"| {c['arms'][0]} - {c['arms'][1]} | {','.join(map(str, c['seeds'])) or '-'} | "
                     f"{_per_seed(c, key)} | {_ms(c.get(best), signed=True)} |")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables (arms, then contrasts), with the command that made them."""
    base = summary["baseline"]
    ema = any("final_ema_top1" in a for a in summary["arms"].values())
    head = ["arm", "seeds", "final top-1", "best top-1"] + (["final EMA top-1"] if ema else [])
    if base is not None:
        # with an EMA the paired differences are the EMA's (the number such a recipe deploys)
        which = "EMA " if ema else ""
        head += [f"final {which}vs {base} (per seed)", f"best {which}vs {base}"]
    head += ["s / epoch", "params train / deployed"]
    lines = [f"Command: `{summary['command']}` ({summary['runs_finished']} of {summary['runs_planned']} runs "
             "finished; mean ± sample std over seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, a in summary["arms"].items():
        cells = [name, ",".join(map(str, a["seeds"])) or "-", _ms(a.get("final_top1")), _ms(a.get("best_top1"))]
        if ema:
            cells.append(_ms(a.get("final_ema_top1")))
        if base is not None:
            if name == base:
                cells += ["(baseline)", "(baseline)"]
            else:
                d = a.get("paired_diff") or {}
                key = "final_ema_top1" if ema and "final_ema_top1" in d else "final_top1"
                cells.append(_per_seed(d, key))
                cells.append(_ms(d.get("best_ema_top1" if key == "final_ema_top1" else "best_top1"), signed=True))
        t = a.get("time_per_epoch_s") or {}
        cells.append(f"{t['mean']:.0f}" if t.get("mean") is not None else "-")
        pt, pd = a.get("params_trained"), a.get("params_deployed")
        cells.append(f"{pt:,} / {pd:,}" if isinstance(pt, int) and isinstance(pd, int) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("contrasts"):
        lines += _contrast_table(summary, ema)
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Draw ``summary`` (what :func:`summarize` returns) into the PNG ``path``: per arm each seed's
    final top-1 with mean ± std, and the paired differences to the baseline and of the contrasts."""
    from ..train.plots import require_matplotlib, save_png

    plt = require_matplotlib()
    arms = list(summary["arms"])
    base = summary["baseline"]
    ema = any("final_ema_top1" in a for a in summary["arms"].values())
    key = "final_ema_top1" if ema else "final_top1"
    contrasts = summary.get("contrasts", [])
    panels = 2 if base is not None or contrasts else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 1.1 * len(arms) + 2) * panels / 1.4, 3.8), squeeze=False)
    ax = axes[0][0]
    for i, name in enumerate(arms):
        s = summary["arms"][name].get(key)
        if not s:
            continue
        ax.scatter([i] * len(s["values"]), s["values"], s=14, color="0.45", zorder=2)
        ax.errorbar([i], [s["mean"]], yerr=[s["std"] or 0], fmt="o", color="C0", capsize=4, zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel(f"{'EMA ' if ema else ''}final top-1 (%)")
    ax.set_title("per seed (grey), mean ± std (blue)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if panels == 2:
        ax = axes[0][1]
        # each arm against the baseline (orange), then the file's contrasts (green), all paired by seed
        entries = [(name, (summary["arms"][name].get("paired_diff") or {}).get(key), "C1")
                   for name in arms if base is not None and name != base]
        entries += [(f"{c['arms'][0]} - {c['arms'][1]}", c.get(key), "C2") for c in contrasts]
        for i, (_, d, color) in enumerate(entries):
            if not d:
                continue
            ax.scatter([i] * len(d["values"]), d["values"], s=14, color="0.45", zorder=2)
            ax.errorbar([i], [d["mean"]], yerr=[d["std"] or 0], fmt="o", color=color, capsize=4, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(entries)), [e[0] for e in entries], rotation=30, ha="right")
        ax.set_ylabel("paired difference (points)")
        ax.set_title("paired by seed\n" + "; ".join(([f"orange: vs {base}"] if base is not None else [])
                                                   + (["green: contrasts"] if contrasts else [])), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title + ': ' if title else ''}{summary['runs_finished']} of {summary['runs_planned']} runs "
                 "finished", fontsize=10)
    save_png(fig, path)


def plot_curves(summary: dict[str, Any], path: Path, title: str | None = None) -> bool:
    """Draw each arm's validation top-1 per epoch (the mean over its finished seeds, the band their range) into
    the PNG ``path``: the folded model's, and beside it the EMA's where the runs kept one. Returns False (and
    draws nothing) when no arm has a curve."""
    from ..train.plots import require_matplotlib, save_png

    arms = {name: a for name, a in summary["arms"].items() if a.get("curve")}
    if not arms:
        return False
    plt = require_matplotlib()
    keys = ["curve"] + (["ema_curve"] if any(a.get("ema_curve") for a in arms.values()) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, (name, a) in enumerate(arms.items()):
            c = a.get(key)
            if not c:
                continue
            epochs = list(range(1, c["epochs"] + 1))
            color = f"C{i % 10}"
            ax.plot(epochs, c["mean"], color=color, lw=1.4, label=f"{name} ({len(a['seeds'])} seed(s))")
            ax.fill_between(epochs, c["min"], c["max"], color=color, alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation top-1 (%){', EMA' if key == 'ema_curve' else ''}")
        ax.set_title(("EMA" if key == "ema_curve" else "folded model") + ": mean over seeds, band: min-max",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title + ': ' if title else ''}learning curves, {summary['runs_finished']} of "
                 f"{summary['runs_planned']} runs finished", fontsize=10)
    save_png(fig, path)
    return True


def write_summary(spec: SweepSpec, out: Path, threads: int = 0, source: str = "SWEEP.yaml") -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md``, ``summary.png`` and ``curves.png`` (:func:`plot_curves`) into
    ``out``; returns the summary."""
    summary = summarize(spec, out, threads, source)
    write_json(out / "summary.json", summary, indent=2)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(markdown(summary))
    if summary["runs_finished"]:
        plot_summary(summary, out / "summary.png")
        plot_curves(summary, out / "curves.png")
    return summary
