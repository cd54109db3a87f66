"""Train small attention CIFAR ResNets on scikit-learn's digits, record the Stripe Observation every
epoch, draw it, and calibrate the trained model into a zero-cost one.

    PYTHONPATH=src python examples/stripe_digits.py -o out/stripe_digits --epochs 15

Writes, per attention type, ``OUT/<attention>/``: stripe_history.json, stripe_curves.{png,json}, stripes.json,
stripe_heatmaps.{png,json}, stripe_summary.{png,json}; and OUT/<attention>/calibration.json.
Small enough for 2 CPU cores (about a minute per model).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from foldattn.cli.stripe import load_data
from foldattn.models import create_model
from foldattn.stripe import StripeHistory, record_stripes
from foldattn.stripe.calibration import calibrate, evaluate, finetune
from foldattn.stripe.plots import plot_heatmaps, plot_history, plot_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="out/stripe_digits")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--attention", nargs="+", default=["se", "eca"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.output)
    for att in args.attention:
        # fresh loaders per model, so each run is the same whatever else is trained in this call
        data = load_data(argparse.Namespace(data="digits", data_dir=None, val_split=None, batch_size=64,
                                            seed=args.seed))
        d = out / att
        d.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        model = create_model(args.model, num_classes=data.num_classes, attention=att, in_channels=data.in_channels)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        history = StripeHistory()
        history.append(0, record_stripes(model, data.val, max_samples=0))
        t0 = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            model.train()
            for x, y in data.train:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            result = record_stripes(model, data.val, max_samples=64, seed=args.seed)
            history.append(epoch, result)
            acc = evaluate(model, data.val)["top1"]
            s = result.summary()
            mean_std = sum(v["gate_mean_std"] for v in s.values()) / len(s)
            print(f"{att} epoch {epoch:>3}: val top-1 {acc:6.2f} %, mean gate std {mean_std:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        history.save(d / "stripe_history.json")
        plot_history(history, d / "stripe_curves.png")
        result.save(d / "stripes.json")
        plot_heatmaps(result, d / "stripe_heatmaps.png")
        plot_summary(result, d / "stripe_summary.png")
        print(result.table())
        # calibrate: the Stripe Observation applied after training
        before = evaluate(model, data.val)
        deployed, report = calibrate(model, data.train_eval)
        after = evaluate(deployed, data.val)
        finetune(deployed, data.train, 2, lr=0.01)
        tuned = evaluate(deployed, data.val)
        print(report.table())
        print(f"calibrate {att}: top-1 {before['top1']:.2f} -> {after['top1']:.2f} % "
              f"(after 2 fine-tuning epochs {tuned['top1']:.2f} %)")
        extra = {}
        if any(getattr(m, "spatial", None) is not None for m in model.modules()):
            # CBAM: how much of the drop is its position-dependent spatial gate, which has no constant form?
            no_spatial = copy.deepcopy(model)
            for m in no_spatial.modules():
                if getattr(m, "spatial", None) is not None:
                    m.spatial = None
            extra["without_spatial_gate"] = evaluate(no_spatial, data.val)
            print(f"{att} with its spatial gates removed (channel gates kept): "
                  f"top-1 {extra['without_spatial_gate']['top1']:.2f} %")
        (d / "calibration.json").write_text(json.dumps(
            {"attention": att, "before": before, "after": after, "after_finetune_2": tuned, **extra,
             **report.to_dict()}, indent=1))


if __name__ == "__main__":
    main()
