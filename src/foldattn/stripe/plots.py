"""Pictures of the Stripe Observation (matplotlib, Agg backend; PNG plus the data as JSON).

- :func:`plot_heatmaps`: images x channels heat maps of a layer's input descriptor
  (before the module) and of its attention vector (after), the paper's figure;
- :func:`plot_history`: each layer's statistic against the epoch;
- :func:`plot_summary`: one bar per layer: gate std and stripe scores.

Every function writes ``PATH`` (PNG) and ``PATH`` with suffix ``.json`` (the plotted
numbers), each atomically, and returns the two paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._utils import atomic_path, require, write_json

if TYPE_CHECKING:  # annotations only: drawing needs no recording machinery
    from .history import StripeHistory
    from .results import LayerStripes, StripeResult

__all__ = ["plot_heatmaps", "plot_history", "plot_summary", "plot_budget", "default_heatmap_layers"]


def _plt() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; matplotlib comes with the ``train`` extra."""
    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str], data: dict[str, Any]) -> tuple[Path, Path]:
    png = Path(path)
    if png.suffix.lower() != ".png":
        raise ValueError(f"picture path must end in .png, got {png}")
    js = png.with_suffix(".json")
    plt = _plt()
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_json(js, data)
    return png, js


def default_heatmap_layers(result: StripeResult, count: int = 3) -> list[str]:
    """First, middle and last recorded layers (up to ``count``): early, mid and late depth."""
    names = [x.name for x in result.layers]
    if len(names) <= count:
        return names
    idx = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]
    return [names[i] for i in idx]


def plot_heatmaps(
    result: StripeResult, path: str | os.PathLike[str], layers: Sequence[str] | None = None,
    unit_scale: bool = False,
) -> tuple[Path, Path]:
    """Images x channels heat maps, descriptor (left) and attention (right), one row per layer.

    Vertical stripes on the right (each column constant) are the Stripe Observation.
    Needs the reservoir sample (``max_samples > 0`` when recording). Each panel's colour
    scale spans its own values, which magnifies tiny variations of a nearly constant gate;
    ``unit_scale=True`` draws every gate on [0, 1] instead.
    """
    chosen: list[LayerStripes] = [result.layer(n) for n in (layers or default_heatmap_layers(result))]
    if not chosen:
        raise ValueError("no layer to draw")
    empty = [x.name for x in chosen if not x.gate_sample]
    if empty:
        raise ValueError(f"layers {empty} have no sampled vectors; record with max_samples > 0")
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(len(chosen), 2, figsize=(11, 3.1 * len(chosen) + 0.6), squeeze=False,
                             layout="constrained")
    for row, layer in zip(axes, chosen, strict=True):
        s = layer.summary()
        panels = (
            (layer.descriptor_sample, "input descriptor (pooled features)", "descriptor", "magma"),
            (layer.gate_sample, "attention a(x)", "gate", "viridis"),
        )
        for ax, (mat, title, key, cmap) in zip(row, panels, strict=True):
            if not mat:
                ax.set_axis_off()
                continue
            limits = {"vmin": 0.0, "vmax": 1.0} if unit_scale and key == "gate" else {}
            im = ax.imshow(np.asarray(mat), aspect="auto", interpolation="nearest", cmap=cmap, **limits)
            const = s[f"{key}_constancy"]
            extra = f", constancy {const:.3f}" if const == const else ""  # NaN: values outside [0, 1]
            ax.set_title(
                f"{layer.name}: {title}\nmean std {s[f'{key}_mean_std']:.3g}, stripe score "
                f"{s[f'{key}_stripe_score']:.3f}{extra}",
                fontsize=9,
            )
            ax.set_xlabel("channel")
            ax.set_ylabel("image (sample)")
            fig.colorbar(im, ax=ax, pad=0.01)
    fig.suptitle(f"Stripe Observation: {len(chosen[0].gate_sample)} of {result.num_images} images", fontsize=11)
    data = {
        "num_images": result.num_images,
        "sample_indices": result.sample_indices,
        "layers": [
            {"name": x.name, "descriptor": x.descriptor_sample, "gate": x.gate_sample, "summary": x.summary()}
            for x in chosen
        ],
    }
    return _save(fig, path, data)


def plot_history(history: StripeHistory, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Mean over channels of the per-channel std of a(x) (the paper's statistic) and the stripe
    score, against the epoch, one line per layer (colour = depth)."""
    if len(history) == 0:
        raise ValueError("the stripe history is empty: append at least one result first")
    plt = _plt()
    names = history.layer_names()
    cmap = plt.get_cmap("viridis")
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.2), layout="constrained")
    std, score = history.series("gate_mean_std"), history.series("gate_stripe_score")
    const = history.series("gate_constancy")
    dstd = history.series("descriptor_stripe_score")
    marker = "o" if len(history) < 30 else None
    for i, n in enumerate(names):
        color = cmap(i / max(1, len(names) - 1))
        label = n if len(names) <= 12 or i in (0, len(names) - 1) else None
        ax1.plot(history.epochs, std[n], color=color, marker=marker, ms=3, label=label)
        ax3.plot(history.epochs, const[n], color=color, marker=marker, ms=3)
        ax2.plot(history.epochs, score[n], color=color, marker=marker, ms=3)
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("constancy of a(x)")
    ax3.set_title("constancy (1 = a(x) the same for every image)", fontsize=10)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean over channels of std across images of a(x)")
    ax1.set_title("attention spread across images (lower = more constant)", fontsize=10)
    if all(v > 0 for s in std.values() for v in s if v == v):
        ax1.set_yscale("log")
    fig.legend(fontsize=7, loc="outside right upper", title="layer (colour = depth)", title_fontsize=7)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("stripe score of a(x)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_title("stripe score (1 = every channel constant across images)", fontsize=10)
    data = {"epochs": history.epochs, "gate_mean_std": std, "gate_constancy": const, "gate_stripe_score": score,
            "descriptor_stripe_score": dstd}
    return _save(fig, path, data)


def plot_summary(result: StripeResult, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Per layer: the std of a(x) across images (mean and max over channels), and the stripe
    score of the attention next to that of its input descriptor."""
    plt = _plt()
    import numpy as np

    names = [x.name for x in result.layers]
    summ = [x.summary() for x in result.layers]
    pos = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(7, 0.45 * len(names) + 3), 7.5), sharex=True,
                                   layout="constrained")
    ax1.bar(pos, [s["gate_mean_std"] for s in summ], color="tab:blue", label="mean over channels")
    ax1.plot(pos, [s["gate_max_std"] for s in summ], "v", color="tab:red", label="max over channels")
    ax1.set_ylabel("std of a(x) across images")
    fig.suptitle(f"Stripe Observation per layer ({result.num_images} images)", fontsize=10)
    ax1.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.06), ncol=2, frameon=False)
    w = 0.28
    ax2.bar(pos - w, [s["descriptor_stripe_score"] for s in summ], w, color="tab:gray",
            label="stripe score, input descriptor")
    ax2.bar(pos, [s["gate_stripe_score"] for s in summ], w, color="tab:green", label="stripe score, attention a(x)")
    ax2.bar(pos + w, [s["gate_constancy"] for s in summ], w, color="tab:olive", label="constancy, attention a(x)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("score (1 = stripes / constant)")
    ax2.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    ax2.set_xticks(pos)
    ax2.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    data = {"num_images": result.num_images, "layers": dict(zip(names, summ, strict=True))}
    return _save(fig, path, data)


def plot_budget(budget: dict[str, Any], path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The trade-off a budget search saw (``BudgetResult.to_dict()``): top-1 against the sites kept, and
    latency at batch 1 against the sites kept, the budget line and the chosen point marked."""
    plt = _plt()
    curve = budget["curve"]
    kept = [p["num_kept"] for p in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(kept, [p["top1"] for p in curve], "o-", color="tab:blue", label="converted + distilled")
    ax1.axhline(budget["teacher_top1"], color="gray", lw=1, label="teacher")
    ax1.axhline(budget["teacher_top1"] - budget["max_drop"], color="tab:red", ls="--", lw=1,
                label=f"budget: -{budget['max_drop']:g} point(s)")
    chosen = budget["chosen"]
    ax1.plot([len(chosen["kept"])], [chosen["top1"]], "*", ms=14, color="tab:orange", label="chosen")
    ax1.set_xlabel("attention sites kept")
    ax1.set_ylabel("validation top-1 (%)")
    ax1.legend(fontsize=8)
    for key, style in (("batch_1", "o-"), *((k, "s--") for k in sorted({k for p in curve for k in p["latency_ms"]})
                                             if k != "batch_1")):
        ax2.plot(kept, [p["latency_ms"].get(key, float("nan")) for p in curve], style,
                 label=key.replace("_", " "))
    ax2.set_xlabel("attention sites kept")
    ax2.set_ylabel("latency (ms, eager PyTorch)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{len(chosen['kept'])} of {len(budget['order'])} site(s) kept within {budget['max_drop']:g} "
                 "point(s) of the teacher")
    fig.tight_layout()
    return _save(fig, path, {"curve": curve, "teacher_top1": budget["teacher_top1"],
                             "max_drop": budget["max_drop"]})
