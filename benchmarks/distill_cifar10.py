"""Trained attention made free: calibration, then distillation, of CIFAR-10 attention models.

For every trained run ``RUNS/<attention>/s<seed>`` (the runs of benchmarks/sweeps/resnet20-cifar10.yaml, or
any ``LABEL=RUN`` given with ``--run``): the top-1 of the attention model (the teacher), of its calibrated
constant model (``foldattn.stripe.calibrate`` on ``--calib-images`` training images), and of the
folded student after 1 and after 3 distillation epochs (two separate distillations, each with its own
cosine schedule: ``foldattn.stripe.distill``, KL on logits at temperature 4 plus the feature term at
every attention site, SGD lr 0.01, bf16 autocast), all on the run's 5,000 held-out images; the
deployed parameters and the batch-1 latency (one thread, interleaved) of the teacher and of the
deployed model; per site, the stripe statistics and the teacher-student output gap before and after.

Results are written per run (``OUT/<label>.json``, after each distillation: a rerun, also one with more
``--epochs``, runs only the distillations a run's file does not hold yet) and as a table
(``OUT/distill.md``). ``--ablate`` adds, for the first run, one-epoch distillations without the feature
term and with the norms' statistics fixed.

    python benchmarks/distill_cifar10.py --runs runs/resnet20/runs --attentions se eca cbam srm --seeds 0 1 \\
        --cache-dir $CIFAR10/cache --out runs/distill
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from foldattn._utils import atomic_path, write_json
from foldattn.bench.timing import interleaved
from foldattn.calibrate import constant_model
from foldattn.stripe.calibration import calibrate
from foldattn.stripe.distillation import distill, distillation_student, site_gaps
from foldattn.summary import count_params
from foldattn.train.data import TensorLoader, load_dataset, with_preprocessing
from foldattn.train.engine import evaluate
from foldattn.train.model import load_trained
from foldattn.verify import verify


def _latency_ms(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        samples = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, 15, 2, min_sample_s=0.1,
                              clock=time.process_time)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def run_one(label: str, run: Path, args: argparse.Namespace, bundles: dict[Any, Any], ablate: bool,
            done: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Calibrate, then every distillation of ``args.epochs`` (and the ablations) that ``done`` lacks; ``save``
    gets the result after each one."""
    teacher, cfg, blob = load_trained(run / "last.pt", ema=False)
    key = (cfg.dataset, cfg.val_split, cfg.split_seed)
    if key not in bundles:
        bundles[key] = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, cfg.split_seed, args.cache_dir,
                                    cfg.image_size)
    bundle = with_preprocessing(bundles[key], (blob.get("run") or {}).get("preprocessing"))
    train = TensorLoader(bundle.train, 128, bundle.mean, bundle.std, train=True, pad=bundle.pad, flip=bundle.flip,
                         seed=args.seed)
    calib = TensorLoader(bundle.train, 256, bundle.mean, bundle.std, train=False)
    val = TensorLoader(bundle.val, 500, bundle.mean, bundle.std, train=False)
    result: dict[str, Any] = {"label": label, "run": str(run), "teacher": evaluate(teacher, val)}
    t0 = time.time()
    deployed, report = calibrate(teacher, calib, max_images=args.calib_images)
    stripes = report.stripes
    assert stripes is not None
    result["after_calibration"] = evaluate(deployed, val)
    for key in ("teacher", "after_calibration"):  # the same run and calibration as the file's distillations
        if key in done and done[key]["top1"] != result[key]["top1"]:
            raise SystemExit(f"{label}: {key} top-1 {result[key]['top1']} differs from the file's "
                             f"{done[key]['top1']}; move the file away to start this run again")
    result = {**done, **result}
    example = next(iter(val))[0][:8]
    result["fold_check"] = str(verify(constant_model(teacher, stripes), deployed, example))
    result["calibration_seconds"] = time.time() - t0
    sites = [x.name for x in stripes.layers]
    summaries = stripes.summary()
    amp = torch.bfloat16
    runs = {f"distill_{e}": {"epochs": e} for e in args.epochs}
    if ablate:
        runs["distill_1_no_features"] = {"epochs": 1, "feature_weight": 0.0}
        runs["distill_1_fixed_norm_stats"] = {"epochs": 1, "freeze_norm_stats": True}
    best = None
    for name, options in runs.items():
        if name in result:
            continue
        student = distillation_student(constant_model(teacher, stripes), example)
        gaps_before = site_gaps(teacher, student, sites, val)
        t0 = time.time()
        out, student, rep = distill(teacher, student, train, val, sites=sites, amp_dtype=amp, lr=args.lr,
                                    log=lambda s, n=name: print(f"  {label} {n}: {s}", flush=True), **options)
        gaps_after = site_gaps(teacher, student, sites, val)
        final = evaluate(out, val)
        result[name] = {**final, "best_epoch": rep.best_epoch, "history": rep.history, "seconds": time.time() - t0,
                        "settings": rep.settings,
                        "sites": {s: {"stripe_score": summaries[s]["gate_stripe_score"],
                                      "gate_mean": summaries[s]["gate_mean"],
                                      "gate_spread": summaries[s]["gate_mean_std"],
                                      "gap_before": gaps_before[s], "gap_after": gaps_after[s]} for s in sites}}
        if best is None or name == f"distill_{max(args.epochs)}":
            best = out
        save(result)
    if best is None:  # every distillation was done already
        return result
    x1 = example[:1]
    lat = _latency_ms({"teacher": copy.deepcopy(teacher).eval(), "deployed": copy.deepcopy(best).eval()}, x1)
    result.update(params_teacher=count_params(teacher), params_deployed=count_params(best), latency_ms_b1=lat)
    return result


def _table(results: list[dict[str, Any]], epochs: list[int], command: str) -> str:
    head = ["model", "teacher top-1", "calibrated (change)"] + [f"distilled {e} ep (change)" for e in epochs] + [
        "params teacher / deployed", "ms b=1 teacher / deployed"]
    lines = [f"Command: `{command}`", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        t = r["teacher"]["top1"]
        cal = r["after_calibration"]["top1"]
        cells = [r["label"], f"{t:.2f}", f"{cal:.2f} ({cal - t:+.2f})"]
        cells += [f"{r[f'distill_{e}']['top1']:.2f} ({r[f'distill_{e}']['top1'] - t:+.2f})"
                  if f"distill_{e}" in r else "-" for e in epochs]  # a run distilled with fewer --epochs
        cells += [f"{r['params_teacher']:,} / {r['params_deployed']:,}",
                  f"{r['latency_ms_b1']['teacher']:.2f} / {r['latency_ms_b1']['deployed']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    # per model over its seeds (labels "<model> s<seed>"): the mean change, and each seed's
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_model.setdefault(r["label"].rsplit(" s", 1)[0], []).append(r)
    rows = []
    for model, rs in by_model.items():
        if len(rs) < 2:
            continue
        cells = [model, str(len(rs))]
        for key in ["after_calibration"] + [f"distill_{e}" for e in epochs]:
            changes = [r[key]["top1"] - r["teacher"]["top1"] for r in rs if key in r]
            cells.append(f"{statistics.mean(changes):+.2f} ({', '.join(f'{c:+.2f}' for c in changes)})"
                         if len(changes) == len(rs) else "-")
        rows.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "Change to the teacher, mean over seeds (each seed's):", "",
                  "| model | seeds | calibrated | " + " | ".join(f"distilled {e} ep" for e in epochs) + " |",
                  "|---|---:|" + "---:|" * (1 + len(epochs)), *rows]
    ablations = [r for r in results if "distill_1_no_features" in r]
    for r in ablations:
        lines += ["", f"Ablation on {r['label']}, one epoch: with the feature term {r['distill_1']['top1']:.2f}, "
                  f"without {r['distill_1_no_features']['top1']:.2f}; norms' statistics fixed "
                  f"{r['distill_1_fixed_norm_stats']['top1']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, help="a sweep's runs folder (RUNS/<attention>/s<seed>)")
    p.add_argument("--attentions", nargs="+", default=["se", "eca", "cbam", "srm"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--run", action="append", default=[], metavar="LABEL=RUN", help="another trained run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--calib-images", type=int, default=2048)
    p.add_argument("--epochs", nargs="+", type=int, default=[1, 3])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="seed of the distillation's batches")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ablate", action="store_true", help="feature-term and norm-statistics ablations on the first run")
    p.add_argument("--table-only", action="store_true", help="rewrite OUT/distill.md from the runs' files; run nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/distill_cifar10.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    todo = [(f"ResNet-20 +{a.upper()} s{s}", args.runs / a / f"s{s}") for s in args.seeds for a in args.attentions] \
        if args.runs else []
    todo += [tuple(x.split("=", 1)) for x in args.run]  # type: ignore[misc]
    bundles: dict[Any, Any] = {}
    results = []
    for i, (label, run) in enumerate(todo):
        dest = args.out / f"{label.replace(' ', '_').replace('+', '')}.json"
        done = json.loads(dest.read_text()) if dest.is_file() else {}
        wanted = [f"distill_{e}" for e in args.epochs] + (
            ["distill_1_no_features", "distill_1_fixed_norm_stats"] if args.ablate and i == 0 else [])
        if args.table_only or all(name in done for name in wanted):
            if done:
                results.append(done)
            continue
        summary = Path(run) / "summary.json"
        if not summary.is_file() or not json.loads(summary.read_text()).get("finished"):
            print(f"{label}: {run} has not finished training; skipped (run this again later)", flush=True)
            continue
        print(f"== {label} ({run})", flush=True)
        def save(result: dict[str, Any], dest: Path = dest) -> None:
            commands = result.get("commands") or ([result["command"]] if "command" in result else [])
            kept = {k: v for k, v in result.items() if k != "command"}
            write_json(dest, {**kept, "commands": [*dict.fromkeys([*commands, command])]})

        results.append(run_one(label, Path(run), args, bundles, ablate=args.ablate and i == 0, done=done,
                               save=save))
        save(results[-1])
    with atomic_path(args.out / "distill.md") as tmp:
        tmp.write_text(_table(results, args.epochs, command))
    print(_table(results, args.epochs, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
