"""The configuration of a training run, and the named recipes of defaults.

One run = one :class:`TrainConfig` (saved in every checkpoint). Recipes
(:func:`register_recipe`) are named sets of defaults; ``paper-cifar`` is the ASR paper's
CIFAR schedule (He et al. 2016): SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, 164 epochs,
lr x0.1 at epochs 81 and 122.
"""

from __future__ import annotations

import dataclasses
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
register_recipe("paper-cifar", epochs=164, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128,
                schedule="step", milestones=[81, 122], gamma=0.1, warmup_epochs=0.0)
# short cosine schedule sized for a few CPU cores (benchmarks/cifar10_asr.py)
register_recipe("cpu-cifar", epochs=10, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128,
                schedule="cosine", warmup_epochs=0.5)
# the demo's recipe on the 16x16 digits
register_recipe("digits", epochs=15, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="cosine")
