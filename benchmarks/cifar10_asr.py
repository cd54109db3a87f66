"""CIFAR-10 benchmark: plain, +SE, +ASR(SE) and +ASR(SE)+SE CIFAR ResNets on the CIFAR-10 JPEGs.

Trains every (variant, seed) with :func:`foldattn.train.train`, validating the *folded*
model on a stratified 5,000-image hold-out of the 50,000 training JPEGs (split seed
fixed, independent of the training seed), and rewrites a markdown table after every
finished run, so partial results exist while it runs. Finished runs are skipped and
interrupted ones resumed when the command is repeated.

Example (the setting of docs/training.md)::

    nice -n 10 python -u benchmarks/cifar10_asr.py \
        --tar ../shared/data/cifar10-train-jpg.tar.gz --work-dir runs/cifar10 \
        --model cifar_resnet20 --epochs 8 --seeds 0 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from foldattn._utils import atomic_path
from foldattn.train import TrainConfig, recipe_defaults, train
from foldattn.train.data import load_dataset

VARIANTS = {
    "plain": {},
    "se": {"attention": "se"},
    "asr": {"attention": "se", "asr": True},
    "asr+se": {"attention": "se", "asr": True, "both": True},
}
LABELS = {"plain": "plain", "se": "+SE", "asr": "+ASR(SE)", "asr+se": "+ASR(SE)+SE"}


def unpack(tar: Path, work: Path) -> Path:
    """Unpack the JPEG archive once into ``work/data`` (atomically: temp folder, then rename)."""
    dest = work / "data"
    if (dest / "train").is_dir():
        return dest / "train"
    if not tar.is_file():
        sys.exit(f"error: {tar} not found; pass --tar PATH/cifar10-train-jpg.tar.gz or --data PATH/train")
    tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=work))
    with tarfile.open(tar) as t:
        t.extractall(tmp, filter="data")
    tmp.rename(dest)
    return dest / "train"


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(runs_dir: Path, model: str, epochs: int, command: str) -> str:
    rows = []
    for key, label in LABELS.items():
        sums = []
        for f in sorted(runs_dir.glob(f"{model}-{key}-e{epochs}-s*/summary.json")):
            s = json.loads(f.read_text())
            if s.get("finished"):
                sums.append(s)
        if not sums:
            rows.append(f"| {label} | 0 | - | - | - | - |")
            continue
        final = [s["final"]["top1"] for s in sums]
        best = [s["best"]["top1"] for s in sums]
        tpe = [s["time_per_epoch_s"] for s in sums]
        seeds = ",".join(str(s["config"]["seed"]) for s in sums)
        rows.append(f"| {label} | {len(sums)} (seeds {seeds}) | {_ms(final)} | {_ms(best)} | "
                    f"{statistics.mean(tpe):.0f} | {sums[0]['run']['params_deployed']:,} |")
    head = (f"### {model}, {epochs} epochs, CIFAR-10 JPEGs (45k train / 5k stratified val, split seed 0)\n\n"
            f"Command: `{command}`\n\n"
            "| variant | runs | final val top-1 % (mean ± std) | best val top-1 % | s / epoch | params deployed |\n"
            "|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tar", type=Path, default=Path("../shared/data/cifar10-train-jpg.tar.gz"))
    p.add_argument("--data", type=Path, help="an unpacked ImageFolder tree (skips --tar)")
    p.add_argument("--work-dir", type=Path, required=True, help="data, decoded cache, runs, results (outside the repo)")
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--recipe", default="cpu-cifar")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--results", type=Path, help="markdown output (default WORK_DIR/results-MODEL-eEPOCHS.md)")
    p.add_argument("--table-only", action="store_true", help="print the table of the finished runs and exit")
    args = p.parse_args(argv)
    if args.table_only:
        print(table(args.work_dir / "runs", args.model, args.epochs, "(see the results file for the command)"))
        return 0
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    root = args.data if args.data is not None else unpack(args.tar, work)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bundle = load_dataset(f"imagefolder:{root}", val_split=5000, split_seed=0, cache_dir=work / "cache")
    print(f"data: {len(bundle.train)} train / {len(bundle.val)} val, decoded in {time.time() - t0:.0f}s", flush=True)
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    results = args.results or work / f"results-{args.model}-e{args.epochs}.md"
    command = "python -u benchmarks/cifar10_asr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    base = recipe_defaults(args.recipe)
    base["epochs"] = args.epochs
    for seed in args.seeds:  # seed-major: each seed gives a complete comparison
        for key in variants:
            out = runs / f"{args.model}-{key}-e{args.epochs}-s{seed}"
            summary = out / "summary.json"
            if summary.is_file() and json.loads(summary.read_text()).get("finished"):
                continue
            cfg = TrainConfig(model=args.model, dataset=f"imagefolder:{root}", recipe=args.recipe, seed=seed,
                              val_split=5000, split_seed=0, output=str(out), threads=args.threads,
                              **{**base, **VARIANTS[key]})
            resume = out / "last.pt" if (out / "last.pt").is_file() else None
            print(f"== {LABELS[key]} seed {seed} -> {out}", flush=True)
            train(cfg, resume=resume, bundle=bundle, log=lambda s: print(s, flush=True))
            with atomic_path(results) as tmp:
                tmp.write_text(table(runs, args.model, args.epochs, command))
            print(table(runs, args.model, args.epochs, command), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
