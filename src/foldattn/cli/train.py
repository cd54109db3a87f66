"""``foldattn train``: train a model (plain, +X, +ASR(X), +ASR(X)+X), validating the folded copy."""

from __future__ import annotations

import argparse
import os

from .._utils import strict_json
from ..train import train
from ..train.arguments import add_train_arguments, config_from_args, resumed_config
from ..train.checkpoint import load_checkpoint
from ..train.source import check_recorded_dataset
from ._errors import CLIError

__all__ = ["register", "config_from_args", "resumed_config"]


def _main(args: argparse.Namespace) -> int:
    saved = None
    if args.resume is not None:
        blob = load_checkpoint(args.resume)
        saved = resumed_config(blob["config"], args.resume)
        if args.dataset is None:  # the recorded data is read only once it is known to be the run's
            check_recorded_dataset(str(saved.get("dataset", "")), blob.get("run"), f"--resume {args.resume}")
    cfg = config_from_args(args, saved)
    try:
        summary = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change,
                        overwrite=args.overwrite)
    except FloatingPointError as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best, final = summary["best"], summary["final"]
    print(strict_json({"output": cfg.output, "best_top1": best["top1"], "best_top5": best["top5"],
                      "best_epoch": best["epoch"], "final_top1": final["top1"], "final_top5": final["top5"],
                      "time_per_epoch_s": summary["time_per_epoch_s"]}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train", help="train plain / +X / +ASR(X) models; validation runs on the folded copy",
        description="Train a model and validate its folded (deployed) copy every epoch. Options left out take "
                    "the recipe's value (or, with --resume, the saved run's).",
    )
    add_train_arguments(p)
    p.set_defaults(func=_main)
