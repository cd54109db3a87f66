"""Streaming statistics of attention vectors and the per-layer results (pure tensor code and
plain data; JSON in and out)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._utils import atomic_path


# --------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------
class _Moments:
    """Per-channel count, mean and sum of squared deviations (Welford/Chan, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.lo = math.inf
        self.hi = -math.inf

    def update(self, x: Tensor) -> None:
        """Merge a batch ``(B, C)`` (Chan et al.'s parallel update)."""
        b = x.shape[0]
        if b == 0:
            return
        bmean = x.mean(dim=0)
        bm2 = ((x - bmean) ** 2).sum(dim=0)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = b, bmean, bm2
            return
        if self.mean.shape != bmean.shape:
            raise ValueError(f"the attention vector changed size from {self.mean.numel()} to {bmean.numel()}")
        n = self.n + b
        delta = bmean - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * b / n)
        self.n = n

    def stats(self) -> ChannelStats:
        if self.mean is None or self.m2 is None:
            return ChannelStats(0, [], [])
        std = (self.m2 / self.n).clamp_min(0).sqrt()
        return ChannelStats(self.n, self.mean.tolist(), std.tolist(), self.lo, self.hi)


class _Reservoir:
    """Algorithm R over image indices: which images to keep, shared by every layer."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.indices: list[int] = []
        self.gen = torch.Generator().manual_seed(seed)

    def offer(self, batch: int) -> list[tuple[int, int]]:
        """``(slot, row)`` pairs: row ``row`` of this batch goes to slot ``slot``."""
        out = []
        for row in range(batch):
            i = self.seen
            self.seen += 1
            if i < self.size:
                self.indices.append(i)
                out.append((i, row))
            else:
                j = int(torch.randint(0, i + 1, (1,), generator=self.gen))
                if j < self.size:
                    self.indices[j] = i
                    out.append((j, row))
        return out


def stripe_score(mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> float:
    """Share of the variance of an images x channels matrix explained by the channel: in [0, 1].

    With per-channel means ``m_c`` and standard deviations ``s_c`` across images, the
    total (population) variance of all values splits into a between-channel part
    ``var_c(m_c)`` and a within-channel part ``mean_c(s_c**2)``. The score is
    ``var_c(m_c) / (var_c(m_c) + mean_c(s_c**2))``, the correlation ratio eta^2 of a
    one-way ANOVA with the channel as factor. 1: every column is constant (perfect
    vertical stripes); 0: all channels have the same mean and values vary only across
    images. Scale-free, so gates and descriptors compare. A matrix with no variance at
    all (every value equal) scores 1.
    """
    m = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64)
    if m.numel() == 0:
        return float("nan")
    between = float(m.var(unbiased=False))
    within = float((s**2).mean())
    total = between + within
    if total <= 0 or not math.isfinite(total):
        return 1.0 if total == 0 else float("nan")
    return min(1.0, max(0.0, between / total))


def constancy(mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> float:
    """How constant a gate with values in [0, 1] is across images: in [0, 1], 1 = constant.

    ``1 - mean_c(s_c) / mean_c(sqrt(m_c (1 - m_c)))``: a variable in [0, 1] with mean ``m``
    has standard deviation at most ``sqrt(m (1 - m))`` (Bhatia-Davis), reached when it
    only takes the values 0 and 1; the score is one minus the spread as a share of that
    ceiling. Unlike :func:`stripe_score` it does not ask the channels to differ: a gate
    stuck at 0.5 in every channel is constant (1) but shows no stripes (0). Only meaningful
    for gates in [0, 1] (sigmoid, hard sigmoid, DIA); callers pass NaN otherwise.
    """
    m = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64)
    if m.numel() == 0:
        return float("nan")
    ceiling = float((m * (1 - m)).clamp_min(0).sqrt().mean())
    if ceiling <= 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - float(s.mean()) / ceiling))


@dataclass
class ChannelStats:
    """Per-channel mean and std across images (population std, float64) of ``count`` vectors,
    and the smallest and largest value seen."""

    count: int
    mean: list[float]
    std: list[float]
    min: float = math.nan
    max: float = math.nan

    def summary(self) -> dict[str, float]:
        """Mean / median / max over channels of the std, mean over channels of the mean,
        :func:`stripe_score` and :func:`constancy` (NaN when values leave [0, 1])."""
        if not self.std:
            keys = ("mean_std", "median_std", "max_std", "mean", "stripe_score", "constancy")
            return {k: float("nan") for k in keys}
        s = torch.tensor(self.std, dtype=torch.float64)
        in_unit = self.min >= 0.0 and self.max <= 1.0
        return {
            "mean_std": float(s.mean()),
            "median_std": float(s.median()),
            "max_std": float(s.max()),
            "mean": float(torch.tensor(self.mean, dtype=torch.float64).mean()),
            "stripe_score": stripe_score(self.mean, self.std),
            "constancy": constancy(self.mean, self.std) if in_unit else float("nan"),
        }


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
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")


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
                x["name"], x["kind"], int(x["channels"]), ChannelStats(**x["gate"]), ChannelStats(**x["descriptor"]),
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
        with open(path) as f:
            return cls.from_dict(json.load(f))
