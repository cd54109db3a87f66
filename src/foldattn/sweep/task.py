"""One run of a sweep as a task that any launcher can execute: its command line, its log, its process.

The sweep's driver decides what runs (:func:`run_state`: new, partial or finished) and a launcher
(:mod:`foldattn.sweep.launchers`) decides where. A :class:`RunTask` is what travels to the place the
run executes (a Ray worker, a SLURM job): plain data, pickled. There, :func:`execute` runs the same
``foldattn train`` process the local runner starts, decides ``--resume`` again from the run folder
(a job that was requeued or retried finds the checkpoint its last attempt wrote) and returns the
process's exit code.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from .._files import load_json_file, read_bounded
from .spec import SweepError

__all__ = ["RunTask", "run_state", "epochs_done", "open_log", "die_with_parent", "execute", "stop_current",
           "process_alive", "read_probe"]

#: seconds a stopped run may take to write its checkpoint before it is killed (a step, then ``last.pt``)
STOP_GRACE_S = 300.0

#: Run before the training process on a remote worker, in a fresh interpreter that imports nothing of foldattn:
#: the process gets SIGTERM when the worker that started it dies (PR_SET_PDEATHSIG; SIGTERM makes ``foldattn
#: train`` write a resumable checkpoint), ignores SIGUSR2 (SLURM's warning signal, sent to every process of a
#: job step: submitit's own handler in the job process answers it), and then becomes the real command by
#: ``exec``. A separate interpreter rather than ``preexec_fn``: the workers are threaded processes.
_GUARD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (AttributeError, OSError):
    pass
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


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


#: bytes of a run's ``metrics.csv`` read to count its epochs (a row is about 200 bytes)
MAX_METRICS_BYTES = 16 << 20


def epochs_done(folder: Path) -> int | None:
    """How many epochs the run in ``folder`` has finished (the rows of its ``metrics.csv``); None when it has
    none yet or the file cannot be read (missing, too large, not a regular file)."""
    try:
        text = read_bounded(folder / "metrics.csv", "metrics file", MAX_METRICS_BYTES)
    except ValueError:
        return None
    rows = [line for line in text.splitlines()[1:] if line.strip()]
    return len(rows) or None


def open_log(path: Path) -> IO[bytes]:
    """The run's log, opened to append, never through a symbolic link (one planted in ``logs/`` would make the
    sweep append to a file elsewhere). Closed when the run ends."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        why = "is a symbolic link" if path.is_symlink() else (e.strerror or str(e))
        raise SweepError(f"log {path}: {why}; remove it (the sweep writes only into its own folder)") from None
    return os.fdopen(fd, "ab")


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the sweep dies, even by SIGKILL, so no run outlives its sweep
    (SIGTERM makes ``foldattn train`` write a resumable checkpoint and stop)."""
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not: it holds nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    return True


@dataclass(frozen=True)
class RunTask:
    """Everything needed to execute one run anywhere the sweep folder is visible at the same path."""

    key: str
    #: ``foldattn`` arguments (``train ...``) without ``--resume``
    args: tuple[str, ...]
    folder: str
    log: str
    #: processes of the run: 1, or the ranks of a DDP run started through torchrun
    ranks: int = 1
    #: environment variables set for the run (``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``)
    env: tuple[tuple[str, str], ...] = ()
    #: the driver's working directory: relative paths of the sweep file resolve there where the worker sees it
    cwd: str = ""
    #: what the run computes on, as ``--dry-run`` and the log show it ("cpu", "cuda 0,1", "ray 1 CPU")
    device: str = field(default="cpu", compare=False)

    def command(self, resume: bool) -> list[str]:
        """The ``foldattn train`` command line as recorded (log, summary)."""
        cmd = ["foldattn", *self.args]
        return [*cmd, "--resume", self.folder] if resume else cmd

    def process_argv(self, resume: bool) -> list[str]:
        """The argv of the run's process: ``python -m foldattn.cli ...``, or torchrun's with ``ranks > 1``."""
        body = ["-m", "foldattn.cli", *self.command(resume)[1:]]
        if self.ranks > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(self.ranks), *body]
        return [sys.executable, *body]

    def shown(self, resume: bool) -> str:
        """The command as ``--dry-run`` and the log show it (torchrun's form for a DDP run)."""
        if self.ranks > 1:
            return shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(self.ranks), "-m", "foldattn.cli",
                               *self.command(resume)[1:]])
        return shlex.join(self.command(resume))

    def header(self, resume: bool) -> bytes:
        """The line written into the log before each attempt."""
        return (f"\n$ {self.shown(resume)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}"
                f"{'' if self.device == 'cpu' else ' on ' + self.device}\n").encode()


#: the run this process is executing (a remote worker runs one at a time): what a stop request signals
_CURRENT: list[subprocess.Popen[bytes]] = []


def stop_current(signum: int = signal.SIGTERM, wait_s: float = STOP_GRACE_S) -> int | None:
    """Ask the run this process executes to stop resumably (``signum``, SIGTERM by default) and wait for it to
    write its checkpoint; killed after ``wait_s``. Its exit code, or None when nothing runs."""
    if not _CURRENT:
        return None
    proc = _CURRENT[-1]
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
    deadline = time.monotonic() + wait_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
        with contextlib.suppress(KeyboardInterrupt):  # a second cancel while it writes the checkpoint
            time.sleep(0.1)
    return proc.returncode


def execute(task: RunTask, forward: tuple[int, ...] = ()) -> int:
    """Run ``task`` here, blocking, and return the exit code of its process (where a launcher's worker runs it).

    ``--resume`` is decided now from the run folder, so a retried or requeued attempt continues from the
    checkpoint the last one wrote. A ``KeyboardInterrupt`` (Ray's cancel) and the signals in ``forward``
    stop the process resumably (SIGTERM) and wait for its checkpoint.
    """
    folder = Path(task.folder)
    resume = run_state(folder) == "partial"
    (Path(task.log).parent).mkdir(parents=True, exist_ok=True)
    logf = open_log(Path(task.log))
    previous: dict[int, Any] = {}

    def forward_stop(signum: int, frame: FrameType | None) -> None:
        if _CURRENT and _CURRENT[-1].poll() is None:
            with contextlib.suppress(ProcessLookupError):
                _CURRENT[-1].send_signal(signal.SIGTERM)

    try:
        logf.write(task.header(resume))
        logf.flush()
        env = {**os.environ, **dict(task.env)}
        cwd = task.cwd if task.cwd and Path(task.cwd).is_dir() else None
        argv = task.process_argv(resume)
        proc = subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), *argv[1:]], stdout=logf,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _CURRENT.append(proc)
        handlers: dict[int, Any] = {sig: forward_stop for sig in forward}
        # Ray's cancel raises KeyboardInterrupt through a simulated SIGINT, which does nothing where SIGINT is
        # ignored (a worker of a driver started in the background with `&` inherits that)
        handlers.setdefault(signal.SIGINT, signal.default_int_handler)
        for sig, handler in handlers.items():
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, handler)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop_current()
        return int(proc.returncode)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _CURRENT:
            _CURRENT.pop()
        logf.close()


def read_probe(path: str) -> str | None:
    """The text of ``path`` where this worker sees it, or None (the sweep folder's shared-storage check)."""
    try:
        return Path(path).read_text()[:256]
    except OSError:
        return None
