"""Recording attention vectors over a data loader (:func:`record_stripes`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import eval_mode, unwrap_model
from .adapters import AttentionSite, Tap, find_attention, select_sites
from .results import LayerStripes, StripeResult
from .statistics import _Moments, _Reservoir


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------
class _LayerAccumulator:
    def __init__(self, site: AttentionSite, samples: int) -> None:
        self.site = site
        self.tap = Tap()
        self.gate, self.descriptor = _Moments(), _Moments()
        self.samples = samples
        # slot -> vector, filled as images are seen: memory follows the images recorded, not max_samples
        self.gate_sample: dict[int, Tensor] = {}
        self.descriptor_sample: dict[int, Tensor] = {}
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
        def rows(sample: dict[int, Tensor]) -> list[list[float]]:
            return [sample[i].tolist() for i in order if i in sample]

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
