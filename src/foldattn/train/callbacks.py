"""What a :class:`~foldattn.train.Trainer` does around its loop: each concern a callback.

The trainer calls, on every callback in order: ``on_fit_start(trainer)`` once the run is set
up, ``on_epoch_start(trainer, epoch)``, ``on_step_end(trainer, info)`` after each optimizer
step, ``on_epoch_end(trainer, row)`` after validation and checkpointing, and
``on_fit_end(trainer)`` (also after an error or interruption). The default set:
:class:`StopOnSignal` (Ctrl-C), :class:`ProgressBar`, :class:`RunFiles` (metrics.csv,
summary.json, curves.png), :class:`TensorBoard` and :class:`StripeMonitoring` when asked for.
"""

from __future__ import annotations

import csv
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .._utils import atomic_path
from .._utils import write_json as _write_json
from .config import TrainConfig

__all__ = ["TrainerState", "Callback", "StopOnSignal", "ProgressBar", "RunFiles", "TensorBoard", "StripeMonitoring",
           "Hook", "write_json", "write_csv"]


class TrainerState(Protocol):
    """What a callback sees of the :class:`~foldattn.train.Trainer` running it (declared here, not imported
    from the trainer, which imports this module: the callbacks stay a floor below the loop)."""

    cfg: TrainConfig
    model: nn.Module
    val_loader: Any
    out: Path
    steps: int
    start_epoch: int
    start_step: int
    stop_requested: bool
    stop_signal: int

    def first_step(self, epoch: int) -> int:
        """The optimizer step ``epoch`` starts at (non-zero when a run resumes mid-epoch)."""
        ...

    def write_summary(self) -> None:
        """Write the run's summary.json (and curves) from the metrics so far."""
        ...


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_fit_start(self, trainer: TrainerState) -> None: ...

    def on_epoch_start(self, trainer: TrainerState, epoch: int) -> None: ...

    def on_step_end(self, trainer: TrainerState, info: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None: ...

    def on_fit_end(self, trainer: TrainerState) -> None: ...


class StopOnSignal(Callback):
    """The first Ctrl-C (SIGINT) or SIGTERM (what SLURM and Kubernetes send before killing) asks the
    trainer to stop after the current step (it writes a resumable checkpoint; the command then
    exits 130 or 143); a second one raises ``KeyboardInterrupt`` at once.

    A second SIGINT within ``grace_s`` of the first is the same Ctrl-C delivered twice:
    ``torchrun`` forwards the terminal's SIGINT to workers that already got it from the
    terminal, and aborting then would lose the checkpoint.
    """

    grace_s = 2.0

    def __init__(self) -> None:
        self._trainer: TrainerState | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: TrainerState) -> None:
        self._trainer = trainer
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, signals act as usual
                break

    def _handle(self, signum: int, frame: Any) -> None:
        assert self._trainer is not None
        if self._trainer.stop_requested:
            if time.monotonic() - self._first < self.grace_s:
                return
            raise KeyboardInterrupt
        self._trainer.stop_requested, self._first = True, time.monotonic()
        self._trainer.stop_signal = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step (again to abort without a checkpoint)", file=sys.stderr)

    def on_fit_end(self, trainer: TrainerState) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class ProgressBar(Callback):
    """A tqdm bar per epoch (loss and images per second), on rank 0."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.t0 = 0.0

    def on_epoch_start(self, trainer: TrainerState, epoch: int) -> None:
        from .._utils import require

        tqdm = require("tqdm", "train").tqdm
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=trainer.steps - trainer.first_step(epoch), desc=f"epoch {epoch + 1}/{trainer.cfg.epochs}",
                        leave=False, dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, trainer: TrainerState, info: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            rate = self.bar.n * trainer.cfg.batch_size / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{info['loss']:.3f}", img_s=f"{rate:.0f}", refresh=False)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        self._close()

    def on_fit_end(self, trainer: TrainerState) -> None:
        self._close()


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented strict JSON, atomically (:func:`foldattn._utils.write_json`)."""
    _write_json(path, obj, indent=2, default=str)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as CSV, atomically; nothing for no rows."""
    if not rows:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


class RunFiles(Callback):
    """``summary.json``, ``metrics.csv`` and ``curves.png`` in the output folder, after every epoch
    and at the end (rank 0)."""

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        trainer.write_summary()

    def on_fit_end(self, trainer: TrainerState) -> None:
        # a run that failed before its first checkpoint has nothing to summarise or resume: no summary either
        if (trainer.out / "last.pt").is_file():
            trainer.write_summary()


class TensorBoard(Callback):
    """Every metric of every epoch to a ``SummaryWriter`` under ``OUTPUT/tensorboard`` (optional package)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.writer: Any = None

    def on_fit_start(self, trainer: TrainerState) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("--tensorboard: the tensorboard package is not installed; skipping", stacklevel=3)
            return
        self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, int(row["epoch"]))

    def on_fit_end(self, trainer: TrainerState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StripeMonitoring(Callback):
    """Record the Stripe Observation statistics every ``every`` epochs (and of the initialised
    model) under ``OUTPUT/stripes`` (:class:`foldattn.stripe.StripeMonitor`)."""

    def __init__(self, every: int, out: Path) -> None:
        from ..stripe import StripeMonitor

        self.monitor = StripeMonitor(every, out)

    def on_fit_start(self, trainer: TrainerState) -> None:
        self.monitor.check(trainer.model)  # a model without attention to record fails now, not after an epoch
        if trainer.start_epoch == 0 and trainer.start_step == 0:
            self.monitor(0, trainer.model, trainer.val_loader)  # the initialised model: where the curves start

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        self.monitor(int(row["epoch"]), trainer.model, trainer.val_loader)


class Hook(Callback):
    """Adapts a ``hook(event, info)`` function: ``"step"`` after each step (``info``: epoch, step,
    loss, model) and ``"epoch"`` after each epoch (``info``: epoch, metrics, model)."""

    def __init__(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_step_end(self, trainer: TrainerState, info: dict[str, Any]) -> None:
        self.fn("step", {**info, "model": trainer.model})

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        self.fn("epoch", {"epoch": int(row["epoch"]) - 1, "metrics": row, "model": trainer.model})
