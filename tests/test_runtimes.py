"""OpenVINO and ExecuTorch: the deployed model written for each runtime, read back, run and compared with PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import foldattn
from foldattn import EquivalenceError, export_executorch, export_openvino
from foldattn.cli import main

from .conftest import randomize_norms, randomize_psi


def _asr_model() -> nn.Module:
    """ResNet-20 with ASR(SE), its psi and norms moved off their initial values: folding changes every conv."""
    return randomize_psi(randomize_norms(foldattn.create_model("cifar_resnet20", attention="se", asr=True))).eval()


def test_openvino_ir_runs_like_the_folded_model(tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino")
    model = _asr_model()
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "notes.txt").write_text("mine")
    report = export_openvino(model, torch.randn(1, 3, 32, 32), tmp_path / "ir")
    assert report.batches == (1, 4) and report.max_rel <= 1e-5 and report.folded_layers == 9
    assert report.precision == "f32"
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["model.bin", "model.xml", "notes.txt"]
    # read back independently: float32 weights, a dynamic batch, the folded model's outputs
    ir = ov.Core().read_model(str(tmp_path / "ir" / "model.xml"))
    assert ir.inputs[0].get_partial_shape().to_string() == "[?,3,32,32]"
    assert not any(op.get_type_name() == "Convert" and op.get_output_element_type(0).get_type_name() == "f32"
                   and op.input_value(0).get_element_type().get_type_name() == "f16" for op in ir.get_ops())
    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = foldattn.fold(model)(x)
    got = torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_executorch_program_runs_like_the_folded_model(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    model = _asr_model()
    report = export_executorch(model, torch.randn(1, 3, 32, 32), tmp_path / "m.pte")
    assert report.batches == (1,) and report.max_rel <= 1e-5 and report.folded_layers == 9
    assert [p.name for p in tmp_path.iterdir()] == ["m.pte"]  # no temporary left
    data = (tmp_path / "m.pte").read_bytes()
    program = Runtime.get().load_program(data)  # data and program referenced while the method runs
    method = program.load_method("forward")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = foldattn.fold(model)(x)
    torch.testing.assert_close(method.execute([x])[0], ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("runtime", ["openvino", "executorch"])
def test_non_finite_outputs_write_nothing(tmp_path: Path, runtime: str) -> None:
    pytest.importorskip(runtime)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    with pytest.raises(EquivalenceError, match="not finite"):
        if runtime == "openvino":
            export_openvino(model, torch.randn(1, 3, 8, 8), tmp_path / "ir")
        else:
            export_executorch(model, torch.randn(1, 3, 8, 8), tmp_path / "m.pte")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_bad_example_inputs_are_refused_before_any_runtime(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="float32"):
        export_openvino(model, torch.randn(2, 3, dtype=torch.float64), tmp_path / "ir")
    with pytest.raises(RuntimeError, match="does not run on the example inputs"):
        export_executorch(model, torch.randn(2, 5), tmp_path / "m.pte")
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_digits_run_to_both_runtimes(digits_asr_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("executorch")
    out = tmp_path / "out"
    assert main(["export", str(digits_asr_run), "--openvino", str(out / "ir"), "--pte", str(out / "m.pte")]) == 0
    text = capsys.readouterr().out
    assert "OpenVINO IR" in text and "ExecuTorch program (XNNPACK)" in text and text.count("max rel") == 2
    assert (out / "ir" / "model.xml").is_file() and (out / "ir" / "model.bin").is_file() and (out / "m.pte").is_file()


def test_a_killed_exports_staged_folder_is_removed_by_the_next(digits_asr_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    stale = tmp_path / "ir" / ".openvino.foldattn-dead.tmp"
    stale.mkdir(parents=True)
    (stale / "model.xml").write_text("half")
    assert main(["export", str(digits_asr_run), "--openvino", str(tmp_path / "ir")]) == 0
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["model.bin", "model.xml"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--pte", "m.onnx"], "must end in .pte"),
    (["--openvino", "model.xml"], "name a folder"),
])
def test_cli_refuses_bad_names(digits_asr_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               argv: list[str], message: str) -> None:
    argv = [argv[0], str(tmp_path / argv[1])]
    assert main(["export", str(digits_asr_run), *argv]) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_cli_names_the_missing_extra(digits_asr_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # an import of it fails as if it were not installed
    assert main(["export", str(digits_asr_run), "--openvino", str(tmp_path / "ir")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'foldattn[openvino]'" in err and err.count("\n") == 1 and not list(tmp_path.iterdir())
