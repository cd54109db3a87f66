"""The configuration of a training run, and the named recipes of defaults.

One run = one :class:`TrainConfig` (saved in every checkpoint). Recipes
(:func:`register_recipe`) are named sets of defaults; ``paper-cifar`` is the ASR paper's
CIFAR schedule (He et al. 2016): SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, 164 epochs,
lr x0.1 at epochs 81 and 122.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import _argtypes
from .._registry import Registry
from .options import check_declared, option, resume_ignored

__all__ = ["TrainConfig", "RESUME_IGNORED", "SCHEDS", "register_recipe", "unregister_recipe", "list_recipes",
           "get_recipe", "recipe_defaults", "RECIPES"]


_TV_DATASETS = ("cifar10", "cifar100", "stl10")
#: ``--sched`` names: timm's ``create_scheduler_v2`` schedulers, and torch's ``OneCycleLR``
SCHEDS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "onecycle")
#: the largest --image-size (a side in pixels) accepted
_MAX_IMAGE_SIZE = 4096
#: the largest --lr accepted (beyond it every optimizer diverges; near 1e38 float32 overflows in the update)
_MAX_LR = 1e3


def _uses_milestones(c: TrainConfig) -> bool:
    return c.sched == "multistep" or (c.sched is None and c.schedule == "step")


def _which_schedule(c: TrainConfig) -> str:
    which = f"--sched is {c.sched}" if c.sched else f"--schedule is {c.schedule}"
    return f"only the step schedule (or --sched multistep) uses milestones ({which})"


def _mixing(c: TrainConfig) -> bool:
    return c.mixup > 0 or c.cutmix > 0


def _folder(c: TrainConfig) -> bool:
    return isinstance(c.dataset, str) and c.dataset.startswith("imagefolder:")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    Every field is declared once (:func:`foldattn.train.options.option`): its flag, help, type, range,
    the options it needs and whether a resume may change it; ``foldattn train``'s arguments, the keys of
    ``-c FILE.yaml``, :meth:`validate` and the resume rule are derived from the declarations.
    """

    # --- model ------------------------------------------------------------------------------------
    model: str = option("cifar_resnet20", group="model", help="foldattn model name (foldattn.list_models()), "
                        "torchvision:NAME or timm:NAME [cifar_resnet20]")
    attention: str | None = option(group="model", help="attention module name, e.g. se, cbam, eca")
    asr: bool = option(False, group="model", action="store_true", help="put the attention in ASR form (folds away)")
    both: bool = option(False, group="model", action="store_true", help="ASR(X) + X (needs --asr)")
    psi_init: float | str | None = option(group="model", argtype=_argtypes.psi_init, metavar="VALUE|random",
                                          help="where psi starts: a number, or 'random' (standard normal) "
                                               "[the attention's: 0.1; scale: 1]")
    every: int = option(1, group="model", integer=True, low=1, help="attention in every K-th block only [1]")
    where: str | None = option(group="model", choices=("block", "transformer", "norms"),
                               help="torchvision:/timm: models: where attach puts ASR [block]")
    include: list[str] = option(factory=list, group="model", nargs="+", metavar="PATTERN",
                                help="torchvision:/timm: models: only these sites")
    exclude: list[str] = option(factory=list, group="model", nargs="+", metavar="PATTERN",
                                help="torchvision:/timm: models: not these sites")
    pretrained: str | None = option(group="model", metavar="PATH",
                                    help="start from these plain-model weights (.safetensors, or a weights-only "
                                         ".pt/.pth state dict or timm/Lightning/foldattn checkpoint); strict, a "
                                         "classifier of another size re-initialised")
    preserve_outputs: bool = option(False, group="model", action="store_true",
                                    help="ASR starts as the identity: the model computes what the pretrained one "
                                         "computed")
    # --- data -------------------------------------------------------------------------------------
    dataset: str = option("digits", group="data", help="digits, cifar10, cifar100, stl10 or imagefolder:PATH "
                                                       "[digits]")
    data_dir: str = option("data", group="data", resume_may_change=True,
                           help="root of torchvision-format datasets [data]")
    download: bool = option(False, group="data", action="store_true", resume_may_change=True,
                            only_if=(lambda c: c.dataset in _TV_DATASETS,
                                     lambda c: f"only cifar10, cifar100 and stl10 are downloaded; not {c.dataset!r}"),
                            help="download torchvision datasets")
    val_split: float | int | None = option(group="data", argtype=_argtypes.split_value,
                                           help="hold out this fraction or count (stratified)")
    split_seed: int = option(0, group="data", integer=True, low=0, high=2**32 - 1,
                             help="seed of the validation split [0]")
    image_size: int | None = option(group="data", integer=True, low=1, high=_MAX_IMAGE_SIZE,
                                    only_if=(_folder, lambda c: f"only imagefolder:PATH data is resized; "
                                                                f"{c.dataset!r} has its size"),
                                    help="imagefolder: resize + centre-crop size")
    cache_dir: str | None = option(group="data", resume_may_change=True,
                                   only_if=(_folder, lambda c: "only imagefolder:PATH data is decoded into a cache; "
                                                               f"not {c.dataset!r}"),
                                   help="imagefolder: keep the decoded tensor cache here")
    data_on_device: bool | None = option(group="data", action="boolean", resume_may_change=True,
                                         help="keep the in-memory images on the GPU and crop, flip, normalise and mix "
                                              "there [on CUDA where they fit in half the free memory; never on the "
                                              "CPU]")
    stream: bool = option(False, group="data", action="store_true",
                          help="imagefolder: decode per batch with --workers processes instead of holding the images "
                               "in memory (ImageNet-style trees: RandomResizedCrop --image-size [224] + flip)")
    # --- recipe and overrides ---------------------------------------------------------------------
    recipe: str = option("default", help="one of the registered recipes (foldattn.train.list_recipes()) [default]")
    epochs: int = option(30, integer=True, low=1, high=_argtypes.MAX_EPOCHS)
    opt: str = option("sgd", help="optimizer: sgd (torch's, with --momentum/--nesterov) or a name of timm's factory "
                                  "(adamw, lamb, lion, ...) [sgd]")
    decay_all: bool = option(False, action="boolean",
                             help="weight decay on norms, biases and psi too (the paper recipes do) [no]")
    clip_grad: float | None = option(low=0.0, help="clip the gradient norm to this [off]")
    model_kwargs: dict[str, Any] = option(factory=dict, argtype=_argtypes.key_values, metavar="K=V,...",
                                          help="keyword arguments for torchvision:/timm: constructors, e.g. "
                                               "img_size=16,drop_path_rate=0.1")
    lr: float = option(0.1, low=0.0, high=_MAX_LR)
    momentum: float = option(0.9, low=0.0, high=1.0, open_high=True)
    nesterov: bool = option(False, action="boolean",
                            only_if=(lambda c: c.opt == "sgd", lambda c: "applies to --opt sgd (timm's Nesterov SGD "
                                                                         f"is --opt nesterov), not {c.opt}"))
    weight_decay: float = option(5e-4, low=0.0, flags=("--wd", "--weight-decay"))
    batch_size: int = option(128, integer=True, low=1, high=_argtypes.MAX_TRAIN_BATCH,
                             help="global batch size (split across DDP ranks)")
    schedule: str = option("cosine", choices=("cosine", "step", "constant"))
    sched: str | None = option(choices=SCHEDS,
                               help="instead of --schedule: timm's scheduler of this name (per update; step needs "
                                    "--decay-epochs, multistep --milestones, plateau watches the validation top-1) or "
                                    "torch's OneCycleLR")
    milestones: list[int] = option(factory=list, nargs="+", argtype=int, only_if=(_uses_milestones, _which_schedule),
                                   help="epochs where a step schedule multiplies lr by --gamma")
    decay_epochs: float | None = option(argtype=_argtypes.positive_float, low=0.0, high=_argtypes.MAX_EPOCHS,
                                        only_if=(lambda c: c.sched == "step", "only --sched step uses it"),
                                        help="--sched step: multiply lr by --gamma every N epochs")
    gamma: float = option(0.1, low=0.0, high=1.0)
    min_lr: float = option(0.0, argtype=_argtypes.nonnegative_float, low=0.0,
                           only_if=(lambda c: c.sched is not None,
                                    "only --sched schedules have a floor; add --sched cosine (or drop it)"),
                           help="--sched: the lowest learning rate [0]")
    patience_epochs: int = option(10, integer=True, low=0, high=_argtypes.MAX_EPOCHS,
                                  only_if=(lambda c: c.sched == "plateau", "only --sched plateau uses it"),
                                  help="--sched plateau: epochs without a better top-1 before lr x --gamma [10]")
    warmup_epochs: float = option(0.0, low=0.0, high=_argtypes.MAX_EPOCHS,
                                  help="linear warm-up length (fractions allowed; at most --epochs)")
    label_smoothing: float = option(0.0, low=0.0, high=1.0, open_high=True)
    model_ema: bool = option(False, action="store_true",
                             help="keep an EMA of the weights (timm's ModelEmaV3); it is validated (folded) every "
                                  "epoch, selects best.pt, and fold/export/eval deploy it")
    model_ema_decay: float = option(0.9998, low=0.0, high=1.0, open_high=True,
                                    only_if=(lambda c: c.model_ema, "add --model-ema to use it"),
                                    help="EMA decay per update [0.9998]")
    model_ema_warmup: bool = option(False, action="store_true",
                                    only_if=(lambda c: c.model_ema, "add --model-ema to use it"),
                                    help="ramp the EMA decay up over the first updates (timm's warm-up; short runs "
                                         "need it)")
    mixup: float = option(0.0, argtype=_argtypes.nonnegative_float, low=0.0, metavar="ALPHA",
                          help="mixup alpha (timm's Mixup) [0: off]")
    cutmix: float = option(0.0, argtype=_argtypes.nonnegative_float, low=0.0, metavar="ALPHA",
                           help="cutmix alpha [0: off]")
    mixup_prob: float = option(1.0, low=0.0, high=1.0,
                               only_if=(_mixing, "mixing is off: set --mixup and/or --cutmix, or drop it"),
                               help="probability of mixing a batch [1.0]")
    mixup_switch_prob: float = option(0.5, low=0.0, high=1.0,
                                      only_if=(_mixing, "mixing is off: set --mixup and/or --cutmix, or drop it"),
                                      help="with both: probability of cutmix instead of mixup [0.5]")
    aa: str | None = option(metavar="SPEC", help="image policy as timm spells it: rand-m9-mstd0.5-inc1 (RandAugment), "
                                                 "v0 or original (AutoAugment), augmix-m5-w4-d2 (AugMix), or "
                                                 "trivialaugment (torchvision's)")
    reprob: float = option(0.0, low=0.0, high=1.0, help="random-erasing probability (timm's RandomErasing) [0]")
    grad_accum_steps: int = option(1, integer=True, low=1, high=_argtypes.MAX_ACCUM_STEPS, metavar="K",
                                   help="one optimizer update every K batches of --batch-size [1]")
    drop_path: float | None = option(low=0.0, high=1.0, open_high=True, metavar="RATE",
                                     help="stochastic depth: timm drop_path_rate, torchvision stochastic_depth_prob, "
                                          "cifar_vit_tiny")
    workers: int = option(0, integer=True, low=0, high=_argtypes.MAX_WORKERS, resume_may_change=True,
                          only_if=(lambda c: c.stream, "data-loading processes serve --stream only (in-memory data "
                                                       "needs none)"),
                          help="data-loading processes for --stream [0: in the main process]")
    threads: int = option(0, integer=True, low=0, high=_argtypes.MAX_CONFIG_THREADS, resume_may_change=True,
                          help="torch CPU threads [0: PyTorch's default]")
    seed: int = option(0, integer=True, low=0, high=2**32 - 1)
    steps_per_epoch: int | None = option(integer=True, low=1, high=_argtypes.MAX_STEPS,
                                         help="cap the batches per epoch (smoke tests)")
    # --- runtime ----------------------------------------------------------------------------------
    amp: str = option("auto", group="runtime", choices=("auto", "bf16", "fp16", "none"),
                      help="autocast dtype [auto: bf16 on CPU]")
    channels_last: bool = option(True, group="runtime", action="boolean")
    compile: bool = option(False, group="runtime", action="store_true", resume_may_change=True,
                           help="torch.compile the training model")
    sync_bn: bool = option(False, group="runtime", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    deterministic: bool = option(False, group="runtime", action="store_true",
                                 help="torch.use_deterministic_algorithms(True)")
    device: str = option("auto", group="runtime", resume_may_change=True, help="auto, cpu, cuda [auto]")
    output: str = option("runs/train", group="runtime", flags=("-o", "--output"), resume_may_change=True,
                         help="output folder [runs/MODEL-VARIANT-DATASET-sSEED]")
    progress: bool = option(False, group="runtime", action="boolean", resume_may_change=True,
                            help="progress bar [on when stderr is a terminal]")
    tensorboard: bool = option(False, group="runtime", action="store_true", resume_may_change=True,
                               help="also log to OUTPUT/tensorboard")
    stripe_every: int = option(0, group="runtime", integer=True, low=0, high=_argtypes.MAX_EPOCHS, metavar="N",
                               help="before training and every N epochs record the attention statistics (Stripe "
                                    "Observation) of the classic attention modules on 512 validation images: "
                                    "OUTPUT/stripes/ (history JSON, curves, heat maps)")

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
        """Refuse values no run can use, before any work (``ValueError`` naming the option, the value and
        what is allowed): the field types, every declaration's range, choices and ``only_if``
        (:func:`foldattn.train.options.check_declared`), then the rules that relate several options."""
        self.check_types()
        check_declared(self)

        def bad(option: str, value: Any, allowed: str) -> NoReturn:
            raise ValueError(f"--{option} {_short(value)}: {allowed}")

        if self.lr == 0:
            bad("lr", self.lr, "must be > 0 (a zero learning rate trains nothing)")
        if self.warmup_epochs > self.epochs:
            bad("warmup-epochs", self.warmup_epochs, f"must be a number in [0, {self.epochs:g}]")
        if self.psi_init is not None and self.psi_init != "random" and abs(self.psi_init) > 1e6:  # type: ignore[arg-type]
            bad("psi-init", self.psi_init, "must be a number in [-1e+06, 1e+06]")
        if self.clip_grad == 0:
            bad("clip-grad", self.clip_grad, "must be > 0 (omit it for no clipping)")
        if not self.opt:
            bad("opt", self.opt, "name an optimizer: sgd, adamw, lamb, ... (timm.optim.list_optimizers())")
        if _uses_milestones(self) and not self.milestones:
            bad("milestones", self.milestones, "a step schedule needs milestones (--milestones 81 122)")
        if self.decay_epochs == 0:
            bad("decay-epochs", self.decay_epochs, "must be > 0")
        if self.sched == "step" and self.decay_epochs is None:
            bad("decay-epochs", None, "--sched step decays every --decay-epochs N epochs: give N")
        if self.min_lr >= self.lr:
            bad("min-lr", self.min_lr, f"must be below --lr ({self.lr:g})")
        if self.model_ema_decay == 0:
            bad("model-ema-decay", self.model_ema_decay, "must be in (0, 1): 0 makes the EMA a copy of the weights")
        if _mixing(self) and self.batch_size % 2:
            bad("batch-size", self.batch_size, "mixup/cutmix pair each image with another: use an even batch size")
        if self.aa is not None:
            from .augment import check_aa

            check_aa(self.aa)
        if self.steps_per_epoch is not None and self.steps_per_epoch < self.grad_accum_steps:
            bad("steps-per-epoch", self.steps_per_epoch,
                f"fewer batches than one optimizer step takes (--grad-accum-steps {self.grad_accum_steps})")
        for m in self.milestones:
            if isinstance(m, bool) or m < 1:
                bad("milestones", m, "must be an integer >= 1")
            if m >= self.epochs:
                bad("milestones", self.milestones, f"every milestone must be < --epochs ({self.epochs})")
        if self.device != "auto":
            try:
                import torch

                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                bad("device", self.device, "use auto, cpu, cuda or cuda:N")
            if dev.type not in ("cpu", "cuda"):
                bad("device", self.device, "use auto, cpu, cuda or cuda:N")
        if self.data_on_device and self.stream:
            bad("data-on-device", True, "serves in-memory data; --stream decodes files per batch on the CPU")
        if self.data_on_device and self.aa is not None:
            bad("data-on-device", True, "--aa runs per image on the CPU; drop one of them")
        if self.data_on_device and self.device == "cpu":
            bad("data-on-device", True, "keeps the images on a GPU, and this run is on the CPU")
        if self.val_split is not None:
            v = self.val_split
            if isinstance(v, bool) or not (0 < v < 1 or (v >= 1 and v == int(v))):
                bad("val-split", v, "must be a fraction in (0, 1) or a whole number of images >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of ``d``'s known fields (others are ignored: a newer foldattn's options)."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a mapping of option names to values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if isinstance(k, str) and k in known})


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



#: the fields a resumed run may change (declared with ``resume_may_change``)
RESUME_IGNORED = resume_ignored(TrainConfig)

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
