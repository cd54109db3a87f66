"""Running a sweep: every (arm, seed) as its own ``foldattn train`` process, a few at a time.

A run is a child process, so runs side by side share nothing (threads, allocator, RNG), a
failure stays in its own log, and Ctrl-C / SIGTERM reach each run's own handler, which writes
a resumable checkpoint. Running the same sweep again skips finished runs and resumes the others
exactly from their ``last.pt``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import load_json_file
from .._utils import write_json
from ..train.runtime import RunLock
from .spec import Run, SweepError, SweepSpec

__all__ = ["prepare_folder", "run_sweep", "run_state", "SweepResult", "command_for", "FORMAT"]

FORMAT = "foldattn-sweep"


def run_state(folder: Path) -> str:
    """``"finished"``, ``"partial"`` (a ``last.pt`` to resume from) or ``"new"``."""
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            if load_json_file(summary, "run summary").get("finished") is True:
                return "finished"
        except (ValueError, AttributeError):
            pass
    return "partial" if (folder / "last.pt").is_file() else "new"


def command_for(spec: SweepSpec, run: Run, out: Path, threads: int, resume: bool = False) -> list[str]:
    """The ``foldattn train`` command line of ``run`` (as recorded beside its numbers)."""
    cmd = ["foldattn", "train", *spec.train_args(run), "-o", str(run.folder(out)), "--no-progress"]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    if resume:
        cmd += ["--resume", str(run.folder(out))]
    return cmd


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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the sweep dies, even by SIGKILL, so no run outlives its sweep
    (SIGTERM makes ``foldattn train`` write a resumable checkpoint and stop)."""
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _open_log(path: Path) -> Any:
    """The run's log, opened to append, never through a symbolic link (one planted in ``logs/`` would make the
    sweep append to a file elsewhere). Closed when the run ends."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        why = "is a symbolic link" if path.is_symlink() else (e.strerror or str(e))
        raise SweepError(f"log {path}: {why}; remove it (the sweep writes only into its own folder)") from None
    return os.fdopen(fd, "ab")


class _Stop:
    """SIGINT/SIGTERM/SIGHUP: stop starting runs, pass the signal on to the running ones, wait for them."""

    def __init__(self) -> None:
        self.signum = 0
        self.children: list[subprocess.Popen[bytes]] = []
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
        for p in self.children:  # a terminal's Ctrl-C reached them already; SIGTERM from kill did not
            if p.poll() is None and signum != signal.SIGINT:  # a closed terminal's SIGHUP too
                p.send_signal(signal.SIGTERM)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_sweep(spec: SweepSpec, out: Path, *, jobs: int, threads: int, source: str,
              log: Callable[[str], None] = print, on_change: Callable[[], None] | None = None) -> SweepResult:
    """Run every unfinished (arm, seed) of ``spec`` into ``out``, ``jobs`` at a time, ``threads`` each.

    ``on_change`` is called after every run that ends (the summary is rewritten there).
    """
    result = SweepResult()
    lock = RunLock(out)
    prepare_folder(spec, out, source, create=True)
    lock.acquire()
    try:
        pending: list[Run] = []
        for run in spec.runs():
            state = run_state(run.folder(out))
            if state == "finished":
                result.finished.append(run.key)
            else:
                pending.append(run)
        log(f"sweep: {len(spec.runs())} runs, {len(result.finished)} finished, {len(pending)} to run "
            f"({jobs} at a time, {threads or 'default'} thread(s) each)")
        for sub in ("logs", "runs"):  # a link planted there would send the runs' files into another folder
            if (out / sub).is_symlink():
                raise SweepError(f"-o {out}: {out / sub} is a symbolic link; the sweep writes only into its own "
                                 "folder: remove the link")
        (out / "logs").mkdir(exist_ok=True)
        running: dict[str, tuple[Run, subprocess.Popen[bytes], Any, float]] = {}
        env = dict(os.environ)
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        with _Stop() as stop:
            while (pending and not stop.signum) or running:
                while pending and len(running) < jobs and not stop.signum:
                    run = pending.pop(0)
                    holder = RunLock(run.folder(out)).busy()
                    if holder:  # another process trains it (an earlier sweep's run?): neither failed nor done
                        result.busy[run.key] = holder
                        log(f"sweep: busy   {run.key}: its folder is in use by {holder}; rerun once that ends")
                        continue
                    resume = run_state(run.folder(out)) == "partial"
                    cmd = command_for(spec, run, out, threads, resume)
                    try:
                        logf = _open_log(run.log(out))
                    except SweepError as e:  # the runs already started go on; this one is not started
                        result.failed[run.key] = str(e)
                        log(f"sweep: FAILED {run.key}: {e}")
                        continue
                    logf.write(f"\n$ {shlex.join(cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
                    logf.flush()
                    proc = subprocess.Popen([sys.executable, "-m", "foldattn.cli", *cmd[1:]], stdout=logf,
                                            stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                    stop.children.append(proc)
                    running[run.key] = (run, proc, logf, time.time())
                    log(f"sweep: {'resume' if resume else 'start '} {run.key}  (log: {run.log(out)})")
                for key, (run, proc, logf, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    logf.close()
                    del running[key]
                    stop.children.remove(proc)
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
    finally:
        lock.release()
    return result
