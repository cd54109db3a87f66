"""Trained attention converted within an accuracy budget: `foldattn calibrate --max-drop` on CIFAR-10 teachers.

For every trained run ``RUNS/<attention>/s<seed>`` (the runs of benchmarks/sweeps/attention-teachers.yaml, or
any ``LABEL=RUN`` given with ``--run``) this runs ``foldattn calibrate RUN --distill-epochs N --max-drop D -o
OUT/<label>`` (a run whose ``calibration.json`` exists is not run again) and tabulates, per model and seed: the
teacher's top-1 on the run's 5,000 held-out images, the chosen model's top-1 and change, the sites converted,
split and kept, the share of the attention's latency overhead removed at batch 1 and 64 (eager PyTorch, one
thread: teacher minus chosen over teacher minus every site converted), the points the search evaluated and
whether the budget was met. The table goes to ``OUT/budget.md``.

    python benchmarks/budget_cifar10.py --runs runs/teachers/runs --attentions se eca cbam srm --seeds 0 1 \\
        --out runs/budget --max-drop 0.3 --distill-epochs 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from foldattn._utils import atomic_path
from foldattn.cli import main as cli


def _row(label: str, report: dict[str, Any]) -> str:
    budget = report["budget"]
    chosen = budget["chosen"]
    actions = [p["action"] for p in budget["plan"]]
    removed = budget.get("overhead_removed") or {}
    share = " / ".join("-" if removed.get(k) is None else f"{100 * removed[k]:.0f} %"
                       for k in sorted(removed, key=lambda k: int(k.split("_")[1])))
    change = chosen["top1"] - budget["teacher_top1"]
    return (f"| {label} | {budget['teacher_top1']:.2f} | {chosen['top1']:.2f} ({change:+.2f})"
            f" | {actions.count('converted')} / {actions.count('split')} / {actions.count('kept')} | {share} "
            f"| {len(budget['curve']) - 1} | {'yes' if budget['met'] else 'no'} |")


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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [tuple(item.split("=", 1)) for item in args.run]
    if args.runs is not None:
        runs += [(f"{a} s{s}", str(args.runs / a / f"s{s}")) for a in args.attentions for s in args.seeds]
    if not runs:
        p.error("give --runs (with --attentions/--seeds) or --run LABEL=RUN")
    command = "python benchmarks/budget_cifar10.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command}`", "",
             "| model | teacher top-1 | chosen top-1 (change) | sites converted / split / kept "
             "| attention latency overhead removed, b=1 / b=64 | points trained | within budget |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, run in runs:
        folder = args.out / label.replace(" ", "-")
        if not (folder / "calibration.json").is_file():
            t0 = time.time()
            code = cli(["calibrate", run, "--distill-epochs", args.distill_epochs, "--max-drop", args.max_drop,
                        "-o", str(folder)])
            if code:
                print(f"{label}: foldattn calibrate exited with {code}", file=sys.stderr)
                return code
            print(f"{label}: {time.time() - t0:.0f} s", flush=True)
        lines.append(_row(label, json.loads((folder / "calibration.json").read_text())))
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "budget.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
