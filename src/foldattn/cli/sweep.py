"""``foldattn sweep``: arms x seeds of ``foldattn train``, resumable, summarised against a baseline.

Examples::

    foldattn sweep benchmarks/sweeps/digits.yaml -o runs/sweep-digits --jobs 2 --threads 1
    foldattn sweep benchmarks/sweeps/digits.yaml -o runs/sweep-digits --dry-run    # check, list the runs
    foldattn sweep benchmarks/sweeps/digits.yaml -o runs/sweep-digits --summary-only
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .._argtypes import MAX_CONFIG_THREADS, bounded_int
from ..sweep.spec import MAX_JOBS
from . import CLIError

__all__ = ["register"]


def _main(args: argparse.Namespace) -> int:
    from ..sweep import SweepError, load_sweep, prepare_folder, run_state, run_sweep, write_summary
    from ..sweep.runner import command_for

    try:
        spec = load_sweep(args.file)
    except SweepError as e:
        raise CLIError(str(e)) from None
    out = Path(args.output)
    jobs = args.jobs or spec.jobs
    threads = args.threads if args.threads is not None else (spec.threads or max(1, (os.cpu_count() or 1) // jobs))
    try:
        prepare_folder(spec, out, args.file, create=False)
    except SweepError as e:
        raise CLIError(str(e)) from None
    if args.dry_run:
        for run in spec.runs():
            state = run_state(run.folder(out))
            print(f"{run.key:<24} {state:<9} {shlex.join(command_for(spec, run, out, threads, state == 'partial'))}")
        return 0
    if args.summary_only:
        if not (out / "sweep.json").is_file():
            raise CLIError(f"-o {out}: no sweep has run there yet (no sweep.json)")
        summary = write_summary(spec, out, threads, args.file)
        print(f"{summary['runs_finished']} of {summary['runs_planned']} runs finished; wrote {out / 'summary.md'}")
        return 0
    result = run_sweep(spec, out, jobs=jobs, threads=threads, source=args.file,
                       on_change=lambda: write_summary(spec, out, threads, args.file))
    summary = write_summary(spec, out, threads, args.file)
    from ..sweep.summary import markdown

    print(markdown(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}" + (", summary.png" if summary["runs_finished"] else ""))
    if result.interrupted:
        print("foldattn sweep: stopped; run the same command again to resume", file=sys.stderr, flush=True)
        return 128 + result.interrupted
    if result.failed:
        failed = ", ".join(f"{k} ({v})" for k, v in result.failed.items())
        print(f"foldattn sweep: error: {len(result.failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    if result.busy:
        busy = ", ".join(f"{k} ({v})" for k, v in result.busy.items())
        print(f"foldattn sweep: {len(result.busy)} run(s) not started, their folders in use by another process: "
              f"{busy}; run the same command again once they end", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run arms x seeds of `foldattn train` (resumable) and summarise them against a baseline",
        description="Run every (arm, seed) of a sweep file as a `foldattn train` process, a few at a time, into "
                    "OUTPUT/runs/ARM/sSEED; finished runs are kept and interrupted ones resumed when the command "
                    "is repeated. Writes OUTPUT/summary.json, summary.md and summary.png (mean ± std per arm, "
                    "paired differences to the baseline arm per seed).",
    )
    p.add_argument("file", metavar="FILE.yaml", help="the sweep file (base, arms, seeds, baseline)")
    p.add_argument("-o", "--output", required=True, help="the sweep's folder (new, empty, or this sweep's)")
    p.add_argument("--jobs", type=bounded_int(1, MAX_JOBS),
                   help=f"runs at a time (at most {MAX_JOBS}) [the file's jobs, else 1]")
    p.add_argument("--threads", type=bounded_int(0, MAX_CONFIG_THREADS),
                   help=f"torch threads per run (at most {MAX_CONFIG_THREADS}) [the file's threads, else CPU cores / "
                        "jobs]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="check the file, list the runs and their commands, "
                                                          "write nothing")
    g.add_argument("--summary-only", action="store_true", help="rewrite the summary from the finished runs")
    p.set_defaults(func=_main)
