"""The Stripe Observation: measure how constant a model's channel-attention vectors are.

Zhong et al. (arXiv 2304.06345; ECCV 2024, "Stripe Observation Guided Inference
Cost-free Attention Mechanism") observe that the attention vector ``a(x)`` a channel
attention module produces becomes nearly the same for every input: drawn as an
images x channels matrix it shows vertical stripes. This module records, over a data
loader, the gate ``a(x)`` (not ``x * a``) of every channel-attention module of a model
and the module's input descriptor (its globally average-pooled input), with streaming
float64 statistics (bounded memory) and a fixed-size reservoir sample of vectors for
pictures.

Per layer it reports, for the gate and for the descriptor:

- the per-channel mean and standard deviation across images (the paper's statistic);
- their summary (mean, median and max over channels of the std);
- the *stripe score* :func:`stripe_score` in [0, 1]: the share of the total variance
  of the images x channels matrix that the channel identity explains (1 = perfect
  vertical stripes, 0 = no channel structure at all). See ``docs/stripe.md``.

>>> result = record_stripes(model, loader, max_images=512)      # doctest: +SKIP
>>> print(result.table())                                        # doctest: +SKIP
>>> history = StripeHistory(); history.append(epoch, result)     # doctest: +SKIP

Supported modules are found through a registry of :class:`AttentionKind` (see
:func:`attention_kinds`, :func:`register_kind`): this project's classic
:class:`~foldattn.attention.ChannelAttention` modules, torchvision's
``SqueezeExcitation`` and timm's SE / effective SE / ECA / CECA / CBAM channel gates
and EfficientNet ``SqueezeExcite``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_path, eval_mode, unwrap_model
from ..attention import ChannelAttention

__all__ = [
    "AttentionKind", "AttentionSite", "Tap", "register_kind", "attention_kinds", "find_attention", "select_sites",
    "stripe_score", "constancy", "ChannelStats", "LayerStripes", "StripeResult", "StripeRecorder", "record_stripes",
    "StripeHistory", "StripeMonitor", "NoAttentionError",
]


class NoAttentionError(ValueError):
    """The model has no channel-attention module of a supported kind."""


# --------------------------------------------------------------------------------------
# What a hook delivers: the gate and the descriptor of each call, per forward pass
# --------------------------------------------------------------------------------------
class Tap:
    """Receives the gates ``(N, C)`` and descriptors ``(N, C)`` a module produces in one forward.

    An :class:`AttentionKind`'s hooks call :meth:`add_gate` and :meth:`add_descriptor`.
    """

    def __init__(self) -> None:
        self.gates: list[Tensor] = []
        self.descriptors: list[Tensor] = []

    def add_gate(self, t: Tensor) -> None:
        self.gates.append(t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64))

    def add_descriptor(self, t: Tensor) -> None:
        self.descriptors.append(t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64))

    def take(self) -> tuple[list[Tensor], list[Tensor]]:
        """What was caught so far; empties the tap."""
        out = (self.gates, self.descriptors)
        self.gates, self.descriptors = [], []
        return out


class _Handle:
    """Removable handle for a method patched on one instance."""

    def __init__(self, module: nn.Module, attr: str) -> None:
        self.module, self.attr = module, attr

    def remove(self) -> None:
        self.module.__dict__.pop(self.attr, None)


def _pooled(x: Tensor) -> Tensor:
    return x.flatten(2).mean(dim=2)


def _descriptor_pre_hook(tap: Tap) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 3:
            tap.add_descriptor(_pooled(args[0]))

    return hook


def _output_hook(add: Callable[[Tensor], None]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor):
            add(out)

    return hook


@dataclass(frozen=True)
class AttentionKind:
    """One kind of channel-attention module the recorder knows how to tap.

    Args:
        name: short identifier, e.g. ``"torchvision.SqueezeExcitation"``.
        matches: ``matches(module) -> bool``.
        attach: ``attach(module, tap) -> handles``: hooks that call ``tap.add_gate``
            with the gate ``(N, C, ...)`` and ``tap.add_descriptor`` with the pooled input.
        channels: ``channels(module) -> C``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    attach: Callable[[nn.Module, Tap], list[Any]]
    channels: Callable[[nn.Module], int]


_KINDS: list[AttentionKind] = []


def register_kind(kind: AttentionKind) -> AttentionKind:
    """Add a kind of attention module to the search (kinds are tried in registration order)."""
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"attention kind {kind.name!r} is already registered")
    _KINDS.append(kind)
    return kind


def attention_kinds() -> list[str]:
    """Names of the kinds of attention module :func:`find_attention` searches for."""
    return [k.name for k in _KINDS]


# --- this project's classic ChannelAttention -------------------------------------------
def _is_foldattn(m: nn.Module) -> bool:
    return isinstance(m, ChannelAttention) and not m.is_static


def _attach_foldattn(m: nn.Module, tap: Tap) -> list[Any]:
    original = type(m).gate.__get__(m)  # the class's gate, bound to this instance

    def gate(d: Tensor) -> Tensor:
        a = original(d)
        tap.add_gate(a)
        return a

    m.__dict__["gate"] = gate  # instance attribute shadows the method until removed
    return [_Handle(m, "gate"), m.register_forward_pre_hook(_descriptor_pre_hook(tap))]


register_kind(AttentionKind("foldattn", _is_foldattn, _attach_foldattn, lambda m: int(m.channels)))


# --- torchvision SqueezeExcitation (MobileNetV3, EfficientNet, RegNet) -------------------
def _is_torchvision_se(m: nn.Module) -> bool:
    try:
        from torchvision.ops import SqueezeExcitation
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(m, SqueezeExcitation)


def _attach_torchvision_se(m: nn.Module, tap: Tap) -> list[Any]:
    return [
        m.avgpool.register_forward_hook(_output_hook(tap.add_descriptor)),
        m.scale_activation.register_forward_hook(_output_hook(tap.add_gate)),
    ]


register_kind(AttentionKind(
    "torchvision.SqueezeExcitation", _is_torchvision_se, _attach_torchvision_se, lambda m: int(m.fc2.out_channels)
))


# --- timm channel gates: the module's `gate` submodule holds the attention ---------------
def _timm_classes() -> tuple[tuple[type[nn.Module], ...], tuple[type[nn.Module], ...]]:
    """``(supported, excluded)`` timm classes; empty without timm."""
    if "timm" not in sys.modules:  # a model built with timm has imported it; never import it ourselves
        return (), ()
    try:
        from timm.layers.cbam import ChannelAttn, LightChannelAttn
        from timm.layers.eca import CecaModule, EcaModule
        from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
        from timm.models._efficientnet_blocks import SqueezeExcite
    except ImportError:  # pragma: no cover - another timm layout
        return (), ()
    # LightChannelAttn subclasses ChannelAttn but applies F.sigmoid, not its `gate`
    return (SEModule, EffectiveSEModule, EcaModule, CecaModule, ChannelAttn, SqueezeExcite), (LightChannelAttn,)


def _is_timm_gate(m: nn.Module) -> bool:
    supported, excluded = _timm_classes()
    return (bool(supported) and isinstance(m, supported) and not isinstance(m, excluded)
            and isinstance(getattr(m, "gate", None), nn.Module))


def _attach_timm_gate(m: nn.Module, tap: Tap) -> list[Any]:
    return [
        m.register_forward_pre_hook(_descriptor_pre_hook(tap)),
        m.gate.register_forward_hook(_output_hook(tap.add_gate)),
    ]


def _timm_channels(m: nn.Module) -> int:
    for attr in ("fc2", "fc", "conv_expand"):
        sub = getattr(m, attr, None)
        if isinstance(sub, nn.Conv2d):
            return int(sub.out_channels)
    return -1  # ECA: only known once it runs


register_kind(AttentionKind("timm (SEModule, EffectiveSEModule, EcaModule, CecaModule, CBAM ChannelAttn, "
                            "EfficientNet SqueezeExcite)", _is_timm_gate, _attach_timm_gate, _timm_channels))


# --------------------------------------------------------------------------------------
# Finding and selecting the modules
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a model: its dotted name, the module, and its kind."""

    name: str
    module: nn.Module
    kind: AttentionKind


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every supported channel-attention module of ``model``, in module order.

    ASR layers (static attention, constant by construction) are not included.

    Raises:
        NoAttentionError: none found; the message lists the kinds searched for.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    sites = []
    for name, m in unwrap_model(model).named_modules():
        kind = next((k for k in _KINDS if k.matches(m)), None)
        if kind is not None:
            sites.append(AttentionSite(name, m, kind))
    if not sites:
        raise NoAttentionError(
            f"no input-dependent channel-attention module found in {type(model).__name__}; searched for: "
            + "; ".join(attention_kinds())
            + ". (ASR layers are constant by construction and are not recorded; register another kind "
            "with foldattn.stripe.register_kind.)"
        )
    return sites


def select_sites(sites: Sequence[AttentionSite], layers: Iterable[str] | None) -> list[AttentionSite]:
    """The sites whose name equals, or matches as a glob pattern (``layer1.*``), one of ``layers``.

    Raises:
        ValueError: a pattern matches nothing (the available names are listed).
    """
    if layers is None:
        return list(sites)
    patterns = [p for p in layers if p]
    if not patterns:
        return list(sites)
    names = [s.name for s in sites]
    unmatched = [p for p in patterns if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(
            f"layer name(s) {unmatched} match no attention module; available: {', '.join(names)} "
            "(exact names or glob patterns such as 'layer2.*')"
        )
    return [s for s in sites if any(s.name == p or fnmatch.fnmatchcase(s.name, p) for p in patterns)]


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


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------
class _LayerAccumulator:
    def __init__(self, site: AttentionSite, samples: int) -> None:
        self.site = site
        self.tap = Tap()
        self.gate, self.descriptor = _Moments(), _Moments()
        self.samples = samples
        self.gate_sample: list[Tensor | None] = [None] * samples
        self.descriptor_sample: list[Tensor | None] = [None] * samples
        self.channels = site.kind.channels(site.module)

    def consume(self, batch: int, picks: list[tuple[int, int]]) -> None:
        gates, descs = self.tap.take()
        if not gates:
            return
        g = torch.cat(gates)
        d = torch.cat(descs) if descs else None
        if g.shape[0] % batch:
            raise RuntimeError(
                f"attention layer {self.site.name!r} produced {g.shape[0]} gate vectors for a batch of {batch} images"
            )
        if self.channels < 0:
            self.channels = g.shape[1]
        self.gate.update(g)
        if d is not None:
            self.descriptor.update(d)
        for slot, row in picks:  # the first call's vectors only
            self.gate_sample[slot] = g[row].float()
            if d is not None and d.shape[0] >= batch:
                self.descriptor_sample[slot] = d[row].float()

    def result(self, order: list[int]) -> LayerStripes:
        def rows(sample: list[Tensor | None]) -> list[list[float]]:
            return [sample[i].tolist() for i in order if sample[i] is not None]  # type: ignore[union-attr]

        return LayerStripes(
            self.site.name, self.site.kind.name.split(" ")[0], self.channels, self.gate.stats(),
            self.descriptor.stats(), rows(self.gate_sample), rows(self.descriptor_sample),
        )


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    elif isinstance(batch, Mapping):
        key = next((k for k in ("image", "images", "input", "inputs", "x", "pixel_values") if k in batch), None)
        if key is None:
            raise TypeError(f"cannot find the images in a batch dict with keys {sorted(batch)}; use key 'image'")
        x = batch[key]
    else:
        raise TypeError(
            f"the loader must yield image tensors, (images, labels) pairs or dicts; got {type(batch).__name__}"
        )
    if not isinstance(x, Tensor) or x.dim() < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a batch of images (N, C, H, W), got {shape}")
    return x


class StripeRecorder:
    """Hooks that record the attention of ``model`` while it runs; a context manager.

    Args:
        model: any model holding supported attention modules (:func:`find_attention`).
        layers: names or glob patterns of the layers to record (default all).
        max_samples: images whose vectors are kept (reservoir sample) for pictures.
        seed: seed of the reservoir sample.

    Example:
        >>> with StripeRecorder(model) as rec:                # doctest: +SKIP
        ...     for x, _ in loader:
        ...         model(x); rec.step(x.shape[0])
        >>> result = rec.result()                              # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None, max_samples: int = 64,
                 seed: int = 0) -> None:
        if max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        self.sites = select_sites(find_attention(model), layers)
        self._acc = [_LayerAccumulator(s, max_samples) for s in self.sites]
        self._reservoir = _Reservoir(max_samples, seed)
        self._handles: list[Any] = []
        self.num_images = 0

    def __enter__(self) -> StripeRecorder:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Install the hooks (idempotent)."""
        if not self._handles:
            for acc in self._acc:
                self._handles += acc.site.kind.attach(acc.site.module, acc.tap)

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def discard(self) -> None:
        """Drop what the hooks caught since the last :meth:`step` (e.g. a failed forward)."""
        for acc in self._acc:
            acc.tap.take()

    def step(self, batch: int) -> None:
        """Fold the vectors of the last forward pass (``batch`` images) into the statistics."""
        picks = self._reservoir.offer(batch)
        for acc in self._acc:
            acc.consume(batch, picks)
        self.num_images += batch

    def result(self, meta: Mapping[str, Any] | None = None) -> StripeResult:
        """The statistics so far. Layers that never ran are dropped with a warning."""
        if self.num_images == 0:
            raise ValueError("no image was recorded: the loader yielded nothing")
        order = sorted(range(len(self._reservoir.indices)), key=lambda i: self._reservoir.indices[i])
        layers = []
        for acc in self._acc:
            if acc.gate.n == 0:
                warnings.warn(f"attention layer {acc.site.name!r} never ran; left out", stacklevel=2)
                continue
            layers.append(acc.result(order))
        if not layers:
            raise ValueError("none of the selected attention layers ran during the forward passes")
        return StripeResult(self.num_images, layers, sorted(self._reservoir.indices), dict(meta or {}))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_model(x: Tensor, model: nn.Module, device: torch.device) -> Tensor:
    """``x`` on ``device``; floating images also in the dtype of the model's parameters."""
    p = next(model.parameters(), None)
    if p is not None and x.is_floating_point() and p.is_floating_point():
        return x.to(device=device, dtype=p.dtype)
    return x.to(device)


@torch.no_grad()
def record_stripes(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Iterable[str] | None = None,
    max_images: int | None = None,
    max_samples: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> StripeResult:
    """Run ``model`` (in eval mode, restored afterwards) over ``loader`` and record its attention.

    The training loop can call this every N epochs and pass the result to
    :meth:`StripeHistory.append`.

    Args:
        model: a model with channel-attention modules (any supported kind).
        loader: yields image tensors ``(N, C, H, W)``, ``(images, labels)`` or dicts with ``"image"``.
        layers: names or glob patterns of the layers to record (default all).
        max_images: stop after this many images (default: the whole loader).
        max_samples: images whose vectors are kept for pictures.
        seed: seed of the reservoir sample.
        device: where to run (default: the model's parameters' device).

    Returns:
        A :class:`StripeResult`.

    Raises:
        NoAttentionError: the model has no supported attention module.
        ValueError: no layer matches ``layers``; the loader yields nothing; images the model cannot take.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    model = unwrap_model(model)
    dev = torch.device(device) if device is not None else _device_of(model)
    rec = StripeRecorder(model, layers, max_samples=max_samples, seed=seed)
    with eval_mode(model), rec:
        for batch in loader:
            x = _images(batch)
            if max_images is not None:
                x = x[: max_images - rec.num_images]
            try:
                model(_to_model(x, model, dev))
            except (RuntimeError, ValueError) as e:
                rec.discard()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(
                    f"the model cannot run on images of shape {tuple(x.shape)}: {first}. "
                    "Check the dataset's channels and size against the model's input."
                ) from None
            rec.step(x.shape[0])
            if max_images is not None and rec.num_images >= max_images:
                break
    return rec.result({"model": type(model).__name__, "max_images": max_images, "seed": seed})


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
        return cls(list(data["epochs"]), list(data["records"]))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON (atomically)."""
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StripeHistory:
        with open(path) as f:
            return cls.from_dict(json.load(f))


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
