"""``foldattn stripe``: record and draw the Stripe Observation of a model's channel attention.

Examples::

    foldattn stripe cifar_resnet20 --attention se --data digits -o out/stripes
    foldattn stripe runs/se/best.pt --data imagefolder:cifar10 --layers 'layer3.*' -o out/stripes
    foldattn stripe --history runs/se/stripes/stripe_history.json -o out/stripes
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .._argtypes import MAX_BATCH, MAX_CLASSES, MAX_IMAGES, MAX_SAMPLES, MAX_SEED, bounded_int, split_value
from .._sizes import check_forward
from .._utils import check_output_folder, make_output_folder

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
    #: one image's (C, H, W) and the (training, validation) image counts: what sizes a batch, known
    #: before any batch is made (``()`` and ``(0, 0)`` where unknown)
    image_shape: tuple[int, ...] = ()
    counts: tuple[int, int] = (0, 0)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "--dataset", dest="data", default=None,
                   help="dataset: digits (built in, no download), cifar10, cifar100, stl10 or imagefolder:PATH "
                        "(default: a checkpoint's own dataset, else digits)")
    p.add_argument("--data-dir", default=None, help="root of torchvision-format datasets")
    p.add_argument("--val-split", type=split_value, default=None,
                   help="hold out this fraction (< 1) or number (>= 1) of training images as the validation set "
                        "(default: a checkpoint's own split)")
    p.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=128,
                   help=f"images per forward pass (at most {MAX_BATCH}; the batch's and its forward's memory is "
                        "estimated first; default 128)")
    p.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0,
                   help=f"seed of splits, shuffling and the picture sample (0 to {MAX_SEED})")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="CKPT_OR_MODEL", nargs="?",
                   help="a training checkpoint (file or run folder), a foldattn model name (e.g. cifar_resnet20), "
                        "torchvision:NAME or timm:NAME (names build randomly initialised models)")
    p.add_argument("--attention", default=None, help="with a model name: the attention module (e.g. se)")
    p.add_argument("--num-classes", type=bounded_int(1, MAX_CLASSES), default=None,
                   help=f"with a model name: classifier outputs (at most {MAX_CLASSES}; default: the dataset's)")


def load_data(args: argparse.Namespace, defaults: dict[str, Any] | None = None,
              recorded: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> DataSource:
    """The loaders named by ``--data`` (any :func:`foldattn.train.data.load_dataset` name).

    ``defaults`` (a training config) fills in ``--data``, ``--data-dir`` and ``--val-split``
    when they are not given, so a checkpoint is measured on its own validation split; a dataset
    path taken from it is read only once it holds the classes ``run`` (the checkpoint's run
    record) names (:func:`foldattn.train.source.check_recorded_dataset`).
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
    from ..train.source import check_recorded_dataset

    if args.data is None and cfg.get("dataset"):
        check_recorded_dataset(spec, run, "the checkpoint")

    # no decode cache: a checkpoint's config does not choose where this command writes
    bundle = _data.load_dataset(spec, data_dir=data_dir, val_split=val_split, split_seed=split_seed,
                                cache_dir=None, image_size=cfg.get("image_size"))
    bundle = _data.with_preprocessing(bundle, recorded)  # the normalisation the model was trained with

    def loader(split: Any, train: bool) -> Any:
        return _data.TensorLoader(split, args.batch_size, bundle.mean, bundle.std, train=train,
                                  pad=bundle.pad if train else 0, flip=bundle.flip and train, seed=args.seed)

    images = getattr(bundle.train, "images", None)
    shape = tuple(int(s) for s in images.shape[1:]) if isinstance(images, torch.Tensor) else ()
    # a float batch of --batch-size images: bounded before the first is made (the images' size is the data's)
    if shape:
        check_forward(None, shape, args.batch_size, "a batch of --batch-size images", "lower --batch-size")
    return DataSource(bundle.name, loader(bundle.val, False), loader(bundle.train, False),
                      loader(bundle.train, True), bundle.num_classes, bundle.in_channels, shape,
                      (len(bundle.train), len(bundle.val)))


def check_batch_memory(model: nn.Module, data: DataSource, batch: int, option: str, training: bool = False) -> None:
    """Refuse a forward pass of ``model`` on ``batch`` of the data's images whose memory (input and
    activations, estimated on the meta device) passes the limit, before the first batch runs."""
    if data.image_shape:
        check_forward(model, data.image_shape, batch, f"a forward pass of {option} {batch} images",
                      f"lower {option}", training=training)


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
    from ..builders import model_by_name
    from ..train.source import load_source

    if os.path.exists(spec):
        # the trained weights (not an EMA), rebuilt with the checks every checkpoint gets
        source = load_source(spec, ema=False)
        if source.config is None and args.data is None:
            raise ValueError(f"{spec} is a deployed file: it records no data; name the images with --data")
        data = load_data(args, source.config.to_dict() if source.config else None, source.preprocessing,
                         run=source.blob.get("run"))
        check_batch_memory(source.model, data, args.batch_size, "--batch-size")
        kwargs: dict[str, Any] = {"num_classes": source.classes or data.num_classes}
        name = source.config.model if source.config and ":" not in source.config.model else None
        return Loaded(source.model, spec, data, name, kwargs)
    data = load_data(args)
    num_classes = args.num_classes or data.num_classes
    torch.manual_seed(args.seed)  # a model built by name is randomly initialised: make it reproducible
    if ":" in spec:
        model = model_by_name(spec, num_classes)
        check_batch_memory(model, data, args.batch_size, "--batch-size")
        return Loaded(model, spec, data, None, {})
    from ..models import list_models

    if spec not in list_models():
        raise ValueError(f"{spec!r} is neither a file nor a model name; models: {', '.join(list_models())}, "
                         "or torchvision:NAME / timm:NAME")
    kwargs = {}
    if data.in_channels != 3:
        kwargs["in_channels"] = data.in_channels
    model = model_by_name(spec, num_classes, kwargs={"attention": args.attention, **kwargs})
    check_batch_memory(model, data, args.batch_size, "--batch-size")
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
    samples = args.samples
    if args.max_images is not None and samples > args.max_images:  # no more images can be kept than are seen
        print(f"note: --samples {samples} is more than --max-images {args.max_images}: keeping {args.max_images}",
              file=sys.stderr)
        samples = args.max_images
    split = {"val": data.val, "train": data.train_eval}[args.split]
    result = record_stripes(model, split, layers=args.layers or None, max_images=args.max_images,
                            max_samples=samples, seed=args.seed)
    result.meta.update({"model": label, "data": data.name, "split": args.split})
    recorded = [layer.name for layer in result.layers]
    unknown = [n for n in args.heatmap_layers or [] if n not in recorded]
    if unknown:  # before anything is written
        raise ValueError(f"--heatmap-layers {' '.join(unknown)}: not a recorded layer; recorded: {', '.join(recorded)}")
    out = make_output_folder(args.output, "-o")
    result.save(out / "stripes.json")
    written.append(out / "stripes.json")
    written += plot_summary(result, out / "stripe_summary.png")
    if samples > 0:
        written += plot_heatmaps(result, out / "stripe_heatmaps.png", layers=args.heatmap_layers or None,
                                 unit_scale=args.unit_scale)
    print(result.table())
    return {"written": [str(p) for p in written], "summary": result.summary()}


def _main(args: argparse.Namespace) -> int:
    report = run_stripe(args)
    print("wrote " + ", ".join(report["written"]))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.add_argument("--max-images", type=bounded_int(1, MAX_IMAGES), default=1024,
                   help=f"images to record (at most {MAX_IMAGES}; default 1024)")
    p.add_argument("--samples", type=bounded_int(0, MAX_SAMPLES), default=64,
                   help=f"images whose vectors are kept for the heat maps (at most {MAX_SAMPLES}, and at most "
                        "--max-images; default 64)")
    p.add_argument("--history", default=None, metavar="JSON",
                   help="also (or only, without a model) plot a stripe history written during training")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=_main)
