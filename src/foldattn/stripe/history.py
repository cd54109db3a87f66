"""Stripe statistics across training epochs (the data; :mod:`~foldattn.stripe.monitor` records it)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
