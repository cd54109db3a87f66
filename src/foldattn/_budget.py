"""Building a model a file names, at a cost bounded by what the file holds (private).

A file (a deployed file, a checkpoint) may name an allowlisted architecture with allowed
options that are nonetheless huge (a classifier of 2^24 classes, 50,000 blocks). Before any
real memory is spent, :func:`build_for` builds the architecture on the ``meta`` device and
compares it with the file's own tensors; every build (meta or real) runs under a
:class:`Budget` that stops it once it creates far more tensors, or far more bytes, than the
file holds, so neither memory nor time can exceed a small multiple of the file itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Budget", "BudgetExceeded", "DoesNotFit", "build_for", "state_mismatch", "match_float_dtype"]

# ops that create a tensor from a size (bytes counted before they run); everything else works on tensors
# that exist already
_FACTORIES = frozenset({
    "empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange",
    "linspace", "logspace", "eye", "scalar_tensor", "new_empty", "new_empty_strided", "new_zeros", "new_ones",
    "new_full", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
})


class BudgetExceeded(ValueError):
    """The build asked for far more than the file holds."""


class DoesNotFit(ValueError):
    """The architecture built does not fit the file's tensors (keys, shapes)."""


def _size_of(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Bytes a factory op will allocate (0 where it cannot be told)."""
    if name.endswith("_like") or name.startswith("new_"):
        like = args[0] if args and isinstance(args[0], Tensor) else None
        shape = args[1] if name.startswith("new_") and len(args) > 1 else (like.shape if like is not None else ())
        dtype = kwargs.get("dtype") or (like.dtype if like is not None else torch.get_default_dtype())
    elif name in ("arange", "linspace", "logspace", "randperm", "eye", "scalar_tensor"):
        return 0  # sized by values, small in every constructor this serves
    else:
        shape = args[0] if args else kwargs.get("size", ())
        if name in ("randint",) and len(args) >= 2:
            shape = args[-1]
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
    try:
        numel = math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return 0
    return numel * torch.empty((), dtype=dtype, device="meta").element_size()


class Budget(TorchDispatchMode):
    """A dispatch mode that counts the tensors and bytes a build creates and stops it past a limit.

    Args:
        max_bytes: bytes of new tensors allowed (meta tensors count too: size, not memory).
        max_tensors: tensor-creating calls allowed (bounds the time of a build with many layers).
        what: named in the error.
    """

    def __init__(self, max_bytes: int, max_tensors: int, what: str) -> None:
        super().__init__()
        self.max_bytes, self.max_tensors, self.what = max_bytes, max_tensors, what
        self.bytes = self.tensors = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _FACTORIES:
            self.tensors += 1
            self.bytes += _size_of(name, args, kwargs)
            if self.bytes > self.max_bytes or self.tensors > self.max_tensors:
                raise BudgetExceeded(
                    f"{self.what} asks for more than the file holds (over {self.tensors:,} tensors / "
                    f"{self.bytes / 2**20:,.0f} MiB while building it, the file's tensors allow "
                    f"{self.max_tensors:,} / {self.max_bytes / 2**20:,.0f} MiB); the file does not describe "
                    "this architecture"
                )
        return func(*args, **kwargs)


def state_mismatch(model: nn.Module, tensors: Mapping[str, Tensor], *, dtypes: bool = True) -> str:
    """What keeps ``tensors`` from loading strictly into ``model`` (keys, shapes, dtypes), "" if nothing."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes, kinds = [], []
    for k, ref in expected.items():
        got = tensors.get(k)
        if got is None or not isinstance(got, Tensor):
            if got is not None:
                kinds.append(f"{k}: a {type(got).__name__}, not a tensor")
            continue
        if tuple(got.shape) != tuple(ref.shape):
            shapes.append(f"{k}: file {tuple(got.shape)} vs model {tuple(ref.shape)}")
        elif dtypes and got.dtype != ref.dtype:
            kinds.append(f"{k}: file {str(got.dtype).removeprefix('torch.')} vs model "
                         f"{str(ref.dtype).removeprefix('torch.')}")
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                         ("dtype mismatches", kinds)):
        if items:
            more = f", ... ({len(items) - 8} more)" if len(items) > 8 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:8])}{more}")
    return "; ".join(parts)


def build_for(build: Callable[[], nn.Module], tensors: Mapping[str, Tensor], what: str) -> nn.Module:
    """``build()`` once it is known to fit ``tensors``: built on the meta device first (no memory)
    and compared; then for real. Both builds run under a :class:`Budget` of a few times what the
    file's tensors hold, so a file cannot make foldattn build far more than it contains.

    Raises:
        BudgetExceeded: the build asks for far more than the file holds.
        DoesNotFit: the architecture does not fit the tensors (keys, shapes), naming them.
    """
    held = sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, Tensor))
    max_bytes = 4 * held + (64 << 20)  # headroom: buffers the file may omit, init temporaries
    max_tensors = 8 * len(tensors) + 2048
    probe = None
    try:
        with torch.device("meta"), Budget(max_bytes, max_tensors, what):
            probe = build()
    except BudgetExceeded:
        raise
    except Exception:  # a constructor that cannot run on the meta device: the budgeted real build decides
        probe = None
    if isinstance(probe, nn.Module):
        problem = state_mismatch(probe, tensors, dtypes=False)  # meta builds may pick other dtypes
        if problem:
            raise DoesNotFit(f"{what} does not build the file's architecture: {problem}")
    with Budget(max_bytes, max_tensors, what):
        model = build()
    return model


def match_float_dtype(model: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """``model`` in the floating dtype of ``tensors`` when they all share one (a model saved in half
    precision loads into a half-precision model); otherwise unchanged, and the dtype check decides."""
    kinds = {t.dtype for t in tensors.values() if isinstance(t, Tensor) and t.is_floating_point()}
    own = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if len(kinds) == 1 and len(own) == 1 and kinds != own:
        model = model.to(next(iter(kinds)))
    return model
