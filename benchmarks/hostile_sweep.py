"""A sweep of hostile inputs against foldattn's whole surface (issue 32): every case classified.

Each case is one thing a new user or an attacker could do: a tampered checkpoint, deployed file,
``-c`` config or sweep file; an absurd ``quantize``/``bench``/``calibrate``/``stripe`` option; a
library call on an odd model; a hostile image folder; a full disk, a read-only folder, a killed
or concurrent command. The script builds its fixtures once in a temporary folder (a finished
digits run with ASR(SE), a classic-SE run, a finished plain run as the *victim*, a deployed file,
an image folder, a folder of somebody's files), then runs every case in its own process
(``python -m foldattn.cli ...`` or ``python -c CODE`` for the library API) with a wall-clock
timeout, ``OMP_NUM_THREADS=1``, ``nice``, an address-space limit (``RLIMIT_AS``) and its peak RSS
measured (``os.wait4``), and classifies the outcome as exactly one of:

* ``lost``: a victim folder's fingerprint (every file's bytes, hidden files too) changed, a file
  of the sandbox outside the case's own folder appeared, changed or vanished, or a file appeared
  in the case's folder outside the outputs it may write;
* ``traceback``: ``Traceback`` on stderr;
* ``hang/memory``: a timeout, a kill by a signal, ``MemoryError``/"out of CPU memory", a peak RSS
  above the bound, or a process of the case (or a child of a killed one) still alive afterwards;
* ``silent``: a refusal was expected and the command exited 0, a refusal left an output behind,
  or a case-specific postcondition failed (a fused model computes something else, a half-written
  folder, a success that did not happen);
* ``handled``: a refusal (non-zero exit, no traceback, nothing written) or a correct success.

Remarks that do not change the class (a refusal with exit status other than 2, a message without
the expected words, more than one ``error`` line) are listed as notes. The run ends with one table
per kind, the list of every case not handled (id, class, command, exit status, last stderr line),
the notes, and the line ``N cases: X handled, ...``. It exits 0: it is a measurement.

From a clone (``make test`` once, or ``pip install -e '.[dev]'``, provides ``.venv``; the
``faults`` kind mounts small tmpfs folders when run as root and skips those cases otherwise)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile_sweep.py --out runs/hostile.json --table runs/hostile.md

``--kinds api images`` or ``--only ID ...`` select cases, ``--list`` lists them, ``--keep``
keeps the temporary folder. The whole sweep takes about 20-30 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("tampered", "quantize", "sweep", "calibrate-stripe", "bench", "api", "images", "faults")
CLASSES = ("handled", "lost", "traceback", "silent", "hang/memory")
SEVERITY = {"lost": 0, "traceback": 1, "hang/memory": 2, "silent": 3}
GIB = 1 << 30
TRAIN_FAST = ["--recipe", "digits", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16", "--threads",
              "1", "--no-progress"]
MEMORY_WORDS = ("MemoryError", "out of CPU memory", "Cannot allocate memory", "std::bad_alloc",
                "DefaultCPUAllocator: can't allocate")


# ----------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What one command did."""

    rc: int | None
    signal: int | None
    timed_out: bool
    wall_s: float
    peak_rss_mib: float
    stdout: str
    stderr: str

    @staticmethod
    def merge(results: Sequence[Result], main: Result) -> Result:
        """The main command's status, with every command's stderr (for tracebacks) and the largest peak."""
        err = "\n".join(r.stderr for r in results if r.stderr)
        return Result(main.rc, main.signal, any(r.timed_out for r in results), sum(r.wall_s for r in results),
                      max(r.peak_rss_mib for r in results), main.stdout, err)


class Child:
    """A process of a case in its own session, limited (RLIMIT_AS, nice), reaped with os.wait4."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], log: Path, as_limit: int,
                 stdout: int | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log.with_suffix(".out"), log.with_suffix(".err")
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in _reap
        self._err = open(self.err_path, "wb")  # noqa: SIM115

        def limits() -> None:  # runs in the child between fork and exec
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
            os.nice(5)

        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out if stdout is None else stdout, stderr=self._err,
                                     preexec_fn=limits, start_new_session=True)
        self.pid = self.proc.pid
        self.start = time.monotonic()
        self.status: int | None = None
        self.maxrss_kib = 0
        self.timed_out = False
        self.end = 0.0

    def _reap(self, status: int, usage: resource.struct_rusage) -> None:
        self.status, self.maxrss_kib, self.end = status, usage.ru_maxrss, time.monotonic()
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        self._out.close()
        self._err.close()

    def poll(self) -> bool:
        """True once the process has ended (and is reaped)."""
        if self.status is not None:
            return True
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self._reap(status, usage)
        return True

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def signal(self, sig: int, group: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def finish(self, timeout: float) -> Result:
        """Wait up to ``timeout`` seconds, then kill the process group; the result."""
        if not self.wait(timeout):
            self.timed_out = True
            self.signal(signal.SIGKILL, group=True)
            _, status, usage = os.wait4(self.pid, 0)
            self._reap(status, usage)
        return self.result()

    def result(self) -> Result:
        assert self.status is not None
        rc = os.waitstatus_to_exitcode(self.status)
        return Result(rc if rc >= 0 else None, -rc if rc < 0 else None, self.timed_out, self.end - self.start,
                      self.maxrss_kib / 1024, _read(self.out_path), _read(self.err_path))


def _read(path: Path, limit: int = 200_000) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) > limit:
        data = data[: limit // 2] + b"\n[...]\n" + data[-limit // 2:]
    return data.decode("utf-8", "replace")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...


def alive(pid: int) -> bool:
    """Running (a zombie is not)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (every case's command starts a session of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
                found.append(int(entry))
    return found


def children_of(pid: int) -> list[int]:
    """Direct children, as ``ps -o pid= --ppid PID`` lists them."""
    proc = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(x) for x in proc.stdout.split()]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in children_of(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------
# the sandbox: fixtures, victims and fingerprints
# ----------------------------------------------------------------------------------------------------
Snapshot = dict[str, tuple[Any, ...]]


def snapshot(root: Path, exclude: Iterable[Path] = ()) -> Snapshot:
    """Every entry under ``root`` (links not followed): kind, size and mtime; ``exclude`` subtrees skipped."""
    skip = {os.path.normpath(str(p)) for p in exclude}
    snap: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.normpath(full) in skip:
                continue
            if os.path.islink(full):
                snap[os.path.relpath(full, root)] = ("link", os.readlink(full))
            else:
                snap[os.path.relpath(full, root)] = ("dir",)
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if os.path.islink(full):
                snap[os.path.relpath(full, root)] = ("link", os.readlink(full))
            else:
                snap[os.path.relpath(full, root)] = ("file", st.st_size, st.st_mtime_ns, st.st_mode)
    return snap


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    out = []
    for k in sorted(set(before) | set(after)):
        if k not in before:
            out.append(f"+{k}")
        elif k not in after:
            out.append(f"-{k}")
        elif before[k] != after[k]:
            out.append(f"~{k}")
    return out


def fingerprint(root: Path) -> dict[str, str]:
    """Every entry's content hash (hidden files included), for the victim folders."""
    fp: dict[str, str] = {}
    if not root.exists():
        return {"": "missing"}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            if full.is_symlink():
                fp[rel] = "link:" + os.readlink(full)
            elif full.is_dir():
                fp[rel] = "dir"
            elif full.is_file():
                fp[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
            else:
                fp[rel] = "special"
    return fp


@dataclass
class Victim:
    """A folder of somebody's files that no case may change; restored after a case that did."""

    path: Path
    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    fp: dict[str, str] = field(default_factory=dict)

    def record(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=False):
            for name in dirnames + filenames:
                full = Path(dirpath, name)
                rel = str(full.relative_to(self.path))
                if full.is_symlink():
                    self.links[rel] = os.readlink(full)
                elif full.is_dir():
                    self.dirs.append(rel)
                else:
                    self.files[rel] = full.read_bytes()
        self.fp = fingerprint(self.path)

    def changed(self) -> list[str]:
        now = fingerprint(self.path)
        return [f"{'+' if k not in self.fp else '-' if k not in now else '~'}{k}"
                for k in sorted(set(self.fp) | set(now)) if self.fp.get(k) != now.get(k)]

    def restore(self) -> None:
        if self.path.is_symlink() or self.path.is_file():
            self.path.unlink()
        elif self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        for d in sorted(self.dirs):
            (self.path / d).mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            (self.path / rel).write_bytes(data)
        for rel, target in self.links.items():
            os.symlink(target, self.path / rel)
        self.fp = fingerprint(self.path)


class Sandbox:
    """The temporary folder: fixtures (built once), victims, one folder per case, logs."""

    def __init__(self, root: Path, as_limit: int, verbose: bool) -> None:
        self.root = root
        self.fix = root / "fix"
        self.cases = root / "cases"
        self.logs = root / "_logs"
        self.as_limit = as_limit
        self.verbose = verbose
        self.paths: dict[str, str] = {}
        self.victims: list[Victim] = []
        self.built: set[str] = set()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop("HS_UNSET_VARIABLE", None)
        self.tmpfs_ok: bool | None = None
        self.mounts: list[Path] = []

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def cli(self, args: list[str], cwd: Path, name: str, timeout: float = 300) -> Result:
        child = Child([sys.executable, "-m", "foldattn.cli", *args], cwd, self.env, self.logs / "fixtures" / name,
                      self.as_limit)
        res = child.finish(timeout)
        if res.rc != 0:
            raise RuntimeError(f"fixture {name} failed ({res.rc}): {res.stderr[-2000:]}")
        return res

    def build(self) -> None:
        """The fixtures every case may read (about a minute on two cores)."""
        for d in (self.fix, self.cases, self.logs):
            d.mkdir(parents=True)
        t0 = time.monotonic()
        self.paths.update(RUN=str(self.fix / "RUN"), SE=str(self.fix / "SE"), VRUN=str(self.root / "victim_run"),
                          DEPDIR=str(self.fix / "DEP"), DEP=str(self.fix / "DEP" / "deployed.safetensors"),
                          IMG=str(self.fix / "IMG"), VICTIM=str(self.root / "victim"),
                          SECRET=str(self.fix / "secret" / "secret.pth"), ROOT=str(self.root))
        self.log("fixtures: training the ASR(SE), SE and plain digits runs, folding, drawing images ...")
        base = ["train", "--recipe", "digits", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
                "--threads", "1", "--no-progress"]
        self.cli([*base, "--attention", "se", "--asr", "-o", self.paths["RUN"]], self.fix, "run")
        self.cli([*base, "--attention", "se", "-o", self.paths["SE"]], self.fix, "se")
        self.cli([*base, "-o", self.paths["VRUN"]], self.root, "victim_run")  # somebody's finished run
        self.cli(["fold", self.paths["RUN"], "-o", self.paths["DEPDIR"]], self.fix, "dep")
        # an image folder with the digits' class names (0..9), 16x16
        img = Path(self.paths["IMG"])
        for k in range(10):
            for i in range(3):
                png(img / str(k) / f"{i}.png", (16, 16), color=(k * 25, i * 60, 128))
        # somebody's files: names foldattn writes too, hidden files, a nested folder, a link
        victim = Path(self.paths["VICTIM"])
        (victim / "sub").mkdir(parents=True)
        (victim / "notes.txt").write_text("my notes, not foldattn's\n")
        (victim / ".hidden").write_bytes(os.urandom(64))
        (victim / "last.pt").write_bytes(b"not a checkpoint: somebody's file named last.pt\n")
        (victim / "summary.json").write_text('{"mine": true}\n')
        (victim / "bench.json").write_text('{"mine": true}\n')
        (victim / "deployed.safetensors").write_bytes(b"somebody's bytes")
        (victim / "sub" / "data.bin").write_bytes(os.urandom(4096))
        os.symlink("notes.txt", victim / "link-to-notes")
        secret = Path(self.paths["SECRET"])
        secret.parent.mkdir(parents=True)
        torch = _torch()
        torch.save(torch.nn.Linear(2, 2).state_dict(), secret)
        for key in ("VICTIM", "VRUN"):
            v = Victim(Path(self.paths[key]))
            v.record()
            self.victims.append(v)
        self.log(f"fixtures: ready in {time.monotonic() - t0:.0f} s under {self.root}")

    def need(self, name: str) -> None:
        """Fixtures only some cases use, built on first use."""
        if name in self.built:
            return
        if name == "SWEEP":
            folder = self.fix / "SWEEP"
            folder.mkdir()
            (folder / "s.yaml").write_text(SWEEP_TINY)
            self.log("fixtures: a finished two-arm sweep ...")
            self.cli(["sweep", str(folder / "s.yaml"), "-o", str(folder / "out")], folder, "sweep", timeout=400)
            self.paths["SWEEP"] = str(folder / "out")
            self.paths["SWEEPFILE"] = str(folder / "s.yaml")
        elif name == "TMPFS" and self.tmpfs_ok is None:
            probe = self.fix / "tmpfs-probe"
            probe.mkdir()
            ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                capture_output=True, check=False).returncode == 0
            if ok:
                subprocess.run(["umount", str(probe)], check=False)
            probe.rmdir()
            self.tmpfs_ok = ok
        self.built.add(name)

    def mount(self, where: Path, size: str, ro: bool = False) -> None:
        where.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True, capture_output=True)
        self.mounts.append(where)

    def unmount_all(self) -> None:
        while self.mounts:
            where = self.mounts.pop()
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def _torch() -> Any:
    import torch

    torch.set_num_threads(1)
    return torch


# ----------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------
Setup = Callable[["Ctx"], None]
Problems = list[tuple[str, str]]
Post = Callable[["Ctx", Result], Problems]


@dataclass
class Case:
    """One hostile input: a command line (``argv``, after ``foldattn``) or library code (``code``)."""

    id: str
    kind: str
    argv: list[str] | None = None
    code: str | None = None
    expect: str = "refuse"  # refuse | ok | either | driver
    message: str | None = None  # words the refusal should contain
    setup: Setup | None = None
    post: Post | None = None
    outputs: tuple[str, ...] = ()  # paths under the case folder the command may create
    timeout: float = 60
    driver: Callable[[Ctx], tuple[Result, Problems]] | None = None
    needs: tuple[str, ...] = ()
    audit: bool = False  # run under an audit hook: no network, no opening the secret or the victims
    network_ok: bool = False  # the case asks for a download itself: the (blocked) attempt is no finding
    ok_codes: tuple[int, ...] = (0,)  # exit statuses that mean it ran (sweep, bench --strict: 1 = a run/target failed)
    teardown: Callable[[Ctx], None] | None = None


@dataclass
class Ctx:
    """A case being run: its folder and the sandbox's placeholders."""

    sb: Sandbox
    case: Case
    c: Path
    children: list[Child] = field(default_factory=list)

    def sub(self, text: str) -> str:
        """Replace {RUN}, {C}, ... (only the known upper-case names; code keeps its own braces)."""
        for key, value in {**self.sb.paths, "C": str(self.c)}.items():
            text = text.replace("{" + key + "}", value)
        return text

    def p(self, text: str) -> Path:
        return Path(self.sub(text))

    def spawn(self, args: list[str], name: str, stdout: int | None = None, code: str | None = None,
              env: dict[str, str] | None = None) -> Child:
        cmd = [sys.executable, "-c", code, *args] if code is not None else \
            [sys.executable, "-m", "foldattn.cli", *args]
        child = Child(cmd, self.c, {**self.sb.env, **(env or {})}, self.sb.logs / self.case.id / name,
                      self.sb.as_limit, stdout)
        self.children.append(child)
        return child

    def run(self, args: list[str], name: str, timeout: float = 60) -> Result:
        return self.spawn([self.sub(a) for a in args], name).finish(timeout)


# --- helpers the cases' setups use (run in this process) ---------------------------------------------
def png(path: Path, size: tuple[int, int], color: tuple[int, int, int] = (90, 120, 150), mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def tree(root: Path, classes: Sequence[str] = ("a", "b"), per: int = 4, size: tuple[int, int] = (12, 12)) -> None:
    for k, cls in enumerate(classes):
        for i in range(per):
            png(root / cls / f"{i + 1}.png", size, color=(40 * k + 10, 30 * i, 200 - 40 * k))


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (8-bit RGB), with the IDAT given."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tamper(src: Path, dest: Path, *changes: Callable[[dict[str, Any]], None]) -> None:
    torch = _torch()
    blob = torch.load(src, weights_only=True)
    for change in changes:
        change(blob)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, dest)


def _subst(value: Any) -> Any:
    """{RUN}, {C}, ... replaced in strings (and in the strings of lists and mappings)."""
    if isinstance(value, str):
        for key, path in _P.items():
            value = value.replace("{" + key + "}", path)
        return value
    if isinstance(value, list):
        return [_subst(v) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v) for k, v in value.items()}
    return value


def S(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set ``blob[a][b]... = value`` (a checkpoint entry; placeholders in strings replaced)."""
    def change(blob: dict[str, Any]) -> None:
        *parents, leaf = dotted.split(".")
        for p in parents:
            blob = blob[p]
        blob[leaf] = _subst(value)
    return change


def W(key: str, fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    """Change one weight of the checkpoint's model."""
    def change(blob: dict[str, Any]) -> None:
        blob["model"][key] = fn(blob["model"][key])
    return change


def ck(src: str, *changes: Callable[[dict[str, Any]], None], name: str = "x.pt") -> Setup:
    """Setup: a tampered copy of a fixture run's last.pt at {C}/name."""
    def setup(cx: Ctx) -> None:
        tamper(cx.p(src) / "last.pt", cx.c / name, *changes)
    return setup


def runcopy(src: str, dest: str = "R", *changes: Callable[[dict[str, Any]], None]) -> Setup:
    """Setup: a copy of a run folder at {C}/dest, its last.pt and best.pt tampered."""
    def setup(cx: Ctx) -> None:
        shutil.copytree(cx.p(src), cx.c / dest, symlinks=True)
        if changes:
            for name in ("last.pt", "best.pt"):
                tamper(cx.c / dest / name, cx.c / dest / name, *changes)
    return setup


def text(name: str, content: str) -> Setup:
    def setup(cx: Ctx) -> None:
        path = cx.c / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cx.sub(content))
    return setup


def raw(name: str, data: bytes) -> Setup:
    def setup(cx: Ctx) -> None:
        path = cx.c / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return setup


def link(name: str, target: str) -> Setup:
    def setup(cx: Ctx) -> None:
        path = cx.c / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(cx.sub(target), path)
    return setup


def mkdir(*names: str) -> Setup:
    def setup(cx: Ctx) -> None:
        for n in names:
            (cx.c / n).mkdir(parents=True, exist_ok=True)
    return setup


def do(fn: Callable[[Path], None]) -> Setup:
    def setup(cx: Ctx) -> None:
        fn(cx.c)
    return setup


def steps(*setups: Setup) -> Setup:
    def setup(cx: Ctx) -> None:
        for s in setups:
            s(cx)
    return setup


def tmpfs(name: str, size: str, ro: bool = False, then: Setup | None = None) -> Setup:
    """Setup: a small tmpfs at {C}/name (a full disk or a read-only folder), filled by ``then`` first."""
    def setup(cx: Ctx) -> None:
        if then is not None and not ro:
            cx.sb.mount(cx.c / name, size)
            then(cx)
        elif then is not None:  # fill, then remount read-only
            cx.sb.mount(cx.c / name, size)
            then(cx)
            subprocess.run(["mount", "-o", "remount,ro", str(cx.c / name)], check=True, capture_output=True)
        else:
            cx.sb.mount(cx.c / name, size, ro=ro)
    return setup


# --- postconditions ----------------------------------------------------------------------------------
def strict_json(path: Path) -> Any:
    def bad(word: str) -> Any:
        raise ValueError(f"non-standard JSON constant {word}")
    return json.loads(path.read_text(), parse_constant=bad)


def exists(*names: str) -> Post:
    def post(cx: Ctx, res: Result) -> Problems:
        if res.rc != 0:
            return []
        missing = [n for n in names if not cx.p(n).exists()]
        return [("silent", f"exit 0 but {', '.join(missing)} missing")] if missing else []
    return post


def json_ok(*names: str) -> Post:
    """Each file exists (after a success) and is strict JSON (no NaN/Infinity)."""
    def post(cx: Ctx, res: Result) -> Problems:
        if res.rc != 0:
            return []
        for n in names:
            path = cx.p(n)
            if not path.exists():
                return [("silent", f"exit 0 but {n} is missing")]
            try:
                strict_json(path)
            except ValueError as e:
                return [("silent", f"{n} is not strict JSON: {e}")]
        return []
    return post


def ckpt_field(path: str, dotted: str, want: Any) -> Post:
    """After a success, the checkpoint's entry equals ``want`` (type included)."""
    def post(cx: Ctx, res: Result) -> Problems:
        if res.rc != 0:
            return []
        torch = _torch()
        blob: Any = torch.load(cx.p(path), weights_only=True)
        for part in dotted.split("."):
            blob = blob[part]
        if blob != want or type(blob) is not type(want):
            return [("silent", f"{dotted} is {blob!r} ({type(blob).__name__}), expected {want!r}")]
        return []
    return post


def loadable(path: str, epoch: int | None = None) -> Post:
    """The checkpoint is whole (loads) and, if given, records this epoch; no temporary files beside it."""
    def post(cx: Ctx, res: Result) -> Problems:
        p = cx.p(path)
        if not p.exists():
            return [("silent", f"{path} is gone")]
        try:
            blob = _torch().load(p, weights_only=True)
        except Exception as e:
            return [("silent", f"{p.name} no longer loads: {type(e).__name__}: {str(e)[:120]}")]
        if epoch is not None and blob.get("epoch") != epoch:
            return [("silent", f"{p.name} records epoch {blob.get('epoch')}, expected {epoch}")]
        left = [q.name for q in p.parent.iterdir() if q.name.endswith(".tmp")]
        return [("silent", f"temporary files left: {left}")] if left else []
    return post


def no_tmp(folder: str) -> Post:
    def post(cx: Ctx, res: Result) -> Problems:
        p = cx.p(folder)
        left = [q.name for q in p.iterdir() if q.name.endswith(".tmp")] if p.is_dir() else []
        return [("silent", f"temporary files left in {folder}: {left}")] if left else []
    return post


def posts(*fns: Post) -> Post:
    def post(cx: Ctx, res: Result) -> Problems:
        out: Problems = []
        for f in fns:
            out += f(cx, res)
        return out
    return post


def unchanged_files(folder: str, names: Sequence[str]) -> Post:
    """Somebody's files in a folder a command was told to write into keep their bytes."""
    def post(cx: Ctx, res: Result) -> Problems:
        bad = []
        for n in names:
            p = cx.p(folder) / n
            if not p.exists() or p.read_bytes() != THEIRS[n]:
                bad.append(n)
        return [("lost", f"somebody's files changed or deleted: {bad}")] if bad else []
    return post


THEIRS = {"notes.txt": b"their notes\n", ".hidden": b"hidden bytes", "data.csv": b"a,b\n1,2\n"}


def theirs(folder: str) -> Setup:
    def setup(cx: Ctx) -> None:
        (cx.c / folder).mkdir(parents=True, exist_ok=True)
        for n, data in THEIRS.items():
            (cx.c / folder / n).write_bytes(data)
    return setup


# ----------------------------------------------------------------------------------------------------
# the audit wrapper (no network; the secret and the victims are never opened)
# ----------------------------------------------------------------------------------------------------
AUDIT = textwrap.dedent('''
    import json, os, sys
    forbid = [p for p in os.environ.get("HS_FORBID", "").split(os.pathsep) if p]
    seen = {"forbidden": [], "network": []}
    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(args[0]))
            if any(p == f or p.startswith(f + os.sep) for f in forbid):
                seen["forbidden"].append(p)
        elif event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request",
                       "http.client.connect"):
            seen["network"].append(event)
            raise OSError("network access blocked by hostile_sweep: " + event)
    def dump():
        with open(os.environ["HS_AUDIT_LOG"], "w") as f:
            json.dump(seen, f)
    import atexit
    atexit.register(dump)
    sys.addaudithook(hook)
    from foldattn.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def audit_post(cx: Ctx, res: Result, network_ok: bool = False) -> Problems:
    log = cx.c / "audit.json"
    if not log.exists():
        return []
    seen = json.loads(log.read_text())
    out: Problems = []
    if seen["network"] and not network_ok:
        out.append(("silent", f"tried the network: {sorted(set(seen['network']))}"))
    if seen["forbidden"]:
        out.append(("silent", f"opened files it must not read: {sorted(set(seen['forbidden']))[:3]}"))
    return out


# ----------------------------------------------------------------------------------------------------
# the library API cases: code run with `python -c`
# ----------------------------------------------------------------------------------------------------
API_PRELUDE = textwrap.dedent('''
    import json, math, os, sys, warnings
    import torch
    from torch import nn
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import foldattn
    from foldattn import fold, verify, attach, save_deployed, load_deployed
    CLEAN = (ValueError, TypeError, OSError, NotImplementedError, foldattn.EquivalenceError)
    C = sys.argv[1]

    def fail(msg):
        print("POSTCONDITION FAILED: " + msg, file=sys.stderr)
        sys.exit(3)

    def rnd(m, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    if mod.running_mean is not None:
                        mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.5)
                        mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
                    if mod.weight is not None:
                        mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
            for n, p in m.named_parameters():
                if n.endswith("psi"):
                    p.copy_(torch.randn(p.shape, generator=g))
        return m

    def flat(y):
        if torch.is_tensor(y):
            return [y]
        if isinstance(y, dict):
            return [v for k in sorted(y) for v in flat(y[k])]
        return [v for t in y for v in flat(t)]

    def run(m, x):
        m.eval()
        with torch.no_grad():
            return flat(m(*x) if isinstance(x, tuple) else m(x))

    def same(a, b, x, what="the folded model"):
        ya, yb = run(a, x), run(b, x)
        if len(ya) != len(yb):
            fail(f"{what} returns {len(yb)} tensors, the model {len(ya)}")
        for u, v in zip(ya, yb):
            if u.shape != v.shape:
                fail(f"{what} returns shape {tuple(v.shape)}, the model {tuple(u.shape)}")
            err = (u - v).abs().max().item()
            if not err <= 1e-4 * max(1.0, u.abs().max().item()):
                fail(f"{what} computes something else: max abs difference {err:.3g}")

    class Block(nn.Module):
        def __init__(self, c=4):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        def forward(self, x):
            return x + self.bn(self.conv(x))

    def resnet():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(), Block(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))

    def asr_net():
        return rnd(attach(rnd(resnet()), "se"))

    def rewrite(src, dest, meta_change=None, tensor_change=None):
        from safetensors import safe_open
        from safetensors.torch import save_file
        from foldattn.deploy import _checksum
        with safe_open(str(src), "pt") as f:
            meta = json.loads(f.metadata()["foldattn"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if tensor_change is not None:
            tensor_change(tensors)
            meta["checksum"] = _checksum(tensors)  # a careful attacker recomputes it
        if meta_change is not None:
            meta = meta_change(meta) or meta
        save_file(tensors, str(dest), metadata={"foldattn": json.dumps(meta)})
        j = os.path.splitext(str(dest))[0] + ".json"
        if os.path.exists(j):
            os.remove(j)
        return dest

    def must_load(path, **kw):
        """A file save_deployed wrote must load: its refusal here is a finding, not a clean refusal."""
        try:
            return load_deployed(path, **kw)
        except CLEAN as e:
            fail(f"save_deployed wrote a file load_deployed refuses: {type(e).__name__}: {str(e)[:200]}")

    def good_file():
        path = os.path.join(C, "good.safetensors")
        save_deployed(foldattn.create_model("cifar_resnet20"), path)
        return path
''')


def api_code(body: str) -> str:
    return API_PRELUDE + "try:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + textwrap.dedent('''
        except CLEAN as e:
            print("error: " + type(e).__name__ + ": " + " | ".join(str(e).splitlines()), file=sys.stderr)
            sys.exit(2)
        print("ok")
    ''')


def api(cid: str, body: str, expect: str = "either", message: str | None = None,
        outputs: tuple[str, ...] = ()) -> Case:
    return Case(cid, "api", code=api_code(body), expect=expect, message=message,
                outputs=("good.safetensors", "good.json", *outputs))


# ----------------------------------------------------------------------------------------------------
# the case list
# ----------------------------------------------------------------------------------------------------
SWEEP_TINY = textwrap.dedent('''\
    base: [--recipe, digits, --epochs, "1", --steps-per-epoch, "1", --batch-size, "16"]
    arms:
      plain: []
      asr: [--attention, se, --asr]
    seeds: [0]
    baseline: plain
    jobs: 1
    threads: 1
''')


def sweep_file(arms: str = "  plain: []\n  asr: [--attention, se, --asr]\n", seeds: str = "[0]",
               extra: str = "", base: str = '[--recipe, digits, --epochs, "1", --steps-per-epoch, "1"]') -> str:
    return f"base: {base}\narms:\n{arms}seeds: {seeds}\nbaseline: plain\n{extra}"


def tampered_cases() -> list[Case]:
    T = "tampered"
    fold_o = ["-o", "{C}/o"]
    resume2 = ["--epochs", "2", "--allow-config-change", "--no-progress"]
    cases = [
        # recorded output folders and copies of runs (the cp -r RA RB finding and variants)
        Case("resume-copy-of-victim-run", T, ["train", "--resume", "{C}/RB", *resume2], expect="either",
             setup=runcopy("{VRUN}", "RB"), outputs=("RB",), timeout=120,
             post=ckpt_field("{C}/RB/last.pt", "epoch", 2)),
        Case("resume-output-names-victim-run", T, ["train", "--resume", "{C}/R", *resume2], expect="either",
             setup=runcopy("{RUN}", "R", S("config.output", "{VRUN}")), outputs=("R",), timeout=120),
        Case("resume-output-relative-dotdot", T, ["train", "--resume", "{C}/R", *resume2], expect="either",
             setup=runcopy("{RUN}", "R", S("config.output", "../../victim_run")), outputs=("R",), timeout=120),
        Case("resume-output-symlink-to-victim", T, ["train", "--resume", "{C}/R", *resume2], expect="either",
             setup=steps(link("lnk", "{VICTIM}"), runcopy("{RUN}", "R", S("config.output", "{C}/lnk"))),
             outputs=("R",), timeout=120),
        Case("resume-output-root", T, ["train", "--resume", "{C}/R", *resume2], expect="either",
             setup=runcopy("{RUN}", "R", S("config.output", "/")), outputs=("R",), timeout=120),
        # recorded datasets that point elsewhere
        Case("eval-recorded-imagefolder-usr-share", T, ["eval", "{C}/x.pt"],
             setup=ck("{RUN}", S("config.dataset", "imagefolder:/usr/share"),
                      S("run.dataset", "imagefolder:/usr/share"))),
        Case("eval-recorded-imagefolder-proc", T, ["eval", "{C}/x.pt"],
             setup=ck("{RUN}", S("config.dataset", "imagefolder:/proc"), S("run.dataset", "imagefolder:/proc"))),
        Case("eval-recorded-imagefolder-root", T, ["eval", "{C}/x.pt"],
             setup=ck("{RUN}", S("config.dataset", "imagefolder:/"), S("run.dataset", "imagefolder:/"))),
        Case("eval-recorded-imagefolder-victim", T, ["eval", "{C}/x.pt"],
             setup=ck("{RUN}", S("config.dataset", "imagefolder:../../victim"))),
        Case("eval-recorded-download-cifar10", T, ["eval", "{C}/x.pt"], audit=True,
             setup=ck("{RUN}", S("config.dataset", "cifar10"), S("config.download", True),
                      S("config.data_dir", "{C}/dl"))),
        Case("stripe-recorded-imagefolder-usr", T, ["stripe", "{C}/x.pt", "--max-images", "8", "--samples", "4",
                                                     "-o", "{C}/s"],
             setup=ck("{SE}", S("config.dataset", "imagefolder:/usr"))),
        Case("calibrate-recorded-imagefolder-etc", T, ["calibrate", "{C}/x.pt", "--max-images", "8", "-o", "{C}/c"],
             setup=ck("{SE}", S("config.dataset", "imagefolder:/etc"))),
        Case("quantize-recorded-imagefolder-proc-self", T, ["quantize", "{C}/x.pt", "-o", "{C}/q"],
             setup=ck("{RUN}", S("config.dataset", "imagefolder:/proc/self"))),
        Case("eval-recorded-cache-dir-victim", T, ["eval", "{C}/x.pt", "--batch-size", "8"], expect="either",
             setup=ck("{RUN}", S("config.dataset", "imagefolder:{IMG}"), S("config.cache_dir", "{VICTIM}"),
                      S("config.image_size", 16))),
        # recorded sizes (the 19 GB verify batch, and the commands other than fold)
        Case("eval-recorded-image-size-8192", T, ["eval", "{C}/x.pt", "--batch-size", "8"], expect="either",
             setup=ck("{RUN}", S("run.image_size", [8192, 8192]))),
        Case("export-pt2-recorded-image-size-8192", T, ["export", "{C}/x.pt", "--pt2", "{C}/m.pt2"],
             expect="either", setup=ck("{RUN}", S("run.image_size", [8192, 8192])), outputs=("m.pt2",)),
        Case("fold-recorded-image-size-1x8192", T, ["fold", "{C}/x.pt", *fold_o], expect="either",
             setup=ck("{RUN}", S("run.image_size", [1, 8192])), outputs=("o",)),
        Case("fold-recorded-image-size-float", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", S("run.image_size", [16.5, 16]))),
        Case("fold-recorded-classes-0", T, ["fold", "{C}/x.pt", *fold_o], setup=ck("{RUN}", S("run.classes", 0))),
        Case("eval-recorded-three-class-names", T, ["eval", "{C}/x.pt"],
             setup=ck("{RUN}", S("run.class_names", ["a", "b", "c"]))),
        Case("fold-recorded-mean-nan", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", S("run.preprocessing", {"mean": [float("nan")] * 3, "std": [0.3] * 3,
                                                       "size": [16, 16]}))),
        Case("eval-recorded-std-zero", T, ["eval", "{C}/x.pt"],
             setup=ck("{RUN}", S("run.preprocessing", {"mean": [0.3] * 3, "std": [0.0] * 3, "size": [16, 16]}))),
        # recorded training options
        Case("resume-config-lr-string", T, ["train", "--resume", "{C}/R", *resume2],
             setup=runcopy("{RUN}", "R", S("config.lr", "1e-3")), outputs=("R",)),
        Case("resume-config-epochs-1e12", T, ["train", "--resume", "{C}/R"],
             setup=runcopy("{RUN}", "R", S("config.epochs", 10**12)), outputs=("R",)),
        Case("resume-config-threads-100000", T, ["train", "--resume", "{C}/R", *resume2],
             setup=runcopy("{RUN}", "R", S("config.threads", 100_000)), outputs=("R",)),
        Case("resume-config-workers-1e6", T, ["train", "--resume", "{C}/R", *resume2],
             setup=runcopy("{RUN}", "R", S("config.workers", 10**6), S("config.stream", True)), outputs=("R",)),
        Case("resume-config-batch-1e9", T, ["train", "--resume", "{C}/R", *resume2],
             setup=runcopy("{RUN}", "R", S("config.batch_size", 10**9)), outputs=("R",)),
        Case("fold-config-unknown-field", T, ["fold", "{C}/x.pt", *fold_o], expect="either",
             setup=ck("{RUN}", S("config.evil", "rm -rf /")), outputs=("o",)),
        Case("fold-config-device-cuda7", T, ["fold", "{C}/x.pt", *fold_o], expect="either",
             setup=ck("{RUN}", S("config.device", "cuda:7")), outputs=("o",)),
        Case("resume-config-pretrained-secret", T, ["train", "--resume", "{C}/R", *resume2], expect="either",
             audit=True, setup=runcopy("{RUN}", "R", S("config.pretrained", "{SECRET}")), outputs=("R",),
             timeout=120),
        Case("fold-model-kwargs-2-24-classes", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", S("config.model_kwargs", {"num_classes": 2**24}))),
        Case("resume-epoch-past-the-end", T, ["train", "--resume", "{C}/R"], expect="either",
             setup=runcopy("{RUN}", "R", S("epoch", 5)), outputs=("R",)),
        Case("resume-optimizer-state-wrong-shapes", T, ["train", "--resume", "{C}/R", *resume2],
             setup=runcopy("{RUN}", "R", lambda b: [s.update(momentum_buffer=_torch().zeros(3))
                                                    for s in b["optimizer"]["state"].values()]),
             outputs=("R",)),
        Case("fold-model-extra-key", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", lambda b: b["model"].update({"evil.weight": _torch().zeros(3)}))),
        Case("fold-truncated-checkpoint", T, ["fold", "{C}/x.pt", *fold_o],
             setup=do(lambda c: (c / "x.pt").write_bytes((Path(_P["RUN"]) / "last.pt").read_bytes()[:700_000]))),
        Case("eval-zero-byte-checkpoint", T, ["eval", "{C}/x.pt"], setup=raw("x.pt", b"")),
        Case("fold-checkpoint-symlink-dev-zero", T, ["fold", "{C}/r/last.pt", *fold_o],
             setup=link("r/last.pt", "/dev/zero")),
        Case("fold-pickle-bomb-in-torch-zip", T, ["fold", "{C}/x.pt", *fold_o], setup=do(_evil_zip)),
        Case("fold-plain-pickle-os-system", T, ["fold", "{C}/x.pt", *fold_o], setup=do(_evil_pickle)),
        Case("fold-format-version-2", T, ["fold", "{C}/x.pt", *fold_o], setup=ck("{RUN}", S("version", 2))),
        Case("fold-format-foreign", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", S("format", "lightning-checkpoint"))),
        Case("fold-nan-weights", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", W("conv1.weight", lambda t: t * float("nan")))),
        Case("fold-negative-running-var", T, ["fold", "{C}/x.pt", *fold_o],
             setup=ck("{RUN}", W("bn1.running_var", lambda t: -t))),
        # deployed files on the command line
        Case("fold-a-deployed-file", T, ["fold", "{DEP}", *fold_o], expect="either", outputs=("o",)),
        Case("export-a-deployed-file", T, ["export", "{DEP}", "--onnx", "{C}/m.onnx"], expect="either",
             outputs=("m.onnx",), post=exists("{C}/m.onnx"), timeout=90),
        Case("eval-deployed-without-dataset", T, ["eval", "{DEP}"], expect="either"),
        Case("eval-deployed-digits", T, ["eval", "{DEP}", "--dataset", "digits"], expect="ok"),
        Case("eval-deployed-nan-weights", T, ["eval", "{C}/d.safetensors", "--dataset", "digits"],
             setup=do(lambda c: _deployed_variant(c, "nan"))),
        Case("eval-deployed-json-copy-for-other-weights", T, ["eval", "{C}/d.safetensors", "--dataset", "digits"],
             message="another weights file", setup=do(lambda c: _deployed_variant(c, "json-other"))),
        Case("eval-deployed-json-copy-kwargs-edited", T, ["eval", "{C}/d.safetensors", "--dataset", "digits"],
             expect="ok", setup=do(lambda c: _deployed_variant(c, "json"))),
        Case("eval-deployed-builder-weights-default", T, ["eval", "{C}/d.safetensors", "--dataset", "digits"],
             audit=True, setup=do(lambda c: _deployed_variant(c, "weights"))),
        Case("eval-deployed-metadata-2mb", T, ["eval", "{C}/d.safetensors", "--dataset", "digits"],
             setup=do(lambda c: _deployed_variant(c, "huge"))),
        Case("eval-deployed-json-copy-dev-zero", T, ["eval", "{C}/d.safetensors", "--dataset", "digits"],
             expect="either", setup=do(lambda c: _deployed_variant(c, "devzero"))),
        # -c configs (YAML)
        Case("config-duplicate-key", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             message="twice", setup=text("c.yaml", "epochs: 1\nlr: 0.1\nepochs: 2\n")),
        Case("config-lr-1e-3-is-a-number", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             expect="ok", setup=text("c.yaml", "lr: 1e-3\n"), outputs=("o",), timeout=90,
             post=ckpt_field("{C}/o/last.pt", "config.lr", 0.001)),
        Case("config-momentum-dot-9", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             expect="ok", setup=text("c.yaml", "momentum: .9\nweight-decay: 5E-4\n"), outputs=("o",), timeout=90,
             post=ckpt_field("{C}/o/last.pt", "config.weight_decay", 0.0005)),
        Case("config-duplicate-key-in-model-kwargs", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "model: cifar_vit_tiny\nmodel-kwargs:\n  depth: 2\n  depth: 3\n")),
        Case("config-epochs-yes", T, ["train", "-c", "{C}/c.yaml", "--no-progress", "-o", "{C}/o"],
             setup=text("c.yaml", "recipe: digits\nepochs: yes\n")),
        Case("config-output-victim-folder", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST],
             setup=text("c.yaml", "output: {VICTIM}\n")),
        Case("config-python-object-tag", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "epochs: !!python/object/apply:os.system ['touch {C}/pwned']\n")),
        Case("config-binary-tag", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "seed: !!binary aGVsbG8=\n")),
        Case("config-lr-nan", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "lr: .nan\n")),
        Case("config-epochs-1e400", T, ["train", "-c", "{C}/c.yaml", "--recipe", "digits", "-o", "{C}/o"],
             setup=text("c.yaml", "epochs: 1e400\n")),
        Case("config-seed-a-date", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "seed: 2024-01-01\n")),
        Case("config-symlink-dev-urandom", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=link("c.yaml", "/dev/urandom")),
        Case("config-utf8-bom", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"], expect="either",
             setup=raw("c.yaml", "\ufeffepochs: 1\n".encode()), outputs=("o",), timeout=90),
        Case("config-empty-file", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"], expect="either",
             setup=raw("c.yaml", b""), outputs=("o",), timeout=90),
        Case("config-includes-config", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "config: {C}/c.yaml\n")),
        Case("config-download-cifar10", T, ["train", "-c", "{C}/c.yaml", "--no-progress", "-o", "{C}/o"],
             audit=True, network_ok=True, message="download",
             setup=steps(mkdir("dl"), text("c.yaml", "dataset: cifar10\ndownload: true\ndata-dir: {C}/dl\n"
                                                     "epochs: 1\n"))),
        Case("config-timm-checkpoint-path-secret", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             audit=True, setup=text("c.yaml", "model: timm:resnet18\nmodel-kwargs:\n  checkpoint_path: {SECRET}\n")),
        Case("config-vit-32px-on-16px-digits", T, ["train", "-c", "{C}/c.yaml", *TRAIN_FAST, "-o", "{C}/o"],
             setup=text("c.yaml", "model: cifar_vit_tiny\nmodel-kwargs: depth=2\n")),
    ]
    return cases


_P: dict[str, str] = {}  # the sandbox's placeholders, for setups that read fixtures directly


def _evil_zip(c: Path) -> None:
    """A torch zip whose pickle runs os.system when unpickled without weights_only."""
    torch = _torch()

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {c}/pwned",))

    torch.save({"format": "foldattn-checkpoint", "model": Evil()}, c / "x.pt")


def _evil_pickle(c: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {c}/pwned",))

    (c / "x.pt").write_bytes(pickle.dumps({"model": Evil()}))


def _deployed_variant(c: Path, how: str) -> None:
    """A copy of the fixture's deployed file, tampered (checksums recomputed where that is the attack)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from foldattn.deploy import _checksum

    src = Path(_P["DEP"])
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["foldattn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    dest = c / "d.safetensors"
    if how == "nan":
        tensors["conv1.weight"] = tensors["conv1.weight"] * float("nan")
        meta["checksum"] = _checksum(tensors)
    elif how == "weights":
        meta["builder"], meta["kwargs"] = "torchvision.models:resnet18", {"weights": "DEFAULT"}
    elif how == "huge":
        meta["user"] = {"pad": "x" * (2 << 20)}
    save_file(tensors, str(dest), metadata={"foldattn": json.dumps(meta)})
    if how in ("json", "json-other"):
        shutil.copy(src.with_suffix(".json"), c / "d.json")
        doc = json.loads((c / "d.json").read_text())
        doc["kwargs"] = {"num_classes": 1000}  # the header decides what is built: harmless while file_sha256 matches
        if how == "json-other":
            doc["file_sha256"] = "sha256:" + hashlib.sha256(b"other weights").hexdigest()
        (c / "d.json").write_text(json.dumps(doc))
    elif how == "devzero":
        os.symlink("/dev/zero", c / "d.json")


def quantize_cases() -> list[Case]:
    Q = "quantize"
    small = ["--calib-images", "32", "--val-images", "64", "--batch-size", "32"]
    q = ["-o", "{C}/q"]
    files = ("{C}/q/model.onnx", "{C}/q/model.int8.onnx")
    return [
        Case("quantize-threads-100000", Q, ["quantize", "{RUN}", *q, "--threads", "100000"], message="--threads"),
        Case("quantize-threads-0", Q, ["quantize", "{RUN}", *q, "--threads", "0"], message="--threads"),
        Case("quantize-threads-9", Q, ["quantize", "{RUN}", *q, "--threads", "9"], message="--threads"),
        Case("quantize-small-into-empty-folder", Q, ["quantize", "{RUN}", *q, *small], expect="ok",
             setup=mkdir("q"), outputs=("q",), timeout=180,
             post=posts(exists(*files), json_ok("{C}/q/quantize.json"))),
        Case("quantize-deployed-digits", Q, ["quantize", "{DEP}", *q, *small, "--data", "digits"], expect="ok",
             outputs=("q",), timeout=180, post=posts(exists(*files), json_ok("{C}/q/quantize.json"))),
        Case("quantize-deployed-no-data", Q, ["quantize", "{DEP}", *q, *small], expect="either", outputs=("q",),
             timeout=180, post=json_ok("{C}/q/quantize.json")),
        Case("quantize-into-victim-folder", Q, ["quantize", "{RUN}", "-o", "{VICTIM}", *small],
             message="not empty"),
        Case("quantize-output-is-a-file", Q, ["quantize", "{RUN}", "-o", "{C}/f", *small], setup=raw("f", b"x")),
        Case("quantize-output-under-proc", Q, ["quantize", "{RUN}", "-o", "/proc/hostile-q", *small]),
        Case("quantize-overwrite-their-folder", Q, ["quantize", "{RUN}", "-o", "{C}/theirs", "--overwrite", *small],
             expect="either", setup=theirs("theirs"), outputs=("theirs",), timeout=180,
             post=unchanged_files("{C}/theirs", list(THEIRS))),
        Case("quantize-calib-images-0", Q, ["quantize", "{RUN}", *q, "--calib-images", "0"]),
        Case("quantize-val-images-negative", Q, ["quantize", "{RUN}", *q, "--val-images", "-1"]),
        Case("quantize-max-drop-nan", Q, ["quantize", "{RUN}", *q, "--max-drop", "nan"]),
        Case("quantize-data-imagefolder-proc", Q, ["quantize", "{RUN}", *q, "--data", "imagefolder:/proc"]),
        Case("quantize-data-cifar10-no-download", Q, ["quantize", "{RUN}", *q, "--data", "cifar10", "--data-dir",
                                                      "{C}/empty"], setup=mkdir("empty"), audit=True),
        Case("quantize-val-split-0", Q, ["quantize", "{RUN}", *q, "--val-split", "0"]),
        Case("quantize-val-split-all-images", Q, ["quantize", "{RUN}", *q, "--val-split", "1797"]),
        Case("quantize-batch-size-0", Q, ["quantize", "{RUN}", *q, "--batch-size", "0"]),
        Case("quantize-seed-negative", Q, ["quantize", "{RUN}", *q, "--seed", "-1"]),
        Case("quantize-nan-weights", Q, ["quantize", "{C}/x.pt", *q, *small],
             setup=ck("{RUN}", W("fc.weight", lambda t: t * float("nan")))),
        Case("quantize-huge-weights", Q, ["quantize", "{C}/x.pt", *q, *small],
             setup=ck("{RUN}", W("conv1.weight", lambda t: t * 1e38)), expect="either", outputs=("q",),
             timeout=180, post=exists(*files)),
        Case("quantize-missing-path", Q, ["quantize", "{C}/nope", *q]),
        Case("quantize-empty-run-folder", Q, ["quantize", "{C}/r", *q], setup=mkdir("r")),
        Case("quantize-which-best-on-a-file", Q, ["quantize", "{RUN}/last.pt", "--which", "best", *q, *small],
             expect="either", outputs=("q",), timeout=180),
        Case("quantize-recorded-val-split-huge", Q, ["quantize", "{C}/x.pt", *q, *small],
             setup=ck("{RUN}", S("config.val_split", 10**9))),
        Case("quantize-one-image", Q, ["quantize", "{RUN}", *q, "--calib-images", "1", "--val-images", "1"],
             expect="either", outputs=("q",), timeout=180, post=json_ok("{C}/q/quantize.json")),
        Case("quantize-a-plain-pickle", Q, ["quantize", "{C}/x.pt", *q], setup=do(_evil_pickle)),
    ]


def sweep_cases() -> list[Case]:
    W_ = "sweep"
    sw = ["-o", "{C}/sw"]

    def seeds_text(n: int) -> str:
        return "[" + ",".join(str(i) for i in range(n)) + "]"

    many_arms = "".join(f"  a{i}: [--lr, \"0.0{i + 1}\"]\n" for i in range(11))
    return [
        Case("sweep-150000-seeds", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(seeds=seeds_text(150_000)))),
        Case("sweep-100000-seeds-compact", W_, ["sweep", "{C}/s.yaml", *sw], message="seeds",
             setup=text("s.yaml", sweep_file(seeds=seeds_text(100_000)))),
        Case("sweep-11000-runs", W_, ["sweep", "{C}/s.yaml", "--dry-run", *sw], message="runs",
             setup=text("s.yaml", sweep_file(arms="  plain: []\n" + many_arms, seeds=seeds_text(1000)))),
        Case("sweep-duplicate-arm-names", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(arms="  plain: []\n  asr: [--attention, se, --asr]\n  asr: []\n"))),
        Case("sweep-duplicate-seeds", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(seeds="[0, 0]"))),
        Case("sweep-arm-name-dotdot", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(arms="  plain: []\n  ../../victim_run: [--attention, se]\n"))),
        Case("sweep-arm-name-slash", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(arms="  plain: []\n  a/b: [--attention, se]\n"))),
        Case("sweep-arm-sets-output", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(arms="  plain: []\n  x: [-o, {VICTIM}]\n"))),
        Case("sweep-arm-resumes-victim", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(arms="  plain: []\n  x: [--resume, {VRUN}]\n"))),
        Case("sweep-base-config-dev-zero", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(base="[-c, /dev/zero, --recipe, digits]"))),
        Case("sweep-jobs-100000-in-file", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(extra="jobs: 100000\n"))),
        Case("sweep-jobs-100000-option", W_, ["sweep", "{C}/s.yaml", *sw, "--jobs", "100000"],
             setup=text("s.yaml", sweep_file())),
        Case("sweep-threads-100000-option", W_, ["sweep", "{C}/s.yaml", *sw, "--threads", "100000"],
             setup=text("s.yaml", sweep_file())),
        Case("sweep-seed-negative", W_, ["sweep", "{C}/s.yaml", *sw], setup=text("s.yaml", sweep_file(seeds="[-1]"))),
        Case("sweep-seed-2-32", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(seeds=f"[{2**32}]"))),
        Case("sweep-unset-variable", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(
                 base="[--recipe, digits, --dataset, 'imagefolder:${HS_UNSET_VARIABLE}']"))),
        Case("sweep-baseline-unknown", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file().replace("baseline: plain", "baseline: nope"))),
        Case("sweep-contrast-with-itself", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(extra="contrasts: [[asr, asr]]\n"))),
        Case("sweep-into-victim-folder", W_, ["sweep", "{C}/s.yaml", "-o", "{VICTIM}"],
             setup=text("s.yaml", sweep_file())),
        Case("sweep-output-is-a-file", W_, ["sweep", "{C}/s.yaml", "-o", "{C}/s.yaml"],
             setup=text("s.yaml", sweep_file())),
        Case("sweep-file-is-dev-zero", W_, ["sweep", "/dev/zero", *sw]),
        Case("sweep-file-is-a-folder", W_, ["sweep", "{C}", *sw]),
        Case("sweep-arm-download", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(arms="  plain: []\n  x: [--download]\n"))),
        Case("sweep-base-epochs-1e9", W_, ["sweep", "{C}/s.yaml", *sw],
             setup=text("s.yaml", sweep_file(base="[--recipe, digits, --epochs, '1000000000']"))),
        Case("sweep-dry-run-and-summary-only", W_, ["sweep", "{C}/s.yaml", *sw, "--dry-run", "--summary-only"],
             setup=text("s.yaml", sweep_file())),
        Case("sweep-summary-only-new-folder", W_, ["sweep", "{C}/s.yaml", *sw, "--summary-only"],
             setup=text("s.yaml", sweep_file())),
        Case("sweep-dry-run-writes-nothing", W_, ["sweep", "{C}/s.yaml", *sw, "--dry-run"], expect="ok",
             setup=text("s.yaml", sweep_file()),
             post=lambda cx, r: [("silent", "--dry-run created the output folder")] if (cx.c / "sw").exists() else []),
        Case("sweep-tiny-runs", W_, ["sweep", "{C}/s.yaml", *sw, "--threads", "1"], expect="ok",
             setup=text("s.yaml", SWEEP_TINY), outputs=("sw",), timeout=240, post=json_ok("{C}/sw/summary.json")),
        Case("sweep-resume-finished", W_, ["sweep", "{SWEEPFILE}", *sw], expect="ok", needs=("SWEEP",),
             setup=do(lambda c: shutil.copytree(_P["SWEEP"], c / "sw", symlinks=True)), outputs=("sw",),
             timeout=120, post=_runs_untouched),
        Case("sweep-killed-driver-then-resumed", W_, expect="driver", driver=_drive_sweep_kill,
             outputs=("sw", "s.yaml"), timeout=300),
        Case("sweep-summary-nan-in-a-run", W_, ["sweep", "{SWEEPFILE}", *sw, "--summary-only"], expect="either",
             needs=("SWEEP",), setup=do(lambda c: _sweep_copy(c, "nan")), outputs=("sw",),
             post=json_ok("{C}/sw/summary.json")),
        Case("sweep-run-folder-symlink-to-victim", W_, ["sweep", "{SWEEPFILE}", *sw], expect="either",
             needs=("SWEEP",), setup=do(lambda c: _sweep_copy(c, "link")), outputs=("sw",), timeout=120),
        Case("sweep-record-tampered", W_, ["sweep", "{SWEEPFILE}", *sw], needs=("SWEEP",),
             setup=do(lambda c: _sweep_copy(c, "record")), outputs=("sw",)),
        Case("sweep-record-dev-zero", W_, ["sweep", "{SWEEPFILE}", *sw], needs=("SWEEP",),
             setup=do(lambda c: _sweep_copy(c, "devzero")), outputs=("sw",)),
        Case("sweep-run-last-pt-garbage", W_, ["sweep", "{SWEEPFILE}", *sw], expect="either", needs=("SWEEP",),
             ok_codes=(0, 1),
             setup=do(lambda c: _sweep_copy(c, "garbage")), outputs=("sw",), timeout=120),
        Case("sweep-log-symlink-to-victim", W_, ["sweep", "{SWEEPFILE}", *sw], expect="either", needs=("SWEEP",),
             ok_codes=(0, 1),
             setup=do(lambda c: _sweep_copy(c, "log")), outputs=("sw",), timeout=120),
    ]


def _runs_untouched(cx: Ctx, res: Result) -> Problems:
    src, dst = Path(cx.sb.paths["SWEEP"]) / "runs", cx.c / "sw" / "runs"
    changed = [str(p.relative_to(src)) for p in src.rglob("*.pt")
               if (dst / p.relative_to(src)).read_bytes() != p.read_bytes()]
    return [("silent", f"finished runs were redone: {changed}")] if changed else []


def _sweep_copy(c: Path, how: str) -> None:
    out = c / "sw"
    shutil.copytree(_P["SWEEP"], out, symlinks=True)
    if how == "nan":
        path = out / "runs" / "asr" / "s0" / "summary.json"
        doc = json.loads(path.read_text())
        doc["final_top1"] = float("nan")
        doc["best"] = {"top1": "lots", "epoch": -1}
        path.write_text(json.dumps(doc))
    elif how == "link":
        shutil.rmtree(out / "runs" / "plain" / "s0")
        os.symlink(_P["VRUN"], out / "runs" / "plain" / "s0")
    elif how == "record":
        doc = json.loads((out / "sweep.json").read_text())
        doc["spec"]["base"] = ["--recipe", "digits", "--epochs", "3"]
        doc["spec"]["arms"]["plain"]["args"] = ["--lr", "0.5"]
        (out / "sweep.json").write_text(json.dumps(doc))
    elif how == "devzero":
        (out / "sweep.json").unlink()
        os.symlink("/dev/zero", out / "sweep.json")
    elif how == "garbage":
        (out / "runs" / "asr" / "s0" / "last.pt").write_bytes(os.urandom(1000))
        (out / "runs" / "asr" / "s0" / "summary.json").unlink()
    elif how == "log":
        shutil.rmtree(out / "runs" / "asr" / "s0")
        log = out / "logs" / "asr-s0.log"
        log.unlink()
        os.symlink(str(Path(_P["VICTIM"]) / "notes.txt"), log)


def _drive_sweep_kill(cx: Ctx) -> tuple[Result, Problems]:
    """SIGKILL the sweep driver while its train children run; they must end with it; then resume."""
    (cx.c / "s.yaml").write_text(sweep_file(base='[--recipe, digits, --epochs, "1", --steps-per-epoch, "60", '
                                                 '--batch-size, "16"]', extra="jobs: 2\nthreads: 1\n"))
    args = ["sweep", f"{cx.c}/s.yaml", "-o", f"{cx.c}/sw"]
    driver = cx.spawn(args, "driver")
    kids: list[int] = []
    first_seen = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not driver.poll():
        kids = [p for p in children_of(driver.pid) if "train" in cmdline(p)]
        if kids and first_seen is None:
            first_seen = time.monotonic()
        if first_seen is not None and time.monotonic() - first_seen > 4:
            break
        time.sleep(0.3)
    family = descendants(driver.pid)  # found by the driver's PID, before the kill
    driver.signal(signal.SIGKILL)
    first = driver.finish(30)
    time.sleep(5)
    problems: Problems = []
    if not kids:
        problems.append(("silent", "no `foldattn.cli train` child appeared within 90 s; nothing was killed"))
    left = [p for p in family if alive(p)]
    if left:
        problems.append(("hang/memory", f"{len(left)} process(es) of the killed sweep still alive 5 s later: "
                                        + "; ".join(f"{p} {cmdline(p)[:80]}" for p in left)))
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    second = cx.spawn(args, "resume").finish(240)
    if second.rc != 0:
        problems.append(("silent", f"the resumed sweep failed (exit {second.rc})"))
    elif not (cx.c / "sw" / "summary.json").exists():
        problems.append(("silent", "the resumed sweep wrote no summary.json"))
    return Result.merge([first, second], second), problems


def calibrate_stripe_cases() -> list[Case]:
    K = "calibrate-stripe"
    c_o, s_o = ["-o", "{C}/c"], ["-o", "{C}/s"]
    small_c = ["--max-images", "32", "--batch-size", "32"]
    small_s = ["--max-images", "32", "--samples", "8", "--batch-size", "32"]
    return [
        Case("calibrate-distill-epochs-1e9", K, ["calibrate", "{SE}", "--distill-epochs", "1000000000", *c_o],
             message="--distill-epochs"),
        Case("stripe-samples-1e8-max-images-64", K, ["stripe", "{SE}", "--samples", "100000000", "--max-images", "64",
                                                     *s_o], message="--samples"),
        Case("calibrate-distill-epochs-negative", K, ["calibrate", "{SE}", "--distill-epochs", "-1", *c_o]),
        Case("calibrate-temperature-0", K, ["calibrate", "{SE}", "--distill-epochs", "1", "--temperature", "0", *c_o]),
        Case("calibrate-temperature-nan", K, ["calibrate", "{SE}", "--distill-epochs", "1", "--temperature", "nan",
                                              *c_o]),
        Case("calibrate-label-weight-inf", K, ["calibrate", "{SE}", "--distill-epochs", "1", "--label-weight", "inf",
                                               *c_o]),
        Case("calibrate-feature-weight-negative", K, ["calibrate", "{SE}", "--distill-epochs", "1",
                                                      "--feature-weight", "-1", *c_o]),
        Case("calibrate-distill-lr-1e9", K, ["calibrate", "{SE}", "--distill-epochs", "1", "--distill-lr", "1e9",
                                             *small_c, *c_o], expect="either", outputs=("c",), timeout=180),
        Case("calibrate-se-small", K, ["calibrate", "{SE}", *small_c, *c_o], expect="ok", outputs=("c",),
             timeout=120, post=_nonempty("{C}/c")),
        Case("calibrate-layers-no-match", K, ["calibrate", "{SE}", "--layers", "nothing.here*", *c_o]),
        Case("calibrate-plain-run", K, ["calibrate", "{VRUN}", *c_o], message="no input-dependent"),
        Case("calibrate-data-imagefolder-proc", K, ["calibrate", "{SE}", "--data", "imagefolder:/proc", *c_o]),
        Case("calibrate-timm-unknown", K, ["calibrate", "timm:no_such_net_x", "--attention", "se", *c_o]),
        Case("calibrate-num-classes-1e9", K, ["calibrate", "cifar_resnet20", "--attention", "se", "--num-classes",
                                              "1000000000", *c_o]),
        Case("calibrate-bench-batch-above-batch", K, ["calibrate", "{SE}", "--bench-batch", "200", "--batch-size",
                                                      "128", *c_o]),
        Case("calibrate-output-is-a-file", K, ["calibrate", "{SE}", *small_c, "-o", "{C}/f"], setup=raw("f", b"x")),
        Case("calibrate-a-deployed-file", K, ["calibrate", "{DEP}", *c_o]),
        Case("calibrate-finetune-and-distill", K, ["calibrate", "{SE}", *small_c, "--finetune-epochs", "1",
                                                   "--distill-epochs", "1", *c_o], expect="either", outputs=("c",),
             timeout=240),
        Case("calibrate-recorded-image-size-8192", K, ["calibrate", "{C}/x.pt", *small_c, *c_o], expect="either",
             setup=ck("{SE}", S("run.image_size", [8192, 8192])), outputs=("c",), timeout=120),
        Case("stripe-se-small", K, ["stripe", "{SE}", *small_s, *s_o], expect="ok", outputs=("s",), timeout=120,
             post=_nonempty("{C}/s")),
        Case("stripe-samples-above-max-images", K, ["stripe", "{SE}", "--samples", "65", "--max-images", "64", *s_o],
             expect="either", outputs=("s",), timeout=90),
        Case("stripe-max-images-0", K, ["stripe", "{SE}", "--max-images", "0", *s_o]),
        Case("stripe-history-dev-zero", K, ["stripe", "--history", "/dev/zero", *s_o]),
        Case("stripe-history-nan", K, ["stripe", "--history", "{C}/h.json", *s_o],
             setup=text("h.json", '{"layers": {"a": {"mean": [NaN]}}, "epochs": [NaN]}')),
        Case("stripe-history-a-list", K, ["stripe", "--history", "{C}/h.json", *s_o], setup=text("h.json", "[1, 2]")),
        Case("stripe-history-deep", K, ["stripe", "--history", "{C}/h.json", *s_o],
             setup=text("h.json", "[" * 100_000 + "]" * 100_000)),
        Case("stripe-history-2mb-string", K, ["stripe", "--history", "{C}/h.json", *s_o],
             setup=text("h.json", json.dumps({"x": "y" * (20 << 20)}))),
        Case("stripe-heatmap-layers-no-match", K, ["stripe", "{SE}", *small_s, "--heatmap-layers", "nope", *s_o]),
        Case("stripe-layers-bad-glob", K, ["stripe", "{SE}", *small_s, "--layers", "[", *s_o]),
        Case("stripe-attention-unknown", K, ["stripe", "cifar_resnet20", "--attention", "nope", *s_o]),
        Case("stripe-output-is-a-file", K, ["stripe", "{SE}", *small_s, "-o", "{C}/f"], setup=raw("f", b"x")),
        Case("stripe-cifar10-no-download", K, ["stripe", "{SE}", "--data", "cifar10", "--data-dir", "{C}/empty",
                                               *s_o], setup=mkdir("empty"), audit=True),
        Case("stripe-split-train", K, ["stripe", "{SE}", *small_s, "--split", "train", *s_o], expect="either",
             outputs=("s",), timeout=120),
        Case("stripe-nothing-to-do", K, ["stripe", *s_o]),
        Case("stripe-recorded-image-size-4096", K, ["stripe", "{C}/x.pt", *small_s, *s_o], expect="either",
             setup=ck("{SE}", S("run.image_size", [4096, 4096])), outputs=("s",), timeout=120),
    ]


def _nonempty(folder: str) -> Post:
    def post(cx: Ctx, res: Result) -> Problems:
        p = cx.p(folder)
        if res.rc == 0 and (not p.is_dir() or not any(p.iterdir())):
            return [("silent", f"exit 0 but {folder} is empty or missing")]
        return []
    return post


def bench_cases() -> list[Case]:
    B = "bench"
    o = ["--out", "{C}/b"]
    small = ["--models", "cifar_resnet20", "--attentions", "se", "--reps", "1", "--warmup", "0", "--no-memory",
             "--no-train", "--throughput-batch", "2"]
    return [
        Case("bench-threads-4096", B, ["bench", "--quick", "--threads", "4096", *o], message="--threads"),
        Case("bench-throughput-batch-1e6", B, ["bench", "--quick", "--throughput-batch", "1000000", *o],
             message="--throughput-batch"),
        Case("bench-threads-0", B, ["bench", "--quick", "--threads", "0", *o]),
        Case("bench-threads-9", B, ["bench", "--quick", "--threads", "9", *o]),
        Case("bench-reps-0", B, ["bench", "--quick", "--reps", "0", *o]),
        Case("bench-warmup-negative", B, ["bench", "--quick", "--warmup", "-1", *o]),
        Case("bench-model-unknown", B, ["bench", "--models", "no_such_model", *o]),
        Case("bench-timm-unknown", B, ["bench", "--models", "timm:no_such_net_x", *o]),
        Case("bench-attention-unknown", B, ["bench", "--quick", "--attentions", "nope", *o]),
        Case("bench-device-cuda-without-gpu", B, ["bench", *small, "--device", "cuda", *o]),
        Case("bench-device-cuda-99", B, ["bench", *small, "--device", "cuda:99", *o]),
        Case("bench-clock-cuda-on-cpu", B, ["bench", *small, "--clock", "cuda", *o]),
        Case("bench-runtime-unknown", B, ["bench", *small, "--runtime", "eager,tensorrt", *o]),
        Case("bench-out-is-a-file", B, ["bench", *small, "--out", "{C}/f"], setup=raw("f", b"x")),
        Case("bench-out-under-proc", B, ["bench", *small, "--out", "/proc/hostile-bench"]),
        Case("bench-small", B, ["bench", *small, *o], expect="ok", outputs=("b",), timeout=120,
             post=json_ok("{C}/b/bench.json")),
        Case("bench-same-model-twice", B, ["bench", *small[:1], "cifar_resnet20", *small[1:], *o], expect="either",
             outputs=("b",), timeout=120, post=json_ok("{C}/b/bench.json")),
        Case("bench-train-batch-0", B, ["bench", "--quick", "--train-batch", "0", *o]),
        Case("bench-latency-batch-0", B, ["bench", "--quick", "--latency-batch", "0", *o]),
        Case("bench-seed-negative", B, ["bench", "--quick", "--seed", "-1", *o]),
        Case("bench-resnet152-train-batch-4096", B, ["bench", "--models", "torchvision:resnet152", "--attentions",
                                                     "se", "--train-batch", "4096", "--reps", "1", *o],
             message="--train-batch", timeout=120),
        Case("bench-vit-tiny-small", B, ["bench", "--models", "cifar_vit_tiny", *small[2:], *o], expect="either",
             outputs=("b",), timeout=180, post=json_ok("{C}/b/bench.json")),
        Case("bench-strict-profile-small", B, ["bench", *small, "--strict", "--profile-failures", *o],
             expect="either", outputs=("b",), timeout=180, ok_codes=(0, 1), post=json_ok("{C}/b/bench.json")),
        Case("bench-out-symlink-to-victim-file", B, ["bench", *small, "--out", "{C}/lnk"],
             setup=link("lnk", "{VICTIM}/bench.json")),
        Case("bench-timm-pretrained-name", B, ["bench", "--models", "timm:resnet18.a1_in1k", "--attentions", "se",
                                               "--reps", "1", "--warmup", "0", "--no-memory", "--no-train",
                                               "--throughput-batch", "2", *o],
             expect="either", audit=True, outputs=("b",), timeout=180),
    ]


def api_cases() -> list[Case]:
    return [
        api("fuse-linear-bn1d-3d-input", '''
            m = rnd(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(4))).eval()
            x = torch.randn(3, 4, 6)
            same(m, fold(m, fuse_bn=True), x)
        '''),
        api("fuse-linear-bn1d-3d-square", '''
            m = rnd(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
            x = torch.randn(3, 4, 4)
            same(m, fold(m, fuse_bn=True), x)
        '''),
        api("fuse-linear-bn1d-2d", '''
            m = rnd(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))).eval()
            x = torch.randn(5, 6)
            same(m, fold(m, fuse_bn=True), x)
        ''', expect="ok"),
        api("fuse-conv1d-bn1d", '''
            m = rnd(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))).eval()
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 9))
        ''', expect="ok"),
        api("fuse-convtranspose-bn", '''
            m = rnd(nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4))).eval()
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 5, 5))
        '''),
        api("fuse-grouped-conv-bn", '''
            m = rnd(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8))).eval()
            same(m, fold(m, fuse_bn=True), torch.randn(2, 4, 7, 7))
        ''', expect="ok"),
        api("fuse-bn-without-running-stats", '''
            m = rnd(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))).eval()
            same(m, fold(m, fuse_bn=True), torch.randn(4, 3, 6, 6))
        '''),
        api("fuse-conv-output-used-twice", '''
            class Twice(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
                def forward(self, x):
                    y = self.conv(x)
                    return self.bn(y) + y
            m = rnd(Twice()).eval()
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 6, 6))
        '''),
        api("fuse-bn-in-train-mode", '''
            m = rnd(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
            d = fold(m, fuse_bn=True)
            same(m, d, torch.randn(2, 3, 6, 6))
        '''),
        api("fuse-weight-norm-conv", '''
            conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
            m = rnd(nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 6, 6))
        '''),
        api("fold-forward-hook-on-asr-host", '''
            m = asr_net()
            host = next(mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
            host.register_forward_hook(lambda mod, i, o: o * 2 + 1)
            same(m, fold(m), torch.randn(2, 3, 8, 8))
        '''),
        api("fold-forward-pre-hook-on-conv", '''
            m = asr_net()
            conv = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)][1]
            conv.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
            same(m, fold(m), torch.randn(2, 3, 8, 8))
        '''),
        api("fold-hook-on-asr-wrapper", '''
            m = asr_net()
            wrapper = next(mod for mod in m.modules() if type(mod).__name__ == "ASR")
            wrapper.register_forward_hook(lambda mod, i, o: -o)
            same(m, fold(m), torch.randn(2, 3, 8, 8))
        '''),
        api("fuse-hook-on-top-model", '''
            m = asr_net()
            m.register_forward_hook(lambda mod, i, o: o + 3)
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 8, 8))
        '''),
        api("fuse-hook-on-bn-that-fuses", '''
            m = rnd(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
            m[1].register_forward_hook(lambda mod, i, o: o.relu())
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 6, 6))
        '''),
        api("fold-block-called-twice", '''
            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.stem, self.block, self.head = nn.Conv2d(3, 4, 3, padding=1), Block(), nn.Linear(4, 2)
                def forward(self, x):
                    y = self.block(self.block(self.stem(x)))
                    return self.head(y.mean((2, 3)))
            m = rnd(attach(rnd(Net()), "se"))
            same(m, fold(m), torch.randn(2, 3, 8, 8))
        '''),
        api("fold-bn-shared-under-two-names", '''
            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.body = resnet()
                    self.alias = self.body[1].bn  # one module, two names
                def forward(self, x):
                    return self.body(x)
            m = rnd(attach(rnd(Net()), "se", where="norms"))
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 8, 8))
        '''),
        api("fold-forward-returns-dict", '''
            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.body = resnet()
                def forward(self, x):
                    return {"logits": self.body(x), "twice": self.body(x) * 2}
            m = rnd(attach(rnd(Net()), "se"))
            same(m, fold(m, fuse_bn=True), torch.randn(2, 3, 8, 8))
        '''),
        api("attach-empty-model", '''
            attach(nn.Sequential(), "se")
        ''', expect="refuse"),
        api("fold-empty-model", '''
            d = fold(nn.Sequential(), fuse_bn=True)
            same(nn.Sequential(), d, torch.randn(2, 3))
        '''),
        api("save-load-model-without-tensors", '''
            p = os.path.join(C, "relu.safetensors")
            save_deployed(nn.ReLU(), p)
            same(nn.ReLU(), load_deployed(p, model=nn.ReLU()), torch.randn(4))
        ''', outputs=("relu.safetensors", "relu.json")),
        api("attach-attention-unknown", '''
            attach(resnet(), "nope")
        ''', expect="refuse"),
        api("attach-include-no-match", '''
            attach(resnet(), "se", include="nothing.*")
        ''', expect="refuse"),
        api("attach-every-0", '''
            attach(resnet(), "se", every=0)
        ''', expect="refuse"),
        api("attach-psi-init-nan", '''
            attach(resnet(), "se", psi_init=float("nan"))
        ''', expect="refuse"),
        api("asr-on-relu", '''
            foldattn.ASR(nn.ReLU(), "se")
        ''', expect="refuse"),
        api("asr-on-zero-width-linear", '''
            m = foldattn.ASR(nn.Linear(3, 0), "se")
            same(m, fold(nn.Sequential(m)), torch.randn(2, 3))
        '''),
        api("attach-bn-without-affine", '''
            net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
            m = rnd(attach(rnd(net), "se", where="norms"))
            same(m, fold(m), torch.randn(2, 3, 6, 6))
        '''),
        api("fold-scripted-module", '''
            m = torch.jit.script(asr_net())
            fold(m)
        '''),
        api("save-metadata-nan", '''
            p = os.path.join(C, "m.safetensors")
            save_deployed(foldattn.create_model("cifar_resnet20"), p, metadata={"score": float("nan")})
            from safetensors import safe_open
            with safe_open(p, "pt") as f:
                json.loads(f.metadata()["foldattn"], parse_constant=lambda w: fail("NaN written into the header"))
        ''', outputs=("m.safetensors", "m.json")),
        api("save-metadata-inf-nested", '''
            p = os.path.join(C, "m.safetensors")
            save_deployed(foldattn.create_model("cifar_resnet20"), p, metadata={"a": [1, {"b": float("-inf")}]})
            must_load(p)
            json.loads(open(os.path.join(C, "m.json")).read(), parse_constant=lambda w: fail("Inf in the JSON copy"))
        ''', outputs=("m.safetensors", "m.json")),
        api("save-metadata-a-tensor", '''
            save_deployed(foldattn.create_model("cifar_resnet20"), os.path.join(C, "m.safetensors"),
                          metadata={"t": torch.ones(2)})
        ''', expect="refuse"),
        api("save-metadata-too-big-to-load", '''
            p = os.path.join(C, "m.safetensors")
            save_deployed(foldattn.create_model("cifar_resnet20"), p, metadata={"pad": "x" * (3 << 20)})
            must_load(p)
        ''', outputs=("m.safetensors", "m.json")),
        api("save-metadata-int-keys", '''
            p = os.path.join(C, "m.safetensors")
            save_deployed(foldattn.create_model("cifar_resnet20"), p, metadata={1: "a", (2, 3): "b"})
            must_load(p)
        ''', outputs=("m.safetensors", "m.json")),
        api("save-metadata-1000-deep", '''
            d = {}
            cur = d
            for _ in range(1000):
                cur["x"] = {}
                cur = cur["x"]
            p = os.path.join(C, "m.safetensors")
            save_deployed(foldattn.create_model("cifar_resnet20"), p, metadata=d)
            must_load(p)
        ''', outputs=("m.safetensors", "m.json")),
        api("save-nan-weights", '''
            m = foldattn.create_model("cifar_resnet20")
            with torch.no_grad():
                m.fc.weight[0, 0] = float("nan")
            save_deployed(m, os.path.join(C, "m.safetensors"))
        ''', expect="refuse"),
        api("save-under-proc", '''
            save_deployed(foldattn.create_model("cifar_resnet20"), "/proc/hostile.safetensors")
        ''', expect="refuse"),
        api("save-builder-os-system", '''
            save_deployed(foldattn.create_model("cifar_resnet20"), os.path.join(C, "m.safetensors"), "os:system",
                          {"command": "true"})
        ''', expect="refuse"),
        api("load-nan-weights", '''
            bad = rewrite(good_file(), os.path.join(C, "bad.safetensors"),
                          tensor_change=lambda t: t.update({"fc.weight": t["fc.weight"] * float("nan")}))
            load_deployed(bad)
        ''', expect="refuse", outputs=("bad.safetensors",)),
        api("load-inf-bias", '''
            bad = rewrite(good_file(), os.path.join(C, "bad.safetensors"),
                          tensor_change=lambda t: t.update({"fc.bias": t["fc.bias"] + float("inf")}))
            load_deployed(bad)
        ''', expect="refuse", outputs=("bad.safetensors",)),
        api("load-negative-running-var", '''
            bad = rewrite(good_file(), os.path.join(C, "bad.safetensors"),
                          tensor_change=lambda t: t.update({"bn1.running_var": -t["bn1.running_var"] - 1}))
            load_deployed(bad)
        ''', expect="refuse", outputs=("bad.safetensors",)),
        api("load-nan-running-mean", '''
            bad = rewrite(good_file(), os.path.join(C, "bad.safetensors"),
                          tensor_change=lambda t: t.update({"bn1.running_mean": t["bn1.running_mean"] * float("nan")}))
            load_deployed(bad)
        ''', expect="refuse", outputs=("bad.safetensors",)),
        api("load-into-model-with-nan", '''
            bad = rewrite(good_file(), os.path.join(C, "bad.safetensors"),
                          tensor_change=lambda t: t.update({"conv1.weight": t["conv1.weight"] * float("inf")}))
            load_deployed(bad, model=foldattn.create_model("cifar_resnet20"))
        ''', expect="refuse", outputs=("bad.safetensors",)),
        api("load-sha256-mismatch", '''
            load_deployed(good_file(), sha256="0" * 64)
        ''', expect="refuse"),
        api("load-a-folder", '''
            load_deployed(C)
        ''', expect="refuse"),
        api("load-a-torch-pickle", '''
            p = os.path.join(C, "m.safetensors")
            torch.save({"x": torch.ones(2)}, p)
            load_deployed(p)
        ''', expect="refuse", outputs=("m.safetensors",)),
        api("load-into-another-architecture", '''
            load_deployed(good_file(), model=foldattn.create_model("cifar_resnet32"))
        ''', expect="refuse"),
        api("verify-different-models", '''
            verify(rnd(resnet(), 0), rnd(resnet(), 1), torch.randn(2, 3, 8, 8))
        ''', expect="refuse"),
        api("verify-string-input", '''
            m = resnet()
            verify(m, m, "an image")
        ''', expect="refuse"),
        api("verify-nan-output", '''
            m = resnet()
            with torch.no_grad():
                m[-1].bias.fill_(float("nan"))
            verify(m, m, torch.randn(2, 3, 8, 8))
        ''', expect="refuse"),
        api("verify-empty-inputs", '''
            m = resnet()
            verify(m, m, ())
        ''', expect="refuse"),
    ]


def images_cases() -> list[Case]:
    IM = "images"

    def train(root: str = "{C}/tree", extra: Sequence[str] = ()) -> list[str]:
        return ["train", "--dataset", f"imagefolder:{root}", "--image-size", "16", "--val-split", "2", "--epochs",
                "1", "--steps-per-epoch", "1", "--batch-size", "4", "--threads", "1", "--no-progress", *extra,
                "-o", "{C}/o"]

    def odd(fn: Callable[[Path], None]) -> Setup:
        def setup(cx: Ctx) -> None:
            tree(cx.c / "tree")
            fn(cx.c / "tree")
        return setup

    def first(data: bytes | None = None, size: tuple[int, int] | None = None, name: str = "0.png") -> Setup:
        def fn(root: Path) -> None:
            if size is not None:
                png(root / "a" / name, size)
            else:
                assert data is not None
                (root / "a" / name).write_bytes(data)
        return odd(fn)

    ok_out = ("o",)
    return [
        Case("first-image-1x1", IM, train(), expect="either", setup=first(size=(1, 1)), outputs=ok_out, timeout=90),
        Case("first-image-7x3000", IM, train(), expect="either", setup=first(size=(7, 3000)), outputs=ok_out,
             timeout=90),
        Case("first-image-9000x9000", IM, train(), expect="either", setup=first(size=(9000, 9000)), outputs=ok_out,
             timeout=120),
        Case("png-header-claims-100000-squared", IM, train(),
             setup=first(png_bytes(100_000, 100_000, zlib.compress(b"\0" * 1000)))),
        Case("bmp-header-claims-60000-squared", IM, train(), setup=first(_bmp_header(60_000, 60_000), name="0.bmp")),
        Case("png-header-width-zero", IM, train(), setup=first(png_bytes(0, 16, zlib.compress(b"")))),
        Case("empty-class-folder", IM, train(), expect="either", setup=odd(lambda r: (r / "c").mkdir()),
             outputs=ok_out, timeout=90),
        Case("all-classes-empty", IM, train(), setup=mkdir("tree/a", "tree/b")),
        Case("text-named-png", IM, train(), setup=first(b"this is not a picture\n" * 10)),
        Case("zero-byte-jpg", IM, train(), setup=first(b"", name="0.jpg")),
        Case("truncated-png", IM, train(), setup=odd(lambda r: _truncate(r / "a" / "1.png"))),
        Case("symlink-loop-folder", IM, train(), expect="either", setup=odd(lambda r: os.symlink("..", r / "a" / "up")),
             outputs=ok_out, timeout=90),
        Case("symlink-to-etc-passwd", IM, train(), expect="either",
             setup=odd(lambda r: os.symlink("/etc/passwd", r / "a" / "0.png")), outputs=ok_out, timeout=90),
        Case("class-folder-symlink-to-proc-self", IM, train(), expect="either",
             setup=odd(lambda r: os.symlink("/proc/self", r / "c")), outputs=ok_out, timeout=90),
        Case("sixteen-bit-png", IM, train(), expect="ok", setup=odd(lambda r: _mode_image(r / "a" / "0.png", "I;16")),
             outputs=ok_out, timeout=90),
        Case("float-tiff-nan", IM, train(), setup=odd(lambda r: _float_tiff(r / "a" / "0.tif", float("nan")))),
        Case("float-tiff-huge-values", IM, train(), setup=odd(lambda r: _float_tiff(r / "a" / "0.tif", 1e30))),
        Case("odd-modes-p-la-cmyk-1", IM, train(), expect="ok", setup=odd(_odd_modes), outputs=ok_out, timeout=90),
        Case("animated-gif", IM, train(), expect="either", setup=odd(_animated_gif), outputs=ok_out, timeout=90),
        Case("class-name-with-newline", IM, train(), expect="either",
             setup=odd(lambda r: tree(r, classes=("x\ny",), per=4)), outputs=ok_out, timeout=90),
        Case("three-hundred-classes", IM, train(extra=["--val-split", "300"]), expect="either",
             setup=do(lambda c: tree(c / "tree", classes=[f"k{i:03d}" for i in range(300)], per=2, size=(4, 4))),
             outputs=ok_out, timeout=120),
        Case("nested-200-levels", IM, train(), expect="either", setup=odd(_deep), outputs=ok_out, timeout=90),
        Case("fifo-named-png", IM, train(), expect="either", setup=odd(lambda r: os.mkfifo(r / "a" / "0.png")),
             outputs=ok_out, timeout=90),
        Case("folder-named-png", IM, train(), expect="either", setup=odd(lambda r: (r / "a" / "0.png").mkdir()),
             outputs=ok_out, timeout=90),
        Case("dev-zero-named-png", IM, train(), expect="either",
             setup=odd(lambda r: os.symlink("/dev/zero", r / "a" / "0.png")), outputs=ok_out, timeout=90),
        Case("root-is-a-file", IM, train("{C}/f"), setup=raw("f", b"x")),
        Case("root-missing", IM, train("{C}/nope")),
        Case("hidden-files-only", IM, train(), setup=do(_hidden_only)),
        Case("cache-dir-is-a-file", IM, train(extra=["--cache-dir", "{C}/f"]),
             setup=steps(raw("f", b"x"), do(lambda c: tree(c / "tree")))),
        Case("webp-and-uppercase-ext", IM, train(), expect="ok", setup=odd(_webp_upper), outputs=ok_out, timeout=90),
        Case("exif-rotated-jpeg", IM, train(), expect="ok", setup=odd(_exif_jpeg), outputs=ok_out, timeout=90),
        Case("image-size-4096-training", IM,
             ["train", "--dataset", "imagefolder:{C}/tree", "--image-size", "4096", "--val-split", "2", "--epochs",
              "1", "--steps-per-epoch", "1", "--batch-size", "4", "--threads", "1", "--no-progress", "-o", "{C}/o"],
             expect="either", setup=do(lambda c: tree(c / "tree")), outputs=ok_out, timeout=120),
        Case("eval-on-two-class-folder", IM, ["eval", "{RUN}", "--dataset", "imagefolder:{C}/tree"],
             setup=do(lambda c: tree(c / "tree"))),
        Case("quantize-on-two-class-folder", IM, ["quantize", "{RUN}", "-o", "{C}/q", "--data",
                                                  "imagefolder:{C}/tree"], setup=do(lambda c: tree(c / "tree"))),
        Case("stream-with-odd-images", IM, train(extra=["--stream"]), expect="either",
             setup=odd(lambda r: png(r / "b" / "0.png", (3, 900))), outputs=ok_out, timeout=90),
    ]


def _bmp_header(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    body = b"\0" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + len(body), 0, 0, 14 + len(header)) + header + body


def _truncate(path: Path) -> None:
    png(path, (64, 64), color=(1, 2, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _mode_image(path: Path, mode: str) -> None:
    from PIL import Image

    Image.new(mode, (12, 12), 30000 if mode.startswith("I") else 128).save(path)


def _float_tiff(path: Path, value: float) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((12, 12), value, dtype=np.float32), mode="F").save(path)


def _odd_modes(root: Path) -> None:
    from PIL import Image

    p = Image.new("P", (12, 12), 3)
    p.info["transparency"] = 3
    p.save(root / "a" / "0.png", transparency=3)
    Image.new("LA", (12, 12), (100, 50)).save(root / "a" / "5.png")
    Image.new("CMYK", (12, 12), (10, 20, 30, 40)).save(root / "b" / "0.jpg")
    Image.new("1", (12, 12), 1).save(root / "b" / "5.png")


def _animated_gif(root: Path) -> None:
    from PIL import Image

    frames = [Image.new("P", (12, 12), i) for i in range(5)]
    frames[0].save(root / "a" / "0.gif", save_all=True, append_images=frames[1:], loop=0)


def _deep(root: Path) -> None:
    d = root / "a"
    for i in range(200):
        d = d / f"d{i % 10}"
    png(d / "deep.png", (12, 12))


def _hidden_only(c: Path) -> None:
    for cls in ("a", "b"):
        for i in range(3):
            png(c / "tree" / cls / f".{i}.png", (12, 12))
        png(c / "tree" / cls / ".ipynb_checkpoints" / "x.png", (12, 12))


def _webp_upper(root: Path) -> None:
    from PIL import Image

    Image.new("RGB", (12, 12), (1, 2, 3)).save(root / "a" / "0.webp")
    Image.new("RGB", (12, 12), (3, 2, 1)).save(root / "b" / "0.PNG")


def _exif_jpeg(root: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (20, 10), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    img.save(root / "a" / "0.jpg", exif=exif.tobytes())


def faults_cases() -> list[Case]:
    F = "faults"
    t = ("TMPFS",)
    copy_run = runcopy("{RUN}", "R")
    return [
        Case("disk-full-train", F, ["train", *TRAIN_FAST, "-o", "{C}/full/run"], message="No space left",
             needs=t, setup=tmpfs("full", "1m"), outputs=("full",), timeout=90,
             post=lambda cx, r: [("silent", "a partial last.pt was left")]
             if (cx.c / "full" / "run" / "last.pt").exists() and loadable("{C}/full/run/last.pt")(cx, r) else []),
        Case("disk-full-fold", F, ["fold", "{RUN}", "-o", "{C}/full/dep"], message="No space left", needs=t,
             setup=tmpfs("full", "512k"), outputs=("full",)),
        Case("disk-full-quantize", F, ["quantize", "{RUN}", "-o", "{C}/full/q", "--calib-images", "32",
                                       "--val-images", "64"], message="No space left", needs=t,
             setup=tmpfs("full", "600k"), outputs=("full",), timeout=180),
        Case("disk-full-bench", F, ["bench", "--models", "cifar_resnet20", "--attentions", "se", "--reps", "1",
                                    "--warmup", "0", "--no-memory", "--no-train", "--throughput-batch", "2",
                                    "--out", "{C}/full/b"], expect="either", needs=t, setup=tmpfs("full", "4k"),
             outputs=("full",), timeout=120),
        Case("disk-full-stripe", F, ["stripe", "{SE}", "--max-images", "32", "--samples", "8", "-o", "{C}/full/s"],
             message="No space left", needs=t, setup=tmpfs("full", "16k"), outputs=("full",), timeout=120),
        Case("disk-full-export-onnx", F, ["export", "{RUN}", "--onnx", "{C}/full/m.onnx"], message="No space left",
             needs=t, setup=tmpfs("full", "256k"), outputs=("full",), timeout=90),
        Case("disk-full-sweep", F, ["sweep", "{C}/s.yaml", "-o", "{C}/full/sw", "--threads", "1"], expect="either",
             needs=t, setup=steps(text("s.yaml", SWEEP_TINY), tmpfs("full", "1m")), outputs=("full",), timeout=180,
             ok_codes=(0, 1)),
        Case("disk-full-during-resume", F, ["train", "--resume", "{C}/full/R", "--epochs", "2",
                                            "--allow-config-change", "--no-progress"],
             message="No space left", needs=t,
             setup=tmpfs("full", "5200k", then=lambda cx: shutil.copytree(cx.p("{RUN}"), cx.c / "full" / "R")),
             outputs=("full",), timeout=120, post=loadable("{C}/full/R/last.pt", epoch=1)),
        Case("read-only-train", F, ["train", *TRAIN_FAST, "-o", "{C}/ro/run"], needs=t,
             setup=tmpfs("ro", "1m", ro=True), outputs=("ro",)),
        Case("read-only-fold", F, ["fold", "{RUN}", "-o", "{C}/ro/dep"], needs=t, setup=tmpfs("ro", "1m", ro=True),
             outputs=("ro",)),
        Case("read-only-resume", F, ["train", "--resume", "{C}/ro/R", "--epochs", "2", "--allow-config-change",
                                     "--no-progress"], needs=t,
             setup=tmpfs("ro", "8m", ro=True, then=lambda cx: shutil.copytree(cx.p("{RUN}"), cx.c / "ro" / "R")),
             outputs=("ro",), post=loadable("{C}/ro/R/last.pt", epoch=1)),
        Case("two-trains-one-folder", F, expect="driver", driver=_drive_two_trains, outputs=("o",), timeout=180),
        Case("two-folds-at-once", F, expect="driver", driver=_drive_two_folds, outputs=("o",), timeout=120),
        Case("two-quantizes-at-once", F, expect="driver", driver=_drive_two_quantizes, outputs=("q",), timeout=300),
        Case("sigkill-train-then-resume", F, expect="driver", driver=lambda cx: _drive_kill_train(cx, signal.SIGKILL),
             outputs=("o",), timeout=240),
        Case("sigterm-train-then-resume", F, expect="driver", driver=lambda cx: _drive_kill_train(cx, signal.SIGTERM),
             outputs=("o",), timeout=240),
        Case("sigint-train-then-resume", F, expect="driver", driver=lambda cx: _drive_kill_train(cx, signal.SIGINT),
             outputs=("o",), timeout=240),
        Case("sigkill-fold-then-fold", F, expect="driver", driver=_drive_kill_fold, outputs=("o",), timeout=120),
        Case("sigterm-quantize-midway", F, expect="driver", driver=_drive_term_quantize, outputs=("q", ".q.*"),
             timeout=300),
        Case("lock-held-by-live-process", F, expect="driver", driver=_drive_live_lock, outputs=("R",), timeout=90),
        Case("lock-garbage-10kb", F, ["fold", "{RUN}", "-o", "{C}/o"], expect="ok",
             setup=raw("o/.lock", os.urandom(10_000)), outputs=("o",), post=no_tmp("{C}/o")),
        Case("lock-symlink-to-victim-file", F, ["fold", "{RUN}", "-o", "{C}/o"], expect="either",
             setup=link("o/.lock", "{VICTIM}/notes.txt"), outputs=("o",)),
        Case("lock-is-a-folder", F, ["fold", "{RUN}", "-o", "{C}/o"], expect="either", setup=mkdir("o/.lock"),
             outputs=("o",)),
        Case("leftover-tmp-symlink-to-victim", F, ["fold", "{RUN}", "-o", "{C}/o"], expect="ok",
             setup=link("o/.deployed.safetensors.foldattn-k1ll3d.tmp", "{VICTIM}/summary.json"), outputs=("o",)),
        Case("output-file-symlink-to-victim", F, ["fold", "{RUN}", "-o", "{C}/o"], expect="either",
             setup=link("o/deployed.safetensors", "{VICTIM}/deployed.safetensors"), outputs=("o",)),
        Case("json-copy-symlink-to-victim", F, ["fold", "{RUN}", "-o", "{C}/o"], expect="either",
             setup=link("o/deployed.json", "{VICTIM}/summary.json"), outputs=("o",)),
        Case("resume-last-pt-symlink-to-victim", F, ["train", "--resume", "{C}/R", "--epochs", "2",
                                                     "--allow-config-change", "--no-progress"],
             expect="either",
             setup=steps(copy_run, do(lambda c: _relink(c / "R" / "last.pt", _P["VRUN"] + "/last.pt"))),
             outputs=("R",), timeout=120),
        Case("metrics-csv-symlink-to-victim", F, ["train", "--resume", "{C}/R", "--epochs", "2",
                                                  "--allow-config-change", "--no-progress"], expect="either",
             setup=steps(copy_run, do(lambda c: _relink(c / "R" / "metrics.csv", _P["VICTIM"] + "/notes.txt"))),
             outputs=("R",), timeout=120),
        Case("stdout-closed-pipe", F, expect="driver", driver=_drive_closed_stdout, outputs=("o",)),
        Case("cwd-deleted", F, expect="driver", driver=_drive_deleted_cwd, outputs=("o", "gone")),
        Case("output-under-a-file", F, ["fold", "{RUN}", "-o", "{RUN}/last.pt/sub"]),
        Case("train-over-finished-victim-run", F, ["train", *TRAIN_FAST, "-o", "{VRUN}"]),
        Case("train-into-victim-folder", F, ["train", *TRAIN_FAST, "-o", "{VICTIM}"]),
        Case("output-name-too-long", F, ["fold", "{RUN}", "-o", "{C}/" + "x" * 300]),
        Case("output-name-with-newline", F, ["fold", "{RUN}", "-o", "{C}/a\nb"], expect="either", outputs=("a\nb",)),
    ]


def _relink(path: Path, target: str) -> None:
    path.unlink()
    os.symlink(target, path)


def _wait_for(path: Path, seconds: float, child: Child | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if child is not None and child.poll():
            return False
        time.sleep(0.2)
    return False


def _drive_two_trains(cx: Ctx) -> tuple[Result, Problems]:
    long = ["train", "--recipe", "digits", "--epochs", "100", "--batch-size", "16",
            "--threads", "1", "--no-progress", "-o", f"{cx.c}/o"]
    a = cx.spawn(long, "first")
    problems: Problems = []
    if not _wait_for(cx.c / "o" / ".lock", 60, a):
        problems.append(("silent", "the first train never held its folder (.lock)"))
    b = cx.spawn(long, "second").finish(60)
    running = not a.poll()
    a.signal(signal.SIGTERM)  # enough: it only had to hold the folder while the second was refused
    first = a.finish(90)
    if not running:
        problems.append(("silent", "the first train had ended before the second was refused"))
    if b.rc == 0:
        problems.append(("silent", "a second train on a folder held by a live run exited 0"))
    if first.rc not in (0, 143):
        problems.append(("silent", f"the first train, sent SIGTERM, exited {first.rc} (documented: 143)"))
    problems += loadable("{C}/o/last.pt")(cx, first)
    return Result.merge([first, b], b), problems


def _drive_two_folds(cx: Ctx) -> tuple[Result, Problems]:
    args = ["fold", cx.sub("{RUN}"), "-o", f"{cx.c}/o"]
    a, b = cx.spawn(args, "a"), cx.spawn(args, "b")
    ra, rb = a.finish(90), b.finish(90)
    problems: Problems = []
    if 0 not in (ra.rc, rb.rc):
        problems.append(("silent", f"neither fold succeeded (exit {ra.rc}, {rb.rc})"))
    problems += _deployed_loads(cx.c / "o" / "deployed.safetensors") + no_tmp("{C}/o")(cx, ra)
    if (cx.c / "o" / ".lock").exists():
        problems.append(("silent", "a .lock was left behind"))
    return Result.merge([ra, rb], rb if rb.rc != 0 else ra), problems


def _deployed_loads(path: Path) -> Problems:
    code = ("import sys, foldattn; foldattn.load_deployed(sys.argv[1]); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return [("silent", f"{path.name} does not load: {last[:160]}")]
    return []


def _drive_two_quantizes(cx: Ctx) -> tuple[Result, Problems]:
    args = ["quantize", cx.sub("{RUN}"), "-o", f"{cx.c}/q", "--calib-images", "32", "--val-images", "64"]
    a, b = cx.spawn(args, "a"), cx.spawn(args, "b")
    ra, rb = a.finish(280), b.finish(280)
    problems: Problems = []
    if 0 not in (ra.rc, rb.rc):
        problems.append(("silent", f"neither quantize succeeded (exit {ra.rc}, {rb.rc})"))
    names = sorted(p.name for p in (cx.c / "q").iterdir()) if (cx.c / "q").is_dir() else []
    if not {"model.onnx", "model.int8.onnx", "quantize.json"} <= set(names):
        problems.append(("silent", f"the output folder is incomplete: {names}"))
    return Result.merge([ra, rb], rb if rb.rc != 0 else ra), problems


def _drive_kill_train(cx: Ctx, sig: int) -> tuple[Result, Problems]:
    # long enough (about 20 s on an idle machine) that the signal lands mid-run however fast the machine is
    args = ["train", "--recipe", "digits", "--epochs", "30", "--steps-per-epoch", "30", "--batch-size", "16",
            "--threads", "1", "--no-progress", "-o", f"{cx.c}/o"]
    a = cx.spawn(args, "first")
    problems: Problems = []
    if not _wait_for(cx.c / "o" / "last.pt", 60, a):
        problems.append(("silent", "no last.pt appeared within 60 s"))
    time.sleep(2.5)
    a.signal(sig)
    first = a.finish(60)
    want = {signal.SIGTERM: 143, signal.SIGINT: 130}.get(sig)
    if want is not None and first.rc != want and first.rc != 0:
        problems.append(("silent", f"{signal.Signals(sig).name}: exit {first.rc} (documented: {want})"))
    problems += loadable("{C}/o/last.pt")(cx, first)
    second = cx.spawn(["train", "--resume", f"{cx.c}/o", "--no-progress"], "resume").finish(150)
    if second.rc != 0:
        problems.append(("silent", f"the resume after {signal.Signals(sig).name} failed (exit {second.rc})"))
    elif not (cx.c / "o" / "summary.json").exists():
        problems.append(("silent", "the resumed run wrote no summary.json"))
    return Result.merge([first, second], second), problems


def _drive_kill_fold(cx: Ctx) -> tuple[Result, Problems]:
    args = ["fold", cx.sub("{RUN}"), "-o", f"{cx.c}/o"]
    a = cx.spawn(args, "killed")
    _wait_for(cx.c / "o", 30, a)
    time.sleep(0.5)
    a.signal(signal.SIGKILL)
    first = a.finish(30)
    second = cx.spawn(args, "again").finish(90)
    problems: Problems = []
    if second.rc != 0:
        problems.append(("silent", f"fold after a killed fold failed (exit {second.rc})"))
    else:
        problems += _deployed_loads(cx.c / "o" / "deployed.safetensors")
    problems += no_tmp("{C}/o")(cx, second)
    first.signal = None  # killed on purpose
    return Result.merge([first, second], second), problems


def _drive_term_quantize(cx: Ctx) -> tuple[Result, Problems]:
    args = ["quantize", cx.sub("{RUN}"), "-o", f"{cx.c}/q", "--calib-images", "64", "--val-images", "128"]
    a = cx.spawn(args, "terminated")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not a.poll() and not any(p.name.startswith(".q.") for p in cx.c.iterdir()):
        time.sleep(0.1)
    time.sleep(0.5)  # inside the write: exporting or quantizing into the temporary folder
    a.signal(signal.SIGTERM)
    first = a.finish(60)
    problems: Problems = []
    q = cx.c / "q"
    names = sorted(p.name for p in q.iterdir()) if q.is_dir() else []
    whole = {"model.onnx", "model.int8.onnx", "quantize.json"}
    if names and not whole <= set(names):
        problems.append(("silent", f"SIGTERM left a half-written output folder: {names}"))
    left = [p.name for p in cx.c.iterdir() if p.name.startswith(".q.")]
    if left:
        problems.append(("silent", f"SIGTERM left temporary files: {left}"))
    second = cx.spawn(args, "again").finish(200)
    if second.rc != 0:
        problems.append(("silent", f"quantize into the same folder after SIGTERM failed (exit {second.rc})"))
    first.signal = None
    return Result.merge([first, second], second), problems


def _drive_live_lock(cx: Ctx) -> tuple[Result, Problems]:
    shutil.copytree(cx.sub("{RUN}"), cx.c / "R")
    sleeper = cx.spawn(["120"], "sleeper", code="import sys, time; time.sleep(float(sys.argv[1]))")
    (cx.c / "R" / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                   "since": "2024-01-01 00:00:00"}))
    res = cx.spawn(["train", "--resume", f"{cx.c}/R", "--epochs", "2", "--allow-config-change", "--no-progress"],
                   "resume").finish(60)
    sleeper.signal(signal.SIGKILL)
    sleeper.finish(10)
    problems: Problems = []
    if res.rc == 0:
        problems.append(("silent", "resumed a run folder held by a live process"))
    elif str(sleeper.pid) not in res.stderr:
        problems.append(("silent", "the refusal does not name the holder's PID"))
    problems += loadable("{C}/R/last.pt", epoch=1)(cx, res)
    return res, problems


def _drive_closed_stdout(cx: Ctx) -> tuple[Result, Problems]:
    r, w = os.pipe()
    os.close(r)  # nobody reads: every write to stdout fails with EPIPE
    child = cx.spawn(["fold", cx.sub("{RUN}"), "-o", f"{cx.c}/o"], "fold", stdout=w)
    os.close(w)
    res = child.finish(60)
    problems: Problems = []
    if res.rc == 0:
        problems += _deployed_loads(cx.c / "o" / "deployed.safetensors")
    return res, problems


def _drive_deleted_cwd(cx: Ctx) -> tuple[Result, Problems]:
    gone = cx.c / "gone"
    gone.mkdir()
    child = Child([sys.executable, "-c", "import os, sys; from foldattn.cli import main; os.rmdir(os.getcwd()); "
                   "sys.exit(main(sys.argv[1:]))",
                   "fold", cx.sub("{RUN}"), "-o", f"{cx.c}/o"], gone, cx.sb.env, cx.sb.logs / cx.case.id / "fold",
                  cx.sb.as_limit)
    cx.children.append(child)
    res = child.finish(60)
    problems: Problems = []
    if res.rc == 0:
        problems += _deployed_loads(cx.c / "o" / "deployed.safetensors")
    return res, problems


def all_cases() -> list[Case]:
    cases = (tampered_cases() + quantize_cases() + sweep_cases() + calibrate_stripe_cases() + bench_cases()
             + api_cases() + images_cases() + faults_cases())
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate case ids: {dup}"
    assert all(c.kind in KINDS for c in cases)
    return cases


# ----------------------------------------------------------------------------------------------------
# running and classifying one case
# ----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    cls: str
    why: str
    notes: list[str]
    result: Result | None
    command: str

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {"id": self.case.id, "kind": self.case.kind, "expect": self.case.expect, "class": self.cls,
                "why": self.why, "notes": self.notes, "command": self.command,
                "exit": None if r is None else r.rc, "signal": None if r is None else r.signal,
                "timed_out": None if r is None else r.timed_out,
                "wall_s": None if r is None else round(r.wall_s, 2),
                "peak_rss_mib": None if r is None else round(r.peak_rss_mib, 1),
                "last_stderr_line": last_line(r.stderr) if r else "",
                "last_stdout_line": last_line(r.stdout) if r else "",
                "stderr_tail": "\n".join(r.stderr.strip().splitlines()[-15:]) if r else "",
                "stdout_tail": "\n".join(r.stdout.strip().splitlines()[-5:]) if r else ""}


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else ""


def last_message(r: Result | None) -> str:
    """The last stderr line, or (marked) stdout's where stderr is empty."""
    if r is None:
        return ""
    return last_line(r.stderr) or (f"(stderr empty; stdout:) {last_line(r.stdout)}" if r.stdout.strip() else "")


OUTPUT_OPTIONS = ("-o", "--out", "--output", "--onnx", "--pt2", "--cache-dir")


def argv_outputs(case: Case) -> list[str]:
    """What a command line names as its output under the case folder (its first path component)."""
    argv = case.argv or []
    return [argv[i + 1][len("{C}/"):].split("/")[0] for i, a in enumerate(argv[:-1])
            if a in OUTPUT_OPTIONS and argv[i + 1].startswith("{C}/")]


def command_text(case: Case, cx: Ctx) -> str:
    if case.argv is not None:
        return "foldattn " + shlex.join(cx.sub(a) for a in case.argv)
    if case.code is not None:
        return f"python -c <library code of {case.id}>"
    return f"<driver {case.id}>"


def run_case(sb: Sandbox, case: Case, rss_bound_mib: float, default_timeout: float | None) -> Outcome:
    c = sb.cases / case.id
    c.mkdir(parents=True)
    cx = Ctx(sb, case, c)
    for n in case.needs:
        sb.need(n)
    if "TMPFS" in case.needs and not sb.tmpfs_ok:
        return Outcome(case, "skipped", "mount -t tmpfs is not permitted here", [], None, command_text(case, cx))
    _P.update(sb.paths)
    _P["C"] = str(c)
    try:
        if case.setup is not None:
            case.setup(cx)
    except Exception as e:
        sb.unmount_all()
        return Outcome(case, "skipped", f"setup failed: {type(e).__name__}: {e}", [], None, command_text(case, cx))
    before_sandbox = snapshot(sb.root, exclude=[c, sb.logs])
    before_case = snapshot(c)
    for v in sb.victims:
        v.fp = fingerprint(v.path)
    timeout = default_timeout or case.timeout
    problems: Problems = []
    try:
        if case.driver is not None:
            result, problems = case.driver(cx)
        else:
            if case.code is not None:
                child = cx.spawn([str(c)], "api", code=case.code)
            elif case.audit:
                env = {"HS_FORBID": os.pathsep.join([sb.paths["SECRET"], sb.paths["VICTIM"]]),
                       "HS_AUDIT_LOG": str(c / "audit.json")}
                child = cx.spawn([cx.sub(a) for a in case.argv or []], "cmd", code=AUDIT, env=env)
            else:
                child = cx.spawn([cx.sub(a) for a in case.argv or []], "cmd")
            result = child.finish(timeout)
    finally:
        strays = []
        for ch in cx.children:
            ch.poll() or ch.finish(1)
            strays += [p for p in session_members(ch.pid) if p != ch.pid]
        for p in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    if case.audit:
        problems += audit_post(cx, result, case.network_ok)
    if case.post is not None and case.expect != "driver":
        try:
            problems += case.post(cx, result)
        except Exception as e:
            problems.append(("silent", f"postcondition could not be checked: {type(e).__name__}: {e}"))
    # lost: victims, the sandbox outside this case, this case's folder outside its outputs
    lost: list[str] = []
    for v in sb.victims:
        changed = v.changed()
        if changed:
            lost.append(f"victim {v.path.name} changed: {', '.join(changed[:4])}")
            v.restore()
    outside = [d for d in diff(before_sandbox, snapshot(sb.root, exclude=[c, sb.logs]))
               if not any(d[1:].startswith(os.path.relpath(v.path, sb.root)) for v in sb.victims)]
    if outside:
        lost.append(f"outside its folder: {', '.join(outside[:4])}")
    allowed = ("audit.json", *case.outputs, *argv_outputs(case))
    after_case = snapshot(c) if c.exists() else {}
    stray_files = [d for d in diff(before_case, after_case)
                   if not any(d[1:] == o or d[1:].startswith(o.rstrip("/") + "/") or fnmatch.fnmatch(d[1:], o)
                              for o in allowed)]
    if stray_files:
        lost.append(f"not among its outputs: {', '.join(stray_files[:4])}")
    if case.teardown is not None:
        case.teardown(cx)
    sb.unmount_all()
    cls, why, notes = classify(case, result, lost, problems, strays, rss_bound_mib, before_case, after_case)
    return Outcome(case, cls, why, notes, result, command_text(case, cx))


def classify(case: Case, res: Result, lost: list[str], problems: Problems, strays: list[int], rss_bound_mib: float,
             before_case: Snapshot, after_case: Snapshot) -> tuple[str, str, list[str]]:
    notes: list[str] = []
    found: Problems = [("lost", m) for m in lost]
    if "Traceback (most recent call last)" in res.stderr:
        found.append(("traceback", "Traceback on stderr"))
    if res.timed_out:
        found.append(("hang/memory", f"no end within the timeout ({res.wall_s:.0f} s)"))
    elif res.signal is not None:
        found.append(("hang/memory", f"killed by signal {res.signal}"))
    mem = [w for w in MEMORY_WORDS if w in res.stderr]
    if mem:
        found.append(("hang/memory", f"{mem[0]} on stderr"))
    if res.peak_rss_mib > rss_bound_mib:
        found.append(("hang/memory", f"peak RSS {res.peak_rss_mib:.0f} MiB > {rss_bound_mib:.0f} MiB"))
    if strays:
        found.append(("hang/memory", f"{len(strays)} process(es) of the case still alive after it ended"))
    if "POSTCONDITION FAILED" in res.stderr:
        found.append(("silent", last_line(res.stderr.split("POSTCONDITION FAILED:")[-1])))
    found += problems
    refused = res.rc is not None and res.rc not in case.ok_codes
    if res.rc is not None and res.rc != 0 and not res.stderr.strip() and res.stdout.strip():
        notes.append(f"exit {res.rc} with nothing on stderr (the message went to stdout)")
    if case.expect == "refuse" and res.rc is not None and not refused:
        found.append(("silent", f"a refusal was expected; it exited {res.rc}"))
    if case.expect == "ok" and refused:
        found.append(("silent", f"a success was expected; exit {res.rc}: {last_line(res.stderr)[:160]}"))
    if refused and case.expect in ("refuse", "either"):
        left = [d for d in diff(before_case, after_case) if d[1:] != "audit.json"]
        if left and case.argv is not None:  # library code writes its own helper files
            found.append(("silent", f"the refusal left {', '.join(left[:4])}"))
        if res.rc != 2:
            notes.append(f"refused with exit {res.rc}, not 2")
        if case.message and case.message not in res.stderr:
            notes.append(f"message lacks {case.message!r}")
        errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower() and "Traceback" not in ln]
        if len(errors) > 1:
            notes.append(f"{len(errors)} lines mention an error")
    if found:
        found.sort(key=lambda p: SEVERITY[p[0]])
        return found[0][0], "; ".join(m for _, m in found)[:600], notes
    return "handled", "refused" if refused else f"ran (exit {res.rc})", notes


# ----------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------
def table(outcomes: list[Outcome], kinds: Sequence[str]) -> str:
    head = "| kind | cases | " + " | ".join(CLASSES) + " |"
    rows = [head, "|" + "---|" * (len(CLASSES) + 2)]
    total = dict.fromkeys(CLASSES, 0)
    n_all = 0
    for k in kinds:
        mine = [o for o in outcomes if o.case.kind == k and o.cls != "skipped"]
        if not mine:
            continue
        counts = {cl: sum(o.cls == cl for o in mine) for cl in CLASSES}
        for cl in CLASSES:
            total[cl] += counts[cl]
        n_all += len(mine)
        rows.append(f"| {k} | {len(mine)} | " + " | ".join(str(counts[cl]) for cl in CLASSES) + " |")
    rows.append(f"| **all** | **{n_all}** | " + " | ".join(f"**{total[cl]}**" for cl in CLASSES) + " |")
    return "\n".join(rows)


def summary_line(outcomes: list[Outcome]) -> str:
    done = [o for o in outcomes if o.cls != "skipped"]
    parts = [f"{sum(o.cls == cl for o in done)} {cl}" for cl in CLASSES]
    skipped = len(outcomes) - len(done)
    return f"{len(done)} cases: " + ", ".join(parts) + (f" ({skipped} skipped)" if skipped else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, help="only these kinds")
    ap.add_argument("--only", nargs="+", metavar="ID", help="only these case ids")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--out", type=Path, help="results JSON [a file in the system's temporary folder]")
    ap.add_argument("--table", type=Path, help="also write the per-kind table as Markdown here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (fixtures, case folders, logs)")
    ap.add_argument("--timeout", type=float, help="seconds per command [each case's own: 60 for most]")
    ap.add_argument("--mem-limit-gib", type=float, default=6.0, help="RLIMIT_AS of every command [6]")
    ap.add_argument("--rss-bound-gib", type=float, default=3.0, help="peak RSS above this is hang/memory [3]")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's last stderr line")
    args = ap.parse_args(argv)

    cases = all_cases()
    if args.kinds:
        cases = [c for c in cases if c.kind in args.kinds]
    if args.only:
        unknown = set(args.only) - {c.id for c in cases}
        if unknown:
            ap.error(f"unknown case id(s): {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c.id in args.only]
    if args.list:
        for c in cases:
            print(f"{c.kind:17s} {c.id:45s} {c.expect}")
        print(f"{len(cases)} cases: " + ", ".join(f"{k} {sum(c.kind == k for c in cases)}" for k in KINDS))
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(tempfile.gettempdir()) / f"foldattn-hostile-{stamp}.json"
    root = Path(tempfile.mkdtemp(prefix="foldattn-hostile-"))
    sb = Sandbox(root, int(args.mem_limit_gib * GIB), args.verbose)
    rss_bound = args.rss_bound_gib * 1024
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    try:
        sb.build()
        _P.update(sb.paths)
        for i, case in enumerate(cases, 1):
            o = run_case(sb, case, rss_bound, args.timeout)
            outcomes.append(o)
            r = o.result
            extra = "" if r is None else f" exit {r.rc if r.signal is None else -r.signal}, {r.wall_s:.1f} s, " \
                                         f"{r.peak_rss_mib:.0f} MiB"
            print(f"[{i:3d}/{len(cases)}] {o.cls:11s} {case.kind:16s} {case.id}{extra}", flush=True)
            if o.cls not in ("handled", "skipped") or args.verbose:
                print(f"      {o.why[:300]}" + (f"\n      stderr: {last_message(r)[:240]}" if r else ""),
                      flush=True)
    finally:
        sb.unmount_all()
        kinds = [k for k in KINDS if any(o.case.kind == k for o in outcomes)]
        report = {"when": stamp, "python": sys.version.split()[0], "cases": len(outcomes),
                  "rlimit_as_gib": args.mem_limit_gib, "rss_bound_gib": args.rss_bound_gib,
                  "seconds": round(time.monotonic() - t0), "summary": summary_line(outcomes),
                  "table": table(outcomes, kinds), "results": [o.as_json() for o in outcomes]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    md = table(outcomes, kinds)
    print("\n" + md + "\n")
    bad = [o for o in outcomes if o.cls not in ("handled", "skipped")]
    if bad:
        print(f"not handled ({len(bad)}):")
        for o in bad:
            r = o.result
            status = "-" if r is None else (r.rc if r.signal is None else f"signal {r.signal}")
            print(f"- {o.case.id} [{o.case.kind}] {o.cls}: {o.why[:300]}\n    $ {o.command[:300]}\n"
                  f"    exit {status}; last stderr line: {last_message(r)}")
    skipped = [o for o in outcomes if o.cls == "skipped"]
    for o in skipped:
        print(f"- skipped {o.case.id}: {o.why}")
    noted = [o for o in outcomes if o.notes and o.cls == "handled"]
    if noted:
        print(f"\nnotes on handled cases ({len(noted)}):")
        for o in noted:
            tail = last_message(o.result)
            print(f"- {o.case.id}: {'; '.join(o.notes)}; last stderr line: {tail}")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(md + "\n\n" + summary_line(outcomes) + "\n")
    print(f"\nresults: {out}" + (f"; sandbox kept: {root}" if args.keep else ""))
    print(summary_line(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
