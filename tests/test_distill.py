"""Trained attention made free: calibration, then distillation (foldattn.stripe.distillation, `calibrate
--distill-epochs`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import foldattn
from foldattn import attention
from foldattn.calibrate import constant_model, strip_attention
from foldattn.cli import main
from foldattn.stripe import record_stripes
from foldattn.stripe.calibration import calibrate
from foldattn.stripe.distillation import deploy_student, distill, distillation_student
from foldattn.summary import count_params
from foldattn.train.data import load_dataset

from .conftest import randomize_norms

torch.set_num_threads(1)
TOL64 = 1e-10


def _images(n: int = 2, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
            for _ in range(n)]


def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, num_classes=10)


# (id, builder of a trained-looking attention model, builder of the architecture without its attention)
MODELS = [
    *[(f"foldattn-{a}", (lambda a=a: foldattn.create_model("cifar_resnet20", attention=a)),
       (lambda a=a: foldattn.create_model("cifar_resnet20", attention=None)), 32)
      for a in attention.list_attentions() if attention.get_attention(a).has_classic_form],
    ("torchvision-mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
     lambda: strip_attention(torchvision.models.mobilenet_v3_small(num_classes=10)), 64),
    ("torchvision-regnet_y_400mf", lambda: torchvision.models.regnet_y_400mf(num_classes=10),
     lambda: strip_attention(torchvision.models.regnet_y_400mf(num_classes=10)), 64),
    ("timm-seresnet18", lambda: _timm("seresnet18"), lambda: _timm("resnet18"), 64),
    ("timm-ecaresnet26t", lambda: _timm("ecaresnet26t"), lambda: strip_attention(_timm("ecaresnet26t")), 64),
    ("timm-efficientnet_b0", lambda: _timm("efficientnet_b0"), lambda: strip_attention(_timm("efficientnet_b0")), 64),
    ("timm-mobilenetv3_small_050", lambda: _timm("mobilenetv3_small_050"),
     lambda: strip_attention(_timm("mobilenetv3_small_050")), 64),
    ("timm-regnety_002", lambda: _timm("regnety_002"), lambda: strip_attention(_timm("regnety_002")), 64),
]


@pytest.mark.parametrize(("case", "make", "plain", "size"), MODELS, ids=[m[0] for m in MODELS])
def test_student_starts_as_the_calibrated_model_and_deploys_to_the_plain_architecture(
        case: str, make: object, plain: object, size: int) -> None:
    torch.manual_seed(0)
    model = randomize_norms(make()).double().eval()  # type: ignore[operator]
    data = _images(size=size)
    stripes = record_stripes(model, data, max_samples=0)
    constant = constant_model(model, stripes)
    student = distillation_student(constant, data[0][0][:2])
    x = data[1][0]
    assert foldattn.verify(constant, student, x).max_rel <= TOL64  # step 0 computes the calibrated model
    # each site is a trainable scale: ASR(scale) on the layer before it, or a learnable ChannelScale before a conv
    trainable = [n for n, p in student.named_parameters() if n.endswith(("psi", "scale"))]
    assert len(trainable) == len(stripes.layers)
    with torch.no_grad():  # a trained student: its scales moved away from the calibrated constants
        for n, p in student.named_parameters():
            if n.endswith("psi") or n.endswith("scale"):
                p.mul_(torch.rand_like(p) + 0.5)
    deployed = deploy_student(student, x[:2])
    assert foldattn.verify(student, deployed, x).max_rel <= TOL64
    if case in ("timm-ecaresnet26t",) or "cbam" in case:  # attention kept in part (CBAM's spatial gate)
        return
    target = plain().double()  # type: ignore[operator]
    target.load_state_dict(deployed.state_dict(), strict=True)
    assert foldattn.verify(deployed, target, x).max_rel <= TOL64


def test_distill_keeps_the_best_folded_epoch(teacher_run: Path) -> None:
    from foldattn.train.data import TensorLoader
    from foldattn.train.model import load_trained

    teacher, _, _ = load_trained(teacher_run)
    bundle = load_dataset("digits")
    train_loader = TensorLoader(bundle.train, 64, bundle.mean, bundle.std, train=True, pad=2, seed=0)
    val = TensorLoader(bundle.val, 128, bundle.mean, bundle.std, train=False)
    _, report = calibrate(teacher, TensorLoader(bundle.train, 128, bundle.mean, bundle.std, train=False))
    assert report.stripes is not None
    student = distillation_student(constant_model(teacher, report.stripes))
    sites = [x.name for x in report.stripes.layers]
    best, _, rep = distill(teacher, student, train_loader, val, epochs=2, sites=sites, log=None)
    assert [h["epoch"] for h in rep.history] == [0, 1, 2]
    assert rep.best["top1"] == max(h["top1"] for h in rep.history)
    assert not any(isinstance(m, foldattn.ASR) for m in best.modules())  # the deployed (folded) student
    assert count_params(best) == count_params(foldattn.create_model("cifar_resnet20"))
    assert rep.to_dict()["settings"]["temperature"] == 4.0
    assert all(p.requires_grad is False for p in teacher.parameters())  # the teacher stays frozen


def test_cli_calibrate_with_distillation(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["calibrate", str(teacher_run), "--distill-epochs", "1", "--max-images", "256", "-o", str(out)]) == 0
    result = json.loads((out / "calibration.json").read_text())
    assert {"before", "after_calibration", "after_distill", "distill"} <= set(result)
    assert result["after_distill"]["top1"] == max(h["top1"] for h in result["distill"]["history"])
    sites = result["distill"]["sites"]
    assert len(sites) == 9 and all({"stripe_score", "gate_mean", "gate_spread", "gap_before", "gap_after"} <= set(s)
                                   for s in sites)
    assert result["distill"]["fold_check"].startswith("OK")
    plain = foldattn.load_deployed(out / "calibrated.safetensors")  # the plain ResNet-20, rebuilt by name
    assert not any(isinstance(m, attention.ChannelAttention) for m in plain.modules())
    assert "after distillation" in capsys.readouterr().out


BAD = [
    ("negative", ["--distill-epochs", "-1"], "--distill-epochs"),
    ("with-finetune", ["--distill-epochs", "1", "--finetune-epochs", "1"], "choose one"),
    ("other-classes",
     ["--distill-epochs", "1", "--data", "imagefolder:{tree}", "--val-split", "3", "--batch-size", "4"], "classes"),
]


@pytest.mark.parametrize(("case", "extra", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_distillation_input_is_one_line(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            case: str, extra: list[str], message: str) -> None:
    from PIL import Image

    tree = tmp_path / "tree"
    for c in ("a", "b", "c"):
        (tree / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tree / c / f"{i}.png")
    out = tmp_path / "out"
    argv = ["calibrate", str(teacher_run), "-o", str(out), *[e.format(tree=tree) for e in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not out.exists()


def test_a_model_without_input_dependent_attention_is_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "cifar_resnet20", "--data", "digits", "--distill-epochs", "1",
                 "-o", str(tmp_path / "o")]) == 2
    assert "no input-dependent channel-attention module" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_interrupted_distillation_writes_nothing(teacher_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import foldattn.stripe.distillation as module

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "distill", interrupted)
    out = tmp_path / "out"
    assert main(["calibrate", str(teacher_run), "--distill-epochs", "1", "-o", str(out)]) == 130
    assert not out.exists()
