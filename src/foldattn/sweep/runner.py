"""Running a sweep: every (arm, seed) as its own ``foldattn train`` process, a few at a time.

A run is a child process, so runs side by side share nothing (threads, allocator, RNG), a
failure stays in its own log, and Ctrl-C / SIGTERM reach each run's own handler, which writes
a resumable checkpoint. Running the same sweep again skips finished runs and resumes the others
exactly from their ``last.pt``.

Where a run executes is its launcher's business (:mod:`foldattn.sweep.launchers`: this machine's CPU or
GPUs, a Ray cluster, SLURM); the loop here, the folders, resume and the summary are the same for all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import load_json_file
from .._utils import write_json
from ..train.runtime import RunLock
from .launchers import Launcher, LocalLauncher
from .spec import Run, SweepError, SweepSpec
from .task import RunTask, run_state

__all__ = ["prepare_folder", "run_sweep", "run_state", "SweepResult", "command_for", "make_task", "FORMAT"]

FORMAT = "foldattn-sweep"


def command_for(spec: SweepSpec, run: Run, out: Path, threads: int, resume: bool = False) -> list[str]:
    """The ``foldattn train`` command line of ``run`` (as recorded beside its numbers)."""
    cmd = ["foldattn", "train", *spec.train_args(run), "-o", str(run.folder(out)), "--no-progress"]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    if resume:
        cmd += ["--resume", str(run.folder(out))]
    return cmd


def make_task(spec: SweepSpec, run: Run, out: Path, threads: int, ranks: int = 1, absolute: bool = False) -> RunTask:
    """``run`` as a task a launcher executes (``absolute``: its paths made absolute, for a remote worker)."""
    if absolute:
        out = out.absolute()
    env = (("OMP_NUM_THREADS", str(threads)),) if threads > 0 else ()
    return RunTask(run.key, tuple(command_for(spec, run, out, threads)[1:]), str(run.folder(out)), str(run.log(out)),
                   ranks=ranks, env=env, cwd=os.getcwd() if absolute else "")


def prepare_folder(spec: SweepSpec, out: Path, source: str, *, create: bool = True) -> None:
    """Claim ``out`` for this sweep: new or empty, or holding this same sweep (arms and seeds may be
    added; a changed base or arm is refused). Writes ``out/sweep.json`` when ``create``."""
    record = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise SweepError(f"-o {out}: is a file; name a folder")
    if record.is_file():
        try:
            old = load_json_file(record, "sweep record")
            old_spec = old["spec"]
            old_base, old_arms = list(old_spec["base"]), dict(old_spec["arms"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SweepError(f"-o {out}: {record} is not a sweep record foldattn wrote; choose another folder") \
                from None
        mine = spec.to_dict()
        if old.get("format") != FORMAT:
            raise SweepError(f"-o {out}: {record} is not a foldattn sweep record; choose another folder")
        if old_base != mine["base"]:
            raise SweepError(f"-o {out} holds another sweep: its base options are {old_base}, this file's "
                             f"{mine['base']}; choose another folder")
        changed = [a for a, v in mine["arms"].items() if a in old_arms and
                   (not isinstance(old_arms[a], dict) or old_arms[a].get("args") != v["args"])]
        if changed:
            raise SweepError(f"-o {out} holds another sweep: arm(s) {', '.join(changed)} have other options there; "
                             "choose another folder (or rename the arms)")
    elif out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
        raise SweepError(f"-o {out}: the folder holds other files and no sweep.json; choose a new or empty folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        write_json(record, {"format": FORMAT, "version": 1, "file": source, "spec": spec.to_dict()}, indent=2)


@dataclass
class SweepResult:
    """What :func:`run_sweep` did."""

    finished: list[str] = field(default_factory=list)  # run keys finished (now or before)
    failed: dict[str, str] = field(default_factory=dict)  # run key -> its log file
    busy: dict[str, str] = field(default_factory=dict)  # run key -> the live process holding its folder
    interrupted: int = 0  # the signal that stopped the sweep (0: none)


class _Stop:
    """SIGINT/SIGTERM/SIGHUP: stop starting runs, pass the signal on to the running ones, wait for them."""

    def __init__(self) -> None:
        self.signum = 0
        self.signals: list[int] = []  # every one received, passed on to the launcher by the loop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        if first:
            print(f"\nsweep: stopping ({signal.Signals(signum).name}); the running runs write a resumable "
                  "checkpoint", file=sys.stderr)
        self.signals.append(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_sweep(spec: SweepSpec, out: Path, *, jobs: int, threads: int, source: str,
              log: Callable[[str], None] = print, on_change: Callable[[], object] | None = None,
              launcher: Launcher | None = None) -> SweepResult:
    """Run every unfinished (arm, seed) of ``spec`` into ``out``, ``jobs`` at a time, ``threads`` each.

    ``on_change`` is called after every run that ends (the summary is rewritten there). ``launcher`` says where
    the runs execute (:mod:`foldattn.sweep.launchers`; by default child processes of this one, on the CPU).
    """
    launcher = launcher if launcher is not None else LocalLauncher()
    launcher.log = log
    result = SweepResult()
    lock = RunLock(out)
    prepare_folder(spec, out, source, create=False)  # a folder of another sweep is refused before any connection
    launcher.connect(out)  # a launcher that cannot run (no extra, no cluster, no shared folder) leaves nothing
    try:
        prepare_folder(spec, out, source, create=True)
        lock.acquire()
        try:
            _run_all(spec, out, jobs, threads, launcher, result, log, on_change)
        finally:
            lock.release()
    finally:
        launcher.close()
    return result


def _run_all(spec: SweepSpec, out: Path, jobs: int, threads: int, launcher: Launcher, result: SweepResult,
             log: Callable[[str], None], on_change: Callable[[], object] | None) -> None:
    """The loop: start runs where a slot is free, poll the running ones, rewrite the summary when one ends."""
    pending: list[Run] = []
    for run in spec.runs():
        state = run_state(run.folder(out))
        if state == "finished":
            result.finished.append(run.key)
        else:
            pending.append(run)
    slots = launcher.capacity(jobs)
    log(f"sweep: {len(spec.runs())} runs, {len(result.finished)} finished, {len(pending)} to run "
        f"({slots} at a time, {threads or 'default'} thread(s) each{launcher.describe()})")
    for sub in ("logs", "runs"):  # a link planted there would send the runs' files into another folder
        if (out / sub).is_symlink():
            raise SweepError(f"-o {out}: {out / sub} is a symbolic link; the sweep writes only into its own "
                             "folder: remove the link")
    (out / "logs").mkdir(exist_ok=True)
    launcher.open(out)

    def task_of(run: Run) -> RunTask:
        return make_task(spec, run, out, threads, launcher.ranks, absolute=launcher.remote)

    running: dict[str, tuple[Run, float]] = {}
    for run in list(pending):  # jobs an earlier start submitted that are still queued or running (SLURM's)
        if launcher.attach(task_of(run)):
            pending.remove(run)
            running[run.key] = (run, time.time())
            log(f"sweep: follow {run.key}: its job from an earlier start is still queued or running")
    with _Stop() as stop:
        forwarded = 0
        while (pending and not stop.signum) or running:
            while pending and len(running) < slots and not stop.signum:
                run = pending.pop(0)
                holder = RunLock(run.folder(out)).busy()
                if holder:  # another process trains it (an earlier sweep's run?): neither failed nor done
                    result.busy[run.key] = holder
                    log(f"sweep: busy   {run.key}: its folder is in use by {holder}; rerun once that ends")
                    continue
                resume = run_state(run.folder(out)) == "partial"
                try:
                    launcher.start(task_of(run), resume)
                except SweepError as e:  # the runs already started go on; this one is not started
                    result.failed[run.key] = str(e)
                    log(f"sweep: FAILED {run.key}: {e}")
                    continue
                running[run.key] = (run, time.time())
                log(f"sweep: {'resume' if resume else 'start '} {run.key}  (log: {run.log(out)})")
            if len(stop.signals) > forwarded:  # outside the handler: a launcher may talk to its engine
                for signum in stop.signals[forwarded:]:
                    launcher.interrupt(signum)
                forwarded = len(stop.signals)
            for key, (run, t0) in list(running.items()):
                rc = launcher.poll(key)
                if rc is None:
                    continue
                del running[key]
                minutes = (time.time() - t0) / 60
                if run_state(run.folder(out)) == "finished":  # its summary says so: never also "failed"
                    result.finished.append(key)
                    log(f"sweep: done   {key} in {minutes:.1f} min" + (f" (exit {rc})" if rc else ""))
                elif stop.signum:
                    log(f"sweep: stopped {key} (resumable)")
                else:
                    result.failed[key] = str(run.log(out))
                    log(f"sweep: FAILED {key} (exit {rc}); see {run.log(out)}")
                if on_change is not None:
                    on_change()
            if running:
                time.sleep(0.5)
        result.interrupted = stop.signum
