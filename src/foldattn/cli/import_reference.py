"""``foldattn import-reference CKPT -o OUT``: convert an ASR authors' checkpoint to a foldattn checkpoint."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from ..fold import fold
from ..models import list_models
from ..summary import count_params
from ..train import TrainConfig, recipe_defaults
from ..train.checkpoint import save_checkpoint
from ..train.reference import load_reference
from ..verify import verify

__all__ = ["register", "REFERENCE_PREPROCESSING"]

#: the reference code (pytorch-classification's cifar.py) normalises both CIFAR-10 and CIFAR-100
#: with CIFAR-10's statistics; its checkpoints expect exactly these inputs
REFERENCE_PREPROCESSING = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010], "size": [32, 32]}


def _main(args: argparse.Namespace) -> int:
    model, info = load_reference(args.checkpoint)
    name = f"cifar_resnet{info.depth}"
    if name not in list_models():
        raise ValueError(f"the checkpoint is a depth-{info.depth} {info.block} ResNet; foldattn registers "
                         f"{', '.join(m for m in list_models() if m.startswith('cifar_resnet'))}")
    dataset = args.dataset or {10: "cifar10", 100: "cifar100"}.get(info.num_classes, "cifar100")
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **recipe_defaults("paper-cifar"), "recipe": "paper-cifar",
                                 "model": name, "dataset": dataset, **info.model_kwargs})
    cfg_dict = cfg.to_dict()
    cfg_dict.pop("num_classes", None)
    out = Path(args.output)
    if out.suffix != ".pt":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "last.pt"
    save_checkpoint(out, model=model, config=cfg_dict, epoch=cfg.epochs, step=0, history=[],
                    best={"top1": -1.0, "top5": 0.0, "epoch": 0}, partial=None,
                    run={"imported_from": str(args.checkpoint), "classes": info.num_classes, "image_size": [32, 32],
                         "preprocessing": REFERENCE_PREPROCESSING})
    line = f"{args.checkpoint}: {name} {info.variant}, {info.num_classes} classes, {count_params(model):,} parameters"
    if info.asr:
        exact = copy.deepcopy(model).double()
        report = verify(exact, fold(exact), torch.randn(2, 3, 32, 32, dtype=torch.float64))
        line += f"; folds to {count_params(fold(model)):,} (float64 check: {report})"
    print(line)
    print(f"wrote {out} (evaluate with: foldattn eval {out} --data-dir DIR)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import-reference", help="convert a checkpoint of the ASR authors' code to foldattn's format",
                       description="Convert a CIFAR ResNet checkpoint of the ASR reference code (DataParallel "
                                   "'module.' keys, bn3.bn/bn3.vector/bn3.attention_module ASR layers, "
                                   "attention_module SE) into a foldattn checkpoint for eval/fold/export.")
    p.add_argument("checkpoint", help="the reference .pth/.pth.tar file")
    p.add_argument("-o", "--output", required=True, help="output .pt file, or a folder (its last.pt)")
    p.add_argument("--dataset", help="dataset recorded in the config [cifar100 for 100 classes, cifar10 for 10]")
    p.set_defaults(func=_main)
