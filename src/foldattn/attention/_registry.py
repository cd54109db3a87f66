"""Name -> class registry behind :func:`foldattn.attention.create`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .._registry import Registry
from ._base import ChannelAttention

__all__ = ["register_attention", "unregister_attention", "list_attentions", "get_attention", "create_attention",
           "register", "unregister", "create", "names", "get", "REGISTRY"]

T = TypeVar("T", bound=type[ChannelAttention])


def _check(cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, ChannelAttention)):
        raise TypeError(f"attention registry expects a ChannelAttention subclass, got {cls!r}")


REGISTRY: Registry[type[ChannelAttention]] = Registry("attention", _check)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make an attention module available as ``create(name, ...)``."""
    return REGISTRY.register(name)  # type: ignore[return-value]


def unregister(name: str) -> type[ChannelAttention]:
    """Remove a registered attention module (e.g. one a test registered)."""
    return REGISTRY.unregister(name)


def names() -> list[str]:
    """Sorted names of the registered attention modules."""
    return REGISTRY.names()


def get(name: str) -> type[ChannelAttention]:
    """The class registered under ``name`` (case-insensitive)."""
    return REGISTRY.get(name)


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


# the package-wide naming (register_X / unregister_X / list_Xs / get_X); the short names above are the same
# functions, as foldattn 0.1 named them
register_attention = register
unregister_attention = unregister
list_attentions = names
get_attention = get
create_attention = create
