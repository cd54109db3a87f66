"""Make the README's figures (PNG under docs/) from runs made here, on the embedded digits.

    python docs/make_figures.py                  # ~5 minutes on 2 CPU cores; writes docs/*.png
    python docs/make_figures.py --quick          # a few steps only, to check the script (figures not kept)
    python docs/make_figures.py --sweep runs/resnet20 --sweep runs/vit   # only the sweeps' figures (seconds)

1. ``foldattn demo`` (plain, +SE, +ASR(SE) ResNet-20 on digits): ``docs/demo-curves.png``.
2. The Stripe Observation of the trained +SE model on the validation digits:
   ``docs/stripe-heatmap.png`` (images x channels; vertical stripes = input-independent attention).
3. ``foldattn bench`` of ResNet-20 with SE (latency, throughput, training step, parameters as
   ratios to plain): ``docs/cost.png``.

4. With ``--sweep DIR`` (a ``foldattn sweep`` folder), instead of 1-3: its summary plot as
   ``docs/sweep-<sweep file name>.png`` (each seed's final top-1, mean ± std per arm, paired
   differences) and its learning curves as ``docs/curves-<sweep file name>.png`` (validation top-1
   per epoch, mean over seeds per arm), redrawn from ``DIR/summary.json``; docs/ablations.md shows them.

Every number in a figure comes from these runs; the script prints the command lines it ran and the
tables the figures were drawn from, so they can be quoted beside the figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent


def _demo(work: Path, quick: bool) -> Path:
    from foldattn.cli.demo import run_demo

    rows = run_demo(work / "demo", quick=quick)
    for r in rows:
        print(f"  {r['model']:<9} final top-1 {r['top1']:.2f}%  best {r['best_top1']:.2f}%  "
              f"params deployed {r['params_deployed']:,}")
    return work / "demo"


def _stripes(demo: Path, work: Path) -> Path:
    from foldattn.stripe import record_stripes
    from foldattn.stripe.plots import plot_heatmaps
    from foldattn.train import TrainConfig, build_model
    from foldattn.train.checkpoint import load_checkpoint, load_model_state
    from foldattn.train.data import load_dataset

    ckpt = load_checkpoint(demo / "se" / "last.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    bundle = load_dataset("digits")
    model = build_model(cfg, bundle.num_classes)
    load_model_state(model, ckpt["model"])
    images = bundle.val.images[:128].float().div(255)
    mean, std = torch.tensor(bundle.mean).view(1, -1, 1, 1), torch.tensor(bundle.std).view(1, -1, 1, 1)
    result = record_stripes(model.eval(), [(images - mean) / std])
    print(result.table())
    names = [x.name for x in result.layers]
    chosen = [names[0], names[len(names) // 2], names[-1]]
    png, _ = plot_heatmaps(result, work / "stripe-heatmap.png", layers=chosen)
    return png


def _cost(work: Path, quick: bool) -> Path:
    out = work / "bench"
    cmd = [sys.executable, "-m", "foldattn.cli", "bench", "--models", "cifar_resnet20", "--attentions", "se",
           "--threads", "1", "--clock", "cpu", "--no-memory", "--out", str(out)]
    cmd += ["--quick"] if quick else ["--reps", "7", "--warmup", "1"]
    print("  $", " ".join(cmd[2:]).replace("foldattn.cli", "foldattn"))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "bench.json").read_text())
    rows = {r["variant"]: r for r in result["groups"][0]["rows"]}

    from foldattn.train.plots import require_matplotlib

    plt = require_matplotlib()
    figures = [("latency", "latency b=1"), ("throughput", "throughput b=64"), ("train", "train step b=64"),
               ("params", "parameters")]
    variants = [("plain", "plain"), ("x", "+SE"), ("asr", "+ASR(SE) training"), ("asr_folded", "+ASR(SE) deployed")]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / len(variants)
    for i, (key, label) in enumerate(variants):
        if key not in rows:
            continue
        values = [rows[key]["ratio"].get(f) or float("nan") for f, _ in figures]
        ax.bar([j + i * width for j in range(len(figures))], values, width, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(figures))], [t for _, t in figures])
    ax.set_ylabel("ratio to plain")
    ax.set_title(f"cifar_resnet20, SE, 1 CPU thread ({result['date'][:10]}); throughput: higher is better")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = work / "cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    for key, label in variants:
        if key in rows:
            print(f"  {label:<20}", {f: None if rows[key]["ratio"].get(f) is None else round(rows[key]["ratio"][f], 3)
                                     for f, _ in figures})
    return path


def _bad_input(message: str) -> SystemExit:
    """One line on stderr and exit status 2, like the CLI's own errors."""
    print(f"make_figures: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _sweep_figure(folder: Path) -> Path:
    from foldattn._files import load_json_file
    from foldattn.sweep import plot_curves, plot_summary

    try:
        summary = load_json_file(folder / "summary.json", "sweep summary")
        record = load_json_file(folder / "sweep.json", "sweep record")
    except ValueError as e:  # missing, too large or not JSON: the message names the file and the reason
        raise _bad_input(str(e)) from None
    if not (isinstance(summary, dict) and summary.get("format") == "foldattn-sweep-summary"
            and isinstance(summary.get("arms"), dict) and isinstance(record, dict)):
        raise _bad_input(f"{folder} is not a `foldattn sweep` folder (its summary.json and sweep.json "
                         "are not the sweep's); name the folder given to `foldattn sweep -o`")
    stem = Path(str(record.get("file") or folder.name)).stem
    path = DOCS / f"sweep-{stem}.png"
    plot_summary(summary, path, title=stem)
    made = [path.name]
    curves = DOCS / f"curves-{stem}.png"
    if plot_curves(summary, curves, title=stem):  # False when no arm's seeds share one finished schedule
        made.append(curves.name)
    print(f"  wrote {', '.join('docs/' + m for m in made)} ({summary.get('runs_finished')} of "
          f"{summary.get('runs_planned')} runs; {summary.get('command')})")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps only; the figures are not copied to docs/")
    p.add_argument("--work", type=Path, help="folder for the runs [a temporary folder]")
    p.add_argument("--sweep", type=Path, action="append", default=[], metavar="DIR",
                   help="draw docs/sweep-<name>.png from this foldattn sweep folder (repeatable); skips 1-3")
    args = p.parse_args()
    if args.sweep:
        for folder in args.sweep:
            _sweep_figure(folder)
        return 0
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("1/3 foldattn demo" + (" --quick" if args.quick else ""))
        demo = _demo(work, args.quick)
        print("2/3 stripe heat map of the trained +SE model")
        stripe = _stripes(demo, work)
        print("3/3 foldattn bench")
        cost = _cost(work, args.quick)
        made = {"demo-curves.png": demo / "curves.png", "stripe-heatmap.png": stripe, "cost.png": cost}
        for name, src in made.items():
            if not args.quick:
                shutil.copyfile(src, DOCS / name)
            print(f"  {'checked' if args.quick else 'wrote'} docs/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
