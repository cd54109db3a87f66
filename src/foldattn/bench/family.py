"""What the benchmark builds: model families (a backbone with and without attention) and the variants measured.

A :class:`Family` knows how to build its backbone plain, with a classic attention X,
with ASR(X) and with ASR(X)+X. The families live in a :class:`~foldattn._registry.Registry`
(``--models`` names); every model of :func:`foldattn.models.list_models` and the
torchvision ResNet-18/50 are registered on import, and ``timm:NAME`` / ``torchvision:NAME``
name any model of those libraries (built untrained, attention placed by :func:`foldattn.attach`).
A :class:`Variant` is one form of the network built from a family and an attention name
(:data:`VARIANTS`). foldattn's own models also carry a ``reference``: the same plain network
written the usual way (:mod:`.reference`), timed beside plain; the re-parameterization
backbones a ``reference_deployed`` too, their deployed network written the usual way.

(The module is ``family``, not ``families``: ``foldattn.bench.families`` is the function.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from .. import attention as _attention
from .._registry import Registry
from .._utils import check_external_name, require, set_submodule
from ..asr import ASR, host_channels
from ..attach import attach, find_sites
from ..fold import fold
from ..models import create_model, list_models

__all__ = [
    "Builder", "Family", "FAMILIES", "register_family", "unregister_family", "list_families", "families", "get_family",
    "Variant", "VARIANTS", "ONNX_ROWS", "RUNTIMES", "RUNTIME_VARIANTS", "runtime_rows",
]

#: ``build(attention, asr, both)``: the model without attention (``attention=None``), with
#: classic X, with ASR(X), or with ASR(X)+X
Builder = Callable[[str | None, bool, bool], nn.Module]


@dataclass(frozen=True)
class Family:
    """A backbone the benchmark knows how to build with and without attention.

    Args:
        name: the name given to ``--models``.
        input_size: ``(C, H, W)`` of one input image.
        build: ``build(attention, asr, both)`` returns the model: no attention when
            ``attention`` is None, classic X, ASR(X), or ASR(X)+X.
        train_batch: default batch size of the training-step measurement.
        num_classes: classifier outputs (labels of the training step).
        reference: ``reference(plain)``: the plain network in another implementation, carrying
            plain's weights (its row must compute the same outputs), or None.
        reference_deployed: ``reference_deployed(plain)``: plain's deployed network (every
            re-parameterization block fused) in another implementation, or None; for models
            whose plain form is already the deployed one, ``reference`` is that row.
    """

    name: str
    input_size: tuple[int, int, int]
    build: Builder
    train_batch: int = 64
    num_classes: int = 10
    reference: Callable[[nn.Module], nn.Module] | None = None
    reference_deployed: Callable[[nn.Module], nn.Module] | None = None


def _check(obj: object) -> None:
    if not isinstance(obj, Family):
        raise TypeError(f"the bench family registry expects a Family, got {obj!r}")


#: name -> :class:`Family`; names are case-sensitive, like the model registry's
FAMILIES: Registry[Family] = Registry("bench family", _check, case_sensitive=True)


def register_family(family: Family) -> Family:
    """Make ``family`` available to :func:`~foldattn.bench.run_bench` and ``--models``.

    ``ValueError`` if its name is taken (even by the same family): :func:`unregister_family` first.
    """
    _check(family)
    if family.name in FAMILIES:
        raise ValueError(f"bench family {family.name!r} is already registered; unregister it first")
    return FAMILIES.register(family.name, family)


def unregister_family(name: str) -> Family:
    """Remove the family ``name`` and return it; ``KeyError`` if it is not registered."""
    return FAMILIES.unregister(name)


def list_families() -> list[str]:
    """Sorted names accepted by ``--models``."""
    return FAMILIES.names()


families = list_families  # foldattn 0.1's name


def get_family(name: str) -> Family:
    """The registered family ``name``, or one for ``timm:NAME`` / ``torchvision:NAME``; a ``ValueError``
    lists the valid names."""
    if name.startswith(("timm:", "torchvision:")):
        return _external_family(name)
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(families())}, timm:NAME or "
                         "torchvision:NAME")
    return FAMILIES.get(name)


def _external_family(name: str) -> Family:
    """A family for an untrained timm / torchvision model (1000 classes, its default input size)."""
    source, _, arch = name.partition(":")
    check_external_name(source, arch)
    size: tuple[int, int, int] = (3, 224, 224)
    if source == "timm":
        cfg = require("timm", "timm").get_pretrained_cfg(arch)
        size = cast("tuple[int, int, int]", tuple(cfg.input_size)) if cfg is not None and cfg.input_size else size

    def factory() -> nn.Module:
        from ..builders import model_by_name

        return model_by_name(name, 1000)

    return Family(name, size, _attach_builder(factory), train_batch=16, num_classes=1000)


# --- builders ----------------------------------------------------------------------------
def _foldattn_builder(name: str) -> Builder:
    """Builder of a :mod:`foldattn.models` model, which places X / ASR(X) itself."""

    def build(attention: str | None, asr: bool, both: bool) -> nn.Module:
        return create_model(name, num_classes=10, attention=attention, asr=asr, both=both)

    return build


class _StageAttention:
    """Creates classic attention modules; DIA modules of equal width are chained (``previous=``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.previous: _attention.ChannelAttention | None = None

    def __call__(self, channels: int) -> _attention.ChannelAttention:
        kwargs: dict[str, Any] = {}
        if _attention.get(self.name) is _attention.DIA:
            same = self.previous is not None and self.previous.channels == channels
            kwargs["previous"] = self.previous if same else None
        module = _attention.create(self.name, channels, **kwargs)
        self.previous = module
        return module


def _attach_builder(factory: Callable[[], nn.Module]) -> Builder:
    """Builder that puts X / ASR(X) where :func:`foldattn.attach` puts ASR (``where="block"``).

    ASR(X): ``foldattn.attach(model, X)``: the last layer of every residual branch before
    the addition (``bn3`` of a torchvision Bottleneck, ``bn2`` of a BasicBlock), SE-ResNet's
    place. Classic X: the same sites (``foldattn.find_sites``) become ``nn.Sequential(layer, X)``.
    ASR(X)+X: both, from the same site list.
    """

    def build(attention: str | None, asr: bool, both: bool) -> nn.Module:
        model = factory()
        if attention is None:
            return model
        sites = [site.name for site in find_sites(model, "block").sites]
        if asr:
            model = attach(model, attention, where="block", inplace=True)
        if both or not asr:
            classic = _StageAttention(attention)
            for name in sites:
                layer = model.get_submodule(name)
                host = layer.host if isinstance(layer, ASR) else layer
                set_submodule(model, name, nn.Sequential(layer, classic(host_channels(host))))
        return model

    return build


def _reference(name: str) -> Callable[[nn.Module], nn.Module] | None:
    """``reference(plain)`` for foldattn's models (see :mod:`.reference`); None for others."""
    import re

    from .reference import reference_cifar_resnet, reference_srp, reference_vit

    if name == "cifar_vit_tiny":
        return reference_vit
    if name == "cifar_repvgg_a0" or re.fullmatch(r"cifar_resnet\d+_\w+", name):
        return reference_srp
    match = re.fullmatch(r"cifar_resnet(\d+)", name)
    if match is None:
        return None
    from ..models import Bottleneck

    depth = int(match.group(1))

    def build(plain: nn.Module) -> nn.Module:
        bottleneck = any(isinstance(m, Bottleneck) for m in plain.modules())
        ref = reference_cifar_resnet(depth, "bottleneck" if bottleneck else "basic")
        ref.load_state_dict(plain.state_dict())  # the same keys
        return ref

    return build


def _reference_deployed(name: str) -> Callable[[nn.Module], nn.Module] | None:
    from .reference import reference_srp, reference_srp_deployed

    return reference_srp_deployed if _reference(name) is reference_srp else None


def _torchvision(arch: str) -> Callable[[], nn.Module]:
    """A factory of the untrained torchvision model ``arch`` (torchvision imported on first use)."""

    def factory() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)

    return factory


for _name in list_models():
    register_family(Family(_name, (3, 32, 32), _foldattn_builder(_name), train_batch=64, num_classes=10,
                           reference=_reference(_name), reference_deployed=_reference_deployed(_name)))
for _arch in ("resnet18", "resnet50"):
    register_family(Family(_arch, (3, 224, 224), _attach_builder(_torchvision(_arch)), train_batch=16,
                           num_classes=1000))


# --- variants: what is measured for each attention X ---------------------------------------
@dataclass(frozen=True)
class Variant:
    """One form of the network, built from a family and an attention name."""

    key: str
    label: str  # "{X}" is replaced by the attention's name
    build: Callable[[Family, str], nn.Module]
    trains: bool = False  # its training step is measured

    def title(self, attention: str) -> str:
        return self.label.replace("{X}", attention.upper())


VARIANTS: tuple[Variant, ...] = (
    Variant("plain", "plain", lambda f, a: f.build(None, False, False), trains=True),
    Variant("x", "+{X}", lambda f, a: f.build(a, False, False), trains=True),
    Variant("asr", "+ASR({X}) train form", lambda f, a: f.build(a, True, False), trains=True),
    Variant("asr_folded", "+ASR({X}) folded", lambda f, a: fold(f.build(a, True, False))),
    Variant("asr_fused", "+ASR({X}) folded+fuse_bn", lambda f, a: fold(f.build(a, True, False), fuse_bn=True)),
    Variant("asr_x_folded", "+ASR({X})+{X} folded", lambda f, a: fold(f.build(a, True, True))),
)
_VARIANT = {v.key: v for v in VARIANTS}
#: deployed forms timed in other runtimes (``--runtime``): (row key suffix, label, the PyTorch variant); the
#: ASR variant is exported or compiled in its deployed form (folded, norms fused)
RUNTIME_VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("plain", "plain", "plain"),
    ("x", "+{X}", "x"),
    ("asr_folded", "+ASR({X}) folded", "asr"),
)
#: runtimes besides eager PyTorch: name -> (row key prefix, label)
RUNTIMES: dict[str, tuple[str, str]] = {
    "ort": ("ort", "ONNX Runtime"),
    "ort-int8": ("ortq", "ONNX Runtime INT8"),
    "compile": ("compile", "torch.compile"),
    "openvino": ("ov", "OpenVINO f32"),
    "openvino-int8": ("ovq", "OpenVINO INT8"),
    "executorch": ("et", "ExecuTorch XNNPACK"),
    "executorch-int8": ("etq", "ExecuTorch XNNPACK INT8"),
}


def runtime_rows(runtime: str) -> list[tuple[str, str, str]]:
    """``(row key, label, source variant)`` of the rows of ``runtime``."""
    prefix, name = RUNTIMES[runtime]
    return [(f"{prefix}_{k}", f"{label} ({name})", src) for k, label, src in RUNTIME_VARIANTS]


#: ONNX Runtime rows: (key, label, the PyTorch variant that is exported)
ONNX_ROWS: tuple[tuple[str, str, str], ...] = tuple(runtime_rows("ort"))
