"""Statistics of attention vectors, pure tensor code: streaming per-channel moments, the
reservoir of sampled images, :func:`stripe_score`, :func:`constancy` and :class:`ChannelStats`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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
