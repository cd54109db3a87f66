"""foldattn.integrations.lightning: ASRCallback with a real Lightning Trainer on the embedded digits (CPU)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import foldattn
from foldattn.fold import asr_layers
from foldattn.integrations.lightning import STRIPE_STATISTICS, ASRCallback, FoldVerificationError

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
DOC = Path(__file__).resolve().parents[1] / "docs" / "lightning.md"


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def stripe_calls(self) -> list[tuple[int | None, dict[str, float]]]:
        return [(step, m) for step, m in self.calls if any(k.startswith("stripe/") for k in m)]


class ParamProbe(pl.Callback):
    """At the start of training (after every callback's setup and configure_optimizers): the ASR
    parameters' values, and which of them the optimizer holds."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = _asr_parameters(pl_module)
        self.before = {name: p.detach().clone() for name, p in params.items()}
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.in_optimizer = {name: id(p) in optimized for name, p in params.items()}


def _asr_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of the ASR layers' attention (psi and T), by name."""
    return {f"{name}.attention.{n}": p for name, layer in asr_layers(module)
            for n, p in layer.attention.named_parameters()}


@dataclass
class Digits:
    train: TensorDataset
    val: TensorDataset

    def loaders(self, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
        return (DataLoader(self.train, batch_size=batch_size, shuffle=True),
                DataLoader(self.val, batch_size=batch_size))


@pytest.fixture(scope="module")
def digits() -> Digits:
    from foldattn.train.data import load_dataset

    bundle = load_dataset("digits")
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)

    def normalised(split: Any) -> TensorDataset:
        return TensorDataset((split.images.float() / 255 - mean) / std, split.labels)

    return Digits(normalised(bundle.train), normalised(bundle.val))


class LitClassifier(pl.LightningModule):
    """A user's module around a plain foldattn ResNet-20 (no ASR: the callback attaches it)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model if model is not None else foldattn.create_model("cifar_resnet20", num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class LitTinyNet(LitClassifier):
    """The network's layers on the LightningModule itself (the callback's default target)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = _Residual(8), _Residual(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def _trainer(callbacks: list[pl.Callback], logger: Logger | bool = False, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2}
    options.update(kwargs)
    return pl.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=callbacks, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, **options)


@dataclass
class Run:
    callback: ASRCallback
    trainer: pl.Trainer
    module: LitClassifier
    logger: MemoryLogger
    probe: ParamProbe
    dirpath: Path


def _fit(digits: Digits, dirpath: Path, callback: ASRCallback, **trainer_kwargs: Any) -> Run:
    module, logger, probe = LitClassifier(), MemoryLogger(), ParamProbe()
    trainer = _trainer([callback, probe], logger=logger, **trainer_kwargs)
    trainer.fit(module, *digits.loaders())
    return Run(callback, trainer, module, logger, probe, dirpath)


@pytest.fixture(scope="module")
def asr_run(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """ASR(SE) attached to ``module.model``, one epoch of 3 steps; ONNX too where onnxruntime is installed."""
    out = tmp_path_factory.mktemp("asr") / "deployed"
    return _fit(digits, out, ASRCallback("se", module="model", dirpath=out, onnx=HAS_ORT))


@pytest.fixture(scope="module")
def stripes_run(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """ASR(SE) + SE (both=True), stripes recorded every epoch over at most 40 images, 2 epochs of 2 steps."""
    out = tmp_path_factory.mktemp("stripes") / "deployed"
    callback = ASRCallback("se", module="model", both=True, dirpath=out, log_stripes=True, stripe_max_images=40)
    return _fit(digits, out, callback, max_epochs=2, limit_train_batches=2)


def _relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def _val_images(digits: Digits, start: int = 64, stop: int = 192) -> Tensor:
    """Validation images the callback did not verify on (it used the first batch of 32)."""
    return digits.val.tensors[0][start:stop]


# ------------------------------------------------------------------------------------- training
def test_asr_parameters_are_optimized_and_trained(asr_run: Run) -> None:
    report = asr_run.callback.attach_report
    assert report is not None and len(report) == 9  # ResNet-20: one site per residual block
    probe = asr_run.probe
    assert probe.before and all(probe.in_optimizer.values()), probe.in_optimizer
    after = _asr_parameters(asr_run.module)
    assert set(after) == set(probe.before)
    changed = {name for name, p in after.items() if not torch.equal(p.detach(), probe.before[name])}
    untrained = [name for name in report.names if not any(n.startswith(f"model.{name}.") for n in changed)]
    assert not untrained, f"no attention parameter of these ASR layers changed: {untrained}"
    # psi itself moved (in a layer where SE's hidden ReLU units are all negative at psi, it gets no gradient)
    assert any(name.endswith(".psi") for name in changed)


def test_folded_model_computes_what_the_trained_model_computes(asr_run: Run, digits: Digits) -> None:
    callback = asr_run.callback
    assert callback.verify_report is not None and callback.verify_report.passed
    assert callback.verify_report.max_rel <= 1e-5
    deployed = callback.deployed
    assert deployed is not None and not asr_layers(deployed)
    assert asr_layers(asr_run.module.model), "the trained model keeps its ASR layers (the fold works on a copy)"
    foldattn.create_model("cifar_resnet20", num_classes=10).load_state_dict(deployed.state_dict(), strict=True)
    x = _val_images(digits)
    with torch.no_grad():
        trained, folded = asr_run.module.model.eval()(x), deployed.eval()(x)
    assert _relative_error(trained, folded) <= 1e-5


def test_deployed_file_loads_into_the_plain_architecture(asr_run: Run, digits: Digits) -> None:
    path = asr_run.dirpath / "model.safetensors"
    assert asr_run.callback.deployed_path == path and path.is_file()
    plain = foldattn.load_deployed(path)
    assert type(plain) is type(foldattn.create_model("cifar_resnet20", num_classes=10)) and not asr_layers(plain)
    x = _val_images(digits)
    with torch.no_grad():
        trained, loaded = asr_run.module.model.eval()(x), plain(x)
    assert _relative_error(trained, loaded) <= 1e-5
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["asr_layers_folded"] == 9
    info = meta["user"]["lightning"]
    assert info["verify"]["inputs"] == "the first validation batch"
    assert info["verify"]["max_rel"] <= 1e-5 and info["global_step"] == 3


def test_no_stripe_metrics_unless_asked(asr_run: Run) -> None:
    assert any("val_acc" in m for _, m in asr_run.logger.calls)  # the logger did receive the run's metrics
    assert not asr_run.logger.stripe_calls()
    assert asr_run.callback.stripes is None


@pytest.mark.skipif(not HAS_ORT, reason="onnx and onnxruntime are not installed")
def test_onnx_written_when_asked(asr_run: Run, stripes_run: Run) -> None:
    report = asr_run.callback.onnx_report
    assert report is not None and report.path == asr_run.dirpath / "model.onnx" and report.path.is_file()
    assert report.folded_layers == 9 and report.max_rel is not None and report.max_rel <= 1e-5
    assert "Sigmoid" not in report.op_counts  # the SE gates were folded away
    assert stripes_run.callback.onnx_report is None and not (stripes_run.dirpath / "model.onnx").exists()


# ------------------------------------------------------------------------------------- stripes
def test_stripe_metrics_are_logged_when_asked(stripes_run: Run) -> None:
    calls = stripes_run.logger.stripe_calls()
    assert [step for step, _ in calls] == [2, 4]  # after each epoch of 2 steps; not in the sanity check
    metrics = calls[-1][1]
    sites = [f"{name}.classic" for name in stripes_run.callback.attach_report.names]  # the classic SE of ASR(X) + X
    assert set(metrics) == {f"stripe/{site}/{stat}" for site in sites for stat in STRIPE_STATISTICS}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    result = stripes_run.callback.stripes
    assert result is not None and result.num_images == 40 and result.meta["epoch"] == 2
    assert stripes_run.callback.verify_report is not None and stripes_run.callback.verify_report.passed


@pytest.mark.parametrize(("epoch", "sanity", "rank_zero", "due"), [
    (0, False, True, False), (1, False, True, True), (2, False, True, False), (3, False, True, True),
    (1, True, True, False), (1, False, False, False),
])
def test_stripes_are_due_every_n_epochs_on_rank_zero(epoch: int, sanity: bool, rank_zero: bool, due: bool) -> None:
    trainer = SimpleNamespace(current_epoch=epoch, sanity_checking=sanity, is_global_zero=rank_zero,
                              state=SimpleNamespace(fn="fit"))
    assert ASRCallback(log_stripes=True, stripe_every_n_epochs=2)._stripes_due(trainer) is due
    assert ASRCallback(log_stripes=False)._stripes_due(trainer) is False


# ------------------------------------------------------------------------------------- other targets and inputs
def test_default_target_is_the_lightning_module(digits: Digits, tmp_path: Path) -> None:
    callback = ASRCallback("se", dirpath=tmp_path / "out")
    module = LitTinyNet()
    _trainer([callback], limit_val_batches=0, limit_train_batches=2).fit(module, digits.loaders()[0])
    assert callback.attach_report is not None and callback.attach_report.names == ["block1.bn", "block2.bn"]
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["user"]["lightning"]["verify"]["inputs"] == "the first training batch"
    fresh = LitTinyNet()
    loaded = foldattn.load_deployed(tmp_path / "out" / "model.safetensors", model=fresh)
    x = _val_images(digits)
    with torch.no_grad():
        assert _relative_error(module.eval()(x), loaded(x)) <= 1e-5


def test_attention_none_folds_a_model_that_already_has_asr(digits: Digits, tmp_path: Path) -> None:
    model = foldattn.create_model("cifar_resnet20", num_classes=10, attention="se", asr=True)
    callback = ASRCallback(None, module="model", dirpath=tmp_path, example_input=_val_images(digits, 0, 8))
    _trainer([callback], limit_train_batches=1, limit_val_batches=0).fit(LitClassifier(model), digits.loaders()[0])
    assert callback.attach_report is None and callback.verify_report is not None
    assert json.loads((tmp_path / "model.json").read_text())["user"]["lightning"]["verify"]["inputs"] == \
        "example_input"


# ------------------------------------------------------------------------------------- errors
class _NoResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize(("make", "options", "message"), [
    (LitClassifier, {"module": "modle"}, r"module='modle'.*no submodule 'modle' \(its submodules: model\)"),
    (lambda: LitClassifier(_NoResidual()), {"module": "model"},
     r"could not attach ASR to LitClassifier.model: no eligible ASR site.*where='norms'"),
    (LitClassifier, {"module": "model", "log_stripes": True},
     r"log_stripes=True.*no input-dependent channel attention.*both=True"),
    (LitClassifier, {"module": "model", "both": True, "log_stripes": True, "stripe_layers": ["layer9.*"]},
     r"stripe_layers=\['layer9.\*'\].*match no attention module"),
    (lambda: LitClassifier(foldattn.create_model("cifar_resnet20", attention="se", asr=True)), {"module": "model"},
     r"already has 9 ASR layer\(s\).*attention=None"),
    (LitClassifier, {"attention": None, "module": "model"}, r"attention=None.*has no ASR layer"),
])
def test_setup_errors_are_clear_and_come_before_training(make: Any, options: dict[str, Any], message: str,
                                                         digits: Digits, tmp_path: Path) -> None:
    attention = options.pop("attention", "se")
    probe = ParamProbe()
    trainer = _trainer([ASRCallback(attention, dirpath=tmp_path / "out", **options), probe])
    with pytest.raises(ValueError, match=message):
        trainer.fit(make(), *digits.loaders())
    assert not hasattr(probe, "before"), "training started"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"attention": "sx"}, ValueError, r"unknown attention 'sx'; valid names: .*se"),
    ({"where": "blocks"}, ValueError, r"where must be one of"),
    ({"every": 0}, ValueError, r"every must be an integer >= 1"),
    ({"stripe_every_n_epochs": 0}, ValueError, r"stripe_every_n_epochs must be an integer >= 1"),
    ({"stripe_statistics": ["gate_stripes"]}, ValueError, r"unknown stripe statistic.*gate_stripe_score"),
    ({"filename": "out/model.safetensors"}, ValueError, r"filename must be a file name without folders"),
    ({"builder_kwargs": {"num_classes": 10}}, ValueError, r"builder_kwargs= needs builder="),
    ({"tolerance": -1.0}, ValueError, r"tolerance must be a finite number >= 0"),
    ({"psi_init": "zeros"}, ValueError, r"psi_init must be"),
    ({"onnx": "yes"}, TypeError, r"onnx must be True or False"),
    ({"example_input": [1, 2]}, TypeError, r"example_input must be a tensor"),
])
def test_bad_options_fail_when_the_callback_is_made(options: dict[str, Any], error: type[Exception],
                                                    message: str) -> None:
    attention = options.pop("attention", "se")
    with pytest.raises(error, match=message):
        ASRCallback(attention, **options)


def test_unreadable_batches_name_input_from_batch(digits: Digits, tmp_path: Path) -> None:
    callback = ASRCallback("se", module="model", dirpath=tmp_path)
    batches = [{"pixels": x, "label": y} for x, y in digits.loaders()[0]]
    with pytest.raises(TypeError, match=r"batch of type dict; pass input_from_batch="):
        callback._inputs(batches[0])
    callback = ASRCallback("se", module="model", input_from_batch=lambda b: b["pixels"])
    assert callback._inputs(batches[0])[0] is batches[0]["pixels"]


def test_verification_failure_is_a_clear_error(asr_run: Run, digits: Digits, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import foldattn.integrations.lightning as integration

    def broken_fold(model: nn.Module) -> nn.Module:
        deployed = foldattn.fold(model)
        with torch.no_grad():
            deployed.fc.bias.add_(1.0)
        return deployed

    monkeypatch.setattr(integration, "fold", broken_fold)
    callback = ASRCallback(None, module="model", dirpath=tmp_path / "out", example_input=_val_images(digits, 0, 8))
    expected = (r"folded LitClassifier.model does not compute what the trained one computes on example_input "
                r"\(inputs \(8, 3, 16, 16\)\): FAILED: max abs error 1\.0\d*e\+00, max relative error .* "
                r"\(tolerance 1e-05.*Nothing was saved")
    with pytest.raises(FoldVerificationError, match=expected):
        callback.on_fit_end(asr_run.trainer, asr_run.module)
    assert callback.deployed is None and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- packaging and docs
def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities"):
        monkeypatch.setitem(sys.modules, name, None)  # as if lightning were not installed
    monkeypatch.delitem(sys.modules, "foldattn.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'foldattn\[lightning\]'"):
        importlib.import_module("foldattn.integrations.lightning")


def test_integrations_package_does_not_import_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "foldattn.integrations")
    assert importlib.import_module("foldattn.integrations").__doc__


def test_the_docs_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its files under the working folder
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for index, code in enumerate(blocks):  # the blocks continue one another, as in one session
        exec(compile(code, f"docs/lightning.md[python block {index}]", "exec"), namespace)
    assert (tmp_path / "deployed" / "model.safetensors").is_file()
    assert "stripe/layer1.0.bn2.classic/gate_stripe_score" in \
        (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
