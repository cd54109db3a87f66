"""What one measurement runs: a model put on the device, its fixed random inputs, one training step.

Shared by the timing of a group (:mod:`.runner`), the peak-memory measurement
(:mod:`.memory`) and the profiles of missed targets (:mod:`.targets`), so that all three
run exactly the same work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..train.engine import training_step
from .config import BenchConfig
from .family import Family

__all__: list[str] = []

#: the optimizer of the measured training step (its cost, not its result, matters)
_SGD: dict[str, Any] = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}


def _prepare(model: nn.Module, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in eval mode (channels_last if ``cfg`` says so)."""
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _inputs(family: Family, batch: int, cfg: BenchConfig, device: torch.device) -> Tensor:
    """A fixed random batch of ``family``'s input size (seeded by ``cfg.seed`` and the batch size)."""
    g = torch.Generator().manual_seed(cfg.seed + batch)
    x = torch.randn(batch, *family.input_size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _train_step(model: nn.Module, family: Family, batch: int, cfg: BenchConfig,
                device: torch.device) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """A closure doing forward + cross-entropy + backward + SGD step on fixed random data."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), **_SGD)
    x = _inputs(family, batch, cfg, device)
    g = torch.Generator().manual_seed(cfg.seed)
    y = torch.randint(0, family.num_classes, (batch,), generator=g).to(device)

    def step() -> None:
        training_step(model, x, y, opt)

    return step, opt
