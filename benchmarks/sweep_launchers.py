"""The same sweep through each of ``foldattn sweep``'s launchers: wall time, overhead per run, same numbers.

Runs ``benchmarks/sweeps/digits.yaml`` as it is (2 arms x 2 seeds of 3 epochs on the embedded digits, no
download) once per launcher, each as its own ``foldattn sweep`` process into its own folder ``OUT/<launcher>``
(its output in ``OUT/<launcher>.log``): ``--launcher local``; ``--launcher ray`` (a local Ray instance started
by the sweep; ``RAY_ADDRESS`` is ignored); ``--launcher slurm --slurm executor=local --slurm time=60``
(submitit's LocalExecutor: each run a submitit job on this machine). CUDA is hidden from every sweep, so every
launcher runs the same CPU runs, ``--jobs`` at a time with ``--threads`` torch threads each.

    python benchmarks/sweep_launchers.py -o runs/launchers [--launchers local,ray,slurm] [--jobs 2] [--threads 1]

What is measured, per launcher:

- ``sweep wall s``: the wall time of the whole ``foldattn sweep`` process (start of the driver to its exit:
  Ray's start and shutdown and the summary included).
- ``train s``: the sum over the runs of their own training time, the ``epoch_time_s`` column of each run's
  ``metrics.csv`` (every epoch's training and validation; not the process start, imports, data and model
  setup, checkpoint writing outside the epochs).
- ``overhead per run s`` = (sweep wall s x slots - train s) / runs, with slots = min(jobs, runs): the
  slot-seconds of the sweep not spent in a training epoch, per run. Every launcher pays the ``foldattn
  train`` process's own start and end in it (the local row is that and the sweep driver's start); what a
  launcher adds on top (Ray's start, task dispatch and worker processes; a submitit job's start and the
  driver's polling) is ``over local s``, its overhead per run minus the local runner's. On a busy machine
  these are differences of noisy numbers: read a few seconds either way as noise (the load average before
  each sweep is recorded).

It checks that every launcher's per-run final and best top-1 (``OUT/<launcher>/summary.json``) equal the
local runner's exactly (seeded runs: the same values, not close ones), prints a markdown table and writes
``OUT/sweep_launchers.json``. Exit status 1 when a sweep fails or a launcher's values differ from local's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "sweeps" / "digits.yaml"
LAUNCHERS = ("local", "ray", "slurm")
EXTRA = {"local": [], "ray": [], "slurm": ["--slurm", "executor=local", "--slurm", "time=60"]}

#: per-run top-1: {"plain-s0": {"final_top1": ..., "best_top1": ...}, ...}
Top1 = dict[str, dict[str, float]]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(threads, 1))}


def _top1(summary: dict[str, Any]) -> Top1:
    """Per-run final and best top-1 from a sweep's summary (each arm's values follow its seeds)."""
    out: Top1 = {}
    for arm, entry in summary["arms"].items():
        for i, seed in enumerate(entry["seeds"]):
            out[f"{arm}-s{seed}"] = {m: entry[m]["values"][i] for m in ("final_top1", "best_top1")}
    return out


def _train_seconds(folder: Path) -> dict[str, float]:
    """Per-run training time: the sum of ``epoch_time_s`` in ``runs/ARM/sSEED/metrics.csv``."""
    seconds: dict[str, float] = {}
    for metrics in sorted(folder.glob("runs/*/s*/metrics.csv")):
        with open(metrics, newline="") as f:
            rows = list(csv.DictReader(f))
        seconds[f"{metrics.parent.parent.name}-{metrics.parent.name}"] = sum(float(r["epoch_time_s"]) for r in rows)
    return seconds


def _sweep(launcher: str, out: Path, jobs: int, threads: int, timeout: float) -> dict[str, Any]:
    """Run the sweep through ``launcher`` into ``out / launcher``; what it took and what it found."""
    folder, log = out / launcher, out / f"{launcher}.log"
    cmd = [sys.executable, "-m", "foldattn.cli", "sweep", str(SWEEP.relative_to(ROOT)), "-o", str(folder),
           "--launcher", launcher, "--jobs", str(jobs), "--threads", str(threads), *EXTRA[launcher]]
    load = os.getloadavg()[0]
    print(f"{launcher}: {shlex.join(['foldattn', *cmd[3:]])}  (load average {load:.1f})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads), cwd=ROOT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n(timed out after {timeout:.0f} s)\n")
            rc = 124
    wall = time.perf_counter() - t0
    print(f"{launcher}: exit {rc} in {wall:.1f} s (log: {log})", flush=True)
    result: dict[str, Any] = {"command": shlex.join(["foldattn", *cmd[3:]]), "exit": rc, "wall_s": wall,
                              "load_average_before": load, "log": str(log)}
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        result["runs_finished"], result["runs_planned"] = summary["runs_finished"], summary["runs_planned"]
        result["top1"] = _top1(summary)
        train = _train_seconds(folder)
        result["train_s_per_run"] = train
        result["train_s"] = sum(train.values())
        runs = summary["runs_planned"]
        slots = min(jobs, runs)
        result["slots"] = slots
        result["overhead_per_run_s"] = (wall * slots - result["train_s"]) / max(runs, 1)
    return result


def _values(top1: Top1) -> str:
    """The exact values: final top-1 per run, the best after a slash where it differs."""
    return "; ".join(f"{key} {v['final_top1']!r}" + ("" if v["best_top1"] == v["final_top1"] else
                                                      f" / best {v['best_top1']!r}") for key, v in top1.items())


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| launcher | sweep wall s | train s (sum of runs) | overhead per run s (over local) | "
             "per-run top-1 equal to local | per-run final top-1 (exact) |", "|---|---:|---:|---:|---|---|"]
    for name, r in results.items():
        if "top1" not in r or r.get("runs_finished") != r.get("runs_planned"):
            lines.append(f"| {name} | {r['wall_s']:.1f} | | | no (exit {r['exit']}, "
                         f"{r.get('runs_finished', 0)} of {r.get('runs_planned', '?')} runs; see {r['log']}) | |")
            continue
        over = r.get("over_local_s")
        extra = "" if over is None or name == "local" else f" ({over:+.1f})"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['overhead_per_run_s']:.1f}{extra} | "
                     f"{'yes' if r['equal_to_local'] else 'no'} | {_values(r['top1'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="a new folder (or one this script wrote): OUT/<launcher> per launcher, sweep_launchers.json")
    p.add_argument("--launchers", default=",".join(LAUNCHERS),
                   help=f"comma-separated, of {', '.join(LAUNCHERS)} [all three]")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time [2]")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run [1]")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each sweep may take [1800]")
    args = p.parse_args(argv)
    chosen = [x.strip() for x in args.launchers.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in LAUNCHERS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        p.error(f"--launchers {args.launchers}: expected distinct names of {', '.join(LAUNCHERS)}")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads: expected at least 1")
    for name in chosen:  # a folder holding this sweep already would skip its finished runs: nothing to time
        if (args.out / name).exists():
            p.error(f"-o {args.out}: {args.out / name} exists; a sweep there would not run again: choose a new "
                    "folder (or remove that one)")
    local_only = "local" not in chosen
    if local_only and not (args.out / "local" / "summary.json").is_file():
        p.error("--launchers without local: the values are compared to OUT/local/summary.json, which is missing")
    args.out = args.out.absolute()  # the sweeps run in the repository's root
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/sweep_launchers.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    results: dict[str, dict[str, Any]] = {}
    for name in sorted(chosen, key=LAUNCHERS.index):  # local first: the reference
        results[name] = _sweep(name, args.out, args.jobs, args.threads, args.timeout)
    if local_only:
        local_top1 = _top1(json.loads((args.out / "local" / "summary.json").read_text()))
        local_overhead = None
    else:
        local_top1 = results["local"].get("top1")
        local_overhead = results["local"].get("overhead_per_run_s")
    ok = bool(local_top1)
    for r in results.values():
        complete = "top1" in r and r["runs_finished"] == r["runs_planned"] and r["exit"] == 0
        r["equal_to_local"] = complete and r["top1"] == local_top1
        if complete and local_overhead is not None:
            r["over_local_s"] = r["overhead_per_run_s"] - local_overhead
        ok = ok and r["equal_to_local"]

    table = _table(results)
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "sweep_file": str(SWEEP.relative_to(ROOT)), "jobs": args.jobs, "threads": args.threads,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": _version("torch"),
                          "ray": _version("ray"), "submitit": _version("submitit")},
              "overhead_definition": "(sweep wall s x min(jobs, runs) - sum of the runs' metrics.csv epoch_time_s) "
                                     "/ runs", "launchers": results, "all_equal_to_local": ok, "table": table}
    tmp = args.out / ".sweep_launchers.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out / "sweep_launchers.json")
    print(f"\n{command}  ({args.jobs} runs at a time, {args.threads} thread(s) each, {os.cpu_count()} CPU cores)\n")
    print(table)
    print(f"\nwrote {args.out / 'sweep_launchers.json'}")
    if not ok:
        print("sweep_launchers: a launcher failed or its per-run top-1 differs from the local runner's",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
