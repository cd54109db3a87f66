"""Peak memory of one forward and one training step, per variant.

CUDA: measured in this process (``max_memory_allocated`` of the caching allocator).
CPU: measured in a fresh subprocess (:func:`_memory_subprocess`), from the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed so freed buffers go back to the OS. Both paths run
the same measurement, :func:`_measure_variants`.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import torch

from .config import BenchConfig
from .family import _VARIANT, VARIANTS, Family, get_family
from .workload import _inputs, _prepare, _train_step

__all__ = ["MIB", "cpu_peak_supported", "peak_memory"]

MIB = 1024 * 1024

class Peak(TypedDict):
    """Peak bytes of one variant: inference, and a training step (None: the variant is not trained)."""

    inference: int
    train: int | None


#: peak bytes of each variant key
Peaks = dict[str, Peak]

_PEAK_RESET = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
#: glibc: buffers of at least this many bytes are mmapped, so freeing one returns it to the OS
_MMAP_THRESHOLD = 65536
#: seconds the CPU memory subprocess may take for one group
_SUBPROCESS_TIMEOUT_S = 1800


def _proc_kib(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"{field_name} not in {_STATUS}")


def cpu_peak_supported() -> bool:
    """True where the peak resident set can be reset (Linux >= 4.0 ``clear_refs`` 5)."""
    try:
        _PEAK_RESET.write_text("5")
        _proc_kib("VmHWM")
        return True
    except OSError:
        return False


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Memory a call needs above what was resident before it (one warm-up call first).

    CUDA: ``max_memory_allocated`` above ``memory_allocated`` (caching allocator).
    CPU: the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``)
    above its resident set just before the call. Meant for a fresh process started
    with a fixed ``MALLOC_MMAP_THRESHOLD_`` so large freed buffers go back to the OS.
    """
    fn()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    before = _proc_kib("VmRSS")
    _PEAK_RESET.write_text("5")
    fn()
    return max(0, _proc_kib("VmHWM") - before) * 1024


def _measure_variants(family: Family, attention: str, cfg: BenchConfig, device: torch.device, train_batch: int,
                      keys: Sequence[str]) -> Peaks:
    """Peak bytes of a throughput-batch forward and (variants that train) a training step, per key.

    Each model is built fresh from ``cfg.seed`` and dropped before the next one.
    """
    out: Peaks = {}
    for key in keys:
        variant = _VARIANT[key]
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _prepare(variant.build(family, attention), cfg, device)
        xb = _inputs(family, cfg.throughput_batch, cfg, device)
        with torch.inference_mode():
            infer = _peak_bytes(functools.partial(model, xb), device)
        train = None
        if variant.trains and cfg.train:
            train = _peak_bytes(_train_step(model, family, train_batch, cfg, device)[0], device)
        out[key] = {"inference": infer, "train": train}
        del model
        gc.collect()
    return out


def _memory_in_process(family: Family, attention: str, cfg: BenchConfig, device: torch.device,
                       train_batch: int) -> Peaks:
    """Every variant, measured in this process (CUDA: the allocator's own peak counters)."""
    return _measure_variants(family, attention, cfg, device, train_batch, [v.key for v in VARIANTS])


def _memory_worker() -> None:
    """Entry point of the memory subprocess: JSON spec on stdin, JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
    cfg = BenchConfig(**fields)
    family, attention = get_family(spec["family"]), spec["attention"]
    warnings.filterwarnings("ignore")
    out = _measure_variants(family, attention, cfg, torch.device(cfg.device), spec["train_batch"], spec["variants"])
    print(json.dumps(out))


def _memory_subprocess(family: Family, attention: str, cfg: BenchConfig, train_batch: int,
                       threads: int) -> tuple[Peaks | None, str | None]:
    """Every variant, measured by :func:`_memory_worker` in a fresh Python; ``(peaks, None)`` or ``(None, why not)``."""
    spec = {"config": asdict(cfg), "family": family.name, "attention": attention, "threads": threads,
            "variants": [v.key for v in VARIANTS], "train_batch": train_batch}
    env = dict(os.environ)
    # a fixed threshold turns off glibc's adaptive one: buffers >= 64 KiB are mmapped and
    # returned to the OS when freed, so the resident set follows the live tensors
    env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding this foldattn package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "from foldattn.bench.memory import _memory_worker; _memory_worker()"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env,
                              timeout=_SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "memory subprocess timed out"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return None, f"memory subprocess failed ({proc.returncode}): {tail[0]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def peak_memory(family: Family, attention: str, cfg: BenchConfig, train_batch: int,
                threads: int) -> tuple[Peaks | None, str | None]:
    """Peak bytes of every variant, by the path the device allows; ``(peaks, note)``.

    ``note`` says why nothing was measured (``peaks`` is then None); it is None otherwise.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        return _memory_in_process(family, attention, cfg, device, train_batch), None
    if cpu_peak_supported():
        return _memory_subprocess(family, attention, cfg, train_batch, threads)
    return None, "peak memory needs Linux /proc/self/clear_refs; not measured"
