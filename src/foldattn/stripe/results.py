"""What a recording produces: :class:`LayerStripes` per attention module and the
:class:`StripeResult` of a model (plain data, JSON in and out)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .._utils import write_json
from .statistics import ChannelStats


@dataclass
class LayerStripes:
    """What was recorded for one attention module.

    ``gate`` is the attention vector ``a(x)``; ``descriptor`` the module's globally
    average-pooled input. ``*_sample`` rows are the reservoir-sampled images
    (``StripeResult.sample_indices`` gives which).
    """

    name: str
    kind: str
    channels: int
    gate: ChannelStats
    descriptor: ChannelStats
    gate_sample: list[list[float]] = field(default_factory=list)
    descriptor_sample: list[list[float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Flat summary: ``gate_*`` and ``descriptor_*`` keys of :meth:`ChannelStats.summary`."""
        out = {f"gate_{k}": v for k, v in self.gate.summary().items()}
        out.update({f"descriptor_{k}": v for k, v in self.descriptor.summary().items()})
        return out


_FORMAT = "foldattn.stripe/1"


def _write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Strict JSON (NaN as ``null``, like every file foldattn writes), atomically."""
    write_json(path, data)


def _nan(value: Any) -> Any:
    """``null`` read back as NaN (statistics of empty or out-of-range gates), in lists and mappings too."""
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan(v) for k, v in value.items()}
    return value


@dataclass
class StripeResult:
    """Statistics of every recorded layer over ``num_images`` images (JSON-serialisable)."""

    num_images: int
    layers: list[LayerStripes]
    sample_indices: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> LayerStripes:
        """The layer called ``name``; ``KeyError`` lists the recorded names."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no recorded layer {name!r}; recorded: {', '.join(x.name for x in self.layers)}")

    def summary(self) -> dict[str, dict[str, float]]:
        """``{layer name: LayerStripes.summary()}``."""
        return {x.name: x.summary() for x in self.layers}

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        head = (f"{'layer':<28} {'C':>5} {'gate mean':>9} {'gate std':>9} {'max std':>8} {'constancy':>9} "
                f"{'stripes':>7} {'desc stripes':>12}")
        rows = [head, "-" * len(head)]
        for x in self.layers:
            s = x.summary()
            rows.append(
                f"{x.name:<28} {x.channels:>5} {s['gate_mean']:>9.4f} {s['gate_mean_std']:>9.4f} "
                f"{s['gate_max_std']:>8.4f} {s['gate_constancy']:>9.3f} {s['gate_stripe_score']:>7.3f} "
                f"{s['descriptor_stripe_score']:>12.3f}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "num_images": self.num_images,
            "sample_indices": list(self.sample_indices),
            "meta": dict(self.meta),
            "layers": [
                {
                    "name": x.name, "kind": x.kind, "channels": x.channels, "summary": x.summary(),
                    "gate": asdict(x.gate), "descriptor": asdict(x.descriptor),
                    "gate_sample": x.gate_sample, "descriptor_sample": x.descriptor_sample,
                }
                for x in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StripeResult:
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a stripe result (format {data.get('format')!r}, expected {_FORMAT!r})")
        layers = [
            LayerStripes(
                x["name"], x["kind"], int(x["channels"]),
                ChannelStats(**{k: _nan(v) for k, v in x["gate"].items()}),
                ChannelStats(**{k: _nan(v) for k, v in x["descriptor"].items()}),
                x.get("gate_sample", []), x.get("descriptor_sample", []),
            )
            for x in data["layers"]
        ]
        return cls(int(data["num_images"]), layers, list(data.get("sample_indices", [])), dict(data.get("meta", {})))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON (atomically)."""
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StripeResult:
        """Read a result file (bounded, structure checked: ``ValueError`` naming the file otherwise)."""
        from .._files import load_json_file

        data = load_json_file(path, "stripe result", 256 << 20)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"stripe result {path}: not a result foldattn wrote ({type(e).__name__}: {e})") from None
