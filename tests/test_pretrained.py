"""Fine-tuning a trained model: output-preserving ASR and plain-architecture weights loaded into it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import foldattn
from foldattn import ASR, attention
from foldattn.cli import main
from foldattn.fold import asr_layers
from foldattn.train import TrainConfig, build_model, train
from foldattn.train.data import load_dataset
from foldattn.train.pretrained import PretrainedError, load_pretrained
from foldattn.train.runtime import Distributed
from foldattn.train.trainer import Trainer

torch.set_num_threads(1)
DIGITS = load_dataset("digits")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# --- preserve_outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", attention.names())
@pytest.mark.parametrize("model_name", ["cifar_resnet20", "resnet18", "norms"])
def test_preserve_outputs_starts_from_the_models_function(name: str, model_name: str) -> None:
    torch.manual_seed(0)
    if model_name == "cifar_resnet20":
        model, where = foldattn.create_model("cifar_resnet20"), "block"
    elif model_name == "resnet18":
        model, where = torchvision.models.resnet18(num_classes=10), "block"
    else:
        model, where = foldattn.create_model("cifar_resnet20"), "norms"
    model = _trained_like(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        attached = foldattn.attach(model, name, where=where, preserve_outputs=True).eval()
        assert _rel(attached(x), ref) < 1e-5  # float32 tolerance
        changed = foldattn.attach(model, name, where=where).eval()
        if name != "scale":  # scale starts at v = 1: attaching it changes nothing by design
            assert _rel(changed(x), ref) > 1e-2  # without it, attaching moves the outputs
        foldattn.verify(attached, foldattn.fold(attached), x)


@pytest.mark.parametrize("host", [nn.Conv2d(4, 6, 3), nn.Linear(5, 6), nn.LayerNorm(6), nn.GroupNorm(2, 6)],
                         ids=["conv", "linear", "layernorm", "groupnorm"])
def test_preserve_outputs_on_every_host_type_float64(host: nn.Module) -> None:
    host = host.double()
    with torch.no_grad():
        for p in host.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64) if isinstance(host, nn.Conv2d) else (
        torch.randn(3, 6, 5, 5, dtype=torch.float64) if isinstance(host, nn.GroupNorm)
        else torch.randn(3, 2, 5 if isinstance(host, nn.Linear) else 6, dtype=torch.float64))
    with torch.no_grad():
        ref = host(x)
        layer = ASR(host, "se", preserve_outputs=True)
        assert _rel(layer(x), ref) < 1e-12


def test_preserve_outputs_refusals() -> None:
    with pytest.raises(ValueError, match=r"too small to divide"):
        ASR(nn.BatchNorm2d(4), "ge", psi_init=-30.0, preserve_outputs=True)  # v0 = sigmoid(-30)
    with pytest.raises(ValueError, match="ASR\\(X\\) \\+ X"):
        ASR(nn.BatchNorm2d(4), "se", both=True, preserve_outputs=True)
    with pytest.raises(ValueError, match="use one of both=True and preserve_outputs=True"):
        foldattn.attach(foldattn.create_model("cifar_resnet20"), "se", both=True, preserve_outputs=True)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="parametrized"):
        ASR(conv, "se", preserve_outputs=True)


# --- loading plain weights ---------------------------------------------------------------------


def test_plain_weights_load_into_an_asr_model_and_keep_its_function(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = _trained_like(foldattn.create_model("cifar_resnet20")).eval()
    x = torch.randn(2, 3, 32, 32)
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))
    for variant in ({"attention": "se", "asr": True}, {"attention": "se"}):
        model = foldattn.create_model("cifar_resnet20", **variant).eval()
        info = load_pretrained(model, tmp_path / "plain.safetensors", log=None)
        assert info["loaded"] == len(plain.state_dict()) and info["new"] and not info["reinitialised"]
    asr = foldattn.create_model("cifar_resnet20", attention="se", asr=True).eval()
    load_pretrained(asr, tmp_path / "plain.safetensors", log=None)
    for _, layer in asr_layers(asr):
        layer.preserve_host_outputs()
    with torch.no_grad():
        assert _rel(asr(x), plain(x)) < 1e-5


@pytest.mark.parametrize("wrap", ["timm", "lightning", "ddp", "ema"])
def test_checkpoints_of_other_trainers(tmp_path: Path, wrap: str) -> None:
    plain = foldattn.create_model("cifar_resnet20")
    state = plain.state_dict()
    blob = {"timm": {"epoch": 3, "arch": "x", "state_dict": state, "optimizer": {}},
            "lightning": {"epoch": 1, "state_dict": {f"model.{k}": v for k, v in state.items()}},
            "ddp": {f"module.{k}": v for k, v in state.items()},
            "ema": {"state_dict_ema": state, "epoch": 2}}[wrap]
    torch.save(blob, tmp_path / "c.pth")
    model = foldattn.create_model("cifar_resnet20", attention="eca", asr=True)
    assert load_pretrained(model, tmp_path / "c.pth", log=None)["loaded"] == len(state)
    assert torch.equal(model.layer1[0].bn2.host.weight, state["layer1.0.bn2.weight"])


def test_a_changed_classifier_is_reinitialised_with_a_notice(tmp_path: Path) -> None:
    save_file(foldattn.create_model("cifar_resnet20", num_classes=100).state_dict(), str(tmp_path / "p.safetensors"))
    lines: list[str] = []
    model = foldattn.create_model("cifar_resnet20", num_classes=10)
    info = load_pretrained(model, tmp_path / "p.safetensors", log=lines.append)
    assert sorted(info["reinitialised"]) == ["fc.bias", "fc.weight"]
    assert any("re-initialised" in line for line in lines)


def test_bad_pretrained_files_are_refused(tmp_path: Path) -> None:
    asr_state = foldattn.create_model("cifar_resnet20", attention="se", asr=True).state_dict()
    save_file(asr_state, str(tmp_path / "asr.safetensors"))
    model = foldattn.create_model("cifar_resnet20", attention="se", asr=True)
    with pytest.raises(PretrainedError, match="fold it first"):
        load_pretrained(model, tmp_path / "asr.safetensors", log=None)
    save_file(foldattn.create_model("cifar_resnet32").state_dict(), str(tmp_path / "r32.safetensors"))
    with pytest.raises(PretrainedError, match="unused"):
        load_pretrained(model, tmp_path / "r32.safetensors", log=None)
    save_file({k: v for k, v in foldattn.create_model("cifar_resnet20").state_dict().items() if "layer3" not in k},
              str(tmp_path / "part.safetensors"))
    with pytest.raises(PretrainedError, match="missing from the file"):
        load_pretrained(model, tmp_path / "part.safetensors", log=None)
    assert load_pretrained(model, tmp_path / "part.safetensors", strict=False, log=None)["loaded"] > 0
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="weights_only"):
        load_pretrained(model, tmp_path / "junk.pt", log=None)
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(model, tmp_path / "nope.pt", log=None)


# --- through the trainer and the command line -------------------------------------------------------


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    train(TrainConfig(dataset="digits", epochs=1, steps_per_epoch=3, batch_size=32, output=str(out)),
          bundle=DIGITS, log=None)
    return out


def test_trainer_starts_from_the_pretrained_function(plain_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="digits", epochs=1, attention="se", asr=True, preserve_outputs=True,
                      pretrained=str(plain_run / "last.pt"), output=str(tmp_path / "ft"), channels_last=False)
    trainer = Trainer(cfg, Distributed(torch.device("cpu")), bundle=DIGITS, log=None)
    trainer.setup()
    plain = build_model(TrainConfig(dataset="digits"), DIGITS.num_classes)
    load_pretrained(plain, plain_run / "last.pt", log=None)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _rel(trainer.model.eval()(x), plain.eval()(x)) < 1e-5


def test_cli_fine_tunes_from_pretrained(plain_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
            "--attention", "se", "--asr", "--preserve-outputs", "--pretrained", str(plain_run / "last.pt"),
            "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["pretrained"].endswith("last.pt") and summary["config"]["preserve_outputs"] is True
    capsys.readouterr()
    assert main([*argv[:-3], "--both", "-o", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--preserve-outputs cannot keep" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--pretrained", str(tmp_path / "none.pt"),
                 "-o", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--where", "norms", "--attention", "se", "--asr",
                 "-o", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--where/--include/--exclude" in capsys.readouterr().err


def test_cli_where_and_include_for_torchvision_models(tmp_path: Path) -> None:
    out = tmp_path / "tv"
    assert main(["train", "--dataset", "digits", "--model", "torchvision:shufflenet_v2_x0_5", "--attention", "se",
                 "--asr", "--where", "norms", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8",
                 "-o", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["where"] == "norms"


# --- deploying what other trainers trained ----------------------------------------------------------


@pytest.mark.parametrize("trainer", ["timm", "lightning", "timm-ema"])
def test_fold_export_eval_take_other_trainers_checkpoints(tmp_path: Path, trainer: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = foldattn.attach(_trained_like(torchvision.models.resnet18(num_classes=10)), "se").eval()
    with torch.no_grad():
        for _, layer in asr_layers(model):
            layer.attention.psi.normal_()
    state = model.state_dict()
    blob = {"timm": {"epoch": 5, "state_dict": state},
            "lightning": {"epoch": 5, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in state.items()}},
            "timm-ema": {"state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": state},
            }[trainer]
    torch.save(blob, tmp_path / "ckpt.pth")
    opts = ["--model", "torchvision:resnet18", "--attention", "se", "--asr", *(["--ema"] if "ema" in trainer else [])]
    assert main(["fold", str(tmp_path / "ckpt.pth"), *opts, "-o", str(tmp_path / "dep")]) == 0
    assert "verify: OK" in capsys.readouterr().out
    deployed = foldattn.load_deployed(tmp_path / "dep" / "deployed.safetensors")  # torchvision builder recorded
    x = torch.randn(2, 3, 32, 32)
    foldattn.verify(model, deployed, x)
    assert main(["export", str(tmp_path / "ckpt.pth"), *opts, "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs PyTorch at two batch sizes" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "ckpt.pth"), *opts, "--dataset", "digits"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verify"].startswith("OK") and result["precision"] == "float32"


def test_other_trainers_checkpoint_needs_the_matching_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=10).state_dict()}, tmp_path / "plain.pth")
    assert main(["fold", str(tmp_path / "plain.pth"), "--model", "torchvision:resnet18", "--attention", "se", "--asr",
                 "-o", str(tmp_path / "o")]) == 2
    assert "checkpoint" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["fold", str(tmp_path / "plain.pth"), "--attention", "se", "-o", str(tmp_path / "o")]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_eval_uses_the_runs_precision_and_which(plain_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(plain_run), "--which", "best"]) == 0
    captured = capsys.readouterr()
    assert "best.pt (--which best)" in captured.err
    result = json.loads(captured.out)
    assert result["precision"] == "bfloat16" and result["checkpoint"].endswith("best.pt")
    summary = json.loads((plain_run / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["best"]["top1"], abs=0.3)  # the same precision as training
    assert main(["eval", str(plain_run), "--amp", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "float32"


def test_preprocessing_travels_with_the_model(plain_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from foldattn.train.checkpoint import load_checkpoint
    from foldattn.train.data import preprocessing

    expected = preprocessing(DIGITS)
    assert load_checkpoint(plain_run)["run"]["preprocessing"] == expected
    assert main(["fold", str(plain_run), "-o", str(tmp_path / "dep")]) == 0
    meta = json.loads((tmp_path / "dep" / "deployed.json").read_text())
    assert meta["user"]["preprocessing"] == expected
    capsys.readouterr()
    assert main(["eval", str(plain_run)]) == 0
    assert json.loads(capsys.readouterr().out)["preprocessing"] == expected
