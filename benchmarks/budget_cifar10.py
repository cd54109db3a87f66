"""Trained attention converted within an accuracy budget: `foldattn calibrate --max-drop` on CIFAR-10 teachers.

For every trained run ``RUNS/<attention>/s<seed>`` (the runs of benchmarks/sweeps/attention-teachers.yaml, or
any ``LABEL=RUN`` given with ``--run``) this runs ``foldattn calibrate RUN --distill-epochs N --max-drop D -o
OUT/<label>`` (a run whose ``calibration.json`` exists is not run again; ``--table-only`` runs none) and
tabulates, per model and seed: the teacher's top-1 on the run's 5,000 held-out images, the chosen model's top-1
and change, the sites converted, split and kept, the share of the attention's latency overhead removed at batch
1 and 64 (eager PyTorch, one thread: teacher minus chosen over teacher minus every site converted), the points
the search evaluated and whether the budget was met; then, per attention, the mean over seeds and whether every
seed meets the goal (within the budget and at least ``--goal`` of the batch-1 overhead removed). The tables go
to ``OUT/budget.md``.

The search times its points while it runs, often beside trainings; ``--retime`` times, afterwards and on an
idle machine, each run's teacher, the chosen model (``calibrated.safetensors``) and the plain network (what
every site converted deploys to: the teacher's builder without attention), interleaved (foldattn bench's
timer), at batch 1 and 64, one thread, wall time; it writes ``OUT/<label>/latency.json`` and the table's
latency columns come from it where it exists.

    python benchmarks/budget_cifar10.py --runs runs/teachers/runs --attentions se eca cbam srm --seeds 0 1 \\
        --out runs/budget --max-drop 0.3 --distill-epochs 1
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import foldattn
from foldattn._utils import atomic_path, set_submodule
from foldattn.cli import main as cli
from foldattn.models._registry import BUILDER_ATTR
from foldattn.stripe.budget import _time_points
from foldattn.train.source import load_source


def _chosen_model(teacher: nn.Module, folder: Path, kept: list[str]) -> nn.Module:
    """The chosen deployed model: by its own builder, or, for a split module (no builder builds it), loaded into
    the teacher's builder at the wholly kept blocks with the teacher's spatial gate at each split site."""
    path = folder / "calibrated.safetensors"
    whole = [k for k in kept if not k.endswith(".spatial")]
    split = [k.rpartition(".")[0] for k in kept if k.endswith(".spatial") and k.rpartition(".")[0] not in whole]
    if not split:
        return foldattn.load_deployed(path)
    record = getattr(teacher, BUILDER_ATTR)
    skeleton = foldattn.create_model(record["name"], **{**record["kwargs"],
                                                        "attention_sites": teacher.attention_site_indices(whole)})
    for name in split:
        set_submodule(skeleton, name, copy.deepcopy(teacher.get_submodule(name).spatial))
    return foldattn.load_deployed(path, model=skeleton)


def _retime(run: str, folder: Path, reps: int) -> dict[str, Any]:
    """Teacher, chosen and plain timed interleaved at batch 1 and 64 (median ms), and the share of the
    attention's overhead the chosen model removes."""
    teacher = load_source(run).model.eval()
    budget = json.loads((folder / "calibration.json").read_text())["budget"]
    chosen = _chosen_model(teacher, folder, budget["chosen"]["kept"]).eval()
    record = getattr(teacher, BUILDER_ATTR)
    plain = foldattn.create_model(record["name"], **{k: v for k, v in record["kwargs"].items()
                                                     if k != "attention"}).eval()
    models = {"teacher": teacher, "chosen": chosen, "plain": plain}
    inputs = {f"batch_{b}": torch.randn(b, 3, 32, 32) for b in (1, 64)}
    times, how = _time_points(models, inputs, reps=reps, min_sample_s=0.05, clock=time.perf_counter)
    out: dict[str, Any] = {"how": how}
    for name in inputs:
        ms = {k: times[k][name] for k in models}
        overhead = ms["teacher"] - ms["plain"]
        removed = (ms["teacher"] - ms["chosen"]) / overhead if overhead > 0 else None
        if budget["chosen"].get("note") == "teacher":  # every site kept: the teacher itself, nothing removed
            removed = 0.0
        out[name] = {**ms, "overhead_removed": removed}
    return out


def _removed(report: dict[str, Any], latency: dict[str, Any] | None) -> dict[str, float | None]:
    """The share of the attention's overhead removed per batch: --retime's careful figures, else the search's."""
    if latency is not None:
        return {k: v["overhead_removed"] for k, v in latency.items() if k.startswith("batch_")}
    return report["budget"].get("overhead_removed") or {}


def _row(label: str, report: dict[str, Any], latency: dict[str, Any] | None) -> str:
    budget = report["budget"]
    chosen = budget["chosen"]
    actions = [p["action"] for p in budget["plan"]]
    removed = _removed(report, latency)
    ms = "-" if latency is None else " / ".join(f"{latency['batch_1'][k]:.2f}" for k in ("teacher", "chosen", "plain"))
    share = " / ".join("-" if (v := removed[k]) is None else f"{100 * v:.0f} %"
                       for k in sorted(removed, key=lambda k: int(k.split("_")[1])))
    change = chosen["top1"] - budget["teacher_top1"]
    return (f"| {label} | {budget['teacher_top1']:.2f} | {chosen['top1']:.2f} ({change:+.2f})"
            f" | {actions.count('converted')} / {actions.count('split')} / {actions.count('kept')} | {ms} | {share} "
            f"| {len(budget['curve']) - 1} | {'yes' if budget['met'] else 'no'} |")


def _mean_rows(results: list[tuple[str, dict[str, Any], dict[str, Any] | None]], goal: float) -> list[str]:
    """Per attention, the mean over its seeds of the change and of the overhead removed, and whether every seed
    meets the issue's goal (within the budget and at least ``goal`` of the overhead removed at batch 1)."""
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
    for label, report, latency in results:
        groups.setdefault(label.split(" ")[0], []).append((report, latency))
    rows = []
    for name, items in groups.items():
        changes = [r["budget"]["chosen"]["top1"] - r["budget"]["teacher_top1"] for r, _ in items]
        removed = [_removed(r, lat) for r, lat in items]
        shares = []
        for batch in ("batch_1", "batch_64"):
            values = [v for m in removed if (v := m.get(batch)) is not None]
            shares.append(f"{100 * sum(values) / len(values):.0f} %" if len(values) == len(removed) else "-")
        goal_met = all(r["budget"]["met"] and (m.get("batch_1") or 0.0) >= goal
                       for (r, _), m in zip(items, removed, strict=True))
        rows.append(f"| {name} | {len(items)} | {sum(changes) / len(changes):+.2f} | {' / '.join(shares)} "
                    f"| {'yes' if goal_met else 'no'} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, help="a sweep's runs folder (RUNS/<attention>/s<seed>)")
    p.add_argument("--attentions", nargs="+", default=["se", "eca", "cbam", "srm"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--run", action="append", default=[], metavar="LABEL=RUN", help="a trained run folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-drop", default="0.3")
    p.add_argument("--distill-epochs", default="1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retime", action="store_true",
                   help="time teacher, chosen and plain again (on an idle machine) into OUT/<label>/latency.json")
    p.add_argument("--table-only", action="store_true",
                   help="tabulate the runs whose calibration.json exists in OUT; calibrate nothing")
    p.add_argument("--reps", type=int, default=30, help="interleaved samples per model with --retime (1-1000)")
    p.add_argument("--goal", type=float, default=0.7,
                   help="share of the attention's batch-1 overhead a model must remove to meet the goal")
    args = p.parse_args(argv)
    if not 1 <= args.reps <= 1000:
        p.error(f"--reps must be between 1 and 1000, got {args.reps}")
    if not 0.0 < args.goal <= 1.0:
        p.error(f"--goal is a share of the overhead, above 0 and at most 1 (0.7 is 70 %), got {args.goal}")
    torch.set_num_threads(args.threads)
    runs = [tuple(item.split("=", 1)) for item in args.run]
    if args.runs is not None:
        runs += [(f"{a} s{s}", str(args.runs / a / f"s{s}")) for a in args.attentions for s in args.seeds]
    if not runs:
        p.error("give --runs (with --attentions/--seeds) or --run LABEL=RUN")
    command = "python benchmarks/budget_cifar10.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command}`", "",
             "| model | teacher top-1 | chosen top-1 (change) | sites converted / split / kept "
             "| ms b=1 teacher / chosen / plain | attention latency overhead removed, b=1 / b=64 | points trained "
             "| within budget |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    results: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    for label, run in runs:
        folder = args.out / label.replace(" ", "-")
        if not (folder / "calibration.json").is_file():
            if args.table_only:
                print(f"{label}: no {folder / 'calibration.json'} yet; left out (--table-only)", file=sys.stderr)
                continue
            t0 = time.time()
            code = cli(["calibrate", run, "--distill-epochs", args.distill_epochs, "--max-drop", args.max_drop,
                        "-o", str(folder)])
            if code:
                print(f"{label}: foldattn calibrate exited with {code}", file=sys.stderr)
                return code
            print(f"{label}: {time.time() - t0:.0f} s", flush=True)
        if args.retime:
            with atomic_path(folder / "latency.json") as tmp:
                tmp.write_text(json.dumps(_retime(run, folder, args.reps), indent=2))
        timed = folder / "latency.json"
        results.append((label, json.loads((folder / "calibration.json").read_text()),
                        json.loads(timed.read_text()) if timed.is_file() else None))
        lines.append(_row(*results[-1]))
    lines += ["", f"Per model, mean over its seeds (goal: within the budget and at least {100 * args.goal:.0f} % of "
              "the batch-1 overhead removed, on every seed):", "",
              "| model | seeds | mean change | mean overhead removed, b=1 / b=64 | goal met on every seed |",
              "|---|---:|---:|---:|---|", *_mean_rows(results, args.goal)]
    lines += ["", "The points each search evaluated (items kept: top-1 after distillation, change to the teacher):", "",
              "| model | items | points |", "|---|---:|---|"]
    for label, report, _ in results:
        budget = report["budget"]
        points = "; ".join(f"{p['num_kept']}: {p['top1']:.2f} ({-p['drop']:+.2f})" for p in budget["curve"]
                           if p.get("note") != "teacher")
        lines.append(f"| {label} | {len(budget['order'])} | {points} |")
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "budget.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
