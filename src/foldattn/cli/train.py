"""``foldattn train``: train a model (plain, +X, +ASR(X), +ASR(X)+X), validating the folded copy."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from .._files import load_yaml_file
from .._utils import strict_json
from ..train import TrainConfig, list_recipes, recipe_defaults, train
from ..train.checkpoint import load_checkpoint
from ..train.config import SCHEDS
from . import nonnegative_float, nonnegative_int, positive_float, positive_int, split_value

__all__ = ["register", "config_from_args"]

# CLI option -> TrainConfig field, for options whose default is "not given" (None)
_FIELDS = (
    "model", "dataset", "data_dir", "download", "val_split", "split_seed", "image_size", "cache_dir",
    "attention", "asr", "both", "psi_init", "every", "where", "include", "exclude", "pretrained", "preserve_outputs",
    "epochs", "opt", "decay_all", "clip_grad", "model_kwargs", "lr", "momentum", "nesterov", "weight_decay",
    "batch_size", "schedule", "milestones", "gamma", "warmup_epochs", "label_smoothing", "workers", "seed",
    "amp", "channels_last", "compile", "sync_bn", "deterministic", "steps_per_epoch", "output", "device",
    "progress", "tensorboard", "stream", "threads", "stripe_every", "sched", "decay_epochs", "min_lr",
    "patience_epochs", "model_ema", "model_ema_decay", "model_ema_warmup", "mixup", "cutmix", "mixup_prob",
    "mixup_switch_prob", "aa", "reprob", "grad_accum_steps", "drop_path", "data_on_device",
)


# optimizers of timm's factory that take no momentum argument (Adam's relatives)
_NO_MOMENTUM = ("adam", "lamb", "lion", "adafactor", "adabelief", "novograd", "adopt", "laprop", "adan")


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _psi_init(text: str) -> float | str:
    if text == "random":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'random', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number or 'random', got {text}")
    return value


def _kwargs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value...], got {item!r}")
        out[key.strip()] = _scalar(value.strip())
    return out


def _from_file(path: str) -> dict[str, Any]:
    """The options of a ``-c`` YAML file, by field name; unknown keys are refused."""
    data = load_yaml_file(path, "--config") or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    known = {*_FIELDS, "recipe"}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        out[name] = _kwargs(value) if name == "model_kwargs" and isinstance(value, str) else value
    return out


def config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe defaults (or a resumed run's saved config), the ``-c`` file, then every option given explicitly."""
    explicit = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    if getattr(args, "config", None):
        from_file = _from_file(args.config)
        if args.recipe is None and "recipe" in from_file:
            args.recipe = from_file["recipe"]
        explicit = {**{k: v for k, v in from_file.items() if k != "recipe"}, **explicit}
    if saved is not None:
        base = dict(saved)
        if args.recipe is not None and args.recipe != base.get("recipe"):
            base.update(recipe_defaults(args.recipe))
            base["recipe"] = args.recipe
    else:
        recipe = args.recipe or "default"
        base = {**recipe_defaults(recipe), "recipe": recipe}
    if "sched" in explicit and "schedule" in explicit:
        raise ValueError("--sched (timm's schedulers) replaces --schedule (foldattn's); give one of them")
    if explicit.get("sched") is not None and "milestones" not in explicit and explicit["sched"] != "multistep":
        base["milestones"] = []  # a recipe's step milestones do not apply to another schedule
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **base, **explicit})
    if "momentum" in explicit and any(family in cfg.opt for family in _NO_MOMENTUM):
        raise ValueError(f"--momentum: --opt {cfg.opt} has no momentum term (its betas are its own); drop it")
    if "output" not in explicit and saved is None:
        kind = "plain" if cfg.attention is None else (
            f"asr-{cfg.attention}{'-both' if cfg.both else ''}" if cfg.asr else cfg.attention)
        cfg.output = f"runs/{cfg.model.replace(':', '-')}-{kind}-{cfg.dataset.split(':')[0]}-s{cfg.seed}"
    if "progress" not in explicit and saved is None:
        cfg.progress = sys.stderr.isatty()
    return cfg


def _main(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    saved = None
    if args.resume is not None:
        saved = load_checkpoint(args.resume)["config"]
    cfg = config_from_args(args, saved)
    try:
        summary = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    except FloatingPointError as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best, final = summary["best"], summary["final"]
    print(strict_json({"output": cfg.output, "best_top1": best["top1"], "best_top5": best["top5"],
                      "best_epoch": best["epoch"], "final_top1": final["top1"], "final_top5": final["top5"],
                      "time_per_epoch_s": summary["time_per_epoch_s"]}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train plain / +X / +ASR(X) models; validation runs on the folded copy",
        description="Train a model and validate its folded (deployed) copy every epoch. Options left out take "
                    "the recipe's value (or, with --resume, the saved run's).",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="foldattn model name (foldattn.list_models()), torchvision:NAME or timm:NAME "
                                   "[cifar_resnet20]")
    g.add_argument("--attention", help="attention module name, e.g. se, cbam, eca")
    g.add_argument("--asr", action="store_true", default=None, help="put the attention in ASR form (folds away)")
    g.add_argument("--both", action="store_true", default=None, help="ASR(X) + X (needs --asr)")
    g.add_argument("--psi-init", type=_psi_init, metavar="VALUE|random",
                   help="where psi starts: a number, or 'random' (standard normal) [the attention's: 0.1; scale: 1]")
    g.add_argument("--every", type=int, help="attention in every K-th block only [1]")
    g.add_argument("--where", choices=["block", "transformer", "norms"],
                   help="torchvision:/timm: models: where attach puts ASR [block]")
    g.add_argument("--include", nargs="+", metavar="PATTERN", help="torchvision:/timm: models: only these sites")
    g.add_argument("--exclude", nargs="+", metavar="PATTERN", help="torchvision:/timm: models: not these sites")
    g.add_argument("--pretrained", metavar="PATH",
                   help="start from these plain-model weights (.safetensors, or a weights-only .pt/.pth state dict "
                        "or timm/Lightning/foldattn checkpoint); strict, a classifier of another size re-initialised")
    g.add_argument("--preserve-outputs", action="store_true", default=None,
                   help="ASR starts as the identity: the model computes what the pretrained one computed")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits, cifar10, cifar100, stl10 or imagefolder:PATH [digits]")
    g.add_argument("--data-dir", help="root of torchvision-format datasets [data]")
    g.add_argument("--download", action="store_true", default=None, help="download torchvision datasets")
    g.add_argument("--val-split", type=split_value, help="hold out this fraction or count (stratified)")
    g.add_argument("--split-seed", type=int, help="seed of the validation split [0]")
    g.add_argument("--image-size", type=int, help="imagefolder: resize + centre-crop size")
    g.add_argument("--cache-dir", help="imagefolder: keep the decoded tensor cache here")
    g.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the in-memory images on the GPU and crop, flip, normalise and mix there [on CUDA "
                        "where they fit in half the free memory; never on the CPU]")
    g.add_argument("--stream", action="store_true", default=None,
                   help="imagefolder: decode per batch with --workers processes instead of holding the images in "
                        "memory (ImageNet-style trees: RandomResizedCrop --image-size [224] + flip)")
    g = p.add_argument_group("recipe and overrides")
    g.add_argument("--recipe", help=f"one of {', '.join(list_recipes())} [default]")
    g.add_argument("-c", "--config", metavar="FILE.yaml",
                   help="options from a YAML file whose keys are the option names (epochs, lr, model-kwargs, ...); "
                        "the command line overrides it")
    g.add_argument("--epochs", type=int)
    g.add_argument("--opt", help="optimizer: sgd (torch's, with --momentum/--nesterov) or a name of timm's factory "
                                 "(adamw, lamb, lion, ...) [sgd]")
    g.add_argument("--decay-all", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on norms, biases and psi too (the paper recipes do) [no]")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this [off]")
    g.add_argument("--model-kwargs", type=_kwargs, metavar="K=V,...",
                   help="keyword arguments for torchvision:/timm: constructors, e.g. img_size=16,drop_path_rate=0.1")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--batch-size", type=int, help="global batch size (split across DDP ranks)")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"))
    g.add_argument("--milestones", type=int, nargs="+", help="epochs where a step schedule multiplies lr by --gamma")
    g.add_argument("--gamma", type=float)
    g.add_argument("--sched", choices=SCHEDS,
                   help="instead of --schedule: timm's scheduler of this name (per update; step needs "
                        "--decay-epochs, multistep --milestones, plateau watches the validation top-1) or torch's "
                        "OneCycleLR")
    g.add_argument("--decay-epochs", type=positive_float, help="--sched step: multiply lr by --gamma every N epochs")
    g.add_argument("--min-lr", type=nonnegative_float, help="--sched: the lowest learning rate [0]")
    g.add_argument("--patience-epochs", type=nonnegative_int, help="--sched plateau: epochs without a better "
                                                                   "top-1 before lr x --gamma [10]")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length (fractions allowed)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--model-ema", action="store_true", default=None,
                   help="keep an EMA of the weights (timm's ModelEmaV3); it is validated (folded) every epoch, "
                        "selects best.pt, and fold/export/eval deploy it")
    g.add_argument("--model-ema-decay", type=float, help="EMA decay per update [0.9998]")
    g.add_argument("--model-ema-warmup", action="store_true", default=None,
                   help="ramp the EMA decay up over the first updates (timm's warm-up; short runs need it)")
    g.add_argument("--mixup", type=nonnegative_float, metavar="ALPHA", help="mixup alpha (timm's Mixup) [0: off]")
    g.add_argument("--cutmix", type=nonnegative_float, metavar="ALPHA", help="cutmix alpha [0: off]")
    g.add_argument("--mixup-prob", type=float, help="probability of mixing a batch [1.0]")
    g.add_argument("--mixup-switch-prob", type=float, help="with both: probability of cutmix instead of mixup [0.5]")
    g.add_argument("--aa", metavar="SPEC",
                   help="image policy as timm spells it: rand-m9-mstd0.5-inc1 (RandAugment), v0 or original "
                        "(AutoAugment), augmix-m5-w4-d2 (AugMix), or trivialaugment (torchvision's)")
    g.add_argument("--reprob", type=float, help="random-erasing probability (timm's RandomErasing) [0]")
    g.add_argument("--grad-accum-steps", type=positive_int, metavar="K",
                   help="one optimizer update every K batches of --batch-size [1]")
    g.add_argument("--drop-path", type=float, metavar="RATE",
                   help="stochastic depth: timm drop_path_rate, torchvision stochastic_depth_prob, cifar_vit_tiny")
    g.add_argument("--workers", type=int, help="data-loading processes for --stream [0: in the main process]")
    g.add_argument("--threads", type=int, help="torch CPU threads [0: PyTorch's default]")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps-per-epoch", type=int, help="cap the batches per epoch (smoke tests)")
    g = p.add_argument_group("runtime")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="autocast dtype [auto: bf16 on CPU]")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the training model")
    g.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under DDP (CUDA)")
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--device", help="auto, cpu, cuda [auto]")
    g.add_argument("-o", "--output", help="output folder [runs/MODEL-VARIANT-DATASET-sSEED]")
    g.add_argument("--resume", help="checkpoint (or output folder) to continue exactly from")
    g.add_argument("--allow-config-change", action="store_true",
                   help="on --resume, warn about changed options instead of refusing")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar [on when stderr is a terminal]")
    g.add_argument("--tensorboard", action="store_true", default=None, help="also log to OUTPUT/tensorboard")
    g.add_argument("--stripe-every", type=int, metavar="N",
                   help="before training and every N epochs record the attention statistics (Stripe "
                        "Observation) of the classic attention modules on 512 validation images: "
                        "OUTPUT/stripes/ (history JSON, curves, heat maps)")
    p.set_defaults(func=_main)
