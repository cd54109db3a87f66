"""Zero-cost conversion of a trained input-dependent attention model (the Stripe Observation
applied after training).

Zhong et al. (arXiv 2304.06345; ECCV 2024) observe that trained channel attention
produces nearly the same vector for every input. :func:`calibrate` takes that at its
word: it replaces each attention module by its *expected gate* over a calibration set,
a constant per-channel scale ``v = E_x[a(x)]`` (:class:`ChannelScale`), then folds that
scale into a neighbouring layer so the deployed model costs exactly the backbone:

- backward, into the layer that produced the attention's input when its only use is
  the attention: BatchNorm / GroupNorm affine (``gamma, beta <- v * gamma, v * beta``)
  or a conv's output channels (``W[c], b[c] <- v_c W[c], v_c b[c]``). This is this
  project's CIFAR ResNets (``block.attention`` right after ``bn2``/``bn3``) and timm's
  SE-ResNets;
- forward, into the conv that is the only consumer of the attention's output:
  ``W[:, c] <- v_c W[:, c]`` (input channels; grouped convs too). Exact because zero
  padding commutes with a per-channel scale. This is torchvision's MobileNetV3 /
  EfficientNet / RegNet, where SE sits between the depthwise conv + BN + activation
  and the 1x1 projection conv.

Where neither applies the :class:`ChannelScale` stays (one multiply). The data flow is
read from a ``torch.fx`` trace; where the model does not trace, from ``nn.Sequential``
neighbours. The fold is exact (tested); the *approximation* is replacing ``a(x)`` by
its mean, whose cost :func:`evaluate` measures and :func:`finetune` can recover.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import eval_mode, set_submodule, unwrap_model
from .asr import ASR, absorbing_parameters
from .attention import DIA
from .graph import build_graph
from .stripe import StripeResult, find_attention, record_stripes, select_sites
from .stripe.recorder import _device_of, _images, _to_model  # the recorder's batch handling, shared
from .transforms import scale_in_channels, scale_out_channels

__all__ = [
    "ChannelScale", "scale_in_channels", "FoldedLayer", "CalibrationReport", "calibrate", "constant_model",
    "fold_scales", "evaluate", "finetune",
]


class ChannelScale(nn.Module):
    """``x * scale`` with a constant per-channel ``scale`` on dim 1 (the calibrated attention).

    Args:
        scale: the ``(C,)`` vector, stored as a buffer.
        learnable: store it as a parameter instead (the student of :func:`foldattn.distill.distill`).
    """

    def __init__(self, scale: Tensor, learnable: bool = False) -> None:
        super().__init__()
        if scale.dim() != 1:
            raise ValueError(f"scale must be a vector (C,), got shape {tuple(scale.shape)}")
        self.learnable = learnable
        if learnable:
            self.scale = nn.Parameter(scale.detach().clone())
        else:
            self.register_buffer("scale", scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.scale.numel():
            raise ValueError(f"ChannelScale({self.scale.numel()}) expects (N, {self.scale.numel()}, ...), "
                             f"got {tuple(x.shape)}")
        return x * self.scale.reshape(-1, *([1] * (x.dim() - 2))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


# --------------------------------------------------------------------------------------
# Replacing attention by constants
# --------------------------------------------------------------------------------------
def _check_dia_chains(model: nn.Module, names: set[str]) -> None:
    dia = [(n, m) for n, m in model.named_modules() if isinstance(m, DIA) and not m.is_static]
    chosen = {n for n, _ in dia if n in names}
    if chosen and len(chosen) != len(dia):
        missing = [n for n, _ in dia if n not in chosen]
        raise ValueError(
            f"DIA blocks share one LSTM state along each stage, so they are calibrated together; "
            f"also select {missing} (or select no layer to calibrate them all)"
        )


def constant_model(model: nn.Module, result: StripeResult, inplace: bool = False) -> nn.Module:
    """``model`` with each layer of ``result`` replaced by :class:`ChannelScale` (its mean gate).

    A project CBAM loses its spatial half (position-dependent, it has no constant form), as in ASR.
    """
    model = unwrap_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    names = {x.name for x in result.layers}
    _check_dia_chains(model, names)
    available = {n for n, _ in model.named_modules()}
    for layer in result.layers:
        if layer.name not in available:
            raise ValueError(f"the model has no module {layer.name!r} (the stripe result is of another model)")
        old = model.get_submodule(layer.name)
        # parameter-free modules (GE without MLP) take the model's dtype and device
        ref = next(itertools.chain(old.parameters(), old.buffers(), model.parameters()), None)
        scale = torch.tensor(layer.gate.mean, dtype=ref.dtype if ref is not None else torch.float32)
        new = ChannelScale(scale.to(ref.device) if ref is not None else scale)
        if layer.name:
            set_submodule(model, layer.name, new)
        else:
            model = new
    return model


# --------------------------------------------------------------------------------------
# Folding the constants into neighbours
# --------------------------------------------------------------------------------------
@dataclass
class FoldedLayer:
    """Where one calibrated attention went: ``action`` is ``"into-norm"``, ``"into-conv-out"``,
    ``"into-conv-in"``, ``"into-asr-host"`` (folded into ``target``) or ``"kept"`` (a
    :class:`ChannelScale` remains)."""

    name: str
    action: str
    target: str | None
    gate_mean: float = float("nan")
    gate_mean_std: float = float("nan")


_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm)
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _absorbs_out(name: str, m: nn.Module | None) -> tuple[str, str] | None:
    """``(action, target)`` when the output channels of ``m`` (called ``name``) can absorb a scale."""
    if isinstance(m, ASR):  # an ASR layer scales its host's parameters; the host absorbs like it does
        return ("into-asr-host", f"{name}.host")
    # exact types only: subclasses (e.g. timm's BatchNormAct2d) may apply more after the affine map
    if type(m) in _NORMS and getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None:
        return ("into-norm", name)
    if type(m) in _CONVS:
        return ("into-conv-out", name)
    return None


def _absorbs_in(m: nn.Module | None) -> bool:
    return type(m) in _CONVS and m.padding_mode == "zeros"  # type: ignore[union-attr]


@torch.no_grad()
def _fold_out(m: nn.Module, v: Tensor) -> None:
    for pname in ("weight", "bias"):
        p = getattr(m, pname, None)
        if isinstance(p, Tensor):
            p.copy_(scale_out_channels(p, v, dim=0))


@torch.no_grad()
def _fold_asr_host(m: nn.Module, v: Tensor) -> None:
    # the parameters an ASR layer itself scales by its vector (dim 0 = output channel)
    for pname in absorbing_parameters(m):
        p = m.get_parameter(pname)
        p.copy_(scale_out_channels(p, v, dim=0))


_FOLDS = {"into-norm": _fold_out, "into-conv-out": _fold_out, "into-asr-host": _fold_asr_host}


@torch.no_grad()
def _fold_in(m: nn.Module, v: Tensor) -> None:
    m.weight.copy_(scale_in_channels(m.weight, v, m.groups))  # type: ignore[union-attr, operator]


def _plan(model: nn.Module, names: Sequence[str], example_inputs: Any = None) -> dict[str, tuple[str, str]]:
    """Where each scale can go, read from the model's dataflow graph (:mod:`foldattn.graph`): the
    layer that is its only input and whose only use it is (backward), else the conv that is its
    only reader (forward)."""
    graph, _ = build_graph(model, example_inputs, extra_leaves=(ChannelScale,))
    assert graph is not None  # the nn.Sequential fallback always gives one
    calls = graph.calls()
    plan: dict[str, tuple[str, str]] = {}
    for i in graph.module_nodes(ChannelScale):
        name = graph.nodes[i].target
        if name not in names or calls[name] != 1:
            continue
        src = graph.sole_producer(i)
        found = _absorbs_out(graph.nodes[src].target, graph.module(src)) if src is not None else None
        if found is not None:
            plan[name] = found
            continue
        dst = graph.sole_consumer(i)
        if dst is not None and _absorbs_in(graph.module(dst)):
            plan[name] = ("into-conv-in", graph.nodes[dst].target)
    return plan


def _plan_asr_classic(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A classic module inside an ASR layer ("ASR(X) + X" made by :func:`foldattn.attach`) scales the
    ASR layer's output, so the ASR host absorbs it exactly, like the ASR vector itself."""
    plan: dict[str, tuple[str, str]] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        if child == "classic" and parent_name and isinstance(model.get_submodule(parent_name), ASR):
            plan[name] = ("into-asr-host", f"{parent_name}.host")
    return plan


@torch.no_grad()
def fold_scales(model: nn.Module, example_inputs: Any = None) -> list[FoldedLayer]:
    """Fold every :class:`ChannelScale` of ``model`` (in place) into a neighbouring layer where exact.

    ``example_inputs`` (an input batch) lets the dataflow be recorded from one forward pass
    when the model does not trace. Returns one :class:`FoldedLayer` per scale, saying where it went.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, ChannelScale)]
    plan = _plan(model, names, example_inputs)
    plan.update(_plan_asr_classic(model, names))
    used: set[str] = set()
    out = []
    for name in names:
        scale: Tensor = model.get_submodule(name).scale  # type: ignore[assignment]
        action, target = plan.get(name, ("kept", None))
        if target is not None and target in used:  # never fold two scales into one layer's same side
            action, target = "kept", None
        if target is not None:
            layer = model.get_submodule(target)
            _FOLDS.get(action, _fold_in)(layer, scale)
            used.add(target)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else None
            if isinstance(parent, ASR) and child == "classic":
                parent.classic = None  # "ASR(X) + X" is now ASR(X): it folds to the plain host
            elif name:
                set_submodule(model, name, nn.Identity())
        out.append(FoldedLayer(name, action, target))
    return out


# --------------------------------------------------------------------------------------
# Accuracy and fine-tuning
# --------------------------------------------------------------------------------------
def evaluate(model: nn.Module, loader: Iterable[Any], max_images: int | None = None) -> dict[str, float]:
    """Top-1 accuracy (%), mean cross-entropy and image count of ``model`` (eval mode, restored) over
    ``loader`` (``(images, labels)`` batches): :func:`foldattn.train.evaluate`."""
    from .train.engine import evaluate as _evaluate

    return _evaluate(unwrap_model(model), loader, max_images=max_images)


def finetune(model: nn.Module, loader: Iterable[Any], epochs: int, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 1e-4) -> list[float]:
    """Train ``model`` (in place) with SGD and a cosine schedule for ``epochs``; mean loss per epoch.

    Meant for a few epochs on the folded model, to recover what replacing ``a(x)`` by its mean
    cost. Each step is :func:`foldattn.train.training_step`.
    """
    from .train.engine import batch_images, training_step

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    dev = _device_of(model)
    losses = []
    was_training = model.training
    model.train()
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            for batch in loader:
                x, y = batch_images(batch)
                loss, _ = training_step(model, _to_model(x, model, dev), y.to(dev), opt)
                total += float(loss) * x.shape[0]
                n += x.shape[0]
            if n == 0:
                raise ValueError("the fine-tuning loader yielded no images")
            sched.step()
            losses.append(total / n)
    finally:
        model.train(was_training)
    return losses


# --------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: per-layer fold actions, the calibration images, the stripes."""

    num_images: int
    layers: list[FoldedLayer]
    stripes: StripeResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def folded(self) -> int:
        return sum(x.action != "kept" for x in self.layers)

    def table(self) -> str:
        rows = [f"{'layer':<30} {'gate mean':>9} {'gate std':>9}  fold"]
        for x in self.layers:
            where = "kept as ChannelScale" if x.action == "kept" else f"{x.action} {x.target}"
            rows.append(f"{x.name:<30} {x.gate_mean:>9.4f} {x.gate_mean_std:>9.4f}  {where}")
        rows.append(f"{self.folded} of {len(self.layers)} attention modules folded away; "
                    f"calibrated on {self.num_images} images")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "folded": self.folded,
                "layers": [asdict(x) for x in self.layers], **self.extra}


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Iterable[str] | None = None,
    max_images: int | None = None,
    fold: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, CalibrationReport]:
    """Turn input-dependent channel attention into zero-cost constants.

    Records the mean gate ``E_x[a(x)]`` of each attention module over ``loader``
    (:func:`~foldattn.stripe.record_stripes`), replaces the module by that constant
    (:class:`ChannelScale`) and, with ``fold=True``, folds it into a neighbouring layer
    (:func:`fold_scales`).

    Args:
        model: a trained model with supported attention modules (any kind
            :func:`~foldattn.stripe.find_attention` finds).
        loader: calibration images (``(images, labels)`` or image batches).
        layers: names or glob patterns of the modules to convert (default all).
        max_images: calibration images to use (default the whole loader).
        fold: fold the constants; otherwise leave :class:`ChannelScale` modules.
        inplace: modify ``model``; by default a deep copy is converted.

    Returns:
        ``(converted model, CalibrationReport)``.
    """
    model = unwrap_model(model)
    select_sites(find_attention(model), layers)  # clear errors before any data is read
    result = record_stripes(model, loader, layers=layers, max_images=max_images, max_samples=0)
    converted = constant_model(model, result, inplace=inplace)
    summaries = result.summary()
    if fold:
        example = None  # lets the dataflow be recorded where the model does not trace
        if not isinstance(loader, Iterator):  # a one-shot iterator was consumed by the recording
            batch = next(iter(loader), None)
            if batch is not None:
                example = _to_model(_images(batch)[:2], converted, _device_of(converted))
        with eval_mode(converted):
            folded = fold_scales(converted, example)
    else:
        folded = [FoldedLayer(x.name, "kept", None) for x in result.layers]
    for f in folded:
        f.gate_mean = summaries[f.name]["gate_mean"]
        f.gate_mean_std = summaries[f.name]["gate_mean_std"]
    return converted, CalibrationReport(result.num_images, folded, result)
