"""``foldattn fold CKPT -o OUT``: the deployed model of a checkpoint, as safetensors + JSON metadata."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._lock import RunLock
from .._sizes import check_forward
from .._utils import first_line
from ..deploy import read_metadata, save_deployed
from ..fold import fold
from ..summary import count_params
from ..train import TrainConfig, example_input
from ..verify import verify
from ._errors import CLIError
from ._source import add_source_options, load_source

__all__ = ["register", "builder_for", "take_image_size", "example_batch"]


def take_image_size(args: argparse.Namespace) -> None:
    """``--image-size`` with a foldattn checkpoint sets the example batch's size (``example_size``): the
    way out when the size the checkpoint records makes that batch too large. Taken off ``args`` before
    :func:`load_source`, which reads it as the input size of another trainer's model."""
    args.example_size = None
    if args.model is None and args.image_size is not None:
        args.example_size, args.image_size = args.image_size, None


def example_batch(args: argparse.Namespace, model: nn.Module, blob: dict[str, Any], batch: int, what: str,
                  passes: int, largest: int | None = None) -> Tensor:
    """The random example batch at the recorded image size (or ``--image-size``), once its bytes and the
    activations of ``passes`` forward passes (estimated on the meta device) at ``largest`` (default
    ``batch``) inputs are known to fit: a checkpoint may record any size up to 8192x8192, and the batch
    is allocated only after this check."""
    if getattr(args, "example_size", None):
        blob = {**blob, "run": {**(blob.get("run") or {}), "image_size": (args.example_size,) * 2}}
    h, w = (blob.get("run") or {}).get("image_size", (32, 32))
    check_forward(model, (3, int(h), int(w)), largest or batch, what,
                  "pass --image-size N for a smaller example batch (a size the model takes)", copies=passes)
    return example_input(blob, batch=batch)


def _verify(args: argparse.Namespace, model: nn.Module, deployed: nn.Module, x: Tensor) -> Any:
    try:
        return verify(model, deployed, x)
    except RuntimeError as e:  # a model that takes one input size only, given another by --image-size
        if not getattr(args, "example_size", None) or isinstance(e, torch.OutOfMemoryError):
            raise
        raise CLIError(f"--image-size {args.example_size}: the model does not run on {tuple(x.shape)}: "
                       f"{first_line(e)}") from None


def builder_for(cfg: TrainConfig, classes: int) -> tuple[str | None, dict[str, Any] | None]:
    """How :func:`foldattn.load_deployed` rebuilds a torchvision/timm run's deployed architecture.

    ``(None, None)`` for foldattn models, whose builder :func:`foldattn.create_model` recorded on
    the model (deploy-time kwargs included: ``deploy=True`` of SRP backbones, the classic twin of
    ASR(X) + X), and for torchvision/timm ASR(X) + X, whose classic twin no plain builder describes.
    """
    source, sep, name = cfg.model.partition(":")
    if not sep or cfg.both:
        return None, None
    if source == "torchvision":
        return f"torchvision.models:{name}", {"num_classes": classes}
    return f"timm:{name}", {"num_classes": classes}


def _output(args: argparse.Namespace) -> Path:
    out = Path(args.output)
    out = out if out.suffix == ".safetensors" else out / "deployed.safetensors"
    if out.resolve() == Path(args.checkpoint).resolve():
        raise CLIError(f"-o {args.output}: that is the file being read; write the result elsewhere")
    return out


def _main(args: argparse.Namespace) -> int:
    out = _output(args)
    take_image_size(args)
    model, cfg, blob = load_source(args)
    # the trained model and the folded one each run the batch (the fold itself works on the weights)
    x = example_batch(args, model, blob, 2, "the verify batch", passes=2)
    with warnings.catch_warnings():
        if cfg is None:  # a deployed file has no ASR layer left: folding it again is the point, not a slip
            warnings.filterwarnings("ignore", message="fold: the model has no ASR layer")
        deployed, fused = fold(model, fuse_bn=args.fuse_bn, return_report=True)
    report = _verify(args, model, deployed, x)
    if cfg is None:  # a deployed file: the same architecture again, rebuilt by the builder its file recorded
        source = read_metadata(args.checkpoint)
        builder, kwargs = (None, None) if args.fuse_bn or not source.get("builder") else \
            (source["builder"], source.get("kwargs") or {})
    else:
        classes = int((blob.get("run") or {}).get("classes") or 10)
        builder, kwargs = (None, None) if args.fuse_bn else builder_for(cfg, classes)
    meta = {"checkpoint": str(args.checkpoint), "config": cfg.to_dict() if cfg else None, "epoch": blob.get("epoch"),
            "best": blob.get("best"), "verify": str(report), "fuse_bn": args.fuse_bn,
            "preprocessing": (blob.get("run") or {}).get("preprocessing"), "weights": blob.get("weights", "model")}
    if fused is not None:
        meta["fuse_bn_report"] = str(fused)
    # the trained model, so that the metadata counts the ASR layers folded (save_deployed folds it
    # exactly as above); under the folder's lock: two commands writing one place are refused, and what a
    # killed one left (temporaries) is cleaned
    out.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(out.parent):
        save_deployed(model, out, builder, kwargs, metadata=meta, fuse_bn=args.fuse_bn)
    name, form = (cfg.model, "in training form") if cfg else (Path(args.checkpoint).name, "in the deployed file")
    print(f"{name}: {count_params(model):,} parameters {form}, {count_params(deployed):,} deployed")
    if fused is not None:
        print(fused if fused.left else f"fuse_bn: fused all {len(fused.fused)} norm layers (graph: {fused.graph})")
    print(f"verify: {report}")
    recorded = read_metadata(out).get("builder")
    print(f"wrote {out} and {out.with_suffix('.json')}"
          + (f" (rebuilt by {recorded})" if recorded else
             " (no builder recorded: load with foldattn.load_deployed(path, model=...))"))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fold", help="fold a checkpoint's ASR layers; write safetensors + JSON with the verify report "
                                    "(a deployed file: again, e.g. with --fuse-bn)")
    add_source_options(p)
    p.add_argument("-o", "--output", required=True, help="a .safetensors file, or a folder (deployed.safetensors)")
    p.add_argument("--fuse-bn", action="store_true",
                   help="also fuse every norm into the conv/linear before it (those left are listed with the reason)")
    p.set_defaults(func=_main)
