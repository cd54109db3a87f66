"""The configuration of a training run, and the named recipes of defaults.

One run = one :class:`TrainConfig` (saved in every checkpoint). Recipes
(:func:`register_recipe`) are named sets of defaults; ``paper-cifar`` is the ASR paper's
CIFAR schedule (He et al. 2016): SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, 164 epochs,
lr x0.1 at epochs 81 and 122.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .._registry import Registry

__all__ = ["TrainConfig", "RESUME_IGNORED", "register_recipe", "unregister_recipe", "list_recipes",
           "recipe_defaults", "RECIPES"]


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
    where: str | None = None  # attach's placement for torchvision:/timm: models (block, transformer, norms)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    pretrained: str | None = None  # plain-architecture weights loaded before training starts
    preserve_outputs: bool = False  # ASR starts as the identity of the (pretrained) model
    recipe: str = "default"
    epochs: int = 30
    opt: str = "sgd"  # sgd (momentum, --nesterov) or any optimizer of timm's factory: adamw, lamb, ...
    decay_all: bool = False  # weight decay on norms, biases and psi too (the paper's reference code does)
    clip_grad: float | None = None  # clip the gradient norm to this (None: no clipping)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # for torchvision/timm constructors
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

    def validate(self) -> None:
        """Refuse values no run can use, before any work (``ValueError`` naming the option,
        the value and what is allowed)."""

        def bad(option: str, value: Any, allowed: str) -> None:
            raise ValueError(f"--{option} {value!r}: {allowed}")

        def integer(option: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                bad(option, value, f"must be an integer >= {low}")

        def number(option: str, value: Any, low: float, high: float = math.inf, open_high: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or value > high or (open_high and value == high):
                bad(option, value, f"must be a number in [{low:g}, {high:g}{')' if open_high else ']'}")

        integer("epochs", self.epochs, 1)
        integer("batch-size", self.batch_size, 1)
        integer("every", self.every, 1)
        integer("seed", self.seed, 0)
        integer("split-seed", self.split_seed, 0)
        integer("workers", self.workers, 0)
        integer("threads", self.threads, 0)
        integer("stripe-every", self.stripe_every, 0)
        if self.steps_per_epoch is not None:
            integer("steps-per-epoch", self.steps_per_epoch, 1)
        if self.image_size is not None:
            integer("image-size", self.image_size, 1)
        number("lr", self.lr, 0.0)
        if self.lr == 0:
            bad("lr", self.lr, "must be > 0 (a zero learning rate trains nothing)")
        number("momentum", self.momentum, 0.0, 1.0, open_high=True)
        number("weight-decay", self.weight_decay, 0.0)
        number("gamma", self.gamma, 0.0, 1.0)
        number("warmup-epochs", self.warmup_epochs, 0.0, float(self.epochs))
        number("label-smoothing", self.label_smoothing, 0.0, 1.0, open_high=True)
        number("psi-init", self.psi_init, -1e6, 1e6)
        if self.clip_grad is not None:
            number("clip-grad", self.clip_grad, 0.0)
            if self.clip_grad == 0:
                bad("clip-grad", self.clip_grad, "must be > 0 (omit it for no clipping)")
        if not isinstance(self.opt, str) or not self.opt:
            bad("opt", self.opt, "name an optimizer: sgd, adamw, lamb, ... (timm.optim.list_optimizers())")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            bad("model-kwargs", self.model_kwargs, "must be key=value pairs")
        if self.schedule not in ("cosine", "step", "constant"):
            bad("schedule", self.schedule, "choose cosine, step or constant")
        if self.milestones and self.schedule != "step":
            bad("milestones", self.milestones,
                f"only the step schedule uses milestones (--schedule is {self.schedule})")
        if self.schedule == "step" and not self.milestones:
            bad("milestones", self.milestones, "the step schedule needs milestones (--milestones 81 122)")
        for m in self.milestones:
            integer("milestones", m, 1)
            if m >= self.epochs:
                bad("milestones", self.milestones, f"every milestone must be < --epochs ({self.epochs})")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            bad("amp", self.amp, "choose auto, bf16, fp16 or none")
        if self.device != "auto":
            try:
                import torch

                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                bad("device", self.device, "use auto, cpu, cuda or cuda:N")
            if dev.type not in ("cpu", "cuda"):
                bad("device", self.device, "use auto, cpu, cuda or cuda:N")
        if self.val_split is not None:
            v = self.val_split
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 or (v >= 1 and v == int(v))):
                bad("val-split", v, "must be a fraction in (0, 1) or a whole number of images >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


RESUME_IGNORED = ("output", "data_dir", "cache_dir", "download", "workers", "threads", "compile", "device",
                  "progress", "tensorboard")

RECIPES: Registry[dict[str, Any]] = Registry("recipe", case_sensitive=True)


def register_recipe(name: str, **defaults: Any) -> None:
    """Register named defaults for :class:`TrainConfig` fields (explicit options override them)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(defaults) - fields
    if unknown:
        raise ValueError(f"recipe {name!r}: unknown config fields {sorted(unknown)}")
    RECIPES.register(name, defaults)


def unregister_recipe(name: str) -> None:
    """Remove a registered recipe."""
    RECIPES.unregister(name)


def list_recipes() -> list[str]:
    return RECIPES.names()


def recipe_defaults(name: str) -> dict[str, Any]:
    """The defaults of recipe ``name`` (a copy)."""
    return dict(RECIPES.get(name))


register_recipe("default", epochs=30, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine")
# the ASR paper's CIFAR recipe (its reference code: pytorch-classification, He et al. 2016)
register_recipe("paper-cifar", decay_all=True, epochs=164, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128,
                schedule="step", milestones=[81, 122], gamma=0.1, warmup_epochs=0.0)
# short cosine schedule sized for a few CPU cores (benchmarks/cifar10_asr.py)
register_recipe("cpu-cifar", decay_all=True, epochs=10, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                batch_size=128, schedule="cosine", warmup_epochs=0.5)
# the demo's recipe on the 16x16 digits
register_recipe("digits", decay_all=True, epochs=15, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64,
                schedule="cosine")
