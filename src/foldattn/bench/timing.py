"""How the benchmark times: interleaved runners, median and quartiles, device sync and check.

All runners of a group are interleaved (A B C, B C A, ... after warm-up rounds), each
sample is ``k`` calls (``k`` chosen during warm-up so a sample lasts at least
``min_sample_s``), and the median of the samples is reported (quartiles in the JSON).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._timing import interleaved

__all__ = ["interleaved"]


class _EventMark:
    """A CUDA event recorded on the current stream; ``later - earlier`` is the GPU time between them, in seconds."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: _EventMark) -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3


#: ``--clock`` names: ``wall`` is elapsed time, ``cpu`` the CPU time of this process (all threads), ``cuda`` the
#: GPU's own time between CUDA events (no host-side jitter)
_CLOCKS: dict[str, Callable[[], Any]] = {"wall": time.perf_counter, "cpu": time.process_time, "cuda": _EventMark}


def _check_device(device: str) -> torch.device:
    """``torch.device(device)`` if the benchmark can run there; ``ValueError`` saying what to use otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported by the benchmark; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device} requested but CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, "
                f"{torch.cuda.device_count()} GPU(s) visible); run with --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def _sync_for(device: torch.device) -> Callable[[], None]:
    """A call that waits for the device's queued work (``torch.cuda.synchronize``; nothing on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _stats(samples: Sequence[float]) -> dict[str, float | int]:
    """Median and quartiles of per-call times, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "n": len(ms)}
