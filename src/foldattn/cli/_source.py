"""Where ``fold`` and ``export`` get the trained model: a foldattn checkpoint or run folder, or another
trainer's checkpoint (timm's ``train.py``, Lightning, a state dict) described by ``--model`` and the
attach options that built it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from torch import nn

from .._argtypes import MAX_CLASSES, bounded_int, positive_int
from ..train import TrainConfig
from ..train.checkpoint import MAX_IMAGE_SIDE

__all__ = ["add_source_options", "load_source"]


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a foldattn checkpoint (.pt) or run folder, or a deployed .safetensors file "
                                      "(foldattn fold's output); or, with --model, a timm train.py / Lightning "
                                      "checkpoint or state dict (.pth/.ckpt/.safetensors)")
    p.add_argument("--which", choices=("last", "best"), default="last", help="for a run folder: last.pt or best.pt")
    g = p.add_argument_group("another trainer's checkpoint (what built the model)")
    g.add_argument("--model", help="the architecture: a foldattn model, torchvision:NAME or timm:NAME")
    g.add_argument("--attention", help="the attention the model was trained with")
    g.add_argument("--asr", action="store_true", help="in ASR form")
    g.add_argument("--both", action="store_true", help="ASR(X) + X")
    g.add_argument("--every", type=positive_int, default=1, help="attention in every K-th block/site [1]")
    g.add_argument("--where", choices=["block", "transformer", "norms"], help="attach's placement [block]")
    g.add_argument("--include", nargs="+", metavar="PATTERN", help="attach: only these sites")
    g.add_argument("--exclude", nargs="+", metavar="PATTERN", help="attach: not these sites")
    g.add_argument("--num-classes", type=bounded_int(1, MAX_CLASSES),
                   help=f"classifier size (at most {MAX_CLASSES:,}) [read from the file]")
    g.add_argument("--image-size", type=bounded_int(1, MAX_IMAGE_SIDE),
                   help=f"input size of the example batch, at most {MAX_IMAGE_SIDE} (its memory is estimated "
                        "first); for a foldattn checkpoint it replaces the recorded size [the recorded size, else "
                        "32 for foldattn models, else 224]")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA weights: of a foldattn --model-ema run [used when present], or timm's "
                        "state_dict_ema [no]")


def load_source(args: argparse.Namespace, notes: TextIO | None = None
                ) -> tuple[nn.Module, TrainConfig | None, dict[str, Any]]:
    """``(model, config, checkpoint-like dict)`` for the command's checkpoint argument
    (:func:`foldattn.train.source.load_source`); which file and weights were taken is said on ``notes``
    (stdout by default; ``eval`` passes stderr, its stdout being JSON). The config is None for a deployed
    ``.safetensors`` file, which records an architecture and weights, not a training run."""
    notes = notes or sys.stdout
    from ..train.source import load_source as _load

    if args.model is None:
        foreign = [o for o in ("attention", "num_classes", "image_size", "where", "include", "exclude")
                   if getattr(args, o)] + [o for o in ("asr", "both") if getattr(args, o)]
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} describes another trainer's checkpoint and needs "
                             "--model; a foldattn checkpoint records its own model")
        source = _load(args.checkpoint, which=args.which, ema=args.ema)
        if source.kind == "deployed":
            if args.ema:
                raise ValueError(f"--ema: {args.checkpoint} is a deployed file: it holds one set of weights")
            return source.model, None, source.blob
        if source.path != Path(args.checkpoint):
            print(f"using {source.path} (--which {args.which})", file=notes)
        if source.weights == "ema" and args.ema is None:
            print("using the EMA weights (--no-ema for the others)", file=notes)
        return source.model, source.config, source.blob
    cfg = TrainConfig(model=args.model, attention=args.attention, asr=args.asr, both=args.both, every=args.every,
                      where=args.where, include=list(args.include or []), exclude=list(args.exclude or []))
    source = _load(args.checkpoint, foreign=cfg, num_classes=args.num_classes, image_size=args.image_size,
                   ema=bool(args.ema))
    return source.model, source.config, source.blob
