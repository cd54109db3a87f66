"""A modern recipe through timm's components: cifar_vit_tiny on CIFAR-10, plain and + ASR(SE).

    python benchmarks/vit_modern_recipe.py --data DATA/train --work-dir runs/vit-modern

Each variant is one ``foldattn train`` command (printed, and kept in ``results.json``): AdamW
(lr 1e-3, wd 0.05, no decay on norms/biases/psi), timm's cosine schedule with a 1-epoch warm-up,
EMA (decay 0.999, warm-up), mixup 0.8 + cutmix 1.0, RandAugment ``rand-m9-mstd0.5-inc1``, random
erasing 0.25, drop path 0.1, label smoothing 0.1, batch 128, ``--epochs`` (5) epochs on a
45,000 / 5,000 split (split seed 0) of the 50,000 CIFAR-10 training JPEGs
(``cifar10-train-jpg.tar.gz`` unpacked: ``DATA/train/<class>/*.jpg``). The variants run side by
side, one torch thread each. ``results.md`` gets the final and best top-1 of the model and of
its EMA (both validated folded), deployed parameters and the time per epoch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

RECIPE = ["--model", "cifar_vit_tiny", "--opt", "adamw", "--lr", "1e-3", "--wd", "0.05", "--sched", "cosine",
          "--warmup-epochs", "1", "--model-ema", "--model-ema-decay", "0.999", "--model-ema-warmup",
          "--mixup", "0.8", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
          "--drop-path", "0.1", "--label-smoothing", "0.1", "--batch-size", "128", "--val-split", "5000",
          "--split-seed", "0", "--no-progress"]
VARIANTS = {"plain": [], "+ASR(SE)": ["--attention", "se", "--asr"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the CIFAR-10 ImageFolder root (DATA/train)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/vit-modern"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    procs, commands = {}, {}
    for name, extra in VARIANTS.items():
        out = args.work_dir / ("asr-se" if extra else "plain")
        cache = str(args.work_dir / "cache")
        cmd = ["foldattn", "train", "--dataset", f"imagefolder:{args.data}", "--cache-dir", cache, *RECIPE, *extra,
               "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads), "-o", str(out)]
        commands[name] = shlex.join(cmd)
        print(commands[name], flush=True)
        log = open(args.work_dir / f"{out.name}.log", "w")  # noqa: SIM115 (closed with the process)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log)
    results = {}
    for name, (proc, out, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            print(f"{name}: foldattn train exited {code}; see {out}.log", file=sys.stderr)
            return 1
        s = json.loads((out / "summary.json").read_text())
        rows = _rows(out)
        results[name] = {
            "command": commands[name], "epochs": s["epochs_done"],
            "final_top1_ema": s["final"]["top1"], "best_top1_ema": s["best"]["top1"],
            "final_top1_model": rows[-1]["val_top1"], "best_top1_model": max(r["val_top1"] for r in rows),
            "params_train": s["run"]["params_train"], "params_deployed": s["run"]["params_deployed"],
            "time_per_epoch_s": s["time_per_epoch_s"],
        }
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| variant | top-1 EMA final (best) | top-1 model final (best) | params train / deployed | s / epoch |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['final_top1_ema']:.2f} ({r['best_top1_ema']:.2f}) | "
                     f"{r['final_top1_model']:.2f} ({r['best_top1_model']:.2f}) | "
                     f"{r['params_train']:,} / {r['params_deployed']:,} | {r['time_per_epoch_s']:.0f} |")
    (args.work_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _rows(out: Path) -> list[dict[str, float]]:
    import csv

    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


if __name__ == "__main__":
    sys.exit(main())
