"""``foldattn export CKPT --onnx OUT [--pt2 OUT] [--openvino DIR] [--pte OUT]``: deploy a checkpoint and export it,
each file checked against PyTorch in its runtime."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from .._lock import RunLock
from .._utils import require
from ..export import export_onnx, export_program
from ..runtimes import export_executorch, export_openvino
from ._errors import CLIError
from ._source import add_source_options, load_source
from .fold import example_batch, take_image_size

__all__ = ["register"]


def _main(args: argparse.Namespace) -> int:
    if not (args.onnx or args.pt2 or args.openvino or args.pte):
        raise CLIError("export: give --onnx FILE.onnx, --pt2 FILE.pt2, --openvino DIR, --pte FILE.pte (one or more)")
    if args.onnx and Path(args.onnx).suffix != ".onnx":
        raise CLIError(f"--onnx {args.onnx}: the file name must end in .onnx")
    if args.pt2 and Path(args.pt2).suffix != ".pt2":
        raise CLIError(f"--pt2 {args.pt2}: the file name must end in .pt2 (torch.export's archive format)")
    if args.pte and Path(args.pte).suffix != ".pte":
        raise CLIError(f"--pte {args.pte}: the file name must end in .pte (ExecuTorch's program format)")
    if args.openvino and Path(args.openvino).suffix in (".xml", ".bin"):
        raise CLIError(f"--openvino {args.openvino}: name a folder; model.xml and model.bin are written into it")
    for given, extra, module in ((args.openvino, "openvino", "openvino"), (args.pte, "executorch", "executorch")):
        if given:
            try:  # before the model is loaded: a missing runtime is one line, not a failure after the ONNX file
                require(module, extra)
            except ImportError as e:
                raise CLIError(str(e)) from None
    take_image_size(args)
    model, cfg, blob = load_source(args)
    # the exports' checks run the example batch of 1 and (dynamic batch) one of 4, in PyTorch and in the
    # exported runtime: bounded at the larger before the batch is made
    example = example_batch(args, model, blob, 1, "the export's check batch", passes=2,
                            largest=1 if args.static_batch else 4)
    folders = sorted({Path(p).parent for p in (args.onnx, args.pt2, args.pte) if p}
                     | ({Path(args.openvino)} if args.openvino else set()))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    # each output folder under its lock: two commands writing one place are refused, a killed one's
    # temporaries are cleaned
    with contextlib.ExitStack() as locks:
        for folder in folders:
            locks.enter_context(RunLock(folder))
        _write(args, model, cfg, example)
    return 0


def _write(args: argparse.Namespace, model: Any, cfg: Any, example: Any) -> None:
    name = cfg.model if cfg is not None else Path(args.checkpoint).name  # a deployed file records no run
    if args.onnx:
        report = export_onnx(model, example, args.onnx, opset_version=args.opset, fuse_bn=args.fuse_bn,
                             dynamic_batch=not args.static_batch)
        print(f"{name}: {report}")
        print(f"wrote {args.onnx}")
    if args.pt2:
        program = export_program(model, example, args.pt2, fuse_bn=args.fuse_bn, dynamic_batch=not args.static_batch)
        print(f"{name}: {program}")
        print(f"wrote {args.pt2} (load: torch.export.load(path).module())")
    if args.openvino:
        ov = export_openvino(model, example, args.openvino, fuse_bn=args.fuse_bn, dynamic_batch=not args.static_batch)
        print(f"{name}: {ov}")
        print(f"wrote {Path(args.openvino) / 'model.xml'} and model.bin (load: openvino.Core().read_model(path))")
    if args.pte:
        pte = export_executorch(model, example, args.pte, fuse_bn=args.fuse_bn)
        print(f"{name}: {pte}")
        print(f"wrote {args.pte} (batch {pte.batches[0]}; load: executorch.runtime.Runtime.get().load_program(path))")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="deploy a checkpoint and export it to ONNX (checked with onnxruntime), a "
                                      "torch.export program, OpenVINO IR and/or an ExecuTorch program")
    add_source_options(p)
    p.add_argument("--onnx", help="output .onnx file")
    p.add_argument("--pt2", help="output .pt2 file (torch.export.save; loaded back and compared)")
    p.add_argument("--openvino", metavar="DIR", help="output OpenVINO IR folder (model.xml, model.bin; float32; "
                                                     "run by OpenVINO's CPU plugin in f32 and compared; extra "
                                                     "foldattn[openvino])")
    p.add_argument("--pte", help="output ExecuTorch .pte file (XNNPACK delegate, batch 1; run by ExecuTorch's runtime "
                                 "and compared; extra foldattn[executorch])")
    p.add_argument("--opset", type=int, help="ONNX opset [exporter default]; validated against the exporter")
    p.add_argument("--fuse-bn", action="store_true", help="also fuse the norm layers into the convs")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 instead of a dynamic axis")
    p.set_defaults(func=_main)
