"""``foldattn calibrate``: make a trained input-dependent attention model zero-cost.

Example::

    foldattn calibrate runs/se/best.pt --data digits --max-images 2048 --finetune-epochs 2 -o out/calibrated
    foldattn calibrate runs/se --distill-epochs 1 --max-drop 0.3 -o out/budget   # the cheapest model within 0.3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._argtypes import (
    MAX_BATCH,
    MAX_IMAGES,
    MAX_TUNE_EPOCHS,
    bounded_int,
    learning_rate,
    nonnegative_float,
    positive_float,
    top1_points,
)
from .._utils import check_output_folder, make_output_folder, write_json
from ..summary import latency_ms
from .stripe import add_data_args, add_model_args, check_batch_memory, load_model_and_data

__all__ = ["register", "run_calibrate", "compare_latency"]


@torch.no_grad()
def compare_latency(a: nn.Module, b: nn.Module, example: torch.Tensor, rounds: int = 7,
                    runs: int = 10) -> tuple[float, float]:
    """Median latency (ms) of ``a`` and ``b``, measured in alternating rounds (fair under background load)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(latency_ms(a, example, repeats=runs))
        tb.append(latency_ms(b, example, repeats=runs))
    return statistics.median(ta), statistics.median(tb)


def _save(model: nn.Module, path: Path, name: str | None, kwargs: dict[str, Any], all_folded: bool,
          meta: dict[str, Any], kept: Sequence[str] = (), teacher: nn.Module | None = None) -> Path:
    """Write the converted model with :func:`foldattn.deploy.save_deployed`.

    When every attention module folded away and the model is a foldattn model, it *is* the
    plain backbone: the file then names ``foldattn.models:NAME`` as its builder, so
    ``foldattn.deploy.load_deployed(path)`` rebuilds it. When ``--max-drop`` kept some sites of a
    model that can build attention at chosen blocks only (the CIFAR ResNets' ``attention_sites``),
    the builder names those blocks. Otherwise (modules kept elsewhere, torchvision or timm models,
    whose deployed tree differs from their builder's) load it with ``model=``.
    """
    from ..deploy import save_deployed

    if name is not None and all_folded:
        builder_kwargs = dict(kwargs)
        if kept:  # the teacher's own options (its attention) at the kept blocks only
            from ..models._registry import BUILDER_ATTR

            record = getattr(teacher, BUILDER_ATTR, None)
            indices = getattr(model, "attention_site_indices", None)
            whole = [k for k in kept if not k.endswith(".spatial")]
            split = [k for k in kept if k.endswith(".spatial") and k.rpartition(".")[0] not in whole]
            if indices is None or split or not isinstance(record, dict) or record.get("name") != name:
                return save_deployed(model, path, metadata=meta)  # a split module: no builder builds it
            builder_kwargs = {**record.get("kwargs", {}), "attention_sites": indices(whole)}
        try:
            return save_deployed(model, path, f"foldattn.models:{name}", builder_kwargs, metadata=meta)
        except ValueError:  # the tree is not the plain model's after all: save without a builder
            pass
    return save_deployed(model, path, metadata=meta)


def _check_distill_data(model: nn.Module, data: Any) -> None:
    """Refuse distillation without training images, or on data with another number of classes."""
    if len(data.train) == 0:
        raise ValueError(f"--distill-epochs: {data.name} has no training images to distil on")
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if heads and heads[-1].out_features != data.num_classes:
        raise ValueError(f"--distill-epochs: the model has {heads[-1].out_features} classes, {data.name} "
                         f"{data.num_classes}: the teacher's logits and the data do not match; pass its own --data")


def _distill(args: argparse.Namespace, model: nn.Module, stripes: Any, data: Any, example: torch.Tensor,
             result: dict[str, Any]) -> nn.Module:
    """Distil the calibrated model from ``model``; fills ``result`` and returns the best deployed model."""
    from ..calibrate import constant_model
    from ..stripe.distillation import SiteGap, deploy_student, distill, distillation_student, site_gaps
    from ..train.engine import evaluate
    from ..verify import verify

    student = distillation_student(constant_model(model, stripes), example[:2])
    sites = [x.name for x in stripes.layers]
    before = site_gaps(model, student, sites, data.val)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    best, student, report = distill(model, student, data.train, data.val, epochs=args.distill_epochs,
                                    lr=args.distill_lr, temperature=args.temperature, label_weight=args.label_weight,
                                    feature_weight=args.feature_weight, sites=sites, amp_dtype=amp)
    after = site_gaps(model, student, sites, data.val)
    check = verify(student, deploy_student(student, example[:2]), example)
    summaries = stripes.summary()
    report.sites = [SiteGap(n, summaries[n]["gate_stripe_score"], summaries[n]["gate_mean"],
                            summaries[n]["gate_mean_std"], before[n], after[n]) for n in sites]
    final = evaluate(best, data.val)
    result["after_distill"] = {**final, "epoch": report.best_epoch}
    result["distill"] = {**report.to_dict(), "fold_check": str(check)}
    print(f"after distillation ({args.distill_epochs} epoch(s), best epoch {report.best_epoch}): top-1 "
          f"{final['top1']:.2f} % (change {final['top1'] - result['before']['top1']:+.2f}); student fold check: "
          f"{check}")
    for s in report.sites:
        print(f"  {s.name:<28} stripe {s.stripe_score:6.3f}  gate {s.gate_mean:.3f} +- {s.gate_spread:.3f}  "
              f"gap {s.gap_before:.2e} -> {s.gap_after:.2e}")
    return best


def _budget(args: argparse.Namespace, model: nn.Module, data: Any, stripes: Any, before: dict[str, float],
            example: torch.Tensor, result: dict[str, Any]) -> nn.Module:
    """``--max-drop``: the fewest attention sites kept (the rest converted and distilled) within the budget;
    fills ``result["budget"]`` and returns the chosen deployed model."""
    from ..stripe.budget import calibrate_within_budget

    wide = next(iter(data.val))[0][: min(64, args.batch_size)]
    chosen_model, found = calibrate_within_budget(
        model, data.train, data.train_eval, data.val, args.max_drop, example=example,
        distill_epochs=args.distill_epochs, max_images=args.max_images,
        latency_inputs={"batch_1": example[:1], f"batch_{wide.shape[0]}": wide},
        distill_options={"lr": args.distill_lr, "temperature": args.temperature, "label_weight": args.label_weight,
                         "feature_weight": args.feature_weight,
                         "amp_dtype": torch.bfloat16 if args.amp == "bf16" else None},
        stripes=stripes, log=lambda s: print(s, flush=True))
    order = found.order
    result["budget"] = found.to_dict()
    chosen = found.chosen
    print(f"budget {args.max_drop:g} point(s): {chosen.num_kept} of {len(order)} site(s) kept, top-1 "
          f"{chosen.top1:.2f} (change {chosen.top1 - before['top1']:+.2f}); {len(found.points) - 1} point(s) "
          "evaluated")
    for row in found.plan():
        print(f"  {row['site']:<28} {row['action']:<9} {row['why']}")
    return chosen_model


def run_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``foldattn calibrate``; returns the report written to ``OUT/calibration.json``."""
    from ..calibrate import constant_model
    from ..stripe.calibration import calibrate, evaluate, finetune
    from ..summary import count_params
    from ..verify import verify

    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.finetune_epochs and args.distill_epochs:
        raise ValueError("--finetune-epochs and --distill-epochs are two ways to recover the accuracy: choose one")
    if args.max_drop is not None and (args.finetune_epochs or args.layers):
        raise ValueError("--max-drop chooses the sites itself and recovers with --distill-epochs: drop "
                         f"{'--finetune-epochs' if args.finetune_epochs else '--layers'}")
    if args.bench_batch > args.batch_size:
        raise ValueError(f"--bench-batch {args.bench_batch}: at most --batch-size ({args.batch_size}), whose first "
                         "validation batch is timed; lower --bench-batch or raise --batch-size")
    check_output_folder(args.output, "--output")  # created only when the results are written
    model, label, data, name, kwargs = load_model_and_data(args)
    model.eval()
    if args.distill_epochs:
        _check_distill_data(model, data)
    if args.distill_epochs or args.finetune_epochs:  # training keeps every activation for the backward pass
        check_batch_memory(model, data, args.batch_size, "--batch-size", training=True)
    before = evaluate(model, data.val)
    print(f"before: top-1 {before['top1']:.2f} % on {int(before['images'])} validation images")
    deployed, report = calibrate(model, data.train_eval, layers=args.layers or None, max_images=args.max_images)
    print(report.table())
    # the fold itself must be exact: compare with the unfolded constant model
    example = next(iter(data.val))[0][: args.batch_size]
    stripes = report.stripes
    if stripes is None:  # pragma: no cover - calibrate() always records
        raise RuntimeError("calibrate() returned no statistics")
    check = verify(constant_model(model, stripes), deployed, example)
    print(f"fold check (constant model vs folded): {check}")
    after = evaluate(deployed, data.val)
    print(f"after calibration: top-1 {after['top1']:.2f} % (change {after['top1'] - before['top1']:+.2f})")
    result: dict[str, Any] = {
        "model": label, "data": data.name, "before": before, "after_calibration": after,
        "fold_check": str(check), **report.to_dict(),
        "params_before": count_params(model), "params_after": count_params(deployed),
    }
    if args.max_drop is not None:
        deployed = _budget(args, model, data, stripes, before, example, result)
        result["params_after"] = count_params(deployed)
    elif args.distill_epochs:
        deployed = _distill(args, model, stripes, data, example, result)
    if args.finetune_epochs:
        losses = finetune(deployed, data.train, args.finetune_epochs, lr=args.lr,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
        tuned = evaluate(deployed, data.val)
        print(f"after {args.finetune_epochs} fine-tuning epoch(s): top-1 {tuned['top1']:.2f} % "
              f"(change {tuned['top1'] - before['top1']:+.2f})")
        result.update({"finetune_epochs": args.finetune_epochs, "finetune_losses": losses, "after_finetune": tuned})
    bench = example[:1] if args.bench_batch == 1 else next(iter(data.val))[0][: args.bench_batch]
    before_ms, after_ms = compare_latency(copy.deepcopy(model), copy.deepcopy(deployed), bench)
    result["latency_ms_before"], result["latency_ms_after"] = before_ms, after_ms
    result["bench_batch"] = int(bench.shape[0])
    print(f"latency, batch {bench.shape[0]}: {result['latency_ms_before']:.2f} ms -> "
          f"{result['latency_ms_after']:.2f} ms; parameters {result['params_before']:,} -> {result['params_after']:,}")
    out = make_output_folder(args.output, "--output")
    all_folded = report.folded == len(report.layers)
    kept: list[str] = []
    if "budget" in result:
        kept = result["budget"]["chosen"]["kept"]
        from ..stripe.plots import plot_budget

        png, _ = plot_budget(result["budget"], out / "budget.png")
        print(f"wrote {png}")
    weights = _save(deployed, out / "calibrated.safetensors", name, kwargs, all_folded,
                    {"source": label, "data": data.name, "calibrated_layers": len(report.layers),
                     "kept_attention": kept}, kept, model)
    result["weights"] = str(weights)
    write_json(out / "calibration.json", result)
    print(f"wrote {weights}, {out / 'calibration.json'}")
    return result


def _main(args: argparse.Namespace) -> int:
    run_calibrate(args)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "calibrate", help="replace input-dependent channel attention by its expected gate and fold it away",
        description="Replace each channel-attention module by its mean attention vector over calibration images, "
                    "fold the constants into neighbouring layers (zero inference cost), report validation accuracy "
                    "before and after, optionally fine-tune the folded model.",
    )
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="attention modules to convert: names or glob patterns (default: all)")
    p.add_argument("--max-images", type=bounded_int(1, MAX_IMAGES), default=2048,
                   help=f"training images (no augmentation) used for calibration (at most {MAX_IMAGES}; default 2048)")
    p.add_argument("--finetune-epochs", type=bounded_int(0, MAX_TUNE_EPOCHS), default=0,
                   help=f"fine-tune the folded model this many epochs (at most {MAX_TUNE_EPOCHS}; a run expected to "
                        "take over an hour says so after its first batch)")
    p.add_argument("--lr", type=learning_rate, default=0.01,
                   help="fine-tuning learning rate (SGD, cosine; default 0.01)")
    g = p.add_argument_group("distillation: the calibrated model learns to reproduce the attention model")
    g.add_argument("--distill-epochs", type=bounded_int(0, MAX_TUNE_EPOCHS), default=0,
                   help="distil the calibrated model from the original for this many epochs; the best epoch's folded "
                        f"model is kept (at most {MAX_TUNE_EPOCHS}; a run expected to take over an hour says so after "
                        "its first batch; default 0: calibration alone)")
    g.add_argument("--distill-lr", type=learning_rate, default=0.01,
                   help="distillation learning rate (SGD momentum 0.9 Nesterov, cosine; default 0.01)")
    g.add_argument("--temperature", type=positive_float, default=4.0, help="softening of the logits (default 4)")
    g.add_argument("--label-weight", type=nonnegative_float, default=0.0,
                   help="weight of the cross-entropy on the labels beside the teacher's logits (default 0)")
    g.add_argument("--feature-weight", type=nonnegative_float, default=1.0,
                   help="weight of matching the outputs at each attention site (default 1; 0: logits only)")
    g.add_argument("--amp", choices=("bf16", "none"), default="bf16",
                   help="autocast of the distillation's forward passes (default bf16)")
    g.add_argument("--max-drop", type=top1_points, default=None, metavar="POINTS",
                   help="convert only as many sites as stay within this many top-1 points of the model (after "
                        "--distill-epochs): sites are ranked by accuracy cost per millisecond saved and the fewest "
                        "kept is found by bisection (each point tried is a calibration and a distillation); "
                        "calibration.json gets the plan and the curve, OUT/budget.png the figure")
    p.add_argument("--bench-batch", type=bounded_int(1, MAX_BATCH), default=1,
                   help=f"batch size of the latency comparison (at most {MAX_BATCH}, and at most --batch-size: its "
                        "images are one validation batch; default 1)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=_main)
