"""Tests of foldattn.calibrate (expected-gate conversion, exact folds) and ``foldattn calibrate``.

Tolerances: folds are checked in float64 against the unfolded constant model at 1e-10
relative to the output scale (verify's float64 tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foldattn import attention
from foldattn.calibrate import ChannelScale, constant_model, fold_scales
from foldattn.cli import main
from foldattn.models import create_model
from foldattn.stripe import find_attention, record_stripes
from foldattn.stripe.calibration import calibrate, evaluate, finetune
from foldattn.verify import verify

torch.set_num_threads(1)
TOL64 = 1e-10


def _data(n_batches: int = 2, batch: int = 4, shape: tuple[int, ...] = (3, 8, 8), seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g, dtype=torch.float64), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


def _perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine and running stats, so a fold into them is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)
    return model


def _check_exact_fold(model: nn.Module, data: list, expected_actions: set[str]) -> None:
    model = model.double().eval()
    unfolded, rep0 = calibrate(model, data, fold=False)
    folded, rep = calibrate(model, data)
    assert {x.action for x in rep.layers} == expected_actions
    assert all(x.action == "kept" for x in rep0.layers)
    assert not any(isinstance(m, ChannelScale) for m in folded.modules()) or "kept" in expected_actions
    verify(unfolded, folded, data[0][0], tolerance=TOL64)


def test_channel_scale() -> None:
    s = ChannelScale(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(s(torch.ones(1, 2, 3)), torch.tensor([[[1.0] * 3, [2.0] * 3]]))
    with pytest.raises(ValueError, match=r"expects \(N, 2, \.\.\.\)"):
        s(torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match="vector"):
        ChannelScale(torch.ones(2, 2))


# ----------------------------------------------------------------------------- exact folds on models
@pytest.mark.parametrize("att", ["se", "eca", "cbam", "dia", "srm", "ge"])
def test_project_models_fold_into_bn(att: str) -> None:
    torch.manual_seed(0)
    _check_exact_fold(_perturb_norms(create_model("cifar_resnet20", attention=att)), _data(), {"into-norm"})


def test_asr_plus_x_folds_into_asr_host() -> None:
    torch.manual_seed(0)
    model = _perturb_norms(create_model("cifar_resnet20", attention="se", asr=True, both=True))
    _check_exact_fold(model, _data(), {"into-asr-host"})
    folded, rep = calibrate(model.double(), _data())
    assert rep.layers[0].target == "layer1.0.bn2.host"
    from foldattn import fold

    verify(folded, fold(folded), _data()[0][0], tolerance=TOL64)  # ASR still folds afterwards


def test_attached_asr_plus_x_calibrates_to_the_plain_backbone() -> None:
    """attach(..., both=True) puts the classic module inside the ASR layer; it folds into the ASR host."""
    import torchvision

    from foldattn import fold
    from foldattn.attach import attach

    torch.manual_seed(0)
    model = attach(_perturb_norms(torchvision.models.resnet18(num_classes=4)), "se", both=True)
    data = _data(1, 2, shape=(3, 32, 32))
    _check_exact_fold(model, data, {"into-asr-host"})
    folded, rep = calibrate(model.double(), data)
    assert rep.layers[0].name == "layer1.0.bn2.classic" and rep.layers[0].target == "layer1.0.bn2.host"
    deployed = fold(folded)
    verify(folded, deployed, data[0][0], tolerance=TOL64)
    torchvision.models.resnet18(num_classes=4).double().load_state_dict(deployed.state_dict(), strict=True)


def test_torchvision_mobilenet_folds_into_projection_conv() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    data = _data(1, 2, shape=(3, 32, 32))
    _check_exact_fold(model, data, {"into-conv-in"})
    _, rep = calibrate(model.double(), data)
    assert rep.layers[0].name == "features.1.block.1" and rep.layers[0].target == "features.1.block.2.0"


def test_grouped_projection_and_sequential_fallback() -> None:
    from torchvision.ops import SqueezeExcitation

    class Untraceable(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
                                      SqueezeExcitation(8, 4), nn.Conv2d(8, 4, 3, padding=1, groups=2))
            self.se2 = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), SqueezeExcitation(6, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.se2(self.body(x))
            return y if float(y.sum()) > -1e9 else -y

    torch.manual_seed(0)
    model = _perturb_norms(Untraceable())
    data = _data(2, 3)
    _check_exact_fold(model, data, {"into-conv-in", "into-norm"})
    _, rep = calibrate(model.double(), data)
    assert [(x.name, x.action, x.target) for x in rep.layers] == [
        ("body.3", "into-conv-in", "body.4"), ("se2.2", "into-norm", "se2.1")]


def test_sequential_fallback_reaches_into_nested_blocks() -> None:
    from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(Conv2dNormActivation(3, 8, 3), SqueezeExcitation(8, 4),
                                       Conv2dNormActivation(8, 4, 1, activation_layer=None))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x) if x.shape[0] > 0 else x  # tensor-dependent branch: no fx trace

    torch.manual_seed(0)
    model = _perturb_norms(Untraceable())
    with pytest.raises(Exception):  # noqa: B017 - the point: torch.fx cannot trace it
        torch.fx.symbolic_trace(model)
    _check_exact_fold(model, _data(), {"into-conv-in"})
    _, rep = calibrate(model.double(), _data())
    assert rep.layers[0].target == "block.2.0"


def test_timm_modules_fold() -> None:
    timm = pytest.importorskip("timm")
    from timm.models._efficientnet_blocks import SqueezeExcite

    torch.manual_seed(0)
    resnet_like = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), timm.layers.SEModule(8, rd_ratio=0.25))
    _check_exact_fold(_perturb_norms(resnet_like), _data(), {"into-norm"})
    effnet_like = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), SqueezeExcite(8),
                                nn.Conv2d(8, 4, 1))
    _check_exact_fold(effnet_like, _data(), {"into-conv-in"})


@settings(max_examples=15, deadline=None)
@given(c=st.sampled_from([2, 4, 6]), out=st.sampled_from([2, 6]), k=st.sampled_from([1, 3]),
       act=st.sampled_from(["none", "relu", "hardswish", "silu"]), grouped=st.booleans(), seed=st.integers(0, 999))
def test_fold_is_exact_over_block_shapes(c: int, out: int, k: int, act: str, grouped: bool, seed: int) -> None:
    """conv -> BN -> [activation] -> SE -> conv: backward into the BN without an activation, else forward."""
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(seed)
    groups = 2 if grouped else 1
    acts = {"none": nn.Identity, "relu": nn.ReLU, "hardswish": nn.Hardswish, "silu": nn.SiLU}
    layers = [nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)] + ([] if act == "none" else [acts[act]()])
    model = nn.Sequential(*layers, SqueezeExcitation(c, 1), nn.Conv2d(c, out, k, padding=k // 2, groups=groups))
    _check_exact_fold(_perturb_norms(model, seed), _data(1, 3, seed=seed),
                      {"into-norm" if act == "none" else "into-conv-in"})


def test_unfoldable_keeps_channel_scale() -> None:
    class TwoUses(nn.Module):  # the BN output feeds the attention and a skip: no exact fold
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.att = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), attention.create("se", 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return self.att(y) + y

    _check_exact_fold(TwoUses(), _data(), {"kept"})


def test_constant_gate_calibrates_to_the_same_model() -> None:
    """An SE whose gate ignores the input (fc2 weight 0) is its expected gate: calibration is exact."""
    torch.manual_seed(0)
    model = _perturb_norms(create_model("cifar_resnet20", attention="se")).double().eval()
    for site in find_attention(model):
        with torch.no_grad():
            site.module.fc2.weight.zero_()
            site.module.fc2.bias.normal_()
    folded, rep = calibrate(model, _data())
    assert rep.folded == 9 and all(x.gate_mean_std < 1e-12 for x in rep.layers)
    verify(model, folded, _data(seed=5)[0][0], tolerance=TOL64)
    # deployed = the plain backbone: its state dict loads strictly into the model built without attention
    plain = create_model("cifar_resnet20").double()
    plain.load_state_dict(folded.state_dict(), strict=True)
    verify(model, plain, _data(seed=6)[0][0], tolerance=TOL64)


def test_calibration_uses_mean_gate_and_copies() -> None:
    model = create_model("cifar_resnet20", attention="se").double()
    data = _data()
    r = record_stripes(model, data, max_samples=0)
    const = constant_model(model, r)
    scale = const.get_submodule("layer2.1.attention")
    assert isinstance(scale, ChannelScale)
    torch.testing.assert_close(scale.scale, torch.tensor(r.layer("layer2.1.attention").gate.mean, dtype=torch.float64))
    assert len(find_attention(model)) == 9  # the input model is untouched


def test_layer_selection_and_dia_chains() -> None:
    model = create_model("cifar_resnet20", attention="se").double()
    converted, rep = calibrate(model, _data(), layers=["layer1.*"])
    assert [x.name for x in rep.layers] == ["layer1.0.attention", "layer1.1.attention", "layer1.2.attention"]
    assert len(find_attention(converted)) == 6
    with pytest.raises(ValueError, match="DIA blocks share one LSTM state"):
        calibrate(create_model("cifar_resnet20", attention="dia").double(), _data(), layers=["layer1.0.attention"])


def test_calibrate_bad_input() -> None:
    with pytest.raises(ValueError, match=r"searched for: foldattn; torchvision\.SqueezeExcitation"):
        calibrate(create_model("cifar_resnet20"), _data())
    with pytest.raises(ValueError, match=r"available: layer1\.0\.attention"):
        calibrate(create_model("cifar_resnet20", attention="se"), _data(), layers=["nope"])
    with pytest.raises(ValueError, match="yielded nothing"):
        calibrate(create_model("cifar_resnet20", attention="se"), [])


def test_fold_scales_without_scales_is_a_no_op() -> None:
    assert fold_scales(create_model("cifar_resnet20")) == []


# ----------------------------------------------------------------------------- accuracy and fine-tuning
class _Fixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, dtype=x.dtype) + self.w
        logits[:, 1] += 1
        return logits


def test_evaluate_counts() -> None:
    data = [(torch.zeros(4, 1, 2, 2), torch.tensor([1, 1, 0, 2])), (torch.zeros(2, 1, 2, 2), torch.tensor([1, 0]))]
    res = evaluate(_Fixed(), data)
    assert res["top1"] == pytest.approx(100 * 3 / 6) and res["images"] == 6
    assert evaluate(_Fixed(), data, max_images=3)["images"] == 3
    with pytest.raises(ValueError, match="yielded no images"):
        evaluate(_Fixed(), [])
    with pytest.raises(TypeError, match="labels"):
        evaluate(_Fixed(), [torch.zeros(2, 1, 2, 2)])


def test_finetune_lowers_loss_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(32, 1, 2, 2)
    y = (x.flatten(1).sum(1) > 0).long()
    losses = finetune(model, [(x, y)], epochs=5, lr=0.1)
    assert len(losses) == 5 and losses[-1] < losses[0] and not model.training
    assert finetune(model, [(x, y)], epochs=0) == []
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, [(x, y)], epochs=-1)


# ----------------------------------------------------------------------------- CLI
def test_cli_calibrate(tmp_path, capsys) -> None:
    rc = main(["calibrate", "cifar_resnet20", "--attention", "se", "--max-images", "32", "--batch-size", "64",
               "--finetune-epochs", "1", "-o", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["folded"] == 9 and report["params_after"] < report["params_before"]
    assert report["num_images"] == 32 and "after_finetune" in report and report["fold_check"].startswith("OK")
    from foldattn.deploy import load_deployed

    plain = load_deployed(tmp_path / "calibrated.safetensors")  # rebuilt as the plain ResNet-20
    assert not find_attention_or_none(plain) and report["weights"].endswith("calibrated.safetensors")
    out = capsys.readouterr().out
    assert "9 of 9 attention modules folded away" in out and "latency" in out


def find_attention_or_none(model: nn.Module) -> list:
    try:
        return find_attention(model)
    except ValueError:
        return []


def test_cli_calibrate_torchvision_saves_without_builder(tmp_path) -> None:
    from foldattn.deploy import load_deployed, read_metadata

    assert main(["calibrate", "torchvision:mobilenet_v3_small", "--max-images", "8", "-o", str(tmp_path)]) == 0
    path = tmp_path / "calibrated.safetensors"
    assert read_metadata(path)["builder"] is None
    with pytest.raises(ValueError):
        load_deployed(path)  # no builder: needs model=, an instance with the converted tree
    same_tree, _ = calibrate(_mobilenet_like(), [torch.zeros(1, 3, 16, 16)])
    load_deployed(path, model=same_tree)


def _mobilenet_like() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=10)


def test_cli_calibrate_errors(tmp_path, capsys) -> None:
    assert main(["calibrate", "cifar_resnet20", "-o", str(tmp_path)]) == 2
    assert "no input-dependent channel-attention module" in capsys.readouterr().err
    assert main(["calibrate", "cifar_resnet20", "--attention", "se", "--finetune-epochs", "-1",
                 "-o", str(tmp_path)]) == 2
    assert "--finetune-epochs" in capsys.readouterr().err
    assert not (tmp_path / "calibrated.safetensors").exists()


@pytest.mark.parametrize("att", ["se", "cbam", "spa"])
def test_report_names_the_dropped_spatial_gate(att: str) -> None:
    """Per site, the report says what a constant cannot keep: CBAM's spatial gate; SPA and SE lose nothing else."""
    torch.manual_seed(0)
    _, rep = calibrate(create_model("cifar_resnet20", attention=att).double(), _data())
    dropped = {x.dropped for x in rep.layers}
    if att == "cbam":
        assert len(rep.layers) == 9 and all(d is not None and "spatial gate" in d for d in dropped)
        assert "spatial gate" in rep.table() and "spatial gate" in str(rep.to_dict()["layers"][0]["dropped"])
    else:
        assert dropped == {None}


def test_timm_cbam_spatial_gate_is_named() -> None:
    pytest.importorskip("timm")
    from timm.layers.cbam import CbamModule
    from timm.layers.squeeze_excite import SEModule

    from foldattn.calibrate import dropped_part

    assert dropped_part(CbamModule(32)) is not None and dropped_part(SEModule(32)) is None


def test_a_long_recovery_says_how_long_after_its_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate --distill-epochs 1000000000 ran with no word about when it would end: the epochs are now
    bounded, and a run expected past an hour (its first batch timed) says so before it goes on."""
    from foldattn.stripe import calibration
    from foldattn.stripe.distillation import distill, distillation_student

    lines: list[str] = []
    assert calibration.announce_duration(2.0, 10, "distillation", lines.append) == 20.0 and lines == []
    calibration.announce_duration(2.0, 10_000, "distillation", lines.append)
    assert lines == ["distillation: about 5.6 hours expected (10,000 batches at 2 s, the first one timed); "
                     "Ctrl-C stops it"]
    calibration.announce_duration(30.0, 10_000, "fine-tuning", lines.append)
    assert lines[-1].startswith("fine-tuning: about 3 days expected")
    # wired into both recoveries: with the threshold at 0 each announces itself once, after its first batch
    monkeypatch.setattr(calibration, "ANNOUNCE_AFTER_S", 0.0)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", attention="se").double().eval()
    lines.clear()
    finetune(constant_model(model, calibrate(model, _data())[1].stripes), _data(), epochs=3, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("fine-tuning: about") and "(6 batches at" in lines[0]
    stripes = calibrate(model, _data())[1].stripes
    student = distillation_student(constant_model(model, stripes), _data()[0][0][:2])
    lines.clear()
    distill(model, student, _data(), _data(), epochs=2, log=lines.append)
    announced = [x for x in lines if x.startswith("distillation: about")]
    assert len(announced) == 1 and "(4 batches at" in announced[0]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--distill-epochs", "1000000000", "--distill-epochs: 1000000000 is too large; give an integer in [0, 1000]"),
    ("--finetune-epochs", "1001", "--finetune-epochs: 1001 is too large"),
    ("--bench-batch", "5000", "--bench-batch: 5000 is too large"),
    ("--batch-size", "100000", "--batch-size: 100000 is too large"),
    ("--max-images", "100000000", "--max-images: 100000000 is too large"),
])
def test_cli_calibrate_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str,
                              message: str) -> None:
    assert main(["calibrate", "cifar_resnet20", "--attention", "se", option, value, "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "c").exists()


def test_a_diverging_distillation_is_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    from foldattn.cli import main
    from foldattn.train import TrainConfig, train

    run = tmp_path / "se"
    train(TrainConfig(dataset="digits", epochs=1, steps_per_epoch=2, batch_size=16, attention="se", output=str(run)),
          log=None)
    out = tmp_path / "out" / "c"
    code = main(["calibrate", str(run), "--distill-epochs", "1", "--distill-lr", "900", "--max-images", "32",
                 "--batch-size", "32", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "the distillation loss is" in err and "lower the learning rate" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
