"""Importing the ASR authors' checkpoint layout (synthetic checkpoints, checked against their semantics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from foldattn.cli import main
from foldattn.train import TrainConfig, build_model
from foldattn.train.checkpoint import CheckpointError, load_checkpoint, load_model_state
from foldattn.train.reference import load_reference

VARIANTS = {"plain": (False, False), "se": (False, True), "asr": (True, False), "asr+se": (True, True)}


def _linear(g: torch.Generator, out: int, inp: int) -> dict[str, Tensor]:
    return {"weight": torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.3,
            "bias": torch.randn(out, generator=g, dtype=torch.float64) * 0.1}


def _bn(g: torch.Generator, c: int) -> dict[str, Tensor]:
    return {"weight": 1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64),
            "bias": 0.1 * torch.randn(c, generator=g, dtype=torch.float64),
            "running_mean": 0.1 * torch.randn(c, generator=g, dtype=torch.float64),
            "running_var": 0.5 + torch.rand(c, generator=g, dtype=torch.float64),
            "num_batches_tracked": torch.tensor(100)}


def reference_state(n: int, classes: int, asr: bool, classic: bool, seed: int = 0) -> dict[str, Tensor]:
    """A random state_dict in the reference code's bottleneck layout (keys without 'module.')."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, Tensor] = {"conv1.weight": torch.randn(16, 3, 3, 3, generator=g, dtype=torch.float64) * 0.3}
    s.update({f"bn1.{k}": v for k, v in _bn(g, 16).items()})
    inplanes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}."
            out = planes * 4
            s[p + "conv1.weight"] = torch.randn(planes, inplanes, 1, 1, generator=g, dtype=torch.float64) * 0.3
            s.update({p + f"bn1.{k}": v for k, v in _bn(g, planes).items()})
            s[p + "conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g, dtype=torch.float64) * 0.1
            s.update({p + f"bn2.{k}": v for k, v in _bn(g, planes).items()})
            s[p + "conv3.weight"] = torch.randn(out, planes, 1, 1, generator=g, dtype=torch.float64) * 0.3
            hidden = round(out / 16)
            if asr:
                s.update({p + f"bn3.bn.{k}": v for k, v in _bn(g, out).items()})
                s.update({p + f"bn3.fused_bn.{k}": v for k, v in _bn(g, out).items()})  # must be ignored
                s[p + "bn3.vector"] = torch.randn(1, out, 1, 1, generator=g, dtype=torch.float64)
                s.update({p + f"bn3.attention_module.fc1.{k}": v for k, v in _linear(g, hidden, out).items()})
                s.update({p + f"bn3.attention_module.fc2.{k}": v for k, v in _linear(g, out, hidden).items()})
            else:
                s.update({p + f"bn3.{k}": v for k, v in _bn(g, out).items()})
            if classic:
                s.update({p + f"attention_module.fc1.{k}": v for k, v in _linear(g, hidden, out).items()})
                s.update({p + f"attention_module.fc2.{k}": v for k, v in _linear(g, out, hidden).items()})
            if b == 0:
                s[p + "downsample.0.weight"] = torch.randn(out, inplanes, 1, 1, generator=g, dtype=torch.float64)
                s.update({p + f"downsample.1.{k}": v for k, v in _bn(g, out).items()})
            inplanes = out
    s.update({f"fc.{k}": v for k, v in _linear(g, classes, inplanes).items()})
    return s


def reference_forward(s: dict[str, Tensor], x: Tensor, n: int) -> Tensor:
    """The reference code's eval-mode forward, written directly from its layout."""
    def bn(p: str, t: Tensor) -> Tensor:
        return F.batch_norm(t, s[p + ".running_mean"], s[p + ".running_var"], s[p + ".weight"], s[p + ".bias"])

    def se_gate(p: str, d: Tensor) -> Tensor:  # d: (N, C)
        h = F.relu(F.linear(d, s[p + ".fc1.weight"], s[p + ".fc1.bias"]))
        return torch.sigmoid(F.linear(h, s[p + ".fc2.weight"], s[p + ".fc2.bias"]))

    x = F.relu(bn("bn1", F.conv2d(x, s["conv1.weight"], padding=1)))
    for stage in (1, 2, 3):
        for b in range(n):
            p = f"layer{stage}.{b}."
            stride = 2 if (stage > 1 and b == 0) else 1
            out = F.relu(bn(p + "bn1", F.conv2d(x, s[p + "conv1.weight"])))
            out = F.relu(bn(p + "bn2", F.conv2d(out, s[p + "conv2.weight"], stride=stride, padding=1)))
            out = F.conv2d(out, s[p + "conv3.weight"])
            if p + "bn3.vector" in s:
                v = se_gate(p + "bn3.attention_module", s[p + "bn3.vector"].flatten(1))  # GAP of (1,C,1,1) = itself
                out = bn(p + "bn3.bn", out) * v[:, :, None, None]
            else:
                out = bn(p + "bn3", out)
            if p + "attention_module.fc1.weight" in s:
                out = out * se_gate(p + "attention_module", out.mean((2, 3)))[:, :, None, None]
            identity = x
            if p + "downsample.0.weight" in s:
                identity = bn(p + "downsample.1", F.conv2d(x, s[p + "downsample.0.weight"], stride=stride))
            x = F.relu(out + identity)
    return F.linear(x.mean((2, 3)), s["fc.weight"], s["fc.bias"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_reference_semantics(tmp_path: Path, variant: str) -> None:
    asr, classic = VARIANTS[variant]
    state = reference_state(n=1, classes=10, asr=asr, classic=classic)
    path = tmp_path / "ref.pth.tar"
    torch.save({"epoch": 164, "best_acc": 77.5, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model, info = load_reference(path, dtype=torch.float64)
    assert (info.depth, info.block, info.num_classes, info.asr, info.classic) == (11, "bottleneck", 10, asr, classic)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = reference_forward(state, x, n=1)
    with torch.no_grad():
        got = model(x)
    # float64: identical algebra up to round-off (tolerance 1e-10 relative to the output scale)
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_cli_import_resnet164(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = reference_state(n=18, classes=100, asr=True, classic=False)
    src = tmp_path / "resnet164_asr_se.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v.float() if v.is_floating_point() else v for k, v in state.items()}},
               src)
    assert main(["import-reference", str(src), "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "cifar_resnet164 +ASR(SE), 100 classes" in printed and "OK" in printed
    blob = load_checkpoint(tmp_path / "out")
    cfg = TrainConfig.from_dict(blob["config"])
    assert (cfg.model, cfg.dataset, cfg.attention, cfg.asr, cfg.both) == ("cifar_resnet164", "cifar100", "se", True,
                                                                          False)
    model = build_model(cfg, num_classes=100)
    load_model_state(model, blob["model"])  # strict: every key matches
    assert sum(k.endswith("attention.psi") for k in blob["model"]) == 54
    # the reference normalised CIFAR-100 with CIFAR-10's statistics; eval must feed it the same inputs
    recorded = blob["run"]["preprocessing"]
    assert recorded["mean"] == [0.4914, 0.4822, 0.4465] and recorded["std"] == [0.2023, 0.1994, 0.2010]
    from foldattn.train.data import load_dataset, with_preprocessing

    bundle = with_preprocessing(load_dataset("digits"), recorded)
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2023, 0.1994, 0.2010)


@pytest.mark.parametrize("bad", ["truncated", "not-resnet", "missing"])
def test_bad_reference_files(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "ref.pth"
    if bad == "truncated":
        torch.save({"state_dict": reference_state(1, 10, True, False)}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif bad == "not-resnet":
        torch.save({"state_dict": {"module.encoder.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match={"truncated": "not a readable", "not-resnet": "not a CIFAR ResNet",
                                               "missing": "does not exist"}[bad]):
        load_reference(path)
