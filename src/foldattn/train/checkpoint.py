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

import math
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._budget import state_mismatch
from .._files import UnreadableFile, torch_load
from .._utils import atomic_path, unwrap_model

__all__ = [
    "CheckpointError", "FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_model_state",
    "config_diff", "capture_rng", "restore_rng", "checkpoint_in", "check_structure", "load_optimizer_state"]

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
        blob = torch_load(path, "checkpoint", map_location)
    except UnreadableFile as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not foldattn's): "
                              f"{e.why}") from None
    except ValueError as e:  # not a regular file, or an archive that inflates far past its size
        raise CheckpointError(str(e)) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a foldattn training checkpoint (no 'format': {FORMAT!r} entry); "
                              "for a published ASR checkpoint use `foldattn import-reference`")
    check_structure(blob, path)
    return blob


#: the largest class count and image side a checkpoint may record
MAX_CLASSES = 1 << 20
MAX_IMAGE_SIDE = 8192
#: the longest class (folder) name a checkpoint may record
MAX_NAME = 255


def _is_int(v: Any, low: int = 0, high: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_state(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                   for k, t in v.items())


def check_structure(blob: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint whose entries are not what :func:`save_checkpoint` writes, naming the entry
    (a checkpoint is data: it passed ``weights_only``, but its structure is not yet trusted)."""

    def bad(entry: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {entry} {why}; this is not a checkpoint foldattn wrote (or it is corrupted)")

    version = blob.get("version", 0)
    if not _is_int(version):
        raise bad("'version'", f"is {version!r}, not a whole number")
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}; this foldattn reads up to {VERSION}")
    if not isinstance(blob.get("config"), dict) or not all(isinstance(k, str) for k in blob["config"]):
        raise bad("'config'", "is missing or not a mapping of option names")
    if not _is_state(blob.get("model")):
        raise bad("'model'", "is missing or not a state dict (names -> tensors)")
    if blob.get("model_ema") is not None and not _is_state(blob["model_ema"]):
        raise bad("'model_ema'", "is not a state dict")
    for entry in ("epoch", "step"):
        if entry in blob and blob[entry] is not None and not _is_int(blob[entry]):
            raise bad(f"'{entry}'", f"is {blob[entry]!r}, not a whole number >= 0")
    for entry in ("optimizer", "scheduler", "scaler", "best", "rng", "run"):
        if blob.get(entry) is not None and not isinstance(blob[entry], dict):
            raise bad(f"'{entry}'", f"is a {type(blob[entry]).__name__}, not a mapping")
    if blob.get("history") is not None and not (isinstance(blob["history"], list)
                                                and all(isinstance(h, dict) for h in blob["history"])):
        raise bad("'history'", "is not a list of per-epoch mappings")
    run = blob.get("run") or {}
    classes = run.get("classes")
    if classes is not None and not _is_int(classes, 1, MAX_CLASSES):
        raise bad("run 'classes'", f"is {classes!r}, not a class count in [1, {MAX_CLASSES}]")
    names = run.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == classes
                                  and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in names)):
        raise bad("run 'class_names'", f"is not a list of {classes} class folder names of at most {MAX_NAME} "
                  "characters")
    size = run.get("image_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                 and all(_is_int(s, 1, MAX_IMAGE_SIDE) for s in size)):
        raise bad("run 'image_size'", f"is {size!r}, not [height, width] in [1, {MAX_IMAGE_SIDE}]")
    pre = run.get("preprocessing")
    if pre is not None:
        ok = isinstance(pre, dict) and all(
            isinstance(pre.get(k), (list, tuple)) and 1 <= len(pre[k]) <= 16
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in pre[k])
            for k in ("mean", "std")) and all(x > 0 for x in pre["std"])
        if not ok:
            raise bad("run 'preprocessing'", "is not {mean: [...], std: [positive ...]} of finite numbers")


def load_model_state(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a short, readable error for another architecture."""
    target = unwrap_model(model)
    problem = state_mismatch(target, state)  # keys, shapes and dtypes: nothing is cast silently
    if problem:
        raise CheckpointError(f"{source} does not fit this model (another architecture, attention or class count?): "
                              + problem)
    target.load_state_dict(state, strict=True)


#: optimizer state entries that hold one value per parameter element (SGD's momentum, Adam's moments)
_PER_ELEMENT = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, source: str = "checkpoint") -> None:
    """``optimizer.load_state_dict(state)``, refused in one line when the state does not fit the parameters
    (another model or optimizer, or a tampered file): torch would accept it and fail at the first step."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise CheckpointError(f"{source}: its optimizer state is not what an optimizer saves (state, param_groups)")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: its optimizer state does not fit this run's optimizer: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key in _PER_ELEMENT and isinstance(value, torch.Tensor) and value.shape != p.shape:
                    raise CheckpointError(f"{source}: its optimizer state {key!r} has shape {tuple(value.shape)} for "
                                          f"a parameter of shape {tuple(p.shape)}; the file is corrupted or of "
                                          "another model")
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    raise CheckpointError(f"{source}: its optimizer state {key!r} holds NaN or Inf")


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable ``key: saved -> current`` lines for every differing config entry."""
    skip = set(ignore)
    keys = sorted((set(saved) | set(current)) - skip)
    return [f"{k}: {saved.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}"
            for k in keys if _norm(saved.get(k)) != _norm(current.get(k))]


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
