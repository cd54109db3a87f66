"""How large each ASR site's per-channel factor is at the start and at the end of training, per arm of a sweep.

A diagnostic for "why does ASR(X) help (or not)": for every finished run ``DIR/runs/<arm>/s<seed>`` of a
``foldattn sweep`` folder, the weights the run deploys (its EMA's when it kept one, ``--model`` for the
model's) are loaded and, at each ASR site (the host layers that an ASR arm of the sweep scales),

- the training-form factor: the RMS over channels of ``v = T(psi)`` for an ASR arm, of LayerScale's
  ``gamma`` for a LayerScale model (its sites in model order), none for a plain model;
- the same factor at initialisation (the arm's model built afresh with the run's seed);
- the RMS of the deployed (folded) host layer's weight, which every arm has: it is what the network
  computes with, whatever the training form was.

Writes ``OUT/branch_scales.json`` (per run, per site), ``OUT/branch_scales.md`` (mean over seeds per arm
and site) and ``OUT/branch_scales.png`` (both against the site's depth, one line per arm).

    python benchmarks/branch_scales.py runs/vit --out runs/vit-scales --png docs/branch-scales-vit-cifar10.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foldattn import ASR, fold
from foldattn._utils import atomic_path, write_json
from foldattn.sweep import run_state
from foldattn.train.model import build_model, load_trained


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def _factors(model: nn.Module) -> list[tuple[str, float]]:
    """(name, RMS of the per-channel factor) of each ASR layer, else of each LayerScale, in model order."""
    asr = [(n, _rms(m.vector())) for n, m in model.named_modules() if isinstance(m, ASR)]
    if asr:
        return asr
    return [(n, _rms(m.gamma)) for n, m in model.named_modules()
            if type(m).__name__ == "LayerScale" and isinstance(getattr(m, "gamma", None), nn.Parameter)]


def measure(run: Path, ema: bool) -> dict[str, Any]:
    """The factors (trained and initial) and the deployed hosts' weight RMS of one finished run."""
    model, cfg, blob = load_trained(run / "last.pt", ema=None if ema else False)
    with torch.no_grad():
        trained = _factors(model)
        classes = int((blob.get("run") or {}).get("classes") or 10)
        torch.manual_seed(cfg.seed)
        initial = _factors(build_model(cfg, classes))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a plain model: "no ASR layer, returned unchanged"
            deployed = fold(model)
        weights = {n: _rms(m.weight) for n, m in deployed.named_modules()
                   if isinstance(getattr(m, "weight", None), torch.Tensor)}
    return {"weights": blob["weights"], "factor_sites": [n for n, _ in trained],
            "factor": [v for _, v in trained], "factor_init": [v for _, v in initial], "deployed_weight_rms": weights}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _span(xs: list[float]) -> str:
    """min .. max (mean) over the sites that have a value, or '-'."""
    xs = [x for x in xs if x == x]
    return f"{min(xs):.3g} .. {max(xs):.3g} (mean {_mean(xs):.3g})" if xs else "-"


def _over_seeds(runs: dict[str, dict[str, Any]], key: str, site: str) -> float:
    """The mean over a arm's seeds of ``run[key][site]`` (NaN where no seed has it)."""
    return _mean([r[key][site] for r in runs.values() if site in r[key]])


def _by_site(r: dict[str, Any], key: str, sites: list[str]) -> dict[str, float]:
    """A run's factors keyed by ASR site; LayerScale's (named ls1, ls2, ...) by their order when they pair up."""
    names, values = r["factor_sites"], r[key]
    if names and names[0].endswith(("ls1", "ls2")):
        return dict(zip(sites, values, strict=True)) if len(values) == len(sites) else {}
    return dict(zip(names, values, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="a foldattn sweep output folder (holds runs/<arm>/s<seed>)")
    p.add_argument("--out", type=Path, required=True, help="folder for branch_scales.{json,md,png}")
    p.add_argument("--png", type=Path, help="write the figure here instead of OUT/branch_scales.png")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="only these arms (default: every arm with a finished run)")
    p.add_argument("--model", action="store_true", help="the model's weights, not its EMA's")
    args = p.parse_args(argv)
    runs_dir = args.sweep / "runs"
    if not runs_dir.is_dir():
        print(f"error: {runs_dir} does not exist: pass a foldattn sweep output folder", file=sys.stderr)
        return 2
    if args.png is not None and not args.png.parent.is_dir():
        print(f"error: --png {args.png}: folder {args.png.parent} does not exist", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    arm_dirs = sorted(d for d in runs_dir.iterdir() if d.is_dir())
    if args.arms:
        unknown = sorted(set(args.arms) - {d.name for d in arm_dirs})
        if unknown:
            print(f"error: --arms: {', '.join(unknown)} not in {runs_dir} (it has "
                  f"{', '.join(d.name for d in arm_dirs)})", file=sys.stderr)
            return 2
        arm_dirs = [runs_dir / a for a in args.arms]
    for arm_dir in arm_dirs:
        for run in sorted(d for d in arm_dir.iterdir() if d.is_dir() and run_state(d) == "finished"):
            results.setdefault(arm_dir.name, {})[run.name] = measure(run, ema=not args.model)
            print(f"{arm_dir.name}/{run.name}: done", file=sys.stderr)
    # the sites: every ASR layer name any run has, in model order (an every-2nd-block arm has fewer)
    sites: list[str] = []
    for arm in results.values():
        for r in arm.values():
            names = [n for n in r["factor_sites"] if not n.endswith(("ls1", "ls2"))]
            if len(names) > len(sites):
                sites = names
    if not sites:
        print(f"error: no finished ASR run under {runs_dir}: nothing to name the sites by", file=sys.stderr)
        return 2
    for arm in results.values():
        for r in arm.values():
            r["factor_by_site"] = _by_site(r, "factor", sites)
            r["factor_init_by_site"] = _by_site(r, "factor_init", sites)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "branch_scales.json", {"sweep": str(args.sweep), "sites": sites, "runs": results})

    rows = ["| arm | seeds | factor at init | factor trained | deployed weight RMS |", "|---|---|---|---|---|"]
    per_arm: dict[str, dict[str, list[float]]] = {}
    for arm, runs in results.items():
        fac = [_over_seeds(runs, "factor_by_site", s) for s in sites]
        ini = [_over_seeds(runs, "factor_init_by_site", s) for s in sites]
        dep = [_over_seeds(runs, "deployed_weight_rms", s) for s in sites]
        per_arm[arm] = {"factor": fac, "init": ini, "deployed": dep}
        seeds = ",".join(s.lstrip("s") for s in runs)
        rows.append(f"| {arm} | {seeds} | {_span(ini)} | {_span(fac)} | {_span(dep)} |")
    md = (f"Per ASR site ({len(sites)}: {sites[0]} .. {sites[-1]}), mean over seeds, then the range over the "
          f"sites; factor = RMS over channels of v = T(psi) (ASR) or of LayerScale's gamma; "
          f"{'model' if args.model else 'EMA (where kept)'} weights.\n\n" + "\n".join(rows) + "\n")
    with atomic_path(args.out / "branch_scales.md") as tmp:
        tmp.write_text(md)
    print(md)
    _plot(per_arm, sites, args.png or args.out / "branch_scales.png")
    return 0


def _plot(per_arm: dict[str, dict[str, list[float]]], sites: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = list(range(len(sites)))
    for i, (arm, d) in enumerate(per_arm.items()):
        color = plt.get_cmap("tab10" if len(per_arm) <= 10 else "tab20")(i)
        if any(v == v for v in d["factor"]):  # not all NaN: the arm has a factor
            a1.plot(x, d["factor"], "o-", color=color, label=f"{arm} trained")
            a1.plot(x, d["init"], "--", color=color, alpha=0.6, label=f"{arm} init")
        if any(v == v for v in d["deployed"]):
            a2.plot(x, d["deployed"], "o-", color=color, label=arm)
    a1.set_yscale("log")
    a1.set_title("per-channel factor (RMS over channels)")
    a2.set_title("deployed host weight (RMS)")
    for a in (a1, a2):
        a.set_xticks(x, [s.replace("blocks.", "") for s in sites], rotation=60, fontsize=7)
        a.set_xlabel("ASR site")
        a.grid(alpha=0.3)
        a.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
