"""``foldattn export CKPT --onnx OUT``: fold a checkpoint and export the deployed model to ONNX (checked)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..export import export_onnx
from ..train import example_input, load_trained

__all__ = ["register"]


def _main(args: argparse.Namespace) -> int:
    model, cfg, blob = load_trained(args.checkpoint)
    out = Path(args.onnx)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    report = export_onnx(model, example_input(blob, batch=1), out, opset_version=args.opset)
    print(f"{cfg.model}: {report}")
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="fold a checkpoint and export it to ONNX, checked with onnxruntime")
    p.add_argument("checkpoint", help="a foldattn checkpoint (.pt) or run folder")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, help="ONNX opset [exporter default]")
    p.set_defaults(func=_main)
