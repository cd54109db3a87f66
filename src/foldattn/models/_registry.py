"""Name -> builder registry behind :func:`foldattn.models.create_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
F = Callable[..., nn.Module]


def register_model(fn: F) -> F:
    """Decorator: register a builder function under its own name."""
    if fn.__name__ in _BUILDERS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _BUILDERS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``.

    Example:
        >>> model = create_model("cifar_resnet164", num_classes=100, attention="se", asr=True)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)
