"""``foldattn sweep``: arms x seeds of ``foldattn train``, resumable, summarised against a baseline.

Examples::

    foldattn sweep benchmarks/sweeps/digits.yaml -o runs/sweep-digits --jobs 2 --threads 1
    foldattn sweep benchmarks/sweeps/digits.yaml -o runs/sweep-digits --dry-run    # check, list the runs
    foldattn sweep benchmarks/sweeps/digits.yaml -o runs/sweep-digits --summary-only
    foldattn sweep FILE.yaml -o DIR --gpus 0,1,2,3 --gpus-per-run 2        # two 2-GPU DDP runs at a time
    foldattn sweep FILE.yaml -o /shared/DIR --launcher ray --address HEAD:6379
    foldattn sweep FILE.yaml -o /shared/DIR --launcher slurm --slurm partition=gpu --slurm time=240
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .._argtypes import MAX_CONFIG_THREADS, bounded_int
from ..sweep.spec import MAX_GPU_IDS, MAX_GPUS_PER_RUN, MAX_JOBS, SLURM_KEYS
from ._errors import CLIError

#: ``--slurm KEY=VALUE`` options of one command line (the keys are few; a repeated key: the last counts)
MAX_SLURM_OPTIONS = 32
#: characters of ``--gpus`` and ``--address``
MAX_OPTION_TEXT = 4_096

__all__ = ["register"]


def _launcher(args: argparse.Namespace, spec: Any) -> tuple[Any, int, int]:
    """The launcher of ``--launcher`` with its options checked, and the runs at a time and threads per run."""
    from ..sweep import LAUNCHERS, SweepError
    from ..sweep.launchers import LocalLauncher, RayLauncher, SlurmLauncher, parse_gpus, visible_gpus
    from ..sweep.spec import parse_slurm

    kind = args.launcher
    cores = os.cpu_count() or 1
    if kind not in LAUNCHERS:  # argparse's choices already; a library caller's namespace
        raise SweepError(f"--launcher {kind}: expected one of {', '.join(LAUNCHERS)}")
    if kind != "local" and args.gpus is not None:
        raise SweepError(f"--gpus picks this machine's GPUs (--launcher local); with --launcher {kind} each run "
                         "declares --gpus-per-run GPUs and the cluster places it")
    if kind != "ray" and args.address is not None:
        raise SweepError("--address names the Ray cluster of --launcher ray")
    if kind != "slurm" and args.slurm:
        raise SweepError("--slurm sets the jobs of --launcher slurm")
    if kind == "local":
        if args.gpus is not None:
            ids = parse_gpus(args.gpus)
        else:  # every visible GPU when CUDA is there, none otherwise
            import torch

            ids = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        if not ids and args.gpus_per_run is not None:
            raise SweepError(f"--gpus-per-run {args.gpus_per_run}: no GPU here (CUDA is not available); name the "
                             "GPUs with --gpus")
        if ids and args.gpus is not None and not args.dry_run:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if max(ids) >= count:
                raise SweepError(f"--gpus {args.gpus}: this machine has {count} visible CUDA GPU(s)"
                                 + (f" (ids 0-{count - 1})" if count else "") + " (--dry-run shows the plan anyway)")
        per_run = args.gpus_per_run if args.gpus_per_run is not None else 1
        launcher: Any = LocalLauncher(ids, per_run, visible_gpus())
        jobs = args.jobs or (launcher.pool.slots if ids else spec.jobs)  # with GPUs: a run per GPU group
        slots = launcher.capacity(jobs)
        threads = args.threads if args.threads is not None else (
            spec.threads or max(1, cores // (slots * launcher.ranks)))
        return launcher, jobs, threads
    threads = args.threads if args.threads is not None else (spec.threads or 1)
    jobs = args.jobs or spec.jobs
    if kind == "ray":
        if args.address is not None and not 0 < len(args.address) <= 256:
            raise SweepError("--address: expected HOST:PORT of a Ray cluster's head (at most 256 characters)")
        return RayLauncher(args.address, args.gpus_per_run, threads), jobs, threads
    if len(args.slurm or ()) > MAX_SLURM_OPTIONS:
        raise SweepError(f"--slurm: given {len(args.slurm)} times; at most {MAX_SLURM_OPTIONS}")
    options = dict(spec.slurm)
    options.update(parse_slurm(dict(args.slurm or ()), "--slurm"))
    return SlurmLauncher(options, args.gpus_per_run, threads), jobs, threads


def _slurm_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key not in SLURM_KEYS or len(text) > MAX_OPTION_TEXT:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {', '.join(SLURM_KEYS)}; got {text!r}"
                                         if len(text) <= 200 else "too long")
    return key, value


def _text(limit: int) -> Any:
    def parse(text: str) -> str:
        if len(text) > limit:
            raise argparse.ArgumentTypeError(f"at most {limit} characters")
        return text

    return parse


def _main(args: argparse.Namespace) -> int:
    from ..sweep import SweepError, load_sweep, prepare_folder, run_state, run_sweep, write_summary
    from ..sweep.runner import make_task
    from ..sweep.task import epochs_done

    try:
        spec = load_sweep(args.file)
        launcher, jobs, threads = _launcher(args, spec)
    except SweepError as e:
        raise CLIError(str(e)) from None
    out = Path(args.output)
    try:
        prepare_folder(spec, out, args.file, create=False)
    except SweepError as e:
        raise CLIError(str(e)) from None
    if args.dry_run:
        try:
            launcher.check(full=False)  # the extra is there (a cluster is not contacted)
        except SweepError as e:
            raise CLIError(str(e)) from None
        index = 0
        for run in spec.runs():
            state = run_state(run.folder(out))
            device = "-" if state == "finished" else launcher.plan(index)
            index += state != "finished"
            task = make_task(spec, run, out, threads, launcher.ranks)
            done = epochs_done(run.folder(out)) if state == "partial" else None
            shown = f"{state} ({done} ep)" if done else state  # how far a run has come: a status of the sweep
            print(f"{run.key:<24} {shown:<16} {device:<18} {task.shown(state == 'partial')}")
        return 0
    if args.summary_only:
        if not (out / "sweep.json").is_file():
            raise CLIError(f"-o {out}: no sweep has run there yet (no sweep.json)")
        summary = write_summary(spec, out, threads, args.file)
        print(f"{summary['runs_finished']} of {summary['runs_planned']} runs finished; wrote {out / 'summary.md'}")
        return 0
    try:
        result = run_sweep(spec, out, jobs=jobs, threads=threads, source=args.file, launcher=launcher,
                           on_change=lambda: write_summary(spec, out, threads, args.file))
    except SweepError as e:
        raise CLIError(str(e)) from None
    summary = write_summary(spec, out, threads, args.file)
    from ..sweep.summary import markdown

    print(markdown(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}"
          + (", summary.png, curves.png" if summary["runs_finished"] else ""))
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sweep", help="run arms x seeds of `foldattn train` (resumable) and summarise them against a baseline",
        description="Run every (arm, seed) of a sweep file as a `foldattn train` process, a few at a time, into "
                    "OUTPUT/runs/ARM/sSEED; finished runs are kept and interrupted ones resumed when the command "
                    "is repeated. Writes OUTPUT/summary.json, summary.md, summary.png (mean ± std per arm, "
                    "paired differences to the baseline arm per seed) and curves.png (validation top-1 per "
                    "epoch, mean over seeds per arm).",
    )
    p.add_argument("file", metavar="FILE.yaml", help="the sweep file (base, arms, seeds, baseline)")
    p.add_argument("-o", "--output", required=True, help="the sweep's folder (new, empty, or this sweep's)")
    p.add_argument("--jobs", type=bounded_int(1, MAX_JOBS),
                   help=f"runs at a time (at most {MAX_JOBS}) [the file's jobs, else 1]")
    p.add_argument("--threads", type=bounded_int(0, MAX_CONFIG_THREADS),
                   help=f"torch threads per run (at most {MAX_CONFIG_THREADS}) [the file's threads, else CPU cores / "
                        "jobs]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="check the file, list the runs (finished, partial "
                                                          "with its epochs done, or new) and their commands, write "
                                                          "nothing")
    g.add_argument("--summary-only", action="store_true", help="rewrite the summary from the finished runs")
    w = p.add_argument_group("where the runs execute (docs/ablations.md, 'On a cluster')")
    w.add_argument("--launcher", choices=("local", "ray", "slurm"), default="local",
                   help="local: processes of this command (its CPU, or --gpus); ray: a Ray task per run (extra "
                        "foldattn[ray]); slurm: a SLURM job per run through submitit (extra foldattn[slurm]); ray "
                        "and slurm need OUTPUT on storage every node mounts at the same path [local]")
    w.add_argument("--gpus", type=_text(MAX_OPTION_TEXT), metavar="IDS",
                   help=f"GPUs of this machine the runs share, e.g. 0,1,2,3 or 0-3, or none (at most {MAX_GPU_IDS} "
                        "ids, each below it); each run gets --gpus-per-run of them through CUDA_VISIBLE_DEVICES, as "
                        "many runs at a time as there are groups (--jobs lowers it) [every visible GPU; none "
                        "without CUDA]")
    w.add_argument("--gpus-per-run", type=bounded_int(0, MAX_GPUS_PER_RUN), metavar="K",
                   help=f"GPUs of each run (at most {MAX_GPUS_PER_RUN}); above 1 a run is a K-rank DDP run through "
                        "torchrun [1 with GPUs; ray: 1 where the cluster has GPUs, else 0; slurm: the slurm "
                        "block's gpus_per_node, else 0]")
    w.add_argument("--address", type=_text(256),
                   help="the Ray cluster (HOST:PORT of its head, ray://HOST:PORT, or auto) [$RAY_ADDRESS, else a "
                        "local Ray instance with this machine's CPUs]")
    w.add_argument("--slurm", type=_slurm_option, action="append", metavar="KEY=VALUE",
                   help="a SLURM job option, over the sweep file's slurm block (repeat it; at most "
                        f"{MAX_SLURM_OPTIONS}): partition, time (minutes, at most 43200 = 30 days; required), "
                        "gpus_per_node (<= 64), cpus_per_task (<= 1024) [threads x ranks], mem_gb (<= 4096), "
                        "constraint, account, qos, max_timeouts (time limits a run may reach, each requeuing it, "
                        "<= 100) [3], executor (slurm, or local: submitit's LocalExecutor on this machine) [slurm]")
    p.set_defaults(func=_main)
