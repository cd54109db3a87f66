"""Import the ASR authors' published CIFAR ResNet checkpoints (Zhong et al., arXiv 2304.06345).

Their layout (PyTorch ``DataParallel`` training, pytorch-classification ResNets):

* the weights are the ``state_dict`` entry of the checkpoint dict, keys prefixed ``module.``;
* an ASR layer on a block's last BatchNorm is stored as ``bn3.bn.*`` (the BN),
  ``bn3.fused_bn.*`` (a deploy-time copy, ignored), ``bn3.vector`` (psi, ``(1, C, 1, 1)``)
  and ``bn3.attention_module.fc1.*`` / ``fc2.*`` (SE: Linear C -> round(C/16) -> C, ReLU, sigmoid);
* a classic SE of a block is ``attention_module.fc1.*`` / ``fc2.*``.

:func:`convert_reference_state` maps those keys onto :class:`foldattn.models.CifarResNet`
(``bn3.host.*``, ``bn3.attention.psi``, ``bn3.attention.fc*``, ``attention.fc*``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import UnreadableFile, torch_load
from ..models import CifarResNet
from .checkpoint import CheckpointError, load_model_state

__all__ = ["ReferenceInfo", "convert_reference_state", "load_reference"]


@dataclass(frozen=True)
class ReferenceInfo:
    """What a reference checkpoint holds: architecture and attention variant."""

    depth: int
    block: str
    num_classes: int
    asr: bool
    classic: bool

    @property
    def model_kwargs(self) -> dict[str, Any]:
        attention = "se" if (self.asr or self.classic) else None
        return {"num_classes": self.num_classes, "attention": attention, "asr": self.asr,
                "both": self.asr and self.classic}

    @property
    def variant(self) -> str:
        return {(False, False): "plain", (False, True): "+SE", (True, False): "+ASR(SE)",
                (True, True): "+ASR(SE)+SE"}[(self.asr, self.classic)]


_RENAMES = (
    (re.compile(r"^(.*\.bn3|.*\.bn2)\.bn\.(.+)$"), r"\1.host.\2"),
    (re.compile(r"^(.*\.bn3|.*\.bn2)\.attention_module\.(fc[12]\..+)$"), r"\1.attention.\2"),
    (re.compile(r"^(layer\d\.\d+)\.attention_module\.(fc[12]\..+)$"), r"\1.attention.\2"),
)


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _inspect(state: dict[str, Tensor]) -> ReferenceInfo:
    if "fc.weight" not in state or "conv1.weight" not in state:
        raise CheckpointError("not a CIFAR ResNet checkpoint of the ASR reference code: no conv1.weight / fc.weight")
    bottleneck = any(re.match(r"layer1\.0\.conv3\.weight$", k) for k in state)
    blocks = {m.group(1) for k in state if (m := re.match(r"^layer1\.(\d+)\.", k))}
    n = len(blocks)
    if n == 0 or any(not any(k.startswith(f"layer{s}.") for k in state) for s in (2, 3)):
        raise CheckpointError("the checkpoint does not have the three stages layer1..layer3 of a CIFAR ResNet")
    depth = (9 if bottleneck else 6) * n + 2
    asr = any(k.endswith(".vector") for k in state)
    classic = any(re.match(r"^layer\d\.\d+\.attention_module\.", k) for k in state)
    return ReferenceInfo(depth, "bottleneck" if bottleneck else "basic", int(state["fc.weight"].shape[0]), asr, classic)


def convert_reference_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], ReferenceInfo]:
    """Rename a reference ``state_dict`` to :class:`~foldattn.models.CifarResNet` keys."""
    state = _strip(state)
    info = _inspect(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".fused_bn." in key:
            continue  # a deployed copy of the same BN; we fold ourselves
        if key.endswith(".vector"):
            if value.dim() != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
                raise CheckpointError(f"{key}: expected psi of shape (1, C, 1, 1), got {tuple(value.shape)}")
            out[key.removesuffix(".vector") + ".attention.psi"] = value.reshape(1, -1)
            continue
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out, info


def load_reference(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[CifarResNet,
                                                                                            ReferenceInfo]:
    """Read a reference checkpoint (``weights_only=True``) and return the converted model (eval mode, ``dtype``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    try:  # the zip-inflation check first: a small crafted file must not inflate to gigabytes
        blob = torch_load(path, "reference checkpoint")
    except UnreadableFile as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e.why}") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors (the ASR reference layout)")
    converted, info = convert_reference_state(state)
    model = CifarResNet(info.depth, block=info.block, **info.model_kwargs).to(dtype)
    load_model_state(model, converted, f"reference checkpoint {path} ({info.variant}, depth {info.depth})")
    return model.eval(), info
