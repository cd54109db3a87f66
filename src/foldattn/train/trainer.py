"""The training loop: :class:`Trainer` (setup, train_one_epoch, validate, checkpoint) and :func:`train`.

Each epoch trains the model (with ASR layers, if any), then validates a *folded copy*
(:func:`foldattn.fold`; the training model is never modified), so the reported accuracy is the
deployed network's. Files in the output folder, each written atomically: ``last.pt`` /
``best.pt`` (model, optimizer, scheduler, scaler, RNG, config), ``metrics.csv``,
``summary.json`` (config, versions, best and final top-1/top-5, time per epoch) and
``curves.png``. A run resumes exactly where it stopped, also mid-epoch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._sizes import check_forward
from .._utils import check_output_folder, eval_mode, first_line, make_output_folder, require
from ..fold import asr_layers
from ..summary import count_params
from .augment import create_mixup, seeded
from .callbacks import (
    Callback,
    Hook,
    ProgressBar,
    RunFiles,
    StopOnSignal,
    StripeMonitoring,
    TensorBoard,
    write_csv,
    write_json,
)
from .checkpoint import (
    config_diff,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    restore_rng,
    save_checkpoint,
)
from .config import RESUME_IGNORED, TrainConfig
from .data import DataBundle, load_dataset, make_loader, preprocessing
from .engine import backward, evaluate, forward_loss, optimizer_step
from .model import build_model, deployed_copy
from .optim import create_optimizer, create_scheduler
from .plots import write_curves
from .pretrained import load_pretrained
from .runtime import Distributed, RunLock, RunLockedError, TrainingInterrupted, amp_dtype, resolve_device, versions

__all__ = ["Trainer", "train"]

#: the files a run writes in its output folder: a new run refuses a folder that holds one of them
RUN_FILES = ("last.pt", "best.pt", "summary.json", "metrics.csv")
#: training steps timed before the run's expected duration is estimated
_TIMED_STEPS = 5


def label(cfg: TrainConfig) -> str:
    """``"cifar_resnet20 +ASR(SE)"`` and the like."""
    if cfg.attention is None:
        return f"{cfg.model} (plain)"
    name = cfg.attention.upper()
    kind = f"+ASR({name})+{name}" if cfg.both else (f"+ASR({name})" if cfg.asr else f"+{name}")
    return f"{cfg.model} {kind}"


class Trainer:
    """One training run of a :class:`~foldattn.train.TrainConfig`.

    ``fit()`` does everything (what :func:`train` calls); the steps are public so that a
    script can drive them: :meth:`setup` (data, model, optimizer, schedule, resumed state,
    callbacks), :meth:`train_one_epoch`, :meth:`validate` (the folded copy) and
    :meth:`checkpoint`.

    Args:
        cfg: the run's configuration.
        dist: the process group (torchrun) or a single process.
        resume: a checkpoint (or an output folder: its ``last.pt``) to continue from.
        allow_config_change: on resume, warn about config differences instead of refusing.
        bundle: already-loaded data (else ``cfg.dataset`` is loaded).
        callbacks: extra :class:`~foldattn.train.callbacks.Callback` objects (after the defaults).
        log: where one line per epoch goes (rank 0 only); None for silence.
        overwrite: a new run may replace another run's files in its output folder (refused by default).
    """

    def __init__(self, cfg: TrainConfig, dist: Distributed, *, resume: str | os.PathLike[str] | None = None,
                 allow_config_change: bool = False, bundle: DataBundle | None = None,
                 callbacks: Sequence[Callback] = (), log: Callable[[str], None] | None = print,
                 overwrite: bool = False) -> None:
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.amp = amp_dtype(cfg, self.device)
        self.out = Path(cfg.output)
        self.resume, self.allow_config_change, self.overwrite = resume, allow_config_change, overwrite
        self.bundle = bundle
        self.log = log if (log is not None and dist.main) else (lambda _s: None)
        self.extra_callbacks = list(callbacks)
        self.callbacks: list[Callback] = []
        self.stop_requested = False
        self.stop_signal = 2  # SIGINT; StopOnSignal records SIGTERM
        self.lock = RunLock(self.out)
        self.history: list[dict[str, float]] = []
        self._plotted = 0  # epochs drawn in curves.png
        self.best: dict[str, float] = {"top1": -1.0, "top5": 0.0, "epoch": 0}
        self.start_epoch = self.start_step = 0
        self.partial: list[float] | None = None
        self._estimated = False  # the time the run will take, said once (see _estimate)

    # --- setup ------------------------------------------------------------------------
    def _start_from_pretrained(self, model: nn.Module) -> None:
        """``--pretrained`` weights into the plain part of the model, then ``--preserve-outputs``."""
        cfg = self.cfg
        if cfg.pretrained:
            load_pretrained(model, cfg.pretrained, log=self.log if self.dist.main else None)
        if cfg.preserve_outputs:
            for _, layer in asr_layers(model):
                layer.preserve_host_outputs()

    def setup(self) -> None:
        """Load the data, build the model, optimizer and schedule, restore a resumed run."""
        cfg, dist = self.cfg, self.dist
        cfg.validate()
        state = None
        if self.resume is not None:
            state = load_checkpoint(self.resume)
            saved = TrainConfig.from_dict(state["config"]).to_dict()
            diff = config_diff(saved, cfg.to_dict(), ignore=RESUME_IGNORED)
            if diff and not self.allow_config_change:
                raise ValueError("--resume with a changed configuration:\n  " + "\n  ".join(diff)
                                 + "\nrerun with the saved options, or pass --allow-config-change to continue anyway")
            if diff:
                warnings.warn("resuming with a changed configuration: " + "; ".join(diff), stacklevel=2)
        if dist.main:  # refused now, before the data is loaded; created only once every check has passed
            check_output_folder(self.out, "--output")
            if not self.overwrite and not self._continues_in_place():
                self._check_not_a_run()
        torch.manual_seed(cfg.seed)
        if self.bundle is None:
            self.bundle = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, cfg.split_seed, cfg.cache_dir,
                                       cfg.image_size, cfg.download, cfg.stream)
        bundle = self.bundle
        if bundle.num_classes < 2:
            raise ValueError(f"dataset {bundle.name!r} has {bundle.num_classes} class: a classifier needs at least 2 "
                             "(check the folder layout: ROOT/<class>/<image>)")
        if len(bundle.val) == 0:
            raise ValueError(f"dataset {bundle.name!r} has no validation images; set --val-split")
        if (cfg.mixup or cfg.cutmix) and (cfg.batch_size // dist.world) % 2:
            raise ValueError(f"--batch-size {cfg.batch_size}: mixup/cutmix need an even batch on each of the "
                             f"{dist.world} processes")
        on = self.device if self._data_on_device(bundle) else None
        self.train_loader = make_loader(bundle.train, cfg.batch_size, bundle, train=True, seed=cfg.seed,
                                        rank=dist.rank, world=dist.world, channels_last=cfg.channels_last,
                                        workers=cfg.workers, aa=cfg.aa, reprob=cfg.reprob, device=on)
        self.val_loader = make_loader(bundle.val, cfg.batch_size, bundle, train=False, rank=dist.rank,
                                      world=dist.world, channels_last=cfg.channels_last, workers=cfg.workers,
                                      device=on)
        n = len(self.train_loader)
        accum = cfg.grad_accum_steps
        if n < accum:
            raise ValueError(f"--grad-accum-steps {accum}: an epoch has only {n} batches")
        # batches per epoch: a whole number of optimizer updates (the rest of the epoch is dropped)
        self.steps = (n if cfg.steps_per_epoch is None else min(cfg.steps_per_epoch, n)) // accum * accum
        self.updates_per_epoch = self.steps // accum

        model = build_model(cfg, bundle.num_classes, bundle.in_channels)
        if state is None:  # a resumed run restores its own weights below
            self._start_from_pretrained(model)
        if cfg.sync_bn and not dist.enabled:
            raise ValueError("--sync-bn synchronises BatchNorm across processes; a single process has nothing to "
                             "sync: drop it, or start several with torchrun")
        if cfg.sync_bn and dist.enabled:
            if self.device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # the batch and the activations a training step keeps, estimated on the meta device before the first
        # step allocates them: an absurd --batch-size or image size is one line, not minutes of swapping
        h, w = bundle.image_size
        check_forward(model, (bundle.in_channels, h, w), max(1, cfg.batch_size // dist.world), "a training batch",
                      "lower --batch-size (or use --grad-accum-steps), the image size or the model",
                      device=self.device, training=True)
        self.optimizer = create_optimizer(cfg, model)
        self.scheduler = create_scheduler(cfg, self.optimizer, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.ema: Any = None
        if cfg.model_ema:  # timm's EMA: a copy of the model (its ASR layers too), folded like it for validation
            timm_utils = require("timm.utils", "train")
            self.ema = timm_utils.ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        self.mixup = create_mixup(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.label_smoothing,
                                  bundle.num_classes)
        if state is not None:
            load_model_state(model, state["model"], f"checkpoint {self.resume}")
            if self.ema is not None:
                if state.get("model_ema") is None:
                    raise ValueError(f"--resume {self.resume}: the checkpoint has no EMA weights (trained without "
                                     "--model-ema)")
                load_model_state(self.ema.module, state["model_ema"], f"checkpoint {self.resume} (EMA)")
            load_optimizer_state(self.optimizer, state["optimizer"], f"checkpoint {self.resume}")
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"])
            self.start_epoch, self.start_step = int(state["epoch"]), int(state["step"])
            self.history = list(state.get("history", []))
            self.best = dict(state.get("best", self.best))
            self.partial = state.get("partial")
            self.log(f"resumed from {self.resume}: epoch {self.start_epoch}, step {self.start_step}")

        self.train_model: nn.Module = model
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            self.train_model = cast(nn.Module, torch.compile(self.train_model))  # an OptimizedModule
        if self.mixup is not None:  # soft targets; Mixup applies the label smoothing itself
            self.criterion: Callable[..., torch.Tensor] = require("timm.loss", "train").SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        params_train, params_deployed = count_params(model), count_params(deployed_copy(model))
        self.run_info = {
            "dataset": bundle.name, "train_images": len(bundle.train), "val_images": len(bundle.val),
            "classes": bundle.num_classes, "class_names": list(bundle.classes),
            "image_size": list(bundle.image_size), "notes": bundle.notes,
            "params_train": params_train, "params_deployed": params_deployed, "world_size": dist.world,
            "device": str(self.device), "amp": str(self.amp).replace("torch.", "") if self.amp else "none",
            "steps_per_epoch": self.steps, "preprocessing": preprocessing(bundle),
        }
        self.callbacks = self._default_callbacks() + self.extra_callbacks
        self._dry_run(bundle)
        if dist.main:  # last: every refusal above leaves the folder as it was (or absent)
            make_output_folder(self.out, "--output")
            self.lock.acquire()
        self.log(f"{label(cfg)} on {bundle.name}: {len(bundle.train)} train / {len(bundle.val)} val images, "
                 f"{params_train:,} params ({params_deployed:,} deployed), {self.steps} steps/epoch, "
                 f"amp={self.run_info['amp']}, world={dist.world}")
        for key in ("image size", "mixed sizes", "aspect ratios"):  # what the data loader decided for the user
            if key in bundle.notes:
                self.log(f"  {key}: {bundle.notes[key]}")

    def _dry_run(self, bundle: DataBundle) -> None:
        """One forward pass of two random images of the data's shape, before anything is written: a model that
        cannot take this data (a ViT built for another image size) is refused with nothing on disk, rather than
        at its first step after the starting checkpoint. A private generator: the run's random streams are
        untouched, so a resumed run stays exact."""
        h, w = bundle.image_size
        x = torch.randn(2, bundle.in_channels, h, w, generator=torch.Generator().manual_seed(0)).to(self.device)
        try:
            with torch.no_grad(), eval_mode(self.model):
                self.model(x)
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise ValueError(f"the model does not run on this data's images ({bundle.in_channels}x{h}x{w}): "
                             f"{first_line(e)}") from None

    def _continues_in_place(self) -> bool:
        """Whether this run resumes the checkpoint of its own output folder (a fork to another folder does not)."""
        if self.resume is None:
            return False
        source = Path(self.resume)
        folder = source if source.is_dir() else source.parent
        return folder.resolve() == self.out.resolve()

    def _check_not_a_run(self) -> None:
        """A new run does not write over another run's files: a typo in ``-o`` would lose finished work."""
        holder = self.lock.busy()
        if holder:  # a run still writing there: say who, as the lock itself would
            raise RunLockedError(f"folder {self.out} is in use by {holder}; choose another output, or wait for that "
                                 "command to end")
        there = [n for n in RUN_FILES if (self.out / n).exists()]
        if there:
            raise ValueError(f"--output {self.out} holds another run's files ({', '.join(there)}); continue that run "
                             f"with --resume {self.out}, choose another folder, or pass --overwrite to replace them")

    def _data_on_device(self, bundle: DataBundle) -> bool:
        """Whether the in-memory images go to the GPU (``--data-on-device``; by default on CUDA where they fit in
        half of the free memory). Refused in one line when asked for and impossible."""
        cfg, asked = self.cfg, self.cfg.data_on_device
        if asked is False or (asked is None and (self.device.type != "cuda" or cfg.stream or cfg.aa)):
            return False
        if self.device.type != "cuda":
            raise ValueError(f"--data-on-device keeps the images on a GPU, and this run is on {self.device}")
        held = (getattr(d, "images", None) for d in (bundle.train, bundle.val))
        images = [t for t in held if isinstance(t, torch.Tensor)]
        if len(images) != 2:
            if asked:
                raise ValueError("--data-on-device serves in-memory data; this dataset is streamed from files")
            return False
        need = sum(t.numel() * t.element_size() for t in images)
        free = torch.cuda.mem_get_info(self.device)[0]
        if need > free // 2:
            if asked:
                raise ValueError(f"--data-on-device: the images take {need / 2**30:.2f} GiB and the GPU has "
                                 f"{free / 2**30:.2f} GiB free (at most half is used for data); drop --data-on-device")
            self.log(f"the images ({need / 2**30:.2f} GiB) stay on the CPU: more than half the GPU's free memory")
            return False
        return True

    def _default_callbacks(self) -> list[Callback]:
        cfg, main = self.cfg, self.dist.main
        out: list[Callback] = [StopOnSignal()]
        if main:
            out.append(RunFiles())
        if cfg.progress and main:
            out.append(ProgressBar())
        if cfg.tensorboard and main:
            out.append(TensorBoard(self.out))
        if cfg.stripe_every and main:
            out.append(StripeMonitoring(cfg.stripe_every, self.out / "stripes"))
        return out

    def _call(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # --- checkpoints and summary --------------------------------------------------------
    def checkpoint(self, name: str, epoch: int, step: int, partial: list[float] | None = None) -> Path:
        """Write ``OUTPUT/name``: everything needed to continue at ``epoch``/``step`` exactly."""
        ema = self.ema.module.state_dict() if self.ema is not None else None
        return save_checkpoint(self.out / name, model=self.model, config=self.cfg.to_dict(),
                               optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, epoch=epoch,
                               step=step, history=self.history, best=self.best, partial=partial, run=self.run_info,
                               model_ema=ema)

    def summary(self, finished: bool | None = None) -> dict[str, Any]:
        """The run's summary (what ``summary.json`` holds)."""
        final = self.history[-1] if self.history else {}
        times = [h["epoch_time_s"] for h in self.history]
        done = len(self.history) >= self.cfg.epochs if finished is None else finished
        key = "ema_" if self.cfg.model_ema else ""
        return {"config": self.cfg.to_dict(), "versions": versions(), "run": self.run_info, "finished": done,
                "epochs_done": len(self.history),
                "best": {"top1": self.best["top1"], "top5": self.best["top5"], "epoch": self.best["epoch"]},
                "final": {"top1": final.get(f"{key}val_top1"), "top5": final.get(f"{key}val_top5"),
                          "loss": final.get(f"{key}val_loss")},
                "accuracy_of": "ema" if self.cfg.model_ema else "model",
                "time_per_epoch_s": sum(times) / len(times) if times else None}

    def write_summary(self) -> None:
        """``summary.json``, ``metrics.csv`` and ``curves.png`` (rank 0; a plotting problem never stops a run)."""
        if not self.dist.main:
            return
        write_json(self.out / "summary.json", self.summary())
        write_csv(self.out / "metrics.csv", self.history)
        # the curves only change with the history: the end of a run does not draw its last epoch again
        plotted = len(self.history)
        if self.history and plotted != self._plotted:
            with contextlib.suppress(Exception):
                write_curves(self.out / "curves.png", {self.cfg.model: self.history}, title=label(self.cfg))
                self._plotted = plotted

    # --- the loop -----------------------------------------------------------------------
    def first_step(self, epoch: int) -> int:
        """The batch an epoch starts at: mid-epoch for the epoch a resumed run stopped in."""
        return self.start_step if epoch == self.start_epoch else 0

    def _interrupt(self, epoch: int, step: int, sums: list[float]) -> None:
        total = self.dist.sum(sums)
        if self.dist.main:
            self.checkpoint("last.pt", epoch, step, total)
        self.write_summary()
        raise TrainingInterrupted(self.out / "last.pt", self.stop_signal)

    def _diverged(self, loss: float, epoch: int, step: int) -> str:
        """One line for a non-finite loss: where, and the checkpoint to resume from with other settings."""
        resume = self.out / "last.pt"
        done = self.history[-1]["epoch"] if self.history else 0
        return (f"training diverged: the loss is {loss} at epoch {epoch + 1} step {step + 1}; {resume} holds the "
                f"run after epoch {done}: resume with a lower learning rate (foldattn train --resume {self.out} "
                "--lr ... --allow-config-change), or check the data")

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (from the resumed step, if any); returns the train loss, top-1 and speed.

        Raises :class:`~foldattn.train.TrainingInterrupted` after a stop request (Ctrl-C),
        once a resumable checkpoint is written.
        """
        cfg, dist = self.cfg, self.dist
        self.train_loader.set_epoch(epoch)
        self.train_model.train()
        first = self.first_step(epoch)
        # the saved partial sums are over all ranks: rank 0 carries them, the others start at 0
        resumed = self.partial is not None and epoch == self.start_epoch and first and dist.main
        # loss sum, correct, images
        sums = list(self.partial) if resumed and self.partial is not None else [0.0, 0.0, 0.0]
        t0 = time.perf_counter()
        batches = itertools.islice(self.train_loader.batches(first), max(self.steps - first, 0))
        accum = cfg.grad_accum_steps
        for i, (x, y) in enumerate(batches, start=first):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            target = y
            if self.mixup is not None:  # seeded by (seed, epoch, batch): a resumed run mixes the same pairs
                with seeded(((cfg.seed * 100_003 + epoch) * 65_537 + i) * 2 + 1):
                    x, target = self.mixup(x, y)
            update = (i + 1) % accum == 0
            # under DDP the gradients are all-reduced only on the micro-batch that ends an update
            sync = self.ddp.no_sync() if self.ddp is not None and not update else contextlib.nullcontext()
            with sync:
                loss, logits = forward_loss(self.train_model, x, target, self.criterion, self.amp)
                if not torch.isfinite(loss):
                    raise FloatingPointError(self._diverged(loss.item(), epoch, i))
                backward(loss, self.scaler, scale=1.0 / accum)
            if update:
                optimizer_step(self.optimizer, self.scaler, self.cfg.clip_grad)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model, step=self.scheduler.updates)
            sums[0] += loss.item() * y.numel()
            sums[1] += (logits.argmax(1) == y).sum().item()  # against the unmixed labels
            sums[2] += y.numel()
            self._call("on_step_end", {"epoch": epoch, "step": i, "loss": loss.item()})
            if not self._estimated and i + 1 - first >= _TIMED_STEPS:
                self._estimate(epoch, i + 1, (time.perf_counter() - t0) / (i + 1 - first))
            if update and dist.any(self.stop_requested) and i + 1 < self.steps:
                self._interrupt(epoch, i + 1, sums)
        elapsed = time.perf_counter() - t0
        tot = dist.sum(sums)
        return {"train_loss": tot[0] / max(tot[2], 1), "train_top1": 100 * tot[1] / max(tot[2], 1),
                "images_per_s": (self.steps - first) * cfg.batch_size / max(elapsed, 1e-9)}

    def _estimate(self, epoch: int, step: int, per_step: float) -> None:
        """Once, after the first timed steps: a run expected to last over an hour says how long (validation
        counted at a tenth of the training time), so nobody waits blind on a typo in --epochs."""
        self._estimated = True
        left = per_step * ((self.steps - step) + self.steps * (self.cfg.epochs - epoch - 1)) * 1.1
        if left > 3600:
            self.log(f"this run is expected to take about {left / 3600:.1f} h more ({self.cfg.epochs - epoch} "
                     f"epoch(s) of {self.steps} steps at {per_step:.2f} s each, measured); Ctrl-C stops it with a "
                     "resumable checkpoint")

    def validate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 of the deployed (folded) copy on the validation split."""
        return evaluate(deployed_copy(self.model), self.val_loader, self.amp, self.device, self.dist)

    def validate_ema(self) -> dict[str, float] | None:
        """The same for the folded EMA weights (None without ``--model-ema``)."""
        if self.ema is None:
            return None
        return evaluate(deployed_copy(self.ema.module), self.val_loader, self.amp, self.device, self.dist)

    def fit(self) -> dict[str, Any]:
        """Set up (if not done), train every remaining epoch, validate, checkpoint; returns the summary."""
        if not hasattr(self, "model"):
            self.setup()
        cfg = self.cfg
        self._call("on_fit_start")  # may still refuse the run (--stripe-every without attention): nothing written
        failed = True
        try:
            if self.dist.main and self.start_epoch == 0 and self.first_step(0) == 0:
                self.checkpoint("last.pt", 0, 0)  # the starting point: a run that diverges early still resumes
            for epoch in range(self.start_epoch, cfg.epochs):
                self._call("on_epoch_start", epoch)
                t0 = time.perf_counter()
                train_metrics = self.train_one_epoch(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                val = self.validate()
                row = {"epoch": epoch + 1, "lr": lr,
                       "train_loss": train_metrics["train_loss"], "train_top1": train_metrics["train_top1"],
                       "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                       "epoch_time_s": 0.0, "images_per_s": train_metrics["images_per_s"]}
                ema = self.validate_ema()
                if ema is not None:  # like timm's train.py: with an EMA, its accuracy is the run's
                    row.update({"ema_val_loss": ema["loss"], "ema_val_top1": ema["top1"], "ema_val_top5": ema["top5"]})
                    val = ema
                row["epoch_time_s"] = time.perf_counter() - t0
                self.history.append(row)
                self.scheduler.step_epoch(epoch + 1, val["top1"])
                improved = val["top1"] > self.best["top1"]
                if improved:
                    self.best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch + 1}
                if self.dist.main:
                    self.checkpoint("last.pt", epoch + 1, 0)
                    if improved:
                        self.checkpoint("best.pt", epoch + 1, 0)
                ema_text = f"  EMA top1 {row['ema_val_top1']:.2f}" if ema is not None else ""
                self.log(f"epoch {epoch + 1:>3}/{cfg.epochs}  lr {row['lr']:.4f}  train loss {row['train_loss']:.3f} "
                         f"top1 {row['train_top1']:.2f}  val (folded) loss {row['val_loss']:.3f} top1 "
                         f"{row['val_top1']:.2f} top5 {row['val_top5']:.2f}{ema_text}  {row['epoch_time_s']:.1f}s "
                         f"({row['images_per_s']:.0f} img/s)")
                self._call("on_epoch_end", row)
                if self.dist.any(self.stop_requested) and epoch + 1 < cfg.epochs:
                    raise TrainingInterrupted(self.out / "last.pt", self.stop_signal)
            failed = False
        finally:
            try:
                self._call("on_fit_end")
            except Exception:
                if not failed:
                    raise
                # the first failure (a full disk at last.pt, say) is the one to report, not its echo here
            finally:
                self.lock.release()
        self.dist.barrier()
        return self.summary()


def train(cfg: TrainConfig, resume: str | os.PathLike[str] | None = None, allow_config_change: bool = False,
          hook: Callable[[str, dict[str, Any]], None] | None = None, bundle: DataBundle | None = None,
          log: Callable[[str], None] | None = print, callbacks: Sequence[Callback] = (),
          overwrite: bool = False) -> dict[str, Any]:
    """Train, validate the folded model each epoch, checkpoint; return the summary dict.

    Args:
        cfg: the run's configuration.
        resume: a checkpoint (or an output folder: its ``last.pt``) to continue from;
            the run then continues exactly where it stopped (also mid-epoch).
        allow_config_change: on resume, warn about config differences instead of refusing.
        hook: called as ``hook(event, info)`` with ``"step"`` after each optimizer step and
            ``"epoch"`` after each validation (for callbacks and tests); ``info["epoch"]`` is
            the 0-based epoch index and ``info["model"]`` the (unwrapped) training model.
        bundle: already-loaded data (else ``cfg.dataset`` is loaded).
        log: where one line per epoch goes (rank 0 only); None for silence.
        callbacks: extra :class:`~foldattn.train.callbacks.Callback` objects.
        overwrite: a new run may replace another run's files in ``cfg.output`` (refused by default,
            naming them: continue that run with ``resume`` instead).

    Raises:
        TrainingInterrupted: after Ctrl-C, once a resumable checkpoint is written.
    """
    cfg.validate()
    device = resolve_device(cfg)
    if cfg.data_on_device and device.type != "cuda":  # before the data is loaded
        raise ValueError(f"--data-on-device keeps the images on a GPU, and this run is on {device}; drop it")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    extra = [*callbacks, *([Hook(hook)] if hook is not None else [])]
    try:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        with Distributed(device) as dist:
            trainer = Trainer(cfg, dist, resume=resume, allow_config_change=allow_config_change, bundle=bundle,
                              callbacks=extra, log=log, overwrite=overwrite)
            return trainer.fit()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
