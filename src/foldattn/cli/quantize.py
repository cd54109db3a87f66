"""``foldattn quantize SRC -o OUT``: INT8 through a runtime's own tools, with the accuracy of both files measured.

Examples::

    foldattn quantize runs/asr-se -o out/int8                       # a run folder (its data, its split)
    foldattn quantize runs/asr-se/best.pt -o out/int8 --per-tensor --method entropy
    foldattn quantize deployed.safetensors --data cifar10 --data-dir data -o out/int8
    foldattn quantize runs/asr-se -o out/int8 --runtime ort,openvino,executorch
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._argtypes import MAX_IMAGES, MAX_THREADS, bounded_int, top1_points
from .._sizes import check_bytes, check_forward
from .._utils import TMP_MARK, _umask, check_output_folder, first_line, strict_json, write_json
from ._errors import CLIError
from .stripe import add_data_args, load_data

__all__ = ["register"]


def _source(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any] | None, dict[str, Any] | None,
                                              dict[str, Any] | None]:
    """``(model, training config, recorded preprocessing, run record)`` of a run folder, checkpoint or deployed
    file."""
    from ..train.source import load_source

    path = Path(args.source)
    if path.suffix == ".safetensors" and args.data is None and path.exists():
        raise CLIError(f"{path} is a deployed file: name the images it is calibrated and scored on with --data "
                       "(and --data-dir / --val-split)")
    try:
        source = load_source(path, which=args.which, ema=args.ema)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    return source.model, source.config.to_dict() if source.config else None, source.preprocessing, \
        source.blob.get("run")


#: the batch sizes at which both files are timed (:func:`foldattn.quantize.quantize`'s default)
_LATENCY_BATCHES = (1, 64)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder that becomes ``out`` when the block succeeds (renamed into place, or its files
    moved into an existing ``out``), and is removed when it fails: a failed command leaves no folder it
    created and no partial file. Made in the nearest existing folder above ``out`` (the same file
    system, so the rename is atomic); ``out``'s missing parents are created only at the end."""
    base = out.parent
    while not base.exists() and base.parent != base:
        base = base.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", suffix=".tmp", dir=base))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would become OUT's mode
        yield tmp
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # empty, or --overwrite: files replaced one by one, others kept
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_memory(args: argparse.Namespace, model: torch.nn.Module, data: Any) -> None:
    """Refuse, before any image is gathered, what the calibration and validation images held in memory
    and the largest forward pass would take (the images' size comes from the data or the checkpoint)."""
    shape = data.image_shape
    if not shape:
        return
    train, val = data.counts
    held = min(args.calib_images, train) + (val if args.val_images is None else min(args.val_images, val))
    per_image = 4 * int(torch.Size(shape).numel())
    hint = "lower --calib-images and --val-images (and --batch-size)"
    check_bytes(held * per_image, f"{held} calibration and validation images of {'x'.join(map(str, shape))}", hint)
    batch = max(args.batch_size, *_LATENCY_BATCHES)
    need = check_forward(model, shape, batch, f"a forward pass of {batch} images", hint)
    check_bytes(held * per_image + need, "the images held and a forward pass", hint)


#: ``--runtime`` names, as the messages say them
_NAMES = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "executorch": "ExecuTorch"}
#: what each runtime needs installed: (module, foldattn extra)
_NEEDS = {"ort": (("onnxruntime", "onnx"), ("onnx", "onnx")),
          "openvino": (("openvino", "openvino"), ("nncf", "openvino")),
          "executorch": (("executorch.exir", "executorch"), ("torchao", "executorch"))}


def _runtimes(text: str) -> list[str]:
    """``--runtime``: a comma-separated list of ort, openvino, executorch."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in _NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown runtime(s) {', '.join(bad) or repr(text)}; valid: "
                                         f"{', '.join(_NAMES)} (comma-separated)")
    return list(dict.fromkeys(names))


def _main(args: argparse.Namespace) -> int:
    for runtime in args.runtime:
        require_runtime(runtime)
    from ..quantize import calibration_methods

    for runtime in args.runtime:
        methods = calibration_methods(runtime)
        if args.method not in methods:  # said before any work
            raise CLIError(f"--method {args.method}: {_NAMES[runtime]} calibrates with "
                           f"{' or '.join(methods)}: choose one, or drop {runtime} from --runtime")
    out = check_output_folder(args.output, "-o")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"-o {out}: the folder is not empty; choose a new folder or pass --overwrite")
    model, cfg, pre, run = _source(args)
    data = load_data(args, cfg, pre, run)
    _check_memory(args, model, data)
    calib: list[torch.Tensor] = []
    count = 0
    for x, _ in data.train_eval:  # the run's training images, no augmentation, in the split's seeded order
        if count >= args.calib_images:
            break
        take = x[: args.calib_images - count]
        calib.append(take.contiguous())
        count += take.shape[0]
    if count < args.calib_images:
        print(f"note: only {count} training images for calibration (--calib-images {args.calib_images})",
              file=sys.stderr)
    model.eval()
    try:
        with torch.no_grad():
            model(calib[0][:2].contiguous())
    except (RuntimeError, ValueError, TypeError) as e:
        raise CLIError(f"the calibration images {tuple(calib[0].shape[1:])} do not fit the model: {first_line(e)}; "
                       "pass the data it was trained on (--data)") from None
    val = list(itertools.islice(data.val, None)) if args.val_images is None else _first(data.val, args.val_images)
    from .._lock import RunLock
    from ..quantize import quantize
    from ..verify import EquivalenceError

    # written into a staged folder, moved into OUT only once everything succeeded; an OUT that exists
    # (empty, or --overwrite) is held under its lock meanwhile
    with RunLock(out) if out.exists() else contextlib.nullcontext(), staged_folder(out) as stage:
        reports = {}
        for runtime in args.runtime:
            try:
                reports[runtime] = quantize(
                    model, calib, val, stage, example=calib[0][:1].contiguous(), per_channel=not args.per_tensor,
                    method=args.method, threads=args.threads, max_drop=args.max_drop, equalize=args.equalize,
                    latency_batches=_LATENCY_BATCHES, runtime=runtime,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
            except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                raise CLIError(f"the model cannot be exported or quantized for {_NAMES[runtime]}: "
                               f"{first_line(e)}") from None
            except EquivalenceError as e:  # the message names the stage that failed (equalization, the export)
                raise CLIError(first_line(e)) from None
        first = next(iter(reports.values()))
        # the first runtime's figures at the top (the file's layout before --runtime), every runtime's below
        result = {"source": str(args.source), "dataset": data.name, **first.to_dict(),
                  "runtimes": {k: {f: v for f, v in r.to_dict().items() if f != "weight_ranges"}
                               for k, r in reports.items()}}
        write_json(stage / "quantize.json", result, indent=2)
    summary = {}
    for runtime, report in reports.items():
        lat = report.latency_ms
        summary[runtime] = {"top1_fp32": report.top1_fp32, "top1_int8": report.top1_int8, "drop": report.drop,
                            "per_channel": report.per_channel, "method": report.method,
                            "latency_ms_batch_1": {k: v.get("batch_1") for k, v in lat.items()},
                            "file_bytes": report.file_bytes, "warnings": report.warnings}
    print(strict_json(summary[args.runtime[0]] if len(summary) == 1 else summary, indent=2))
    files = [out / f for r in reports.values() for f in r.files.values()]
    print(f"wrote {', '.join(map(str, files))} and {out / 'quantize.json'}")
    return 0


def _first(batches: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, count = [], 0
    for x, y in batches:
        if count >= n:
            break
        out.append((x[: n - count], y[: n - count]))
        count += out[-1][1].numel()
    return out


def require_runtime(runtime: str) -> None:
    """A one-line CLIError naming the extra when ``runtime``'s packages are missing."""
    from .._utils import require

    try:
        for module, extra in _NEEDS[runtime]:
            require(module, extra)
    except ImportError as e:
        raise CLIError(str(e)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quantize", help="INT8 (ONNX Runtime, OpenVINO or ExecuTorch, per-channel) of a deployed model, its accuracy "
                         "measured",
        description="Fold the model (ASR layers, norms), export it for each --runtime (ONNX by default), quantize it "
                    "statically with that runtime's own tools (int8 weights, per-channel by default; activations "
                    "calibrated on the run's own training images), then score both files on the validation split "
                    "and time them there (one thread). Writes OUT/model.onnx and OUT/model.int8.onnx (ort), "
                    "OUT/openvino/ (openvino), OUT/model.pte and OUT/model.int8.pte (executorch) and "
                    "OUT/quantize.json.",
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT_OR_DEPLOYED",
                   help="a run folder, a training checkpoint (.pt) or a deployed .safetensors file (with --data)")
    p.add_argument("-o", "--output", required=True, help="output folder (new or empty)")
    p.add_argument("--which", choices=("last", "best"), default="last", help="for a run folder: last.pt or best.pt")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA weights of a --model-ema run [used when present]")
    p.add_argument("--runtime", type=_runtimes, default=["ort"], metavar="R[,R...]",
                   help="quantize and measure with each runtime's own tools: ort (ONNX Runtime, quantize_static: "
                        "OUT/model.int8.onnx), openvino (NNCF: OUT/openvino/model.int8.xml; extra "
                        "foldattn[openvino]), executorch (PT2E with the XNNPACK quantizer, batch 1: "
                        "OUT/model.int8.pte; extra foldattn[executorch]) [ort]")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization before quantizing (evens out per-channel weight ranges between "
                        "consecutive layers; outputs verified unchanged): for --per-tensor and merged branches")
    p.add_argument("--method", choices=("minmax", "entropy", "percentile", "mean-minmax"), default="minmax",
                   help="activation calibration: minmax, entropy or percentile (ort), minmax, mean-minmax (the mean "
                        "over batches of each batch's extremes, NNCF's own choice) or percentile (openvino), minmax "
                        "(executorch) [minmax]")
    p.add_argument("--calib-images", type=bounded_int(1, MAX_IMAGES), default=512,
                   help=f"training images for calibration, held in memory (at most {MAX_IMAGES}; their bytes are "
                        "estimated first) [512]")
    p.add_argument("--val-images", type=bounded_int(1, MAX_IMAGES), default=None,
                   help=f"score on the first N validation images, held in memory (at most {MAX_IMAGES}) [all]")
    p.add_argument("--threads", type=bounded_int(1, MAX_THREADS), default=1,
                   help=f"ONNX Runtime threads for scoring and timing (at most {MAX_THREADS}: 4 per CPU core, "
                        "256 at most) [1]")
    p.add_argument("--max-drop", type=top1_points, default=1.0,
                   help="report a top-1 drop above this many points (0 to 100) loudly [1.0]")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    add_data_args(p)
    p.set_defaults(func=_main)
