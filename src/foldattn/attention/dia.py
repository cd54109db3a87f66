"""Dense-and-implicit attention (Huang et al., "DIANet", AAAI 2020).

One LSTM cell is shared by all blocks of a stage. Block ``b`` feeds its pooled
features and the previous block's state ``(h, c)`` to the cell; the new hidden
state ``h`` (in (0, 1)) is the block's attention vector.

Blocks are chained by passing ``previous=`` the stage's preceding DIA module: the
cell is then shared (registered once, on the first module of the chain) and the
state flows along the chain.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

from ._base import ChannelAttention, PsiInit
from ._registry import register

__all__ = ["DIA", "DIACell"]


class _SmallMLP(nn.Sequential):
    def __init__(self, channels: int, reduction: int) -> None:
        hidden = max(1, channels // reduction)
        super().__init__(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4 * channels))


class DIACell(nn.Module):
    """LSTM cell whose input-to-hidden and hidden-to-hidden maps are small MLPs.

    Its output gate multiplies ``sigmoid(c)``, so ``h`` lies in (0, 1) and can
    serve directly as an attention vector.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.ih = _SmallMLP(channels, reduction)
        self.hh = _SmallMLP(channels, reduction)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.channels)
            state = (zeros, zeros)
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.sigmoid(), c


def _hand_over(module: DIA, slot: str, value: object) -> None:
    """Leave ``value`` for the next block of the chain, in this thread's slot: several threads may
    run one model at once, and each forward pass must receive its own predecessor's state."""
    module.__dict__.setdefault(slot, {})[threading.get_ident()] = value


def _take(module: DIA, slot: str) -> Any:
    """What :func:`_hand_over` left in this thread's slot (once: the graph is not kept alive), or None."""
    return module.__dict__.get(slot, {}).pop(threading.get_ident(), None)


@register("dia")
class DIA(ChannelAttention):
    """One block's view of a stage-shared :class:`DIACell`.

    Classic form: the first block of a chain starts from a zero state; each later
    block takes the state its predecessor produced in the same forward pass, so the
    blocks must run in chain order. ASR form: each block has its own ``psi`` and its
    vector is the cell run over the psis of the chain up to and including itself,
    from a zero state (no data, no hidden dependence on call order).

    Args:
        channels: channels of the gated feature map.
        reduction: hidden ratio of the cell's MLPs.
        previous: the preceding DIA module of the stage, whose cell is shared.
    """

    def __init__(self, channels: int, reduction: int = 4, previous: DIA | None = None) -> None:
        super().__init__(channels)
        # links are plain attributes (not submodules) so the cell is registered once
        self.__dict__["_previous"] = previous
        self._has_next = False
        if previous is None:
            self.cell = DIACell(channels, reduction)
        else:
            if not isinstance(previous, DIA):
                raise TypeError(f"previous must be a DIA module, got {type(previous).__name__}")
            if previous.channels != channels:
                raise ValueError(
                    f"DIA blocks share one cell per stage, so channels must match: "
                    f"previous has {previous.channels}, this one {channels}"
                )
            previous._has_next = True
            self.__dict__["_shared_cell"] = previous.shared_cell

    @property
    def shared_cell(self) -> DIACell:
        """The stage's cell (registered on the first module of the chain)."""
        return self.cell if "cell" in self._modules else self.__dict__["_shared_cell"]

    @property
    def previous(self) -> DIA | None:
        return self.__dict__["_previous"]

    def _take_previous_state(self, batch: int) -> tuple[Tensor, Tensor] | None:
        prev = self.previous
        if prev is None:
            return None
        state = _take(prev, "_state")
        if state is None or state[0].shape[0] != batch:
            raise RuntimeError(
                "DIA blocks of a stage must run in order within one forward pass: the previous block "
                "of this chain has not produced a state for this batch"
            )
        return state

    def gate(self, d: Tensor) -> Tensor:
        h, c = self.shared_cell(d, self._take_previous_state(d.shape[0]))
        if self._has_next:
            _hand_over(self, "_state", (h, c))
        return h

    def _static_key(self) -> tuple[object, ...]:
        """Identifies the inputs of :meth:`static_state`: grad mode, the chain's psis and the cell."""
        prev = self.previous
        base = prev._static_key() if prev is not None else tuple(
            (p.data_ptr(), p._version) for p in self.shared_cell.parameters()
        )
        assert self.psi is not None
        return (base, torch.is_grad_enabled(), self.psi.data_ptr(), self.psi._version)

    def static_state(self) -> tuple[Tensor, Tensor]:
        """ASR form: the cell's state after this block, from the chain's psis alone.

        In a forward pass the blocks run in chain order, so each block hands its state to
        the next (one cell step per block). The hand-over is keyed by the values it was
        computed from (psi and cell parameter versions, grad mode), and is used once; any
        other call recomputes the chain from the zero state, so the result never depends
        on the call order.
        """
        if self.psi is None:
            raise RuntimeError("DIA has no psi: call make_static() first")
        prev = self.previous
        state = None
        if prev is not None:
            cached = _take(prev, "_static_cache")
            state = cached[1] if cached is not None and cached[0] == prev._static_key() else prev.static_state()
        h, c = self.shared_cell(self.psi, state)
        if self._has_next:
            _hand_over(self, "_static_cache", (self._static_key(), (h, c)))
        return h, c

    def static_gate(self) -> Tensor:
        return self.static_state()[0][0]

    def make_static(self, psi_init: PsiInit = 0.1) -> DIA:
        prev = self.previous
        if prev is not None and not prev.is_static:
            raise RuntimeError("make the previous DIA block of the chain static first (chain order)")
        super().make_static(psi_init)
        return self


