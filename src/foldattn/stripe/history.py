"""Stripe statistics across training epochs, and the training-loop monitor that records them."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters import AttentionSite, find_attention, select_sites
from .recorder import record_stripes
from .results import StripeResult, _nan, _write_json

# --------------------------------------------------------------------------------------
# Over training
# --------------------------------------------------------------------------------------
_HISTORY_FORMAT = "foldattn.stripe-history/1"


@dataclass
class StripeHistory:
    """Per-layer summaries of successive :class:`StripeResult` s, keyed by epoch.

    Only summaries and per-channel std are kept (no samples), so a long run stays small.

    Example (inside a training loop):
        >>> history = StripeHistory()                                        # doctest: +SKIP
        >>> if epoch % every == 0:                                           # doctest: +SKIP
        ...     history.append(epoch, record_stripes(model, val_loader, max_images=512))
        ...     history.save(out / "stripe_history.json"); plot_history(history, out / "stripe_curves.png")
    """

    epochs: list[float] = field(default_factory=list)
    records: list[dict[str, dict[str, Any]]] = field(default_factory=list)

    def append(self, epoch: float, result: StripeResult) -> None:
        """Add the summaries of ``result`` recorded at ``epoch`` (epochs must increase)."""
        if self.epochs and epoch <= self.epochs[-1]:
            raise ValueError(f"epochs must increase: got {epoch} after {self.epochs[-1]}")
        self.epochs.append(epoch)
        self.records.append({
            x.name: {**x.summary(), "gate_std": list(x.gate.std), "num_images": result.num_images}
            for x in result.layers
        })

    def __len__(self) -> int:
        return len(self.epochs)

    def layer_names(self) -> list[str]:
        """Every layer seen, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def series(self, metric: str = "gate_mean_std") -> dict[str, list[float]]:
        """``{layer: [metric at each epoch]}`` (NaN where a layer is missing)."""
        out = {}
        for name in self.layer_names():
            out[name] = [float(r[name].get(metric, math.nan)) if name in r else math.nan for r in self.records]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": _HISTORY_FORMAT, "epochs": list(self.epochs), "records": list(self.records)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StripeHistory:
        if data.get("format") != _HISTORY_FORMAT:
            raise ValueError(f"not a stripe history (format {data.get('format')!r}, expected {_HISTORY_FORMAT!r})")
        return cls(list(data["epochs"]), [_nan(r) for r in data["records"]])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON (atomically)."""
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StripeHistory:
        """Read a history file (bounded, structure checked: ``ValueError`` naming the file otherwise)."""
        from .._files import load_json_file

        data = load_json_file(path, "stripe history", 64 << 20)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"stripe history {path}: not a history foldattn wrote ({type(e).__name__}: {e})") from None


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
        from .plots import plot_heatmaps, plot_history

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
