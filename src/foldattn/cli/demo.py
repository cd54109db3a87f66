"""``foldattn demo``: the whole ASR story on the embedded digits in a few minutes of CPU.

Trains a CIFAR-style ResNet-20 three ways on scikit-learn's handwritten digits
(plain, +SE, +ASR(SE); Zhong et al., ASR, arXiv 2304.06345), folds the ASR model,
verifies that the folded network computes the same function, and prints one table:
validation accuracy of the deployed model, parameters and batch-1 latency. A
markdown report and a PNG of the training curves go to the output folder.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from .._argtypes import MAX_EPOCHS, MAX_SEED, MAX_THREADS, bounded_int
from .._utils import atomic_path
from ..fold import asr_layers, fold
from ..summary import count_params, latency_ms
from ..train import TrainConfig, build_model, recipe_defaults, train, write_curves
from ..train.checkpoint import load_checkpoint, load_model_state
from ..train.data import ImageData, load_dataset
from ..verify import verify

__all__ = ["VARIANTS", "run_demo", "register"]

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "+SE": {"attention": "se"},
    "+ASR(SE)": {"attention": "se", "asr": True},
}


def run_demo(output: str | Path = "runs/demo", epochs: int | None = None, quick: bool = False, seed: int = 0,
             model: str = "cifar_resnet20", log: Any = print) -> list[dict[str, Any]]:
    """Train, fold, verify and time each variant; write ``report.md`` and ``curves.png``; return the rows."""
    out = Path(output)
    bundle = load_dataset("digits")
    base = {**recipe_defaults("digits"), "recipe": "digits", "dataset": "digits", "model": model, "seed": seed}
    if quick:
        base.update(epochs=2, steps_per_epoch=4)
    if epochs is not None:
        base["epochs"] = epochs
    rows, curves = [], {}
    example = cast(ImageData, bundle.val).images[:4].float().div(255)  # digits: held in memory
    example = (example - torch.tensor(bundle.mean).view(1, -1, 1, 1)) / torch.tensor(bundle.std).view(1, -1, 1, 1)
    for label, options in VARIANTS.items():
        slug = label.strip("+").replace("(", "-").replace(")", "").lower()
        cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **base, **options, "output": str(out / slug)})
        t0 = time.perf_counter()
        summary = train(cfg, bundle=bundle, log=None, overwrite=True)  # the demo's own folder: a rerun replaces it
        seconds = time.perf_counter() - t0
        trained = build_model(cfg, bundle.num_classes)
        load_model_state(trained, load_checkpoint(out / slug / "last.pt")["model"])
        trained.eval()
        if asr_layers(trained):
            deployed = fold(trained)
            r32 = verify(trained, deployed, example)
            exact = copy.deepcopy(trained).double()
            r64 = verify(exact, fold(exact), example.double())
            check = (f"folded == trained: max relative error {r32.max_rel:.1e} in float32 (tolerance 1e-5), "
                     f"{r64.max_rel:.1e} when folded in float64 (tolerance 1e-10)")
        else:
            deployed, check = trained, "nothing to fold"
        curves[label] = load_checkpoint(out / slug / "last.pt")["history"]
        row = {"model": label, "top1": summary["final"]["top1"], "best_top1": summary["best"]["top1"],
               "params_train": count_params(trained), "params_deployed": count_params(deployed),
               "latency_ms": latency_ms(deployed, example[:1], 10 if quick else 50), "train_s": seconds,
               "verify": check}
        rows.append(row)
        if log is not None:
            log(f"{label:<9} trained {seconds:5.1f}s  val top-1 {row['top1']:.2f}%  ({check})")
    write_curves(out / "curves.png", curves, title=f"{model} on digits (validation = folded model)")
    _write_report(out, rows, base, quick)
    return rows


_SMOKE = ("SMOKE TEST (--quick: 2 epochs of 4 steps): it checks that training, folding and verifying run; "
          "the accuracies below are not meaningful. Run `foldattn demo` without --quick for the real comparison.")


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | val top-1 % (final) | best | params (train) | params (deployed) | latency b=1 (ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['top1']:.2f} | {r['best_top1']:.2f} | {r['params_train']:,} | "
                     f"{r['params_deployed']:,} | {r['latency_ms']:.2f} |")
    return "\n".join(lines)


def _write_report(out: Path, rows: list[dict[str, Any]], cfg: dict[str, Any], quick: bool = False) -> None:
    text = (
        "# foldattn demo\n\n" + (f"**{_SMOKE}**\n\n" if quick else "") +
        f"CIFAR-style {cfg['model']} on scikit-learn's handwritten digits (16x16), {cfg['epochs']} epochs, "
        f"seed {cfg['seed']}, recipe `digits`. Validation accuracy is measured on the deployed (folded) model.\n\n"
        + _table(rows) + "\n\n"
        + "\n".join(f"- {r['model']}: trained in {r['train_s']:.0f} s; fold check: {r['verify']}" for r in rows)
        + "\n\n![training curves](curves.png)\n\n"
        "+ASR(SE) trains with SE's parameters and a learnable input psi; after `foldattn.fold` the deployed network "
        "is the plain ResNet (same parameter count, same latency), while +SE keeps its cost at inference.\n"
    )
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            rows = run_demo(args.output, epochs=args.epochs, quick=args.quick, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    print()
    if args.quick:
        print(_SMOKE)
    print(_table(rows))
    print(f"\nreport: {Path(args.output) / 'report.md'} (curves.png beside it); total {time.perf_counter() - t0:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="train plain, +SE and +ASR(SE) on digits, fold, verify, print a table",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a few steps only (CI, < 1 minute)")
    p.add_argument("--epochs", type=bounded_int(1, MAX_EPOCHS),
                   help=f"epochs per model (at most {MAX_EPOCHS}) [15; --quick: 2 short ones]")
    p.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0)
    p.add_argument("--threads", type=bounded_int(0, MAX_THREADS), default=1,
                   help=f"torch CPU threads (at most {MAX_THREADS}); 1 is fastest for these tiny models on a busy "
                        "machine, 0 = all cores")
    p.add_argument("-o", "--output", default="runs/demo", help="report folder [runs/demo]")
    p.set_defaults(func=_main)
