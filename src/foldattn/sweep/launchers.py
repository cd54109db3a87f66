"""Where the runs of a sweep execute: this machine (its CPU, or its GPUs a run or a group at a time), a Ray
cluster, or SLURM through submitit.

The runner (:func:`foldattn.sweep.run_sweep`) keeps one loop whatever runs the runs: it decides which runs
are due (new, partial: resumed, finished: kept), starts one where a slot is free, polls the running ones and
rewrites the summary when one ends. A launcher answers "start this run", "has it ended (its exit code)" and
"stop resumably"; every run is the same ``foldattn train`` process with the same folder, log and checkpoint,
so resume and summary do not depend on the launcher. ``--dry-run`` shows each run's device (:meth:`Launcher.plan`).

- ``local``: a child process per run (``CUDA_VISIBLE_DEVICES`` set per run from a pool of GPU ids; a run of
  ``gpus_per_run > 1`` is a DDP run through torchrun on that many).
- ``ray``: a Ray task per run (its CPUs and GPUs declared), on a local Ray instance or the cluster at
  ``address``; the task starts the same process on its worker and returns its exit code.
- ``slurm``: a submitit job per run; a job warned of its time limit stops the run resumably and is requeued
  (:class:`SlurmRun`); the job ids are kept in ``OUT/slurm/jobs.json`` so that the same command run again
  follows the jobs still queued or running instead of submitting them twice.

The extras (``foldattn[ray]``, ``foldattn[slurm]``) are imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._files import load_json_file
from .._utils import require, write_json
from .spec import MAX_GPU_IDS, MAX_GPUS_PER_RUN, SweepError
from .task import RunTask, die_with_parent, execute, open_log, process_alive, read_probe, run_state, stop_current

__all__ = ["Launcher", "LocalLauncher", "RayLauncher", "SlurmLauncher", "SlurmRun", "GpuPool", "LAUNCHERS",
           "parse_gpus", "visible_gpus"]

#: seconds the shared-storage check waits for every Ray node to read the probe
PROBE_TIMEOUT_S = 120.0
#: seconds a job warned by SLURM (90 s before its limit, submitit's default) gives its run to stop
SLURM_STOP_S = 75.0


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _require(module: str, extra: str) -> Any:
    """The extra's module, or a one-line SweepError naming what to install."""
    try:
        return require(module, extra)
    except ImportError as e:
        raise SweepError(f"--launcher {extra}: {e}") from None


class Launcher:
    """Starts, polls and stops the runs of one sweep (the base class is the interface)."""

    name = "local"
    #: the runs execute elsewhere: their paths are absolute, and the sweep folder must be on shared storage
    remote = False
    #: processes per run (torchrun's ranks when above 1)
    ranks = 1

    def __init__(self) -> None:
        self.log: Callable[[str], None] = print

    def check(self, full: bool = True) -> None:
        """What can be refused before anything is written or started: a missing extra, and unless ``full`` is
        false (the dry run) what the real thing needs (``sbatch``, a time limit)."""

    def connect(self, out: Path) -> None:
        """Reach the engine (start or join Ray, ...) before the sweep claims ``out``; refuses with a SweepError
        and leaves nothing behind."""
        self.check()

    def open(self, out: Path) -> None:
        """The sweep holds ``out`` now: set up what the launcher keeps there."""

    def capacity(self, jobs: int) -> int:
        """Runs in flight at once, given ``--jobs``."""
        return jobs

    def describe(self) -> str:
        """What the sweep's first line adds about where the runs go."""
        return ""

    def plan(self, index: int) -> str:
        """The device the ``index``-th run to start gets, as ``--dry-run`` shows it."""
        return "cpu"

    def attach(self, task: RunTask) -> bool:
        """Follow a job an earlier driver submitted for ``task`` that is still queued or running."""
        return False

    def start(self, task: RunTask, resume: bool) -> None:
        """Start ``task`` (raises SweepError when this run cannot start; the others go on)."""
        raise NotImplementedError

    def poll(self, key: str) -> int | None:
        """The run's exit code once it has ended (negative: it did not report one), else None."""
        raise NotImplementedError

    def interrupt(self, signum: int) -> None:
        """The driver got ``signum``: make the running runs stop resumably (they end on their own)."""

    def close(self) -> None:
        """The sweep is over (or stopped): release what :meth:`connect` acquired."""


# ----------------------------------------------------------------------------------------------- local GPUs


def visible_gpus() -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (ids, UUIDs or MIG names), or None when it is not set: a
    ``--gpus`` id indexes this list, so a sweep started under ``CUDA_VISIBLE_DEVICES=2,3`` gives its runs 2 and 3."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def parse_gpus(text: str) -> list[int]:
    """``--gpus`` as ids: ``0,1,2,3``, ranges ``0-3``, or ``none`` (no GPU: the runs train as on a CPU machine)."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return []
    ids: list[int] = []
    seen: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or len(lo) > 6 or len(hi) > 6:
            raise SweepError(f"--gpus {text!r}: expected GPU ids such as 0,1,2,3 or 0-3 (or none)")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first or last >= MAX_GPU_IDS:
            raise SweepError(f"--gpus {text!r}: ids are in [0, {MAX_GPU_IDS - 1}], a range low-high")
        if len(ids) + last - first + 1 > MAX_GPU_IDS:
            raise SweepError(f"--gpus {text!r}: at most {MAX_GPU_IDS} GPUs")
        for i in range(first, last + 1):
            if i in seen:
                raise SweepError(f"--gpus {text!r}: GPU {i} is named twice")
            seen.add(i)
            ids.append(i)
    return ids


class GpuPool:
    """GPU ids handed out ``per_run`` at a time: a run takes the lowest free ones and gives them back when it ends."""

    def __init__(self, ids: Sequence[int], per_run: int, visible: Sequence[str] | None = None) -> None:
        if not 1 <= per_run <= MAX_GPUS_PER_RUN:
            raise SweepError(f"--gpus-per-run {per_run}: expected 1 to {MAX_GPUS_PER_RUN} with --gpus")
        if per_run > len(ids):
            raise SweepError(f"--gpus-per-run {per_run}: --gpus names {len(ids)} GPU(s)")
        if visible is not None and ids and max(ids) >= len(visible):
            raise SweepError(f"--gpus {max(ids)}: CUDA_VISIBLE_DEVICES makes {len(visible)} GPU(s) visible "
                             f"(ids 0-{len(visible) - 1})" if visible else
                             "--gpus: CUDA_VISIBLE_DEVICES is empty here: no GPU is visible")
        self.ids, self.per_run, self.visible = list(ids), per_run, list(visible) if visible is not None else None
        self.free = list(ids)

    @property
    def slots(self) -> int:
        return len(self.ids) // self.per_run

    def take(self) -> list[int]:
        if len(self.free) < self.per_run:
            raise SweepError("no free GPU")  # the runner keeps runs in flight to the pool's slots
        got = sorted(self.free, key=self.ids.index)[:self.per_run]
        self.free = [i for i in self.free if i not in got]
        return got

    def give(self, ids: Sequence[int]) -> None:
        self.free += [i for i in ids if i not in self.free]

    def planned(self, index: int) -> list[int]:
        """The ids of the ``index``-th run when runs end in the order they started (the dry run's picture)."""
        slot = index % self.slots
        return self.ids[slot * self.per_run:(slot + 1) * self.per_run]

    def env(self, ids: Sequence[int]) -> str:
        """``CUDA_VISIBLE_DEVICES`` of a run holding ``ids``."""
        return ",".join(self.visible[i] if self.visible is not None else str(i) for i in ids)

    def label(self, ids: Sequence[int]) -> str:
        return "cuda " + ",".join(map(str, ids))


class LocalLauncher(Launcher):
    """Each run a child process of the sweep (the runner as it always was), optionally on a pool of GPUs.

    No run outlives its sweep: a signal to the sweep is passed on (SIGTERM: a resumable checkpoint), and on
    Linux a run gets SIGTERM when the sweep dies even by SIGKILL (``PR_SET_PDEATHSIG``).
    """

    name = "local"

    def __init__(self, gpus: Sequence[int] = (), gpus_per_run: int = 1,
                 visible: Sequence[str] | None = None) -> None:
        super().__init__()
        self.pool = GpuPool(gpus, gpus_per_run, visible) if gpus else None
        self.ranks = gpus_per_run if gpus else 1
        self._running: dict[str, tuple[subprocess.Popen[bytes], IO[bytes], list[int]]] = {}

    def capacity(self, jobs: int) -> int:
        return min(jobs, self.pool.slots) if self.pool is not None else jobs

    def describe(self) -> str:
        if self.pool is None:
            return ""
        return f", GPUs {','.join(map(str, self.pool.ids))}, {self.pool.per_run} per run"

    def plan(self, index: int) -> str:
        return "cpu" if self.pool is None else self.pool.label(self.pool.planned(index))

    def start(self, task: RunTask, resume: bool) -> None:
        devices = self.pool.take() if self.pool is not None else []
        env = {**os.environ, **dict(task.env)}
        if self.pool is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.pool.env(devices)
            task = dataclasses.replace(task, device=self.pool.label(devices))
        try:
            logf = open_log(Path(task.log))
        except SweepError:
            if self.pool is not None:
                self.pool.give(devices)
            raise
        logf.write(task.header(resume))
        logf.flush()
        proc = subprocess.Popen(task.process_argv(resume), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self._running[task.key] = (proc, logf, devices)

    def poll(self, key: str) -> int | None:
        proc, logf, devices = self._running[key]
        rc = proc.poll()
        if rc is None:
            return None
        logf.close()
        if self.pool is not None:
            self.pool.give(devices)
        del self._running[key]
        return rc

    def interrupt(self, signum: int) -> None:
        for proc, _, _ in self._running.values():  # a terminal's Ctrl-C reached them already; SIGTERM from kill did not
            if proc.poll() is None and signum != signal.SIGINT:  # a closed terminal's SIGHUP too
                proc.send_signal(signal.SIGTERM)


# ------------------------------------------------------------------------------------------------------ Ray


def _reachable(address: str, label: str) -> None:
    """A TCP connection to a ``HOST:PORT`` (or ``ray://HOST:PORT``) address, within seconds: ``ray.init`` on an
    address nobody answers retries for a long time."""
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SweepError(f"{label}: expected HOST:PORT of a Ray cluster's head (or ray://HOST:PORT, auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise SweepError(f"{label}: no Ray cluster answers there ({e.strerror or e}); start one (`ray start --head` "
                         "on its head node) or correct the address") from None


class RayLauncher(Launcher):
    """Each run a Ray task declaring its CPUs (threads x ranks) and GPUs; the task runs the same ``foldattn
    train`` process on its worker and returns its exit code. The sweep folder must be on storage every node
    mounts at the same path (checked before the sweep starts: every node reads a probe file).

    Ctrl-C or SIGTERM on the driver cancels the tasks (a KeyboardInterrupt in each, which stops its run
    resumably) and waits for them; running the same command again resumes as the local runner does.
    """

    name = "ray"
    remote = True

    def __init__(self, address: str | None = None, gpus_per_run: int | None = None, threads: int = 1) -> None:
        super().__init__()
        env = os.environ.get("RAY_ADDRESS") or None
        self.address = address or env or "local"
        self.label = f"--address {address}" if address else (f"RAY_ADDRESS={env}" if env else "Ray")
        self.gpus_per_run = gpus_per_run
        self.threads = max(1, threads)
        self.ranks = max(1, gpus_per_run or 1)
        self._ray: Any = None
        self._fn: Any = None
        self._refs: dict[str, Any] = {}
        self._initialized = False

    @property
    def cpus(self) -> int:
        return self.threads * self.ranks

    def check(self, full: bool = True) -> None:
        self._ray = _require("ray", "ray")

    def connect(self, out: Path) -> None:
        self.check()
        ray = self._ray
        if self.address not in ("local", "auto"):
            _reachable(self.address, self.label)
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
        if self.address == "local":
            kwargs["num_cpus"] = os.cpu_count() or 1
        try:
            ray.init(address=self.address, **kwargs)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError, ...: one line either way
            raise SweepError(f"{self.label}: Ray did not start or could not be reached: {_first_line(e)}") from None
        self._initialized = True
        try:
            self._configure()
            self._check_shared(out)
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        ray = self._ray
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if self.gpus_per_run is None:
            self.gpus_per_run = 1 if gpus >= 1 else 0
        self.ranks = max(1, self.gpus_per_run)
        where = "this machine's Ray instance" if self.address == "local" else "the cluster"
        if self.gpus_per_run > gpus or self.cpus > resources.get("CPU", 0):
            message = (f"a run asks for {self.cpus} CPU(s) and {self.gpus_per_run} GPU(s); {where} has "
                       f"{resources.get('CPU', 0):g} and {gpus:g}")
            if self.address == "local":
                raise SweepError(f"--launcher ray: {message}: lower --threads or --gpus-per-run")
            self.log(f"sweep: note: {message}; the tasks wait until nodes that large join")
        self._fn = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus_per_run, max_retries=0)(execute)

    def _check_shared(self, out: Path) -> None:
        """Every live node must read a probe file written into ``out`` here: the runs write their folders and
        logs there, and the driver reads them back."""
        ray = self._ray
        strategies = _require("ray.util.scheduling_strategies", "ray")
        made = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        probe = out / f".probe-{token[:8]}"
        probe.write_text(token)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            reader = ray.remote(num_cpus=0, max_retries=0)(read_probe)
            refs = {reader.options(scheduling_strategy=strategies.NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(probe)): n.get("NodeManagerAddress", n["NodeID"]) for n in nodes}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
            blind = []
            for ref, node in refs.items():
                seen = None
                if ref in ready:
                    with contextlib.suppress(Exception):
                        seen = ray.get(ref)
                if seen != token:
                    blind.append(str(node))
            if blind:
                raise SweepError(f"-o {out}: Ray node(s) {', '.join(blind[:5])}{' ...' if len(blind) > 5 else ''} "
                                 "do not see the sweep folder at this path: put it on storage every node mounts at "
                                 "the same path (NFS, a parallel file system)")
        finally:
            probe.unlink(missing_ok=True)
            for p in made:  # innermost first; only what this check created, and only if empty
                with contextlib.suppress(OSError):
                    p.rmdir()

    def describe(self) -> str:
        where = "a local Ray instance" if self.address == "local" else f"Ray at {self.address}"
        return f", on {where}, {self.cpus} CPU(s) and {self.gpus_per_run or 0} GPU(s) per run"

    def plan(self, index: int) -> str:
        gpus = "auto" if self.gpus_per_run is None else str(self.gpus_per_run)
        return f"ray cpu={self.cpus} gpu={gpus}"

    def start(self, task: RunTask, resume: bool) -> None:
        label = f"ray cpu={self.cpus} gpu={self.gpus_per_run}"
        self._refs[task.key] = self._fn.remote(dataclasses.replace(task, device=label))

    def poll(self, key: str) -> int | None:
        ray = self._ray
        ref = self._refs[key]
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        del self._refs[key]
        try:
            return int(ray.get(ref))
        except Exception as e:  # the task raised, was cancelled before it started, or its worker died
            self.log(f"sweep: {key}: {type(e).__name__}: {_first_line(e)[:300]}")
            return -1

    def interrupt(self, signum: int) -> None:
        for ref in self._refs.values():
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=False)  # a KeyboardInterrupt in the task: it stops its run resumably

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            with contextlib.suppress(Exception):
                self._ray.shutdown()


# ---------------------------------------------------------------------------------------------------- SLURM


class SlurmRun:
    """A submitit job: one run. Its ``checkpoint`` (submitit calls it when SLURM warns of the time limit, or on a
    preemption signal) stops the run resumably and returns the same job to requeue; the requeued job finds the
    checkpoint and runs with ``--resume``."""

    def __init__(self, task: RunTask) -> None:
        self.task = task

    def __call__(self) -> int:
        rc = execute(self.task, forward=(signal.SIGTERM,))
        if rc in (130, 143) and os.environ.get("SLURM_JOB_ID") and not _finished(self.task):
            # SLURM's own SIGTERM (a preemption, scancel): the job is SLURM's to requeue or end; returning would
            # write a result and the sweep would read a stopped run as ended. Wait to be killed.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(1)
        return rc

    def checkpoint(self) -> Any:
        stop_current(signal.SIGTERM, wait_s=SLURM_STOP_S)
        helpers = require("submitit.helpers", "slurm")
        return helpers.DelayedSubmission(SlurmRun(self.task))


def _finished(task: RunTask) -> bool:
    return run_state(Path(task.folder)) == "finished"


class SlurmLauncher(Launcher):
    """Each run a job submitted through submitit (``sbatch``; ``executor=local``: submitit's LocalExecutor, the
    same path as processes on this machine). The options are the ``slurm:`` block's keys (:data:`SLURM_KEYS`).

    Jobs outlive the driver (they are SLURM's): running the same command again follows the jobs still queued or
    running (``OUT/slurm/jobs.json``) and submits the rest. Ctrl-C or SIGTERM on the driver cancels the jobs
    (``scancel``: SIGTERM, a resumable checkpoint).
    """

    name = "slurm"
    remote = True

    def __init__(self, options: Mapping[str, Any], gpus_per_run: int | None = None, threads: int = 1) -> None:
        super().__init__()
        self.options = dict(options)
        gpus = gpus_per_run if gpus_per_run is not None else int(self.options.get("gpus_per_node", 0))
        self.gpus = gpus
        self.ranks = max(1, gpus)
        self.cluster = str(self.options.get("executor", "slurm"))
        self.cpus = int(self.options.get("cpus_per_task", max(1, threads) * self.ranks))
        self._submitit: Any = None
        self._executor: Any = None
        self._jobs: dict[str, Any] = {}
        self._attached: set[str] = set()
        self._record: Path | None = None
        self._ids: dict[str, str] = {}

    def check(self, full: bool = True) -> None:
        self._submitit = _require("submitit", "slurm")
        if self.cluster == "slurm" and full:
            if shutil.which("sbatch") is None:
                raise SweepError("--launcher slurm: no `sbatch` on PATH: run the sweep on a SLURM login node (or "
                                 "try the SLURM path on this machine with --slurm executor=local)")
            if "time" not in self.options:
                raise SweepError("--launcher slurm needs each job's time limit: --slurm time=MINUTES (or `time:` "
                                 "in the sweep file's slurm block); a run that reaches it is requeued from its "
                                 "checkpoint")

    def parameters(self, key: str = "sweep") -> dict[str, Any]:
        """submitit's parameters of a run's job (AutoExecutor's names)."""
        o = self.options
        # the local executor kills a job at its time limit too: without one it gets 30 days
        params: dict[str, Any] = {"name": f"foldattn-{key}", "timeout_min": int(o.get("time", 30 * 24 * 60)),
                                  "nodes": 1, "tasks_per_node": 1, "cpus_per_task": self.cpus,
                                  "gpus_per_node": self.gpus}
        if "mem_gb" in o:
            params["mem_gb"] = int(o["mem_gb"])
        for name in ("partition", "constraint", "account", "qos"):
            if name in o:
                params[f"slurm_{name}"] = o[name]
        return params

    def executor(self, folder: Path, cluster: str | None = None) -> Any:
        """A configured ``submitit.AutoExecutor`` writing into ``folder`` (``cluster``: this launcher's)."""
        submitit = self._submitit or _require("submitit", "slurm")
        timeouts = int(self.options.get("max_timeouts", 3))
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster or self.cluster,
                                   slurm_max_num_timeout=timeouts, local_max_num_timeout=timeouts)
        ex.update_parameters(**self.parameters())
        return ex

    def sbatch_script(self, folder: Path, key: str = "sweep") -> str:
        """The sbatch script submitit writes for a run's job (what ``sbatch`` would be given)."""
        ex = self.executor(folder, "slurm")
        ex.update_parameters(name=f"foldattn-{key}")
        inner = ex._executor
        return str(inner._make_submission_file_text(inner._submitit_command_str, "preview"))

    def describe(self) -> str:
        o = self.options
        parts = [f"{self.cpus} CPU(s)", f"{self.gpus} GPU(s)"] + [f"{k} {o[k]}" for k in ("partition", "time")
                                                                  if k in o]
        where = "SLURM" if self.cluster == "slurm" else "submitit's local executor"
        return f", as {where} jobs: {', '.join(parts)} each"

    def plan(self, index: int) -> str:
        return f"slurm cpu={self.cpus} gpu={self.gpus}"

    def open(self, out: Path) -> None:
        folder = out / "slurm"
        if folder.is_symlink():
            raise SweepError(f"-o {out}: {folder} is a symbolic link; the sweep writes only into its own folder: "
                             "remove the link")
        self._executor = self.executor(folder)
        self._record = folder / "jobs.json"
        self._ids = {}
        if self._record.is_file():
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                data = load_json_file(self._record, "sweep jobs record")
                if data.get("executor") == self.cluster:
                    self._ids = {str(k): str(v) for k, v in dict(data.get("jobs", {})).items()
                                 if str(v).replace("_", "").isdigit()}

    def _save(self) -> None:
        assert self._record is not None
        write_json(self._record, {"format": "foldattn-sweep-jobs", "executor": self.cluster, "jobs": self._ids})

    def _job(self, job_id: str) -> Any:
        submitit = self._submitit
        assert self._executor is not None
        folder = self._executor.folder
        if self.cluster == "local":
            return submitit.local.local.LocalJob(folder=folder, job_id=job_id)
        return submitit.SlurmJob(folder=folder, job_id=job_id)

    def _alive(self, key: str) -> bool:
        job = self._jobs[key]
        if self.cluster == "local" and key in self._attached:  # not this process's child: its controller's PID
            return process_alive(int(job.job_id))
        return not job.done()

    def attach(self, task: RunTask) -> bool:
        job_id = self._ids.get(task.key)
        if job_id is None:
            return False
        self._jobs[task.key] = self._job(job_id)
        self._attached.add(task.key)
        if self.cluster == "local":
            alive = process_alive(int(job_id.split("_")[0]))
        else:
            try:
                alive = not self._jobs[task.key].done(force_check=True)
            except Exception:  # sacct does not know it (purged): not ours to follow
                alive = False
        if not alive:
            del self._jobs[task.key]
            self._attached.discard(task.key)
            del self._ids[task.key]
            self._save()
        return alive

    def start(self, task: RunTask, resume: bool) -> None:
        assert self._executor is not None
        label = f"slurm cpu={self.cpus} gpu={self.gpus}"
        self._executor.update_parameters(name=f"foldattn-{task.key}")
        try:
            job = self._executor.submit(SlurmRun(dataclasses.replace(task, device=label)))
        except Exception as e:  # sbatch refused (partition, account, time over the partition's limit, ...)
            raise SweepError(f"submitting {task.key}: {_first_line(e)[:300]}") from None
        self._jobs[task.key] = job
        self._ids[task.key] = str(job.job_id)
        self._save()

    def poll(self, key: str) -> int | None:
        if self._alive(key):
            return None
        job = self._jobs.pop(key)
        self._attached.discard(key)
        self._ids.pop(key, None)
        self._save()
        try:
            return int(job.result())
        except Exception as e:  # the job died (killed, cancelled, out of time too often) without a result
            self.log(f"sweep: {key}: job {job.job_id} ended without a result: {_first_line(e)[:300]}")
            return -1

    def interrupt(self, signum: int) -> None:
        for key, job in self._jobs.items():
            with contextlib.suppress(Exception):
                if self.cluster == "local":  # its controller passes SIGTERM to the job, which stops its run
                    os.kill(int(job.job_id), signal.SIGTERM)
                else:
                    job.cancel(check=False)  # scancel: SIGTERM to the job's processes, the run checkpoints
            self.log(f"sweep: cancelling {key} (job {job.job_id})")


#: ``--launcher`` names
LAUNCHERS: dict[str, type[Launcher]] = {"local": LocalLauncher, "ray": RayLauncher, "slurm": SlurmLauncher}
