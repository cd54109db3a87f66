"""Assert that a deployed model computes what the training-form model computes."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import eval_mode, first_line, unwrap_model

__all__ = ["verify", "check_finite", "EquivalenceError", "VerifyReport", "TOLERANCES"]

#: Largest accepted ``max |a - b| / max |a|`` per dtype: a few hundred ulps of the
#: output scale for float64 and float32, the round-off of whole networks in half precision.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


class EquivalenceError(AssertionError):
    """Raised by :func:`verify` when outputs differ by more than the tolerance."""


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`: errors, the tolerance they were held to, and the dtype."""

    max_abs: float
    max_rel: float
    tolerance: float
    dtype: torch.dtype
    outputs: int

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (
            f"{verdict}: max abs error {self.max_abs:.3e}, max relative error {self.max_rel:.3e} "
            f"(tolerance {self.tolerance:.0e}, {str(self.dtype).removeprefix('torch.')}, "
            f"{self.outputs} output tensor(s))"
        )


_MAX_OUTPUT_DEPTH = 32


def _flatten(out: Any, label: str = "output", depth: int = 0, seen: set[int] | None = None) -> list[Tensor]:
    """Every tensor reachable in a model's output, in a fixed order: tensors, mappings (sorted keys),
    lists/tuples/named tuples, dataclasses (fields in order) and plain objects (their attributes,
    sorted). Unordered or one-shot containers (sets, generators, iterators) are refused: their
    tensors cannot be paired between two models."""
    seen = set() if seen is None else seen
    if isinstance(out, Tensor):
        return [out]
    if out is None or isinstance(out, (str, bytes, int, float, bool, complex, torch.dtype, torch.device)):
        return []
    if depth > _MAX_OUTPUT_DEPTH or id(out) in seen:
        raise ValueError(f"verify: {label} nests more than {_MAX_OUTPUT_DEPTH} levels or refers to itself; "
                         "return tensors in tuples, lists, dicts or dataclasses")
    seen = seen | {id(out)}
    if isinstance(out, Mapping):
        try:
            keys = sorted(out)
        except TypeError:
            keys = list(out)
        return [t for k in keys for t in _flatten(out[k], f"{label}[{k!r}]", depth + 1, seen)]
    if isinstance(out, (list, tuple)):
        return [t for i, o in enumerate(out) for t in _flatten(o, f"{label}[{i}]", depth + 1, seen)]
    if isinstance(out, (set, frozenset)) and all(x is None or isinstance(x, (str, bytes, int, float)) for x in out):
        return []
    if isinstance(out, (set, frozenset, Iterator, Generator)):
        raise ValueError(f"verify: {label} is a {type(out).__name__}, whose tensors have no order to pair between "
                         "the two models; return a tuple, list or dict")
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out)
                for t in _flatten(getattr(out, f.name), f"{label}.{f.name}", depth + 1, seen)]
    if isinstance(out, Sequence):
        return [t for i, o in enumerate(out) for t in _flatten(o, f"{label}[{i}]", depth + 1, seen)]
    attrs = getattr(out, "__dict__", None)
    if isinstance(attrs, dict):
        return [t for k in sorted(attrs) for t in _flatten(attrs[k], f"{label}.{k}", depth + 1, seen)]
    return []


def _as_args(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Any, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _shapes(args: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in args)


def _run(model: nn.Module, args: tuple[Any, ...], label: str) -> list[Tensor]:
    try:
        out = model(*args)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = first_line(e)
        raise ValueError(
            f"the {label} model cannot run on example inputs of shape {_shapes(args)}: {first}. "
            "Pass inputs shaped like the model's real inputs."
        ) from None
    return _flatten(out)


@torch.no_grad()
def verify(
    model: nn.Module,
    deployed: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    dtype: torch.dtype | None = None,
    tolerance: float | None = None,
) -> VerifyReport:
    """Compare ``model`` and ``deployed`` on ``example_inputs``, both in eval mode.

    Args:
        model: the reference (e.g. the training form with ASR layers).
        deployed: the model to check (e.g. ``foldattn.fold(model)``).
        example_inputs: a tensor, or a tuple of positional inputs.
        dtype: run both models (copies) and the floating inputs in this dtype;
            by default the dtype of ``model``'s parameters.
        tolerance: override the per-dtype tolerance of :data:`TOLERANCES`.

    Returns:
        A :class:`VerifyReport` (max absolute and max relative error). The relative
        error is relative to the output scale, ``max |a - b| / max |a|``.

    Raises:
        EquivalenceError: the relative error exceeds the tolerance, or an output of either
            model holds NaN or Inf.
        ValueError: the inputs do not fit the models, the outputs differ in structure, or they hold no
            tensor (nothing would be compared).
    """
    for role, m in (("model", model), ("deployed", deployed)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"verify: {role} must be an nn.Module, got {type(m).__name__}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance < 0):
        raise ValueError(f"verify: tolerance must be a finite number >= 0, got {tolerance!r}")
    model, deployed = unwrap_model(model), unwrap_model(deployed)
    args = _as_args(example_inputs)
    empty = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 0]
    if empty:
        raise ValueError(f"verify: example input {empty[0]} has a batch of 0 samples; nothing would be compared "
                         "(pass at least one sample)")
    if dtype is not None:
        model, deployed = copy.deepcopy(model).to(dtype), copy.deepcopy(deployed).to(dtype)
        args = tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    ref_param = next(model.parameters(), None)
    run_dtype = dtype or (ref_param.dtype if ref_param is not None else torch.get_default_dtype())
    tol = tolerance if tolerance is not None else TOLERANCES.get(run_dtype, 1e-5)
    with eval_mode(model), eval_mode(deployed):
        ref = _run(model, args, "reference")
        out = _run(deployed, args, "deployed")
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out, strict=False)):
        raise ValueError(
            f"output structure differs: reference {[tuple(t.shape) for t in ref]}, "
            f"deployed {[tuple(t.shape) for t in out]}"
        )
    if not sum(t.numel() for t in ref):
        raise ValueError("verify: the models' outputs hold no tensor, so nothing was compared; return tensors "
                         "(in tuples, lists, dicts, dataclasses or objects with tensor attributes)")
    check_finite(ref, "reference")
    check_finite(out, "deployed")
    max_abs, scale = 0.0, 0.0
    for a, b in zip(ref, out, strict=True):
        a64, b64 = a.double(), b.double()
        if a64.numel():
            max_abs = max(max_abs, (a64 - b64).abs().max().item())
            scale = max(scale, a64.abs().max().item())
    max_rel = max_abs / scale if scale > 0 else max_abs
    report = VerifyReport(max_abs, max_rel, tol, run_dtype, len(ref))
    if not report.passed:
        raise EquivalenceError(str(report))
    return report


def _output_error(ref: Sequence[Tensor], got: Sequence[Tensor], runtime: str) -> tuple[float, float]:
    """``(max abs, max abs / max |ref|)`` of another runtime's outputs ``got`` against PyTorch's ``ref``, in
    float64, after both are checked finite and alike in count and shape (the exports' checks)."""
    check_finite(list(ref), "PyTorch")
    check_finite(list(got), runtime)
    if len(ref) != len(got):
        raise EquivalenceError(f"{runtime} returned {len(got)} output(s), PyTorch {len(ref)}")
    max_abs = scale = 0.0
    for r, g in zip(ref, got, strict=True):
        r64, g64 = r.detach().cpu().double(), g.detach().cpu().double()
        if r64.shape != g64.shape:
            raise EquivalenceError(f"output shape differs: {runtime} {tuple(g64.shape)}, PyTorch {tuple(r64.shape)}")
        if r64.numel():
            max_abs = max(max_abs, (r64 - g64).abs().max().item())
            scale = max(scale, r64.abs().max().item())
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def check_finite(outputs: Sequence[Tensor], label: str) -> None:
    """Raise :class:`EquivalenceError` if any output holds NaN or Inf (how many, in which output).

    A non-finite output is never "equal": ``max`` over errors would silently drop a NaN.
    """
    problems = []
    for i, t in enumerate(outputs):
        if not t.is_floating_point() and not t.is_complex():
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            problems.append(f"output {i} {tuple(t.shape)}: {nan} NaN and {inf} Inf of {t.numel()} values")
    if problems:
        raise EquivalenceError(
            f"the {label} model's outputs are not finite ({'; '.join(problems)}); a model that produces NaN or Inf "
            "cannot be verified (diverged training, overflow in low precision, or broken weights)"
        )
