"""The run-time pieces of a training run: device and precision, the process group, Ctrl-C."""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._lock import RunLock, RunLockedError
from .config import TrainConfig

__all__ = [
    "RunLock", "RunLockedError", "resolve_device", "amp_dtype", "Distributed", "StopFlag",
    "TrainingInterrupted", "versions",
]


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    return dev


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    choice = cfg.amp
    if choice == "auto":
        if device.type == "cpu" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    table = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if choice not in table:
        raise ValueError(f"--amp must be one of auto, bf16, fp16, none; got {choice!r}")
    if choice == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or none")
    return table[choice]


class Distributed:
    """The process group (torchrun), or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False
        self.device = device  # NCCL reduces CUDA tensors only
        if self.enabled:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """``flag`` of any rank, on every rank: a Ctrl-C seen by one rank stops all at the same step."""
        return flag if not self.enabled else self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # every rank leaves a finished or interrupted run together (an error may be one rank's
        # alone, and a barrier would then wait for a peer that never comes)
        self.close(barrier=exc is None or isinstance(exc, TrainingInterrupted))

    def close(self, barrier: bool = True) -> None:
        """Destroy the process group this object created (after a barrier, by default).

        The barrier is not only politeness: gloo's worker threads release a finished
        collective's tensors after the caller's ``wait`` returns, and that needs the GIL. A
        rank that stops while its peer is still writing the checkpoint reaches interpreter
        shutdown before then, and the process aborts ("terminate called without an active
        exception"). Waiting in the barrier hands those threads the GIL first.
        """
        if self.owns_group:
            import torch.distributed as dist

            if barrier:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


class StopFlag:
    """First Ctrl-C asks to stop after the current step; a second one raises at once.

    A second SIGINT within ``grace_s`` of the first is the same Ctrl-C delivered twice:
    ``torchrun`` forwards the terminal's SIGINT to workers that already got it from the
    terminal, and aborting then would lose the checkpoint.
    """

    grace_s = 2.0

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if time.monotonic() - self._first < self.grace_s:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    from .._version import __version__

    return {"foldattn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a resumable checkpoint was written to :attr:`path`."""

    def __init__(self, path: Path, signum: int = 2) -> None:
        super().__init__(f"interrupted; a resumable checkpoint is at {path} (continue with --resume {path})")
        self.path = path
        self.signum = signum  # SIGINT (2) or SIGTERM (15): the command exits 128 + signum
