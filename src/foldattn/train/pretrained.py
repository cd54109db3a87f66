"""Trained weights of the plain model, loaded into a model that may carry attention or ASR layers.

``foldattn train --pretrained PATH`` starts from a model someone already trained: a safetensors
file (a state dict, or a foldattn deployed file), or a weights-only ``.pt``/``.pth`` (a state dict,
or a checkpoint of timm's ``train.py``, Lightning or foldattn, whose weights are under
``state_dict`` / ``model``). The weights are those of the *plain* architecture: an ASR layer's
host takes the weights of the layer it wraps (``bn2.weight`` -> ``bn2.host.weight``), attention
modules start from their initialisation, and a classifier of another size is re-initialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._files import torch_load
from ..asr import ASR
from ..attention import ChannelAttention

__all__ = ["PretrainedError", "read_state_dict", "load_pretrained"]

_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning's usual attribute


class PretrainedError(ValueError):
    """The pretrained file cannot be read, or its weights do not fit the plain architecture."""


def read_state_dict(path: str | os.PathLike[str], key: str | None = None,
                    what: str = "--pretrained") -> dict[str, Tensor]:
    """The tensors of a weights file, never executing code (safetensors, or ``torch.load(weights_only=True)``).

    Args:
        path: ``.safetensors``, or ``.pt``/``.pth``/``.ckpt`` holding a state dict or a checkpoint dict.
        key: which entry of a checkpoint dict holds the weights (default: the first of
            ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema`` present).
        what: how messages name the file (the option or role it came from).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{what} {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise PretrainedError(f"{what} {path}: not a readable safetensors file ({e})") from None
    try:
        blob = torch_load(path, what)
    except ValueError as e:  # a zip bomb, pickles with code, truncated files, ...
        raise PretrainedError(str(e)) from None
    if isinstance(blob, dict) and blob and all(isinstance(v, Tensor) for v in blob.values()):
        if key is not None:
            raise PretrainedError(f"{what} {path}: a plain state dict has no entry {key!r}")
        return dict(blob)
    if not isinstance(blob, dict):
        raise PretrainedError(f"{what} {path}: holds a {type(blob).__name__}, not a state dict")
    keys = [key] if key is not None else ["state_dict", "model", "state_dict_ema", "model_ema"]
    for k in keys:
        value = blob.get(k)
        if isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            return dict(value)
    raise PretrainedError(f"{what} {path}: no state dict under {', '.join(map(repr, keys))} "
                          f"(entries: {', '.join(map(str, list(blob)[:8]))})")


def _strip_prefix(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove a wrapper prefix every key carries, when that makes the keys match the model."""
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k in expected for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _plain_names(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """``{plain key: model key}`` for weights the plain model has, and the keys that are new
    (attention modules, psi) and start from their initialisation."""
    asr = sorted((n for n, m in model.named_modules() if isinstance(m, ASR) and n), key=len, reverse=True)
    attention = [n for n, m in model.named_modules() if isinstance(m, ChannelAttention) and n]
    mapping: dict[str, str] = {}
    new: set[str] = set()
    for key in model.state_dict():
        owner = next((a for a in asr if key.startswith(f"{a}.")), None)
        if owner is not None and key.startswith(f"{owner}.host."):
            mapping[f"{owner}.{key[len(owner) + len('.host.'):]}"] = key
        elif owner is not None or any(key.startswith(f"{a}.") for a in attention):
            new.add(key)
        else:
            mapping[key] = key
    return mapping, new


def _classifier(model: nn.Module) -> str | None:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True,
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Load the plain-architecture weights of ``path`` into ``model`` (in place).

    Args:
        model: the model to train: plain, with classic attention, or with ASR layers.
        path: see :func:`read_state_dict`.
        strict: every weight of the file must be used and every weight of the plain model
            found (attention modules and the ASR vectors excepted); ``False`` loads what fits.
        log: where the one-line notices go (a re-initialised classifier, new modules).

    Returns:
        ``{"loaded": n, "new": [keys], "reinitialised": [keys]}``.

    Raises:
        PretrainedError: unreadable file, ASR training-form weights, or weights that do not fit.
    """
    state = read_state_dict(path)
    mapping, new = _plain_names(model)
    state = _strip_prefix(state, set(mapping))
    if any(".host." in k or k.endswith("psi") for k in state):
        raise PretrainedError(f"--pretrained {path}: holds ASR training-form weights (host/psi); fold it first "
                              "(foldattn fold RUN -o DIR) and pass the deployed .safetensors")
    target = model.state_dict()
    head = _classifier(model)
    reinit, missing, shape = [], [], []
    loaded = 0
    for plain, key in mapping.items():
        if plain not in state:
            missing.append(plain)
            continue
        value = state.pop(plain)
        if value.shape != target[key].shape:
            if head is not None and key.startswith(f"{head}."):
                reinit.append(key)
                continue
            shape.append(f"{plain}: file {tuple(value.shape)}, model {tuple(target[key].shape)}")
            continue
        target[key].copy_(value.to(target[key].dtype))
        loaded += 1
    unexpected = sorted(state)
    if shape:
        raise PretrainedError(f"--pretrained {path}: {len(shape)} weight(s) of another shape, e.g. {shape[0]}; "
                              "is it the same architecture (--model, --model options)?")
    if strict and (missing or unexpected):
        what = []
        if missing:
            what.append(f"{len(missing)} weight(s) of the model missing from the file, e.g. {missing[:3]}")
        if unexpected:
            what.append(f"{len(unexpected)} weight(s) of the file unused, e.g. {unexpected[:3]}")
        raise PretrainedError(f"--pretrained {path}: " + "; ".join(what) + " (strict loading)")
    if reinit:
        head_mod = cast(nn.Linear, model.get_submodule(cast(str, head)))  # reinit: keys of the Linear head
        head_mod.reset_parameters()
        if log is not None:
            log(f"--pretrained: the classifier {head} has another size here; re-initialised it")
    if log is not None and new:
        log(f"--pretrained: loaded {loaded} weights; {len(new)} attention/ASR tensors start from their initialisation")
    return {"loaded": loaded, "new": sorted(new), "reinitialised": reinit}
