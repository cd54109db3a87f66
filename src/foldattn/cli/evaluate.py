"""``foldattn eval CKPT``: top-1/top-5 of a checkpoint's deployed (folded) model on its validation data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .._argtypes import MAX_BATCH, bounded_int
from .._utils import strict_json
from ..summary import count_params
from ..train import evaluate
from ..train.checkpoint import checkpoint_in
from ..train.data import load_dataset, make_loader, preprocessing, with_preprocessing
from ..train.model import deployed_copy
from ..train.source import check_recorded_dataset
from ..verify import verify
from ._source import add_source_options, load_source

__all__ = ["register"]


def _classes(model: torch.nn.Module) -> int:
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return head[-1].out_features if head else -1


_AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
        "none": None}


def _main(args: argparse.Namespace) -> int:
    if args.model is not None and args.dataset is None:  # refused before the file is read
        raise ValueError("--model (another trainer's checkpoint) needs --dataset: the file records no data")
    model, cfg, blob = load_source(args, notes=sys.stderr)
    if cfg is None or args.model is not None:  # a deployed file or another trainer's checkpoint: no data recorded
        what = "a deployed file" if cfg is None else "--model (another trainer's checkpoint)"
        if args.dataset is None:
            raise ValueError(f"{what} records no data: pass --dataset (its validation split is evaluated)")
        path = Path(args.checkpoint)
        bundle = load_dataset(args.dataset, args.data_dir or "data", None, 0, args.cache_dir, args.image_size)
        bundle = with_preprocessing(bundle, (blob.get("run") or {}).get("preprocessing"))
        workers = 0
    else:
        path = checkpoint_in(args.checkpoint, args.which)
        dataset = args.dataset or cfg.dataset
        if args.dataset is None:  # a recorded path is read only once it is known to hold the run's classes
            check_recorded_dataset(dataset, blob.get("run"), f"checkpoint {path}")
        # the decode cache only where this command line says: a checkpoint does not choose where we write
        bundle = load_dataset(dataset, args.data_dir or cfg.data_dir, cfg.val_split if args.dataset is None else None,
                              cfg.split_seed, args.cache_dir, cfg.image_size, stream=cfg.stream)
        bundle = with_preprocessing(bundle, (blob.get("run") or {}).get("preprocessing"))
        workers = cfg.workers
    if bundle.num_classes != _classes(model):
        raise ValueError(f"--dataset {bundle.name}: {bundle.num_classes} classes, the model "
                         f"{_classes(model)}; evaluate on data with the model's classes")
    model.eval()
    deployed = deployed_copy(model)
    loader = make_loader(bundle.val, args.batch_size, bundle, train=False, workers=workers)
    x = next(iter(loader))[0][:4]
    report = verify(model, deployed, x) if deployed is not model else None
    precision = args.amp if args.amp != "run" else str((blob.get("run") or {}).get("amp") or "none")
    if precision not in _AMP:
        raise ValueError(f"the checkpoint recorded precision {precision!r}; pass --amp bf16 or --amp none")
    metrics = evaluate(deployed, loader, _AMP[precision])
    dtype = "float32" if _AMP[precision] is None else str(_AMP[precision]).replace("torch.", "")
    result = {"checkpoint": str(path), "dataset": bundle.name, "images": len(bundle.val),
              "epoch": blob.get("epoch"), "weights": blob.get("weights", "model"), "precision": dtype,
              "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
              "preprocessing": preprocessing(bundle), "params_deployed": count_params(deployed),
              "verify": str(report) if report else "nothing to fold"}
    print(strict_json(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's folded model (top-1/top-5)",
                       description="Rebuild the model from the checkpoint's config, fold it, check the fold, and "
                                   "report top-1/top-5 on the run's validation split (or --dataset).")
    add_source_options(p)
    p.add_argument("--dataset", help="evaluate on this dataset's validation split instead of the run's (needed for a "
                                     "deployed file or --model)")
    p.add_argument("--data-dir", help="root of torchvision-format datasets [the run's]")
    p.add_argument("--cache-dir", help="imagefolder decode cache [none]")
    p.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=256,
                   help=f"images per forward pass (at most {MAX_BATCH}) [256]")
    p.add_argument("--amp", choices=("run", "bf16", "none"), default="run",
                   help="precision: run = what the run validated in (printed), bf16, none = float32 [run]")
    p.set_defaults(func=_main)
