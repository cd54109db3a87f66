"""Training engine and recipes for ``foldattn train``.

One run = one :class:`TrainConfig`. Each epoch trains the model (with ASR layers,
if any), then validates a *folded copy* (:func:`foldattn.fold`; the training model
is never modified), so the reported accuracy is the deployed network's. Files in
the output folder, each written atomically:

* ``last.pt`` / ``best.pt``: checkpoints (model, optimizer, scheduler, scaler, RNG, config),
* ``metrics.csv``: one row per epoch; ``summary.json``: config, versions, best and
  final top-1/top-5, time per epoch; ``curves.png``: loss and accuracy curves.

Recipes (:func:`register_recipe`) are named sets of defaults; ``paper-cifar`` is the
ASR paper's CIFAR schedule (He et al. 2016): SGD lr 0.1, momentum 0.9, wd 1e-4,
batch 128, 164 epochs, lr x0.1 at epochs 81 and 122.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as _attention
from ._utils import atomic_path, unwrap_model
from .checkpoint import (
    config_diff,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from .data import DataBundle, load_dataset, make_loader
from .fold import fold, has_foldable
from .summary import count_params

__all__ = [
    "TrainConfig", "TrainingInterrupted", "register_recipe", "list_recipes", "recipe_defaults", "build_model",
    "train", "evaluate", "deployed_copy", "write_curves", "load_trained", "example_input", "RESUME_IGNORED",
]


# ----------------------------------------------------------------------------- config + recipes
@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    model: str = "cifar_resnet20"
    dataset: str = "digits"
    attention: str | None = None
    asr: bool = False
    both: bool = False
    psi_init: float = 0.1
    every: int = 1
    recipe: str = "default"
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    val_split: float | int | None = None
    split_seed: int = 0
    image_size: int | None = None
    stream: bool = False
    amp: str = "auto"
    channels_last: bool = True
    sync_bn: bool = False
    deterministic: bool = False
    steps_per_epoch: int | None = None
    # run-time options: may change on --resume without changing the result
    output: str = "runs/train"
    data_dir: str = "data"
    cache_dir: str | None = None
    download: bool = False
    workers: int = 0
    threads: int = 0
    compile: bool = False
    device: str = "auto"
    progress: bool = False
    tensorboard: bool = False
    stripe_every: int = 0  # record the Stripe Observation statistics every N epochs (0: never)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


RESUME_IGNORED = ("output", "data_dir", "cache_dir", "download", "workers", "threads", "compile", "device",
                  "progress", "tensorboard")

_RECIPES: dict[str, dict[str, Any]] = {}


def register_recipe(name: str, **defaults: Any) -> None:
    """Register named defaults for :class:`TrainConfig` fields (explicit options override them)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(defaults) - fields
    if unknown:
        raise ValueError(f"recipe {name!r}: unknown config fields {sorted(unknown)}")
    if name in _RECIPES:
        raise ValueError(f"recipe {name!r} is already registered")
    _RECIPES[name] = defaults


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def recipe_defaults(name: str) -> dict[str, Any]:
    """The defaults of recipe ``name`` (a copy)."""
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(list_recipes())}")
    return dict(_RECIPES[name])


register_recipe("default", epochs=30, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine")
# the ASR paper's CIFAR recipe (its reference code: pytorch-classification, He et al. 2016)
register_recipe("paper-cifar", epochs=164, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128,
                schedule="step", milestones=[81, 122], gamma=0.1, warmup_epochs=0.0)
# short cosine schedule sized for a few CPU cores (benchmarks/cifar10_asr.py)
register_recipe("cpu-cifar", epochs=10, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128,
                schedule="cosine", warmup_epochs=0.5)
# the demo's recipe on the 16x16 digits
register_recipe("digits", epochs=15, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="cosine")


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a resumable checkpoint was written to :attr:`path`."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"interrupted; a resumable checkpoint is at {path} (continue with --resume {path})")
        self.path = path


# ----------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The model named by ``cfg.model`` with its attention / ASR options.

    ``torchvision:NAME`` and ``timm:NAME`` go through :func:`foldattn.attach`; other names
    are :func:`foldattn.models.create_model` names.
    """
    if cfg.attention is not None:
        _attention.get(cfg.attention)
    if (cfg.asr or cfg.both) and cfg.attention is None:
        raise ValueError("--asr/--both need --attention NAME (e.g. --attention se)")
    if cfg.every < 1:
        raise ValueError(f"--every must be >= 1, got {cfg.every}")
    source, sep, name = cfg.model.partition(":")
    if sep:
        model = _external_model(source, name, cfg, num_classes)
    else:
        from .models import create_model

        kwargs: dict[str, Any] = {}
        if in_channels != 3:
            kwargs["in_channels"] = in_channels
        if cfg.every != 1:
            kwargs["every"] = cfg.every
        model = create_model(cfg.model, num_classes=num_classes, attention=cfg.attention, asr=cfg.asr,
                             both=cfg.both, psi_init=cfg.psi_init, **kwargs)
    return model


def _external_model(source: str, name: str, cfg: TrainConfig, num_classes: int) -> nn.Module:
    from .attach import attach

    if source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        raise ValueError(f"unknown model source {source!r}; use torchvision:NAME, timm:NAME or a foldattn model name")
    if cfg.attention is None:
        return model
    if not cfg.asr:
        raise ValueError(f"{cfg.model}: attach inserts attention in ASR form only; add --asr (or --asr --both for "
                         "ASR(X) + X), or use a foldattn.models name for classic attention")
    return attach(model, cfg.attention, both=cfg.both, psi_init=cfg.psi_init, every=cfg.every)


def load_trained(path: str | os.PathLike[str]) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the (training-form) model of a checkpoint: ``(model in eval mode, config, checkpoint dict)``.

    Raises :class:`~foldattn.checkpoint.CheckpointError` for unreadable files or weights that
    do not fit the architecture recorded in the checkpoint's config.
    """
    blob = load_checkpoint(path)
    cfg = TrainConfig.from_dict(blob["config"])
    run = blob.get("run") or {}
    classes = run.get("classes")
    if classes is None:  # older checkpoints: the classifier's output size
        heads = [v for k, v in blob["model"].items() if k.endswith("weight") and v.dim() == 2]
        classes = int(heads[-1].shape[0]) if heads else 10
    model = build_model(cfg, int(classes))
    load_model_state(model, blob["model"], f"checkpoint {path}")
    return model.eval(), cfg, blob


def example_input(blob: dict[str, Any], batch: int = 2) -> torch.Tensor:
    """A random normalised input batch of the checkpoint's image size (32x32 if unknown)."""
    h, w = (blob.get("run") or {}).get("image_size", (32, 32))
    return torch.randn(batch, 3, int(h), int(w), generator=torch.Generator().manual_seed(0))


def deployed_copy(model: nn.Module) -> nn.Module:
    """The deployed form for evaluation: a folded copy if the model has ASR layers or
    re-parameterization blocks (a plain SRP network deploys fused too), else the model itself."""
    inner = unwrap_model(model)
    return fold(inner) if has_foldable(inner) else inner


# ----------------------------------------------------------------------------- runtime
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    return dev


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
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


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    bounds = [m * steps_per_epoch for m in cfg.milestones]
    if cfg.schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"--schedule must be cosine, step or constant; got {cfg.schedule!r}")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= b for b in bounds)
        return 1.0

    return factor


class _Dist:
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

    def __enter__(self) -> _Dist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _StopFlag:
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

    def __enter__(self) -> _StopFlag:
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


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        msg = f"cannot write to output folder {out}: {e.strerror or e}; choose another --output"
        raise PermissionError(msg) from None


def _versions() -> dict[str, str]:
    import numpy
    import torchvision

    from . import __version__

    return {"foldattn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, amp_dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu", dist: _Dist | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` (eval mode) over ``loader``."""
    device = torch.device(device)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top1, top5, count
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = model(x)
            logits = logits.float()
            totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            totals[1] += hit[:, 0].sum().item()
            totals[2] += hit.any(dim=1).sum().item()
            totals[3] += y.numel()
    finally:
        for m, flag in was:
            m.training = flag
    if dist is not None:
        totals = dist.sum(totals)
    n = max(totals[3], 1.0)
    return {"loss": totals[0] / n, "top1": 100 * totals[1] / n, "top5": 100 * totals[2] / n}


# ----------------------------------------------------------------------------- outputs
def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_curves(path: Path, runs: dict[str, list[dict[str, float]]], title: str = "") -> None:
    """A PNG with loss and top-1 curves (train dashed, validation solid) of one or more runs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, hist) in enumerate(runs.items()):
        if not hist:
            continue
        color = f"C{i}"
        ep = [h["epoch"] for h in hist]
        a.plot(ep, [h["train_loss"] for h in hist], "--", color=color, alpha=0.7)
        a.plot(ep, [h["val_loss"] for h in hist], "-", color=color, label=label)
        b.plot(ep, [h["train_top1"] for h in hist], "--", color=color, alpha=0.7)
        b.plot(ep, [h["val_top1"] for h in hist], "-", color=color, label=label)
    a.set(xlabel="epoch", ylabel="loss (-- train, - val)", yscale="log")
    b.set(xlabel="epoch", ylabel="top-1 % (-- train, - val, folded)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


class _TensorBoard:
    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("--tensorboard: the tensorboard package is not installed; skipping", stacklevel=3)
                return
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, int(row["epoch"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- training
def _progress(iterable: Iterator[Any], total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


def train(cfg: TrainConfig, resume: str | os.PathLike[str] | None = None, allow_config_change: bool = False,
          hook: Callable[[str, dict[str, Any]], None] | None = None, bundle: DataBundle | None = None,
          log: Callable[[str], None] | None = print) -> dict[str, Any]:
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

    Raises:
        TrainingInterrupted: after Ctrl-C, once a resumable checkpoint is written.
    """
    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        with _Dist(device) as dist:
            return _train(cfg, device, dist, resume, allow_config_change, hook, bundle, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, device: torch.device, dist: _Dist, resume: str | os.PathLike[str] | None,
           allow_config_change: bool, hook: Callable[[str, dict[str, Any]], None] | None,
           bundle: DataBundle | None, log: Callable[[str], None] | None) -> dict[str, Any]:
    amp_dtype = _amp_dtype(cfg, device)
    log = log if (log is not None and dist.main) else (lambda _s: None)
    out = Path(cfg.output)
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        saved = TrainConfig.from_dict(state["config"]).to_dict()
        diff = config_diff(saved, cfg.to_dict(), ignore=RESUME_IGNORED)
        if diff and not allow_config_change:
            raise ValueError("--resume with a changed configuration:\n  " + "\n  ".join(diff)
                             + "\nrerun with the saved options, or pass --allow-config-change to continue anyway")
        if diff:
            warnings.warn("resuming with a changed configuration: " + "; ".join(diff), stacklevel=2)
    if dist.main:
        _check_writable(out)
    torch.manual_seed(cfg.seed)

    if bundle is None:
        bundle = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, cfg.split_seed, cfg.cache_dir,
                              cfg.image_size, cfg.download, cfg.stream)
    train_loader = make_loader(bundle.train, cfg.batch_size, bundle, train=True, seed=cfg.seed, rank=dist.rank,
                               world=dist.world, channels_last=cfg.channels_last, workers=cfg.workers)
    val_loader = make_loader(bundle.val, cfg.batch_size, bundle, train=False, rank=dist.rank, world=dist.world,
                             channels_last=cfg.channels_last, workers=cfg.workers)
    steps = len(train_loader) if cfg.steps_per_epoch is None else min(cfg.steps_per_epoch, len(train_loader))

    model = build_model(cfg, bundle.num_classes, bundle.in_channels)
    if cfg.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_step, history, best, partial = 0, 0, [], {"top1": -1.0, "top5": 0.0, "epoch": 0}, None
    if state is not None:
        load_model_state(model, state["model"], f"checkpoint {resume}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        history = list(state.get("history", []))
        best = dict(state.get("best", best))
        partial = state.get("partial")
        log(f"resumed from {resume}: epoch {start_epoch}, step {start_step}")

    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    tb = _TensorBoard(out, cfg.tensorboard and dist.main)
    params_train = count_params(model)
    params_deployed = count_params(deployed_copy(model))
    run_info = {"dataset": bundle.name, "train_images": len(bundle.train), "val_images": len(bundle.val),
                "classes": bundle.num_classes, "image_size": list(bundle.image_size), "notes": bundle.notes,
                "params_train": params_train, "params_deployed": params_deployed, "world_size": dist.world,
                "device": str(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                "steps_per_epoch": steps}
    config_dict = cfg.to_dict()

    def checkpoint(name: str, epoch: int, step: int, partial_sums: list[float] | None) -> Path:
        return save_checkpoint(out / name, model=model, config=config_dict, optimizer=optimizer, scheduler=scheduler,
                               scaler=scaler, epoch=epoch, step=step, history=history, best=best,
                               partial=partial_sums, run=run_info)

    def write_summary(finished: bool) -> dict[str, Any]:
        final = history[-1] if history else {}
        times = [h["epoch_time_s"] for h in history]
        summary = {"config": config_dict, "versions": _versions(), "run": run_info, "finished": finished,
                   "epochs_done": len(history),
                   "best": {"top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"]},
                   "final": {"top1": final.get("val_top1"), "top5": final.get("val_top5"),
                             "loss": final.get("val_loss")},
                   "time_per_epoch_s": sum(times) / len(times) if times else None}
        if dist.main:
            _write_json(out / "summary.json", summary)
            _write_csv(out / "metrics.csv", history)
            with contextlib.suppress(Exception):  # a plotting problem must not kill a long run
                write_curves(out / "curves.png", {cfg.model: history}, title=_label(cfg))
        return summary

    log(f"{_label(cfg)} on {bundle.name}: {len(bundle.train)} train / {len(bundle.val)} val images, "
        f"{params_train:,} params ({params_deployed:,} deployed), {steps} steps/epoch, amp={run_info['amp']}, "
        f"world={dist.world}")
    monitor = None
    if cfg.stripe_every and dist.main:
        from .stripe import StripeMonitor

        monitor = StripeMonitor(cfg.stripe_every, out / "stripes")
        monitor.check(model)  # a model without attention to record fails now, not after an epoch
        if start_epoch == 0 and start_step == 0:
            monitor(0, model, val_loader)  # the initialised model: where the curves start
    try:
        with _StopFlag() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                train_loader.set_epoch(epoch)
                train_model.train()
                first = start_step if epoch == start_epoch else 0
                # the saved partial sums are over all ranks: rank 0 carries them, the others start at 0
                resumed = partial is not None and epoch == start_epoch and first and dist.main
                sums = list(partial) if resumed else [0.0, 0.0, 0.0]
                t0 = time.perf_counter()
                batches = itertools.islice(train_loader.batches(first), max(steps - first, 0))
                bar = _progress(batches, steps - first, cfg.progress and dist.main, f"epoch {epoch + 1}/{cfg.epochs}")
                for i, (x, y) in enumerate(bar, start=first):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                        logits = train_model(x)
                        loss = criterion(logits.float(), y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {i + 1}; training "
                                                 "diverged (lower --lr, or check the data)")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    sums[0] += loss.item() * y.numel()
                    sums[1] += (logits.argmax(1) == y).sum().item()
                    sums[2] += y.numel()
                    if hasattr(bar, "set_postfix"):
                        rate = (i + 1 - first) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}", refresh=False)
                    if hook is not None:
                        hook("step", {"epoch": epoch, "step": i, "loss": loss.item(), "model": model})
                    if dist.any(stop.requested) and i + 1 < steps:
                        tot = dist.sum(sums)
                        if dist.main:
                            checkpoint("last.pt", epoch, i + 1, tot)
                        write_summary(False)
                        raise TrainingInterrupted(out / "last.pt")
                train_time = time.perf_counter() - t0
                tot = dist.sum(sums)
                val = evaluate(deployed_copy(model), val_loader, amp_dtype, device, dist)
                epoch_time = time.perf_counter() - t0
                row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": tot[0] / max(tot[2], 1), "train_top1": 100 * tot[1] / max(tot[2], 1),
                       "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                       "epoch_time_s": epoch_time,
                       "images_per_s": (steps - first) * cfg.batch_size / max(train_time, 1e-9)}
                history.append(row)
                improved = val["top1"] > best["top1"]
                if improved:
                    best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch + 1}
                if dist.main:
                    checkpoint("last.pt", epoch + 1, 0, None)
                    if improved:
                        checkpoint("best.pt", epoch + 1, 0, None)
                tb.log(row)
                if monitor is not None:
                    monitor(epoch + 1, model, val_loader)
                summary = write_summary(epoch + 1 == cfg.epochs)
                log(f"epoch {epoch + 1:>3}/{cfg.epochs}  lr {row['lr']:.4f}  train loss {row['train_loss']:.3f} "
                    f"top1 {row['train_top1']:.2f}  val (folded) loss {val['loss']:.3f} top1 {val['top1']:.2f} "
                    f"top5 {val['top5']:.2f}  {epoch_time:.1f}s ({row['images_per_s']:.0f} img/s)")
                if hook is not None:
                    hook("epoch", {"epoch": epoch, "metrics": row, "model": model})
                if dist.any(stop.requested) and epoch + 1 < cfg.epochs:
                    raise TrainingInterrupted(out / "last.pt")
        summary = write_summary(len(history) >= cfg.epochs)
    finally:
        tb.close()
    dist.barrier()
    return summary


def _label(cfg: TrainConfig) -> str:
    if cfg.attention is None:
        return f"{cfg.model} (plain)"
    name = cfg.attention.upper()
    kind = f"+ASR({name})+{name}" if cfg.both else (f"+ASR({name})" if cfg.asr else f"+{name}")
    return f"{cfg.model} {kind}"
