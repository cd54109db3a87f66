"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict (only tensors and Python primitives, so loading never
unpickles code)::

    {"format": "foldattn-checkpoint", "version": 1,
     "config": {...}, "model": state_dict, "optimizer": ..., "scheduler": ...,
     "scaler": ..., "rng": {...}, "epoch": completed epochs, "step": batches done
     in the next epoch (mid-epoch after Ctrl-C), "partial": running sums of that
     epoch, "history": per-epoch metrics, "best": best validation metrics}
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import atomic_path, unwrap_model

__all__ = [
    "CheckpointError", "FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_model_state",
    "config_diff", "capture_rng", "restore_rng", "checkpoint_in"]

FORMAT = "foldattn-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a usable foldattn checkpoint; the message says why."""


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA) and Python's ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` saved (CUDA states only if the device count matches)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_plain(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _py_state_to_plain(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _py_state_from_plain(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(int(v) for v in internal.tolist()), gauss)


def save_checkpoint(path: str | os.PathLike[str], *, model: nn.Module, config: Mapping[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                    epoch: int = 0, step: int = 0, **extra: Any) -> Path:
    """Write a checkpoint to ``path`` atomically (temporary file, then rename).

    ``model`` is unwrapped (DDP / ``torch.compile``) first, so the keys never carry
    ``module.`` or ``_orig_mod.`` prefixes. ``extra`` entries (history, best, partial
    sums...) must be tensors or Python primitives.
    """
    blob: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "config": dict(config),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng(), "epoch": int(epoch), "step": int(step), **extra,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def checkpoint_in(path: str | os.PathLike[str], which: str = "last") -> Path:
    """The checkpoint file ``path`` names: itself, or for a run folder its ``last.pt`` / ``best.pt``."""
    if which not in ("last", "best"):
        raise CheckpointError(f"--which must be last or best, got {which!r}")
    path = Path(path)
    return path / f"{which}.pt" if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    A directory means its ``last.pt``. Raises :class:`CheckpointError` for a missing,
    truncated, corrupt or foreign file, naming the file and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle, EOF and weights-only errors all mean the same to the user
        text = str(e).strip()
        if "Weights only load failed" in text:
            why = "it holds Python objects other than tensors and plain values, which safe loading refuses"
        else:
            why = (text.splitlines()[0] if text else type(e).__name__)[:200]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not foldattn's): "
                              f"{why}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a foldattn training checkpoint (no 'format': {FORMAT!r} entry); "
                              "for a published ASR checkpoint use `foldattn import-reference`")
    if int(blob.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {blob['version']}; this foldattn reads up to {VERSION}")
    return blob


def load_model_state(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a short, readable error for another architecture."""
    target = unwrap_model(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise CheckpointError(f"{source} does not fit this model (another architecture, attention or class count?): "
                              + "; ".join(parts))
    target.load_state_dict(state, strict=True)


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable ``key: saved -> current`` lines for every differing config entry."""
    skip = set(ignore)
    keys = sorted((set(saved) | set(current)) - skip)
    return [f"{k}: {saved.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}"
            for k in keys if _norm(saved.get(k)) != _norm(current.get(k))]


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
