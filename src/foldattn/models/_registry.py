"""Name -> builder registry behind :func:`foldattn.models.create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .._registry import Registry

__all__ = ["register_model", "unregister_model", "create_model", "list_models", "get_builder", "BUILDER_ATTR",
           "REGISTRY"]

BUILDER_ATTR = "foldattn_builder"
"""Attribute :func:`create_model` sets on its models: ``{"name": ..., "kwargs": ...}``, the
call that builds their deployed (folded) form; :func:`foldattn.save_deployed` records it."""
# the training-only arguments (ASR, LayerScale): the folded model is the backbone built without them
_TRAINING_ONLY = ("asr", "both", "psi_init", "layer_scale")

F = Callable[..., nn.Module]
REGISTRY: Registry[F] = Registry("model", case_sensitive=True)


def register_model(fn: F) -> F:
    """Decorator: register a builder function under its own name."""
    return REGISTRY.register(fn.__name__, fn)


def unregister_model(name: str) -> F:
    """Remove a registered builder (e.g. one a test registered)."""
    return REGISTRY.unregister(name)


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    return REGISTRY.names()


def get_builder(name: str) -> F:
    """The builder function registered as ``name``."""
    return REGISTRY.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``.

    The model remembers how to build its deployed form (attribute :data:`BUILDER_ATTR`), so
    ``foldattn.save_deployed(model, path)`` needs no ``builder=``.

    Example:
        >>> model = create_model("cifar_resnet164", num_classes=100, attention="se", asr=True)
    """
    fn = get_builder(name)
    classes = kwargs.get("num_classes", 1)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {classes!r}")
    model = fn(**kwargs)
    setattr(model, BUILDER_ATTR, {"name": name, "kwargs": _deploy_kwargs(fn, kwargs)})
    return model


def _deploy_kwargs(fn: F, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments that build what :func:`foldattn.fold` makes of ``fn(**kwargs)``."""
    out = {k: v for k, v in kwargs.items() if k not in _TRAINING_ONLY}
    if kwargs.get("asr") and not kwargs.get("both"):
        out.pop("attention", None)  # ASR(X) folds away; ASR(X) + X keeps the classic X
    if "deploy" in inspect.signature(fn).parameters:
        out["deploy"] = True  # fold also fuses the re-parameterization blocks
    return out
