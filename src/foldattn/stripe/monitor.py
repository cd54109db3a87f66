"""The training-loop monitor: records the stripe statistics every few epochs, keeps their history and
draws it (:mod:`~foldattn.stripe.history` holds the data, :mod:`~foldattn.stripe.plots` the drawing)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from .adapters import AttentionSite, find_attention, select_sites
from .history import StripeHistory
from .plots import plot_heatmaps, plot_history
from .recorder import record_stripes
from .results import StripeResult

__all__ = ["StripeMonitor"]


class StripeMonitor:
    """Training callback behind ``foldattn train --stripe-every N``.

    Every ``every`` epochs it records the model's attention over ``loader`` (eval mode,
    restored), appends the summaries to a :class:`StripeHistory` and (re)writes, in
    ``output_dir``: ``stripe_history.json``, ``stripe_curves.png/.json`` (statistic vs
    epoch), ``stripes.json`` and ``stripe_heatmaps.png/.json`` (the latest record). An
    existing ``stripe_history.json`` is continued (a resumed run replaces the epochs it
    replays). Call it on one process only (rank 0 under DDP).

    Example:
        >>> monitor = StripeMonitor(every=5, output_dir=run_dir)          # doctest: +SKIP
        >>> monitor.check(model)             # fail before training if there is nothing to record
        >>> for epoch in range(1, epochs + 1):                            # doctest: +SKIP
        ...     train_one_epoch(...)
        ...     monitor(epoch, model, val_loader)
    """

    def __init__(self, every: int, output_dir: str | os.PathLike[str], max_images: int = 512, max_samples: int = 64,
                 layers: Iterable[str] | None = None, seed: int = 0) -> None:
        if every < 1:
            raise ValueError(f"--stripe-every must be >= 1 epoch, got {every}")
        from pathlib import Path

        self.every, self.out = every, Path(output_dir)
        self.max_images, self.max_samples, self.seed = max_images, max_samples, seed
        self.layers = list(layers) if layers is not None else None
        path = self.out / "stripe_history.json"
        self.history = StripeHistory.load(path) if path.exists() else StripeHistory()

    def check(self, model: nn.Module) -> list[AttentionSite]:
        """The sites that will be recorded; raises :class:`NoAttentionError` / ``ValueError`` now, not mid-run."""
        return select_sites(find_attention(model), self.layers)

    def __call__(self, epoch: int, model: nn.Module, loader: Iterable[Any]) -> StripeResult | None:
        """Record at epochs divisible by ``every`` (and write the files); otherwise do nothing."""
        if epoch % self.every:
            return None
        result = record_stripes(model, loader, layers=self.layers, max_images=self.max_images,
                                max_samples=self.max_samples, seed=self.seed)
        result.meta["epoch"] = epoch
        keep = [i for i, e in enumerate(self.history.epochs) if e < epoch]  # a resumed run replays later epochs
        self.history = StripeHistory([self.history.epochs[i] for i in keep], [self.history.records[i] for i in keep])
        self.history.append(epoch, result)
        self.out.mkdir(parents=True, exist_ok=True)
        self.history.save(self.out / "stripe_history.json")
        plot_history(self.history, self.out / "stripe_curves.png")
        result.save(self.out / "stripes.json")
        if self.max_samples > 0:
            plot_heatmaps(result, self.out / "stripe_heatmaps.png")
        return result
