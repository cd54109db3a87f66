"""Shared test helpers: deterministic seeds and randomised norm statistics."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
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


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test session, whichever pytest-xdist worker asks first.

    For expensive read-only fixtures (the `bench --quick` run takes ~20 s): a module-scoped fixture
    is built once per worker, and `make test` runs a worker per core. The other workers wait for
    the first one under a file lock, then reuse its folder. (xdist's own ``--dist loadgroup`` does
    not group tests under pytest 9.2, whose node ids it can no longer rewrite.)
    """
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained classic-SE ResNet-20 on the digits (two epochs): the teacher that calibration, distillation
    and the budget search convert. Module-scoped."""
    from foldattn.train import TrainConfig, train
    from foldattn.train.data import load_dataset

    out = tmp_path_factory.mktemp("teacher")
    train(TrainConfig(dataset="digits", recipe="digits", epochs=2, batch_size=32, attention="se", lr=0.05,
                      decay_all=True, output=str(out)), bundle=load_dataset("digits"), log=None)
    return out


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


@pytest.fixture(scope="module")
def recorded_8192(digits_asr_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the digits run's checkpoint recording 8192x8192 images (within the structure check's limit):
    an example batch made at that size would take tens of GB, so commands must bound it first."""
    blob = torch.load(digits_asr_run / "last.pt", weights_only=True)
    blob["run"]["image_size"] = [8192, 8192]
    path = tmp_path_factory.mktemp("r8192") / "last.pt"
    torch.save(blob, path)
    return path
