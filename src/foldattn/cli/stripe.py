"""``foldattn stripe``: record and draw the Stripe Observation of a model's channel attention.

Examples::

    foldattn stripe cifar_resnet20 --attention se --data digits -o out/stripes
    foldattn stripe runs/se/best.pt --data imagefolder:cifar10 --layers 'layer3.*' -o out/stripes
    foldattn stripe --history runs/se/stripes/stripe_history.json -o out/stripes
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .._utils import check_output_folder, make_output_folder
from . import positive_int, split_value

__all__ = [
    "register", "run_stripe", "DataSource", "Loaded", "load_model_and_data", "load_data", "add_model_args",
    "add_data_args",
]


# --------------------------------------------------------------------------------------
# Where models and data come from (shared with ``foldattn calibrate``)
# --------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """Loaders over one dataset, plus what a model needs to know about it."""

    name: str
    val: Iterable[Any]
    train_eval: Iterable[Any]  # training images without augmentation (calibration)
    train: Iterable[Any]       # training images, shuffled and augmented (fine-tuning)
    num_classes: int
    in_channels: int


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "--dataset", dest="data", default=None,
                   help="dataset: digits (built in, no download), cifar10, cifar100, stl10 or imagefolder:PATH "
                        "(default: a checkpoint's own dataset, else digits)")
    p.add_argument("--data-dir", default=None, help="root of torchvision-format datasets")
    p.add_argument("--val-split", type=split_value, default=None,
                   help="hold out this fraction (< 1) or number (>= 1) of training images as the validation set "
                        "(default: a checkpoint's own split)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, shuffling and the picture sample")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="CKPT_OR_MODEL", nargs="?",
                   help="a training checkpoint (file or run folder), a foldattn model name (e.g. cifar_resnet20), "
                        "torchvision:NAME or timm:NAME (names build randomly initialised models)")
    p.add_argument("--attention", default=None, help="with a model name: the attention module (e.g. se)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="with a model name: classifier outputs "
                                                                   "(default: the dataset's)")


def load_data(args: argparse.Namespace, defaults: dict[str, Any] | None = None,
              recorded: dict[str, Any] | None = None) -> DataSource:
    """The loaders named by ``--data`` (any :func:`foldattn.train.data.load_dataset` name).

    ``defaults`` (a training config) fills in ``--data``, ``--data-dir`` and ``--val-split``
    when they are not given, so a checkpoint is measured on its own validation split.
    """
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg = defaults or {}
    spec = args.data or cfg.get("dataset") or "digits"
    data_dir = args.data_dir or cfg.get("data_dir")
    val_split = args.val_split if args.val_split is not None else cfg.get("val_split")
    if isinstance(val_split, float) and val_split >= 1:
        val_split = int(val_split)
    split_seed = int(cfg.get("split_seed", args.seed)) if args.data is None and cfg else args.seed
    from ..train import data as _data

    # no decode cache: a checkpoint's config does not choose where this command writes
    bundle = _data.load_dataset(spec, data_dir=data_dir, val_split=val_split, split_seed=split_seed,
                                cache_dir=None, image_size=cfg.get("image_size"))
    bundle = _data.with_preprocessing(bundle, recorded)  # the normalisation the model was trained with

    def loader(split: Any, train: bool) -> Any:
        return _data.TensorLoader(split, args.batch_size, bundle.mean, bundle.std, train=train,
                                  pad=bundle.pad if train else 0, flip=bundle.flip and train, seed=args.seed)

    return DataSource(bundle.name, loader(bundle.val, False), loader(bundle.train, False),
                      loader(bundle.train, True), bundle.num_classes, bundle.in_channels)


class Loaded(NamedTuple):
    """What ``CKPT_OR_MODEL`` gave: the model, a label, the data, and how to build the plain
    architecture (``name`` for :func:`foldattn.models.create_model` and its keyword arguments; the
    name is ``None`` for torchvision/timm models)."""

    model: nn.Module
    label: str
    data: DataSource
    name: str | None
    kwargs: dict[str, Any]


def load_model_and_data(args: argparse.Namespace) -> Loaded:
    """The model named by ``CKPT_OR_MODEL`` and the data (a checkpoint's own by default)."""
    spec = args.model
    if not spec:
        raise ValueError("give a model: a checkpoint path, a foldattn model name, torchvision:NAME or timm:NAME")
    from ..train.source import load_source, model_by_name

    if os.path.exists(spec):
        # the trained weights (not an EMA), rebuilt with the checks every checkpoint gets
        source = load_source(spec, ema=False)
        assert source.config is not None
        data = load_data(args, source.config.to_dict(), source.preprocessing)
        kwargs = {"num_classes": source.classes or data.num_classes}
        return Loaded(source.model, spec, data, None if ":" in source.config.model else source.config.model, kwargs)
    data = load_data(args)
    num_classes = args.num_classes or data.num_classes
    torch.manual_seed(args.seed)  # a model built by name is randomly initialised: make it reproducible
    if ":" in spec:
        return Loaded(model_by_name(spec, num_classes), spec, data, None, {})
    from ..models import list_models

    if spec not in list_models():
        raise ValueError(f"{spec!r} is neither a file nor a model name; models: {', '.join(list_models())}, "
                         "or torchvision:NAME / timm:NAME")
    kwargs: dict[str, Any] = {}
    if data.in_channels != 3:
        kwargs["in_channels"] = data.in_channels
    model = model_by_name(spec, num_classes, kwargs={"attention": args.attention, **kwargs})
    return Loaded(model, spec, data, spec, {"num_classes": num_classes, **kwargs})




# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------
def run_stripe(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``foldattn stripe``; returns the paths written and the result summary."""
    from ..stripe import StripeHistory, record_stripes
    from ..stripe.plots import plot_heatmaps, plot_history, plot_summary

    check_output_folder(args.output, "--output")  # created only when the first file is written
    written: list[Path] = []
    if args.history:
        history = StripeHistory.load(args.history)
        written += plot_history(history, make_output_folder(args.output, "-o") / "stripe_curves.png")
        if not args.model:
            return {"written": [str(p) for p in written]}
    model, label, data, _, _ = load_model_and_data(args)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    split = {"val": data.val, "train": data.train_eval}[args.split]
    result = record_stripes(model, split, layers=args.layers or None, max_images=args.max_images,
                            max_samples=args.samples, seed=args.seed)
    result.meta.update({"model": label, "data": data.name, "split": args.split})
    out = make_output_folder(args.output, "-o")
    result.save(out / "stripes.json")
    written.append(out / "stripes.json")
    written += plot_summary(result, out / "stripe_summary.png")
    if args.samples > 0:
        written += plot_heatmaps(result, out / "stripe_heatmaps.png", layers=args.heatmap_layers or None,
                                 unit_scale=args.unit_scale)
    print(result.table())
    return {"written": [str(p) for p in written], "summary": result.summary()}


def _main(args: argparse.Namespace) -> int:
    report = run_stripe(args)
    print("wrote " + ", ".join(report["written"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stripe", help="measure how constant a model's channel-attention vectors are (the Stripe Observation)",
        description="Record each channel-attention module's attention vector a(x) and input descriptor over a "
                    "dataset; write per-channel statistics (JSON), heat maps and a per-layer summary (PNG + JSON).",
    )
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--split", choices=("val", "train"), default="val", help="which images to record (default val)")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="attention modules to record: names or glob patterns (default: all)")
    p.add_argument("--heatmap-layers", nargs="+", default=None, metavar="NAME",
                   help="layers drawn as heat maps (default: first, middle and last)")
    p.add_argument("--unit-scale", action="store_true",
                   help="draw attention heat maps on a fixed [0, 1] colour scale (default: each panel's own range)")
    p.add_argument("--max-images", type=int, default=1024, help="images to record (default 1024)")
    p.add_argument("--samples", type=int, default=64, help="images kept for the heat maps (default 64)")
    p.add_argument("--history", default=None, metavar="JSON",
                   help="also (or only, without a model) plot a stripe history written during training")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=_main)
