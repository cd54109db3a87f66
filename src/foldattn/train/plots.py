"""Training curves as a PNG (matplotlib, from the ``train`` extra)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .._utils import atomic_path, require

__all__ = ["write_curves", "require_matplotlib", "save_png"]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError naming the extra to install."""
    matplotlib = require("matplotlib", "train")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def write_curves(path: Path, runs: dict[str, list[dict[str, float]]], title: str = "") -> None:
    """A PNG with loss and top-1 curves (train dashed, validation solid) of one or more runs."""
    plt = require_matplotlib()

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, hist) in enumerate(runs.items()):
        if not hist:
            continue
        color = f"C{i}"
        ep = [h["epoch"] for h in hist]
        a.plot(ep, [h["train_loss"] for h in hist], "--", color=color, alpha=0.7)
        a.plot(ep, [h["val_loss"] for h in hist], "-", color=color, label=label)
        b.plot(ep, [h["train_top1"] for h in hist], "--", color=color, alpha=0.7)
        b.plot(ep, [h["val_top1"] for h in hist], "-", color=color, label=label)
    a.set(xlabel="epoch", ylabel="loss (-- train, - val)", yscale="log")
    b.set(xlabel="epoch", ylabel="top-1 % (-- train, - val, folded)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    save_png(fig, path)


def save_png(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it as a PNG atomically (rendered first, then one write and a rename), close it."""
    plt = require_matplotlib()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
