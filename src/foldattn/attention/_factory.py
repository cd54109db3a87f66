"""One factory for the attention modules of a model, site after site (DIA chains included)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._base import ChannelAttention
from ._registry import create, get
from .dia import DIA

__all__ = ["Factory"]


class Factory:
    """Builds the attention modules ``name`` of a model's sites, in forward order.

    DIA (Huang et al., AAAI 2020) shares one LSTM cell along a stage: each DIA module is
    chained to the previous one (``previous=``) when it has the same width and no
    :meth:`new_chain` came in between. Other modules are independent. ``name=None``
    builds nothing (``__call__`` returns None), so a model can hold one factory per role
    (ASR, classic) whether or not that role is used.

    Args:
        name: a registered attention name, or None.
        every: a module for every ``every``-th site only (the 1st, (k+1)-th, ...); the
            calls for the other sites return None. DIA chains the modules that are built.
        sites: a module at these sites only (0-based, in forward order; with ``every``, both must
            hold); None: every site. What ``foldattn calibrate --max-drop`` records for the sites it kept.
        **kwargs: passed to every module's constructor (e.g. ``reduction=8``).
    """

    def __init__(self, name: str | None, *, every: int = 1, sites: Sequence[int] | None = None,
                 **kwargs: Any) -> None:
        if name is not None:
            get(name)  # unknown names fail here, listing the valid ones
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (attention in every k-th block), got {every!r}")
        if sites is not None and (not isinstance(sites, (list, tuple, set, frozenset)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 16 for i in sites)):
            raise ValueError(f"attention_sites must be a list of site indices (integers >= 0), got {sites!r}")
        self.name, self.kwargs, self.every = name, kwargs, every
        self.only = None if sites is None else frozenset(sites)
        self.previous: ChannelAttention | None = None
        self.sites = 0

    def new_chain(self) -> None:
        """The next DIA module starts a new chain (a new stage)."""
        self.previous = None

    def __call__(self, channels: int) -> ChannelAttention | None:
        site, self.sites = self.sites, self.sites + 1
        if self.name is None or site % self.every or (self.only is not None and site not in self.only):
            return None
        kwargs = dict(self.kwargs)
        if get(self.name) is DIA:
            same = self.previous is not None and self.previous.channels == channels
            kwargs["previous"] = self.previous if same else None
        module = create(self.name, channels, **kwargs)
        self.previous = module
        return module
