"""The configuration of a training run, and the named recipes of defaults.

One run = one :class:`TrainConfig` (saved in every checkpoint). Recipes
(:func:`register_recipe`) are named sets of defaults; ``paper-cifar`` is the ASR paper's
CIFAR schedule (He et al. 2016): SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, 164 epochs,
lr x0.1 at epochs 81 and 122.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .._registry import Registry

__all__ = ["TrainConfig", "RESUME_IGNORED", "SCHEDS", "register_recipe", "unregister_recipe", "list_recipes",
           "get_recipe", "recipe_defaults", "RECIPES"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    model: str = "cifar_resnet20"
    dataset: str = "digits"
    attention: str | None = None
    asr: bool = False
    both: bool = False
    psi_init: float | str | None = None  # None: the attention module's default (0.1; scale: 1); "random"
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
    schedule: str = "cosine"  # foldattn's per-step schedule (the paper recipes): cosine, step, constant
    sched: str | None = None  # instead: timm's scheduler (cosine, tanh, step, multistep, plateau, poly) or onecycle
    milestones: list[int] = field(default_factory=list)
    decay_epochs: float | None = None  # --sched step: decay every this many epochs
    gamma: float = 0.1
    min_lr: float = 0.0  # --sched: the floor of the learning rate
    patience_epochs: int = 10  # --sched plateau: epochs without a better top-1 before lr x gamma
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    model_ema: bool = False  # keep an exponential moving average of the weights (timm's ModelEmaV3)
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False  # ramp the EMA decay up from 0 (timm's warm-up)
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # with both: probability of cutmix instead of mixup
    aa: str | None = None  # image policy as timm spells it: rand-m9-mstd0.5-inc1, v0, augmix-m5-w4-d2, trivialaugment
    reprob: float = 0.0  # random-erasing probability
    grad_accum_steps: int = 1  # optimizer step every K batches (the effective batch is K x --batch-size)
    drop_path: float | None = None  # stochastic depth rate (timm drop_path_rate, torchvision stochastic_depth_prob)
    seed: int = 0
    val_split: float | int | None = None
    split_seed: int = 0
    image_size: int | None = None
    stream: bool = False
    data_on_device: bool | None = None  # in-memory images on the GPU, augmented there (None: on CUDA where they fit)
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

    def check_types(self) -> None:
        """Every field holds a value of its declared type (a config from a YAML file or a checkpoint is
        data: a number where a name belongs, a list where a number belongs, is refused naming the field)."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is_a(value, hints[f.name]):
                option = f.name.replace("_", "-")
                raise ValueError(f"--{option} {_short(value)}: expected {_type_name(hints[f.name])}, got "
                                 f"{type(value).__name__}")

    def validate(self) -> None:
        """Refuse values no run can use, before any work (``ValueError`` naming the option,
        the value and what is allowed)."""
        self.check_types()

        def bad(option: str, value: Any, allowed: str) -> None:
            raise ValueError(f"--{option} {_short(value)}: {allowed}")

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
        for option, value in (("seed", self.seed), ("split-seed", self.split_seed)):
            if value >= 2**32:
                bad(option, value, "must be below 2^32 (NumPy's generators take 32-bit seeds)")
        integer("workers", self.workers, 0)
        integer("threads", self.threads, 0)
        integer("stripe-every", self.stripe_every, 0)
        if self.steps_per_epoch is not None:
            integer("steps-per-epoch", self.steps_per_epoch, 1)
        if self.image_size is not None:
            integer("image-size", self.image_size, 1)
            if self.image_size > _MAX_IMAGE_SIZE:
                bad("image-size", self.image_size, f"must be at most {_MAX_IMAGE_SIZE} pixels")
        number("lr", self.lr, 0.0, _MAX_LR)
        if self.lr == 0:
            bad("lr", self.lr, "must be > 0 (a zero learning rate trains nothing)")
        number("momentum", self.momentum, 0.0, 1.0, open_high=True)
        number("weight-decay", self.weight_decay, 0.0)
        number("gamma", self.gamma, 0.0, 1.0)
        number("warmup-epochs", self.warmup_epochs, 0.0, float(self.epochs))
        number("label-smoothing", self.label_smoothing, 0.0, 1.0, open_high=True)
        if self.psi_init is not None and self.psi_init != "random":
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
        if self.sched is not None and self.sched not in SCHEDS:
            bad("sched", self.sched, f"choose {', '.join(SCHEDS)}")
        uses_milestones = self.sched == "multistep" or (self.sched is None and self.schedule == "step")
        which = f"--sched is {self.sched}" if self.sched else f"--schedule is {self.schedule}"
        if self.milestones and not uses_milestones:
            bad("milestones", self.milestones,
                f"only the step schedule (or --sched multistep) uses milestones ({which})")
        if uses_milestones and not self.milestones:
            bad("milestones", self.milestones, "a step schedule needs milestones (--milestones 81 122)")
        if self.decay_epochs is not None:
            if self.sched != "step":
                bad("decay-epochs", self.decay_epochs, "only --sched step uses it")
            number("decay-epochs", self.decay_epochs, 0.0)
            if self.decay_epochs == 0:
                bad("decay-epochs", self.decay_epochs, "must be > 0")
        if self.sched == "step" and self.decay_epochs is None:
            bad("decay-epochs", None, "--sched step decays every --decay-epochs N epochs: give N")
        number("min-lr", self.min_lr, 0.0)
        integer("patience-epochs", self.patience_epochs, 0)
        if self.patience_epochs != 10 and self.sched != "plateau":
            bad("patience-epochs", self.patience_epochs, "only --sched plateau uses it")
        if self.min_lr and self.sched is None:
            bad("min-lr", self.min_lr, "only --sched schedules have a floor; add --sched cosine (or drop it)")
        if self.min_lr >= self.lr:
            bad("min-lr", self.min_lr, f"must be below --lr ({self.lr:g})")
        if not isinstance(self.model_ema, bool):
            bad("model-ema", self.model_ema, "must be true or false")
        number("model-ema-decay", self.model_ema_decay, 0.0, 1.0, open_high=True)
        if self.model_ema_decay == 0:
            bad("model-ema-decay", self.model_ema_decay, "must be in (0, 1): 0 makes the EMA a copy of the weights")
        if not self.model_ema and (self.model_ema_decay != 0.9998 or self.model_ema_warmup):
            bad("model-ema-decay" if self.model_ema_decay != 0.9998 else "model-ema-warmup",
                self.model_ema_decay if self.model_ema_decay != 0.9998 else True, "add --model-ema to use it")
        number("mixup", self.mixup, 0.0)
        number("cutmix", self.cutmix, 0.0)
        number("mixup-prob", self.mixup_prob, 0.0, 1.0)
        number("mixup-switch-prob", self.mixup_switch_prob, 0.0, 1.0)
        mixing = self.mixup > 0 or self.cutmix > 0
        if not mixing and (self.mixup_prob != 1.0 or self.mixup_switch_prob != 0.5):
            bad("mixup-prob", self.mixup_prob, "mixing is off: set --mixup and/or --cutmix, or drop it")
        if mixing and self.batch_size % 2:
            bad("batch-size", self.batch_size, "mixup/cutmix pair each image with another: use an even batch size")
        number("reprob", self.reprob, 0.0, 1.0)
        if self.aa is not None:
            from .augment import check_aa

            check_aa(self.aa)
        integer("grad-accum-steps", self.grad_accum_steps, 1)
        if self.steps_per_epoch is not None and self.steps_per_epoch < self.grad_accum_steps:
            bad("steps-per-epoch", self.steps_per_epoch,
                f"fewer batches than one optimizer step takes (--grad-accum-steps {self.grad_accum_steps})")
        if self.drop_path is not None:
            number("drop-path", self.drop_path, 0.0, 1.0, open_high=True)
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
        folder = isinstance(self.dataset, str) and self.dataset.startswith("imagefolder:")
        if self.image_size is not None and not folder:
            bad("image-size", self.image_size, f"only imagefolder:PATH data is resized; {self.dataset!r} has its size")
        if self.cache_dir is not None and not folder:
            bad("cache-dir", self.cache_dir,
                f"only imagefolder:PATH data is decoded into a cache; not {self.dataset!r}")
        if self.data_on_device and self.stream:
            bad("data-on-device", True, "serves in-memory data; --stream decodes files per batch on the CPU")
        if self.data_on_device and self.aa is not None:
            bad("data-on-device", True, "--aa runs per image on the CPU; drop one of them")
        if self.data_on_device and self.device == "cpu":
            bad("data-on-device", True, "keeps the images on a GPU, and this run is on the CPU")
        if self.workers and not self.stream:
            bad("workers", self.workers, "data-loading processes serve --stream only (in-memory data needs none)")
        if self.download and self.dataset not in ("cifar10", "cifar100", "stl10"):
            bad("download", True, f"only cifar10, cifar100 and stl10 are downloaded; not {self.dataset!r}")
        if self.nesterov and self.opt != "sgd":
            bad("nesterov", True, f"applies to --opt sgd (timm's Nesterov SGD is --opt nesterov), not {self.opt}")
        if self.val_split is not None:
            v = self.val_split
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 or (v >= 1 and v == int(v))):
                bad("val-split", v, "must be a fraction in (0, 1) or a whole number of images >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of ``d``'s known fields (others are ignored: a newer foldattn's options)."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a mapping of option names to values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if isinstance(k, str) and k in known})


#: the largest --image-size (a side in pixels) accepted
_MAX_IMAGE_SIZE = 4096
#: the largest --lr accepted (beyond it every optimizer diverges; near 1e38 float32 overflows in the update)
_MAX_LR = 1e3


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_a(value: Any, hint: Any) -> bool:
    """``value`` matches the type hint (bool is not an int; an int is a float; containers checked inside)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and len(value) <= 4096
    if origin is list:
        return isinstance(value, list) and len(value) <= 1024 and all(_is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and len(value) <= 256 and all(
            _is_a(k, args[0]) and _is_a(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "nothing (null)"
    if origin is list:
        plural = {int: "integers", str: "strings", float: "numbers"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}"
    if origin is dict:
        return "a mapping of names to values"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string (at most 4096 characters)"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


#: ``--sched`` names: timm's ``create_scheduler_v2`` schedulers, and torch's ``OneCycleLR``
SCHEDS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "onecycle")

RESUME_IGNORED = ("output", "data_dir", "cache_dir", "download", "workers", "threads", "compile", "device",
                  "progress", "tensorboard", "data_on_device")

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


def get_recipe(name: str) -> dict[str, Any]:
    """The defaults of recipe ``name`` (a copy)."""
    return dict(RECIPES.get(name))


recipe_defaults = get_recipe  # foldattn 0.1's name


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
