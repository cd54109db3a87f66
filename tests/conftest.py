"""Shared test helpers: deterministic seeds and randomised norm statistics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

os.environ.setdefault("OMP_NUM_THREADS", "1")
# one torch thread per pytest-xdist worker (the workers share the cores); up to two without xdist
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer random running statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


def randomize_psi(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every psi away from its constant init so that channels get different scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("psi"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


# Module-scoped fixtures that train or benchmark for seconds. `make test` runs pytest-xdist with
# --dist loadgroup: the tests that use one of these go to one worker, so the fixture is built once
# per session instead of once per worker (the `bench --quick` fixture alone takes ~20 s).
_SHARED_FIXTURES = {"test_bench.py": "quick_run", "test_distill.py": "teacher_run", "test_quantize.py": "run",
                    "test_train.py": "trained_run", "test_ddp.py": "full_run"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = _SHARED_FIXTURES.get(item.path.name)
        if name in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(f"{item.path.name}::{name}"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits_asr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder (``last.pt``, ``best.pt``, summary): ResNet-20 + ASR(SE), one epoch of two
    steps on the embedded digits. Module-scoped: tests that damage files work on copies."""
    from foldattn.train import TrainConfig, train
    from foldattn.train.data import load_dataset

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="digits", epochs=1, steps_per_epoch=2, batch_size=16, attention="se", asr=True,
                      output=str(out)), bundle=load_dataset("digits"), log=None)
    return out
