"""``foldattn eval CKPT``: top-1/top-5 of a checkpoint's deployed (folded) model on its validation data."""

from __future__ import annotations

import argparse
import json

import torch

from ..fold import asr_layers, fold
from ..summary import count_params
from ..train import TrainConfig, build_model, evaluate
from ..train.checkpoint import load_checkpoint, load_model_state
from ..train.data import load_dataset, make_loader
from ..verify import verify

__all__ = ["register"]


def _main(args: argparse.Namespace) -> int:
    blob = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(blob["config"])
    dataset = args.dataset or cfg.dataset
    bundle = load_dataset(dataset, args.data_dir or cfg.data_dir, cfg.val_split if args.dataset is None else None,
                          cfg.split_seed, args.cache_dir or cfg.cache_dir, cfg.image_size, stream=cfg.stream)
    model = build_model(cfg, bundle.num_classes, bundle.in_channels)
    load_model_state(model, blob["model"], f"checkpoint {args.checkpoint}")
    model.eval()
    deployed = fold(model) if asr_layers(model) else model
    loader = make_loader(bundle.val, args.batch_size, bundle, train=False, workers=cfg.workers)
    x = next(iter(loader))[0][:4]
    report = verify(model, deployed, x) if deployed is not model else None
    amp = None if args.amp == "none" else torch.bfloat16
    metrics = evaluate(deployed, loader, amp)
    result = {"checkpoint": str(args.checkpoint), "dataset": bundle.name, "images": len(bundle.val),
              "epoch": blob.get("epoch"), "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
              "params_deployed": count_params(deployed), "verify": str(report) if report else "no ASR layer"}
    print(json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's folded model (top-1/top-5)",
                       description="Rebuild the model from the checkpoint's config, fold it, check the fold, and "
                                   "report top-1/top-5 on the run's validation split (or --dataset).")
    p.add_argument("checkpoint", help="a foldattn checkpoint (.pt) or a run folder (its last.pt)")
    p.add_argument("--dataset", help="evaluate on this dataset's validation split instead of the run's")
    p.add_argument("--data-dir", help="root of torchvision-format datasets [the run's]")
    p.add_argument("--cache-dir", help="imagefolder decode cache [the run's]")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=("bf16", "none"), default="none", help="autocast for evaluation [none: float32]")
    p.set_defaults(func=_main)
