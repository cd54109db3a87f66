"""INT8 accuracy of trained CIFAR-10 models: plain, +SE and +ASR(SE) folded, per-channel and per-tensor.

For each trained run (``LABEL=RUN_FOLDER``), the deployed model (ASR folded, norms fused) is exported
to ONNX and quantized by ONNX Runtime (``foldattn.quantize.quantize``: QDQ, int8 weights, uint8
activations) with per-channel and per-tensor weight scales and each calibration method, calibrated
on ``--calib-images`` images of the run's own training split (no augmentation) and scored on the
run's 5,000 held-out validation images. Both files are timed in ONNX Runtime on one thread. With
``--runtimes ort,openvino,executorch`` each model is also quantized per channel (minmax) by OpenVINO's NNCF
and by ExecuTorch's PT2E flow with the XNNPACK quantizer, scored and timed in that runtime (a second
table). The tables go to ``OUT/int8.md`` and every figure to ``OUT/int8.json``.

Example (the runs of benchmarks/sweeps/int8-models.yaml)::

    python benchmarks/int8_cifar10.py --out runs/int8 --cache-dir $CIFAR10/cache --runtimes ort,openvino,executorch \\
        --run "ResNet-20 plain=runs/int8-models/runs/resnet20-plain/s0" \\
        --run "ResNet-20 +SE=runs/int8-models/runs/resnet20-se/s0" \\
        --run "ResNet-20 +ASR(SE)=runs/int8-models/runs/resnet20-asr-se/s0" \\
        --run "RepVGG-A0 plain=runs/int8-models/runs/repvgg-plain/s0" \\
        --run "RepVGG-A0 +ASR(SE)=runs/int8-models/runs/repvgg-asr-se/s0"
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from foldattn._utils import atomic_path, strict_json
from foldattn.quantize import METHODS, RUNTIMES, quantize
from foldattn.train.data import TensorLoader, load_dataset, with_preprocessing
from foldattn.train.model import load_trained


def _batches(loader: TensorLoader, limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, count = [], 0
    for x, y in loader:
        if limit is not None and count >= limit:
            break
        keep = x.shape[0] if limit is None else min(x.shape[0], limit - count)
        out.append((x[:keep].contiguous(), y[:keep]))
        count += keep
    return out


def _ort_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """ONNX Runtime: INT8 top-1 in every setting, latency of the per-channel minmax files."""
    names = [n for n in next(iter(results.values()))["rows"] if n.startswith(("pc-", "pt-"))]
    heads = [f"{'per-channel' if n.startswith('pc') else 'per-tensor'} {n.split('-', 1)[1]}" for n in names]
    lines = ["| model | fp32 top-1 (ORT) | " + " | ".join(f"INT8 {h} (drop)" for h in heads)
             + " | ORT ms b=1 fp32 / int8 | ORT ms b=64 fp32 / int8 |",
             "|---|---:|" + "---:|" * len(heads) + "---:|---:|"]
    for label, res in results.items():
        rows = [res["rows"][n] for n in names]
        lat = rows[0]["latency_ms"]
        cells = [f"{r['top1_int8']:.2f} ({-r['drop']:+.2f})" for r in rows]
        lines.append(f"| {label} | {rows[0]['top1_fp32']:.2f} | " + " | ".join(cells)
                     + f" | {lat['fp32']['batch_1']:.2f} / {lat['int8']['batch_1']:.2f}"
                     + f" | {lat['fp32']['batch_64']:.1f} / {lat['int8']['batch_64']:.1f} |")
    return [*lines, ""]


#: the runtimes' names in the table
_LABELS = {"ort": "ORT", "openvino": "OpenVINO", "executorch": "ExecuTorch"}


def _runtime_table(results: dict[str, dict[str, Any]], runtimes: list[str]) -> list[str]:
    """Per-channel minmax INT8 in each runtime: fp32 top-1, the change, and fp32 / INT8 latency at batch 1 and 64."""
    head = "| model |" + "".join(f" {_LABELS[r]} fp32 top-1 | {_LABELS[r]} INT8 change | {_LABELS[r]} ms b=1 "
                                 f"fp32 / int8 | {_LABELS[r]} ms b=64 fp32 / int8 |" for r in runtimes)
    lines = [head, "|---|" + "---:|" * (4 * len(runtimes))]
    for label, res in results.items():
        cells = []
        for r in runtimes:
            row = res["rows"][("" if r == "ort" else f"{r}-") + "pc-minmax"]
            lat = row["latency_ms"]
            cells += [f"{row['top1_fp32']:.2f}", f"{-row['drop']:+.2f}",
                      f"{lat['fp32']['batch_1']:.2f} / {lat['int8']['batch_1']:.2f}",
                      f"{lat['fp32']['batch_64']:.1f} / {lat['int8']['batch_64']:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=RUN", help="a trained run folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache-dir", help="decoded-image cache of the runs' image folder")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=["minmax", "percentile"], choices=METHODS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization before quantizing (foldattn quantize --equalize)")
    p.add_argument("--runtimes", default="ort", metavar="R[,R...]",
                   help="ort (every setting of --methods, per channel and per tensor), openvino, executorch "
                        "(per-channel minmax, each runtime's own quantizer: foldattn quantize --runtime) [ort]")
    args = p.parse_args(argv)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not runtimes or any(r not in RUNTIMES for r in runtimes):
        p.error(f"--runtimes: choose from {', '.join(RUNTIMES)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/int8_cifar10.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results: dict[str, dict[str, object]] = {}
    bundles: dict[tuple[object, ...], object] = {}
    for item in args.run:
        label, _, run = item.partition("=")
        model, cfg, blob = load_trained(Path(run) / "last.pt")
        key = (cfg.dataset, cfg.val_split, cfg.split_seed, cfg.image_size)
        if key not in bundles:
            bundles[key] = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, cfg.split_seed, args.cache_dir,
                                        cfg.image_size)
        bundle = with_preprocessing(bundles[key], (blob.get("run") or {}).get("preprocessing"))
        calib_loader = TensorLoader(bundle.train, 64, bundle.mean, bundle.std, train=False)
        val_loader = TensorLoader(bundle.val, 256, bundle.mean, bundle.std, train=False)
        calib = [x for x, _ in _batches(calib_loader, args.calib_images)]
        val = _batches(val_loader, None)
        results[label] = {"run": run, "epochs": blob.get("epoch"), "rows": {}}
        settings = [("ort", pc, m) for pc in (True, False) for m in args.methods] if "ort" in runtimes else []
        settings += [(rt, True, "minmax") for rt in runtimes if rt != "ort"]
        for runtime, per_channel, method in settings:
            name = f"{'' if runtime == 'ort' else runtime + '-'}{'pc' if per_channel else 'pt'}-{method}"
            folder = args.out / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            report = quantize(model, calib, val, folder, example=calib[0][:1], per_channel=per_channel,
                              method=method, threads=args.threads, equalize=args.equalize, runtime=runtime)
            row = report.to_dict()
            row["seconds"] = time.time() - t0
            results[label]["rows"][name] = row  # type: ignore[index]
            print(f"{label} {name}: fp32 {report.top1_fp32:.2f} int8 {report.top1_int8:.2f} "
                  f"(drop {report.drop:+.2f})", flush=True)
    with atomic_path(args.out / "int8.json") as tmp:
        tmp.write_text(strict_json({"command": command, "results": results}, indent=1) + "\n")
    lines = [f"Command: `{command}`", ""]
    if "ort" in runtimes:
        lines += _ort_table(results)
    if len(runtimes) > 1 or "ort" not in runtimes:
        lines += _runtime_table(results, runtimes)
    with atomic_path(args.out / "int8.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
