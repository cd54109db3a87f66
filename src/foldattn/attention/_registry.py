"""Name -> class registry behind :func:`foldattn.attention.create`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._base import ChannelAttention

__all__ = ["register", "create", "names", "get"]

_REGISTRY: dict[str, type[ChannelAttention]] = {}
T = TypeVar("T", bound=type[ChannelAttention])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make an attention module available as ``create(name, ...)``."""
    key = name.lower()

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, ChannelAttention)):
            raise TypeError(f"register({name!r}) expects a ChannelAttention subclass, got {cls!r}")
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"attention name {name!r} is already registered to {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
        return cls

    return deco


def names() -> list[str]:
    """Sorted names of the registered attention modules."""
    return sorted(_REGISTRY)


def get(name: str) -> type[ChannelAttention]:
    """The class registered under ``name`` (case-insensitive)."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name.lower()]


def create(name: str, channels: int, **kwargs: Any) -> ChannelAttention:
    """Build the attention module ``name`` for ``channels`` channels.

    Example:
        >>> from foldattn import attention
        >>> se = attention.create("se", 64, reduction=8)
    """
    cls = get(name)
    try:
        return cls(channels, **kwargs)
    except TypeError as e:  # wrong keyword: say which module and what it takes
        raise TypeError(f"attention {name!r}: {e}") from None
