"""The CUDA tier: what only a GPU exercises (autocast fp16 with a gradient scaler, data on the device,
CUDA-event timing, NCCL). Marked ``cuda`` and skipped where no GPU is present, so ``make test`` and
CI run unchanged; ``pytest -m cuda`` (or ``benchmarks/gpu_check.sh``) runs it on a GPU machine.

Where CUDA and CPU differ on purpose, the test says so: kernels differ (cuDNN picks its own
convolution algorithms), so results are compared with a tolerance across devices, and bitwise only
within one device under ``--deterministic`` (which sets ``torch.use_deterministic_algorithms`` and
needs ``CUBLAS_WORKSPACE_CONFIG``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import foldattn
from foldattn import attention
from foldattn.train.data import TensorLoader, load_dataset
from foldattn.verify import TOLERANCES

from .conftest import randomize_norms, randomize_psi

# cuBLAS reads it when its first handle is made (during a test, after this import): deterministic matmuls
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA tier needs a GPU")]

CUDA = torch.device("cuda")
#: a few hundred ulps of each dtype at the output scale of a small network (float16's 10 mantissa bits, bf16's 7)
DTYPES = {torch.float32: TOLERANCES[torch.float32], torch.float16: TOLERANCES[torch.float16],
          torch.bfloat16: TOLERANCES[torch.bfloat16]}
ENV = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "foldattn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("att", [a for a in attention.names() if a != "dia"] + ["dia"])
def test_asr_trains_and_folds_on_cuda(att: str, dtype: torch.dtype) -> None:
    model = randomize_psi(randomize_norms(foldattn.create_model("cifar_resnet20", attention=att, asr=True)))
    model = model.to(CUDA, dtype)
    x = torch.randn(4, 3, 32, 32, device=CUDA, dtype=dtype)
    model.train()
    loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    psi = [p for n, p in model.named_parameters() if n.endswith("psi")]
    assert psi and all(p.grad is not None and torch.isfinite(p.grad).all() for p in psi)
    deployed = foldattn.fold(model)
    assert next(deployed.parameters()).device.type == "cuda"
    report = foldattn.verify(model, deployed, x, tolerance=DTYPES[dtype])
    assert report.dtype == dtype


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_attach_fold_verify_on_cuda(source: str) -> None:
    if source == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", num_classes=10)
    else:
        model = torchvision.models.resnet18(num_classes=10)
    model = randomize_psi(foldattn.attach(randomize_norms(model), "se")).to(CUDA)
    x = torch.randn(2, 3, 64, 64, device=CUDA)
    for fuse in (False, True):
        foldattn.verify(model, foldattn.fold(model, fuse_bn=fuse), x)


def test_data_on_device_gives_the_cpu_batches() -> None:
    """The crops and flips come from CPU generators in both cases, so the GPU batches are the CPU ones:
    the uint8 crops exactly, the normalised floats to float32 rounding (one division, one subtraction)."""
    bundle = load_dataset("digits")
    kw = dict(batch_size=32, mean=bundle.mean, std=bundle.std, train=True, pad=bundle.pad, flip=True, seed=3)
    cpu = TensorLoader(bundle.train, **kw)
    gpu = TensorLoader(bundle.train, **kw, device=CUDA)
    for epoch in (0, 2):
        cpu.set_epoch(epoch)
        gpu.set_epoch(epoch)
        for (a, ya), (b, yb) in zip(cpu.batches(5), gpu.batches(5), strict=True):
            assert b.device.type == "cuda" and torch.equal(ya, yb.cpu())
            torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_train_one_short_epoch_with_amp(tmp_path: Path, amp: str) -> None:
    out = tmp_path / amp
    done = _cli("train", "--device", "cuda", "--amp", amp, "--epochs", "1", "--steps-per-epoch", "6",
                "--attention", "se", "--asr", "--data-on-device", "-o", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["device"].startswith("cuda") and summary["run"]["amp"] == {"fp16": "float16",
                                                                                     "bf16": "bfloat16"}[amp]
    assert summary["finished"] and summary["final"]["top1"] is not None
    if amp == "fp16":  # the gradient scaler's state travels in the checkpoint
        assert torch.load(out / "last.pt", weights_only=True)["scaler"] is not None


def test_compile_and_channels_last_train(tmp_path: Path) -> None:
    done = _cli("train", "--device", "cuda", "--compile", "--channels-last", "--epochs", "1", "--steps-per-epoch", "4",
                "--attention", "se", "--asr", "-o", str(tmp_path / "c"), "--no-progress", timeout=900)
    assert done.returncode == 0, done.stderr


def test_resume_is_exact_on_cuda(tmp_path: Path) -> None:
    """Stopped mid-epoch and resumed, the run ends with the uninterrupted run's weights, bit for bit
    (``--deterministic``: cuDNN and cuBLAS pick reproducible algorithms; without it a GPU run is not
    reproducible even uninterrupted)."""
    from foldattn.train import TrainConfig, TrainingInterrupted, train

    def cfg(out: Path) -> TrainConfig:
        return TrainConfig(dataset="digits", epochs=2, steps_per_epoch=4, batch_size=32, attention="se", asr=True,
                           device="cuda", deterministic=True, data_on_device=True, amp="bf16", output=str(out))

    bundle = load_dataset("digits")
    train(cfg(tmp_path / "full"), bundle=bundle, log=None)

    def stop(event: str, info: dict) -> None:
        if event == "step" and (info["epoch"], info["step"]) == (1, 1):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C mid-epoch: a resumable checkpoint is written

    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "cut"), bundle=bundle, log=None, hook=stop)
    train(cfg(tmp_path / "cut"), resume=tmp_path / "cut", bundle=bundle, log=None)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_and_bench_from_cuda(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _cli("train", "--device", "cuda", "--epochs", "1", "--steps-per-epoch", "3", "--attention", "se", "--asr",
                "-o", str(run), "--no-progress").returncode == 0
    exported = _cli("export", str(run), "--onnx", str(tmp_path / "m.onnx"))
    assert exported.returncode == 0, exported.stderr
    bench = _cli("bench", "--quick", "--device", "cuda", "--out", str(tmp_path / "b"))
    assert bench.returncode == 0, bench.stderr
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["machine"]["device"].startswith("cuda") and "gpu" in result["machine"]
    rows = result["groups"][0]["rows"]
    assert all(r["latency_ms"]["median"] > 0 for r in rows)
    assert any(r["memory_mib"] for r in rows)  # torch.cuda.max_memory_allocated


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with NCCL needs two GPUs")
def test_ddp_with_nccl(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "foldattn.cli", "train", "--device", "cuda", "--epochs", "1", "--steps-per-epoch", "4",
                           "--attention", "se", "--asr", "--sync-bn", "-o", str(tmp_path / "ddp"), "--no-progress"],
                          capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2
