"""``foldattn fold CKPT -o OUT``: the deployed model of a checkpoint, as safetensors + JSON metadata."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .._lock import RunLock
from ..deploy import read_metadata, save_deployed
from ..fold import fold
from ..summary import count_params
from ..train import TrainConfig, example_input
from ..verify import verify
from ._source import add_source_options, load_source

__all__ = ["register", "builder_for"]


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


def _main(args: argparse.Namespace) -> int:
    model, cfg, blob = load_source(args)
    x = example_input(blob)
    deployed, fused = fold(model, fuse_bn=args.fuse_bn, return_report=True)
    report = verify(model, deployed, x)
    classes = int((blob.get("run") or {}).get("classes") or 10)
    builder, kwargs = (None, None) if args.fuse_bn else builder_for(cfg, classes)
    out = Path(args.output)
    if out.suffix != ".safetensors":
        out = out / "deployed.safetensors"
    meta = {"checkpoint": str(args.checkpoint), "config": cfg.to_dict(), "epoch": blob.get("epoch"),
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
    print(f"{cfg.model}: {count_params(model):,} parameters in training form, {count_params(deployed):,} deployed")
    if fused is not None:
        print(fused if fused.left else f"fuse_bn: fused all {len(fused.fused)} norm layers (graph: {fused.graph})")
    print(f"verify: {report}")
    recorded = read_metadata(out).get("builder")
    print(f"wrote {out} and {out.with_suffix('.json')}"
          + (f" (rebuilt by {recorded})" if recorded else
             " (no builder recorded: load with foldattn.load_deployed(path, model=...))"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fold", help="fold a checkpoint's ASR layers; write safetensors + JSON with the verify report")
    add_source_options(p)
    p.add_argument("-o", "--output", required=True, help="a .safetensors file, or a folder (deployed.safetensors)")
    p.add_argument("--fuse-bn", action="store_true",
                   help="also fuse every norm into the conv/linear before it (those left are listed with the reason)")
    p.set_defaults(func=_main)
