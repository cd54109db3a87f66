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


# --- INT8 through each runtime's own quantizer ------------------------------------------------------------------

def _calibration(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 32, 32, generator=g) for _ in range(n)]


@pytest.mark.parametrize("per_channel", [True, False])
def test_openvino_int8_quantizes_every_conv_with_the_asked_weight_scales(tmp_path: Path, per_channel: bool) -> None:
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from foldattn.runtimes import OpenVINORunner, quantize_openvino

    deployed = foldattn.fold(_asr_model(), fuse_bn=True)
    export_openvino(deployed, torch.randn(1, 3, 32, 32), tmp_path / "ir", fold_asr=False)
    quantize_openvino(tmp_path / "ir" / "model.xml", tmp_path / "ir" / "model.int8.xml", _calibration(),
                      per_channel=per_channel)
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["model.bin", "model.int8.bin", "model.int8.xml",
                                                                   "model.xml"]
    ir = ov.Core().read_model(str(tmp_path / "ir" / "model.int8.xml"))
    convs = [op for op in ir.get_ops() if op.get_type_name() == "Convolution"]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 21  # none left out
    # a weight's FakeQuantize (or its compressed int8 constant's scale) holds one range per output channel or one
    weight_scales = []
    for conv in convs:
        node = conv.input_value(1).get_node()
        while node.get_type_name() not in ("FakeQuantize", "Multiply", "Constant"):
            node = node.input_value(0).get_node()
        assert node.get_type_name() != "Constant", "a conv's weights are not quantized"
        weight_scales.append(int(torch.Size(list(node.input_value(1).get_shape())).numel()))
    channels = [c.get_output_partial_shape(0)[1].get_length() for c in convs]
    assert weight_scales == (channels if per_channel else [1] * len(convs))
    # the INT8 model computes nearly what the float one does (random weights and data: a loose bound)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = deployed(x)
    got = OpenVINORunner(tmp_path / "ir" / "model.int8.xml")(x)
    assert (got - ref).abs().max() / ref.abs().max() < 0.1


def test_executorch_int8_program_runs_the_quantized_graph(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    from foldattn.runtimes import ExecuTorchRunner, lower_executorch, quantize_executorch

    deployed = foldattn.fold(_asr_model(), fuse_bn=True)
    calib = _calibration()
    quantized = quantize_executorch(deployed, calib[0], calib)
    ops = {str(n.target) for n in quantized.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_channel" in o for o in ops) and any("quantize_per_tensor" in o for o in ops)
    program = lower_executorch(quantized, torch.randn(1, 3, 32, 32))
    float_bytes = sum(4 * p.numel() for p in deployed.parameters())
    assert len(program) < float_bytes / 2  # int8 weights
    runner = ExecuTorchRunner(program, quantized)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        simulated, ref = quantized(x), deployed(x)
    got = runner(x)  # one image at a time through the batch-1 program
    scale = ref.abs().max()
    # XNNPACK's int8 kernels compute the simulated graph: most logits the same, the rest a rounding step or two away
    assert (got == simulated).float().mean() > 0.5 and (got - simulated).abs().max() / scale < 0.05
    assert (got - ref).abs().max() / scale < 0.1  # (timing at another batch size: the slow CLI test)


@pytest.mark.parametrize(("runtime", "method"), [("openvino", "entropy"), ("executorch", "percentile")])
def test_a_method_the_runtime_lacks_is_refused_before_any_work(tmp_path: Path, runtime: str, method: str) -> None:
    from foldattn.quantize import quantize

    with pytest.raises(ValueError, match=f"{runtime} calibrates activations with"):
        quantize(_asr_model(), [], [], tmp_path / "q", example=torch.zeros(1, 3, 32, 32), runtime=runtime,
                 method=method)
    with pytest.raises(ValueError, match="runtime must be one of ort, openvino, executorch"):
        quantize(_asr_model(), [], [], tmp_path / "q", example=torch.zeros(1, 3, 32, 32), runtime="tensorrt")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method", ["minmax", "mean-minmax", "percentile"])
def test_every_openvino_method_quantizes(tmp_path: Path, method: str) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from foldattn.runtimes import INT8_METHODS, OpenVINORunner, quantize_openvino

    assert method in INT8_METHODS["openvino"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten()).eval()
    export_openvino(model, torch.randn(1, 3, 8, 8), tmp_path)
    quantize_openvino(tmp_path / "model.xml", tmp_path / "model.int8.xml", [torch.randn(8, 3, 8, 8)], method=method)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert (OpenVINORunner(tmp_path / "model.int8.xml")(x) - ref).abs().max() / ref.abs().max() < 0.1
