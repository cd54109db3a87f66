"""The common base of structural re-parameterization blocks, and their registry.

A :class:`RepBlock` is the *training form* of a conv layer: parallel linear branches,
each ending in a BatchNorm, summed. In eval mode it is one affine map of its input,
so :meth:`RepBlock.fuse` returns a single :class:`torch.nn.Conv2d` (with bias) that
computes the same function. The nonlinearity is never part of a block: models apply
it after the block (and after an ASR scale on the block's output).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from .._registry import Registry
from .._utils import set_submodule, unwrap_model
from ..hosts import scaled_forward
from ..transforms import add_branches, pad_kernel

__all__ = [
    "Branch", "RepBlock", "register", "unregister", "create", "names", "get", "rep_blocks", "reparameterize",
    "register_block", "unregister_block", "list_blocks", "get_block", "create_block",
    "centred_padding", "deploy_conv",
]


def centred_padding(kernel_size: int, small: int, padding: int, what: str) -> int:
    """Padding of a ``small`` kernel so that it sits centred in ``kernel_size`` with ``padding``.

    Raises ``ValueError`` (naming ``what``) when no such padding exists: an even size
    difference is needed, and ``padding >= (kernel_size - small) / 2``.
    """
    diff = kernel_size - small
    if diff < 0 or diff % 2:
        raise ValueError(
            f"{what}: a size-{small} kernel cannot be centred in a size-{kernel_size} kernel "
            "(the difference must be even and >= 0); use an odd kernel_size"
        )
    inner = padding - diff // 2
    if inner < 0:
        raise ValueError(
            f"{what}: padding={padding} is too small to centre a size-{small} kernel in a size-{kernel_size} one; "
            f"use padding >= {diff // 2} (e.g. padding={kernel_size // 2})"
        )
    return inner


class Branch(nn.Module):
    """One linear branch of a :class:`RepBlock`: ``bn(body(x))``, its last layer the BatchNorm ``self.bn``.

    Subclasses implement :meth:`body` and :meth:`kernel`.
    """

    bn: nn.BatchNorm2d

    def body(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Everything the branch computes before its last BatchNorm."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.body(x))

    def forward_scaled(self, v: Tensor, x: Tensor) -> Tensor:
        """The branch with its last BatchNorm's weight and bias multiplied by ``v`` (ASR's training form)."""
        return scaled_forward(self.bn, v, self.body(x))

    def kernel(self, kernel_size: tuple[int, int]) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(weight, bias)`` in float64 of the eval-mode branch as one conv with ``kernel_size``."""
        raise NotImplementedError

    def _bn_affine(self, bn: nn.BatchNorm2d | None = None) -> tuple[Tensor, Tensor]:
        from ..transforms import fuse_bn

        bn = self.bn if bn is None else bn
        # a branch's BatchNorm tracks running statistics (the default)
        return fuse_bn(cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var), bn.eps, bn.weight, bn.bias)


class RepBlock(nn.Module):
    """Base class of re-parameterizable blocks: ``sum(branch(x) for branch in branches)``.

    Args:
        in_channels, out_channels: channels of input and output.
        kernel_size: side ``k`` of the square kernel of the fused conv.
        stride: stride of every branch (and of the fused conv).
        padding: zero padding of the fused conv; default ``k // 2``.
        groups: groups of every branch (and of the fused conv).

    It is an ASR host: :meth:`asr_parameters` names the weight and bias of every
    branch's last BatchNorm; scaling those by ``v`` scales the block output by ``v``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1) -> None:
        super().__init__()
        name = type(self).__name__
        for label, val in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("kernel_size", kernel_size), ("stride", stride), ("groups", groups)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name}: {label} must be a positive int, got {val!r}")
        if padding is None:
            padding = kernel_size // 2
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"{name}: padding must be a non-negative int, got {padding!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.branches = nn.ModuleDict()

    # --- training form ---------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        # no name holds a branch's output: it is freed by the addition, before the next branch
        # allocates (as in ``a(x) + b(x) + c(x)``; a named one changes the allocator's reuse)
        out: Tensor | None = None
        for branch in self.branches.values():
            out = branch(x) if out is None else out + branch(x)
        if out is None:
            raise RuntimeError(f"{type(self).__name__} has no branches; subclasses add them in __init__")
        return out

    def forward_scaled(self, v: Tensor, x: Tensor) -> Tensor:
        """The block with every branch's last BatchNorm scaled by ``v``: ``block(x) * v``, functionally."""
        out: Tensor | None = None
        for branch in cast("Mapping[str, Branch]", self.branches).values():
            out = branch.forward_scaled(v, x) if out is None else out + branch.forward_scaled(v, x)
        if out is None:
            raise RuntimeError(f"{type(self).__name__} has no branches; subclasses add them in __init__")
        return out

    def asr_parameters(self) -> list[str]:
        """Per-output-channel parameters: every branch's last BatchNorm weight and bias."""
        return [f"branches.{n}.bn.{p}" for n in self.branches for p in ("weight", "bias")]

    # --- deploy form -----------------------------------------------------------------
    @torch.no_grad()
    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` in float64 of the single conv equal to the eval-mode block."""
        k = (self.kernel_size, self.kernel_size)
        parts = []
        for name, branch in cast("Mapping[str, Branch]", self.branches).items():  # a ModuleDict of Branches
            w, b = branch.kernel(k)
            if w.shape[-2:] != k:
                w = pad_kernel(w, k)
            expected = (self.out_channels, self.in_channels // self.groups, *k)
            if tuple(w.shape) != expected:  # a bug in a Branch subclass, not user input
                raise RuntimeError(f"branch {name!r} gave a kernel of shape {tuple(w.shape)}, expected {expected}")
            parts.append((w, b))
        return add_branches(*parts)

    def deploy_conv(self) -> nn.Conv2d:
        """An (uninitialised) conv with the geometry of the fused block."""
        return deploy_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                           self.groups)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The deployed form: one ``Conv2d`` (with bias) equal to this block in eval mode.

        Uses the BatchNorm running statistics; products in float64, cast back to the
        block's dtype and device. ``self`` is not modified.
        """
        ref = next(self.parameters())
        w, b = self.fused_kernel()
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ValueError(f"{type(self).__name__}: the fused kernel contains NaN or Inf (diverged training?)")
        conv = self.deploy_conv().to(device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(w.to(ref.dtype))
        conv.bias.copy_(b.to(ref.dtype))  # type: ignore[union-attr]
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")


def deploy_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int | None,
                groups: int) -> nn.Conv2d:
    """The deploy form of every block: a ``Conv2d`` with bias."""
    padding = kernel_size // 2 if padding is None else padding
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                     bias=True)


# --- registry ------------------------------------------------------------------------
T = TypeVar("T", bound=type[RepBlock])


def _check(cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, RepBlock)):
        raise TypeError(f"the block registry expects a RepBlock subclass, got {cls!r}")


REGISTRY: Registry[type[RepBlock]] = Registry("re-parameterization block", _check)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`RepBlock` subclass available as ``create(name, ...)``."""
    return REGISTRY.register(name)  # type: ignore[return-value]


def unregister(name: str) -> type[RepBlock]:
    """Remove a registered block class."""
    return REGISTRY.unregister(name)


def names() -> list[str]:
    """Sorted names of the registered blocks."""
    return REGISTRY.names()


def get(name: str) -> type[RepBlock]:
    """The block class registered under ``name`` (case-insensitive)."""
    return REGISTRY.get(name)


def create(name: str, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
           padding: int | None = None, groups: int = 1, *, deploy: bool = False, **kwargs: Any) -> nn.Module:
    """Build block ``name``; with ``deploy=True`` its deploy form (a ``Conv2d`` with bias) instead.

    The geometry is checked in both cases, so a configuration that cannot fuse
    exactly fails at construction either way.

    Example:
        >>> block = create("dbb", 16, 32, kernel_size=3, stride=2)
        >>> conv = block.eval().fuse()
    """
    cls = get(name)
    try:
        block = cls(in_channels, out_channels, kernel_size, stride, padding, groups, **kwargs)
    except TypeError as e:
        raise TypeError(f"block {name!r}: {e}") from None
    return block.deploy_conv() if deploy else block


# the package-wide naming (register_X / unregister_X / list_Xs / get_X), the same functions as above
register_block = register
unregister_block = unregister
list_blocks = names
get_block = get
create_block = create


# --- model-level ---------------------------------------------------------------------
def rep_blocks(model: nn.Module) -> Iterator[tuple[str, RepBlock]]:
    """``(name, block)`` for every outermost :class:`RepBlock` of ``model``, in module order."""
    outer: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, RepBlock) and not any(name.startswith(p + ".") for p in outer):
            outer.append(name)
            yield name, m


@torch.no_grad()
def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every :class:`RepBlock` replaced by its fused conv (its deploy form).

    Wrappers (DataParallel/DDP, ``torch.compile``) are removed first; by default a
    deep copy is converted. Idempotent: a model without blocks is returned as is.
    """
    model = unwrap_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    for name, block in list(rep_blocks(model)):
        try:
            conv = block.fuse()
        except ValueError as e:
            raise ValueError(f"cannot fuse block {name!r}: {e}") from None
        if not name:
            return conv
        set_submodule(model, name, conv)
    return model
