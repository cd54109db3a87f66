"""Fine-tuning a trained plain ResNet-20 on CIFAR-10: plain, + ASR(SE) with preserve_outputs, + SE.

    python benchmarks/finetune_cifar10.py --data DATA/train --work-dir runs/finetune --seeds 0 1

1. Train the plain ResNet-20 for ``--pretrain-epochs`` (15) epochs, recipe ``cpu-cifar``, on a
   45,000 / 5,000 stratified split (split seed 0) of the 50,000 CIFAR-10 training JPEGs
   (``cifar10-train-jpg.tar.gz`` unpacked: ``DATA/train/<class>/*.jpg``), one run per seed;
   skipped when ``WORK/pre-s{seed}/last.pt`` exists (``--pretrained-dir`` points elsewhere).
2. From each, fine-tune ``--epochs`` (5) more epochs (``cpu-cifar`` with ``--lr`` 0.01) as
   (a) plain, (b) + ASR(SE) with ``--preserve-outputs``, (c) + SE (classic, new modules).
3. Record the validation top-1 of each model at step 0 (before fine-tuning, deployed form),
   after fine-tuning (final and best), deployed parameters and batch-1 latency; write
   ``results.json``, ``results.md`` and ``finetune.png`` in ``--work-dir`` after every run.

Each training run is ``foldattn train`` (the same options on the command line reproduce it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from foldattn.summary import count_params, latency_ms
from foldattn.train import TrainConfig, recipe_defaults, train
from foldattn.train.data import load_dataset, make_loader
from foldattn.train.engine import evaluate
from foldattn.train.model import deployed_copy, load_trained
from foldattn.train.runtime import Distributed
from foldattn.train.trainer import Trainer

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "+ASR(SE) preserve_outputs": {"attention": "se", "asr": True, "preserve_outputs": True},
    "+SE": {"attention": "se"},
}


def _cfg(args: argparse.Namespace, seed: int, out: Path, **kw: Any) -> TrainConfig:
    base = {**TrainConfig().to_dict(), **recipe_defaults("cpu-cifar"), "recipe": "cpu-cifar",
            "model": "cifar_resnet20", "dataset": f"imagefolder:{args.data}", "val_split": 5000, "split_seed": 0,
            "cache_dir": str(args.work_dir / "cache"), "seed": seed, "threads": args.threads, "output": str(out)}
    return TrainConfig.from_dict({**base, **kw})


def _step0_top1(cfg: TrainConfig, bundle: Any) -> float:
    """Validation top-1 of the model fine-tuning starts from (deployed form, float32)."""
    trainer = Trainer(cfg, Distributed(torch.device("cpu")), bundle=bundle, log=None)
    trainer.setup()
    loader = make_loader(bundle.val, 256, bundle, train=False)
    return evaluate(deployed_copy(trainer.model), loader)["top1"]


def _write(work: Path, rows: list[dict[str, Any]]) -> None:
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| variant | seed | top-1 at step 0 | final top-1 | best top-1 | params deployed | latency b=1 ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['step0_top1']:.2f} | {r['final_top1']:.2f} | "
                     f"{r['best_top1']:.2f} | {r['params_deployed']:,} | {r['latency_ms']:.2f} |")
    (work / "results.md").write_text("\n".join(lines) + "\n")
    try:
        from foldattn.train.plots import require_matplotlib

        plt = require_matplotlib()
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        if not runs:
            continue
        epochs = range(0, len(runs[0]["curve"]) + 1)
        mean = [statistics.mean(r["step0_top1"] for r in runs)]
        mean += [statistics.mean(r["curve"][e - 1] for r in runs) for e in epochs if e > 0]
        ax.plot(list(epochs), mean, marker="o", label=f"{variant} ({len(runs)} seed(s))")
    ax.set_xlabel("fine-tuning epoch (0 = the starting model)")
    ax.set_ylabel("val top-1 % (deployed model)")
    ax.set_title("ResNet-20 on CIFAR-10, fine-tuned from a plain model trained 15 epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "finetune.png", dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the unpacked train/ folder (ImageFolder layout)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/finetune"))
    p.add_argument("--pretrained-dir", type=Path, help="folder with pre-s{seed}/last.pt [WORK]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    bundle = load_dataset(f"imagefolder:{args.data}", val_split=5000, split_seed=0, cache_dir=args.work_dir / "cache")
    pre_dir = args.pretrained_dir or args.work_dir
    rows: list[dict[str, Any]] = json.loads((args.work_dir / "results.json").read_text()) if (
        args.work_dir / "results.json").is_file() else []
    for seed in args.seeds:
        pre = pre_dir / f"pre-s{seed}"
        if not (pre / "last.pt").is_file():
            print(f"pretraining seed {seed} -> {pre}", flush=True)
            train(_cfg(args, seed, pre, epochs=args.pretrain_epochs), bundle=bundle, log=print)
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in rows):
                continue
            slug = variant.split()[0].strip("+").replace("(", "-").replace(")", "").lower()
            out = args.work_dir / f"ft-{slug}-s{seed}"
            cfg = _cfg(args, seed, out, epochs=args.epochs, lr=args.lr, warmup_epochs=0.0,
                       pretrained=str(pre / "last.pt"), **VARIANTS[variant])
            step0 = _step0_top1(cfg, bundle)
            print(f"{variant} seed {seed}: top-1 at step 0 {step0:.2f}", flush=True)
            summary = train(cfg, bundle=bundle, log=print)
            model, _, blob = load_trained(out / "last.pt")
            deployed = deployed_copy(model)
            rows.append({"variant": variant, "seed": seed, "step0_top1": step0,
                         "final_top1": summary["final"]["top1"], "best_top1": summary["best"]["top1"],
                         "curve": [h["val_top1"] for h in blob["history"]], "params_deployed": count_params(deployed),
                         "latency_ms": latency_ms(deployed, torch.randn(1, 3, *bundle.image_size)),
                         "command": f"foldattn train --recipe cpu-cifar --dataset imagefolder:DATA/train "
                                    f"--val-split 5000 --epochs {args.epochs} --lr {args.lr} --warmup-epochs 0 "
                                    f"--seed {seed} --pretrained {pre}/last.pt "
                                    + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                               for k, v in VARIANTS[variant].items())})
            _write(args.work_dir, rows)
    _write(args.work_dir, rows)
    print((args.work_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
