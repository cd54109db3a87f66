"""One small name -> object registry, used for every registry of the package (private type).

Attention modules, model builders, re-parameterization blocks, datasets, recipes, bench
families and stripe adapters each keep one :class:`Registry`; their modules expose
``register`` / ``unregister`` / ``names`` / ``get`` functions around it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Names (case-insensitive unless ``case_sensitive``) mapped to objects of one kind.

    Args:
        kind: what the entries are, for messages ("attention", "model", ...).
        check: called on every object registered; raises ``TypeError`` for a wrong kind.
        case_sensitive: keep names as given instead of lower-casing them.
    """

    def __init__(self, kind: str, check: Callable[[object], None] | None = None, *,
                 case_sensitive: bool = False) -> None:
        self.kind = kind
        self._check = check
        self._case_sensitive = case_sensitive
        self._entries: dict[str, T] = {}

    def _key(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        return name if self._case_sensitive else name.lower()

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that does so.

        Registering another object under a taken name raises ``ValueError`` (unregister first);
        registering the same object again is a no-op.
        """
        key = self._key(name)

        def add(value: T) -> T:
            if self._check is not None:
                self._check(value)
            if key in self._entries and self._entries[key] is not value:
                raise ValueError(f"{self.kind} name {name!r} is already registered "
                                 f"(to {getattr(self._entries[key], '__name__', self._entries[key])!s}); "
                                 "unregister it first")
            self._entries[key] = value
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named; ``KeyError`` if it is not registered."""
        key = self._key(name)
        if key not in self._entries:
            raise KeyError(f"no {self.kind} named {name!r}")
        return self._entries.pop(key)

    def get(self, name: str) -> T:
        """The object registered under ``name``; ``ValueError`` listing the valid names otherwise."""
        key = name if self._case_sensitive or not isinstance(name, str) else name.lower()
        if not isinstance(key, str) or key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._entries[key]

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return (name if self._case_sensitive else name.lower()) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
