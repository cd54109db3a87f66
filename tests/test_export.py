"""export_onnx (checked with onnxruntime), torch.jit.trace and torch.export of folded models."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import foldattn
from foldattn import EquivalenceError, attach, export_onnx
from foldattn.export import onnx_op_counts
from foldattn.fold import asr_layers

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
tv = pytest.importorskip("torchvision.models")


def _timm(name: str, **kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kw)


_timm_vit = functools.partial(_timm, "vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)


BUILDERS = {
    "resnet18": functools.partial(tv.resnet18, num_classes=10),
    "mobilenet_v3_small": functools.partial(tv.mobilenet_v3_small, num_classes=10),
    "timm_convnext_atto": functools.partial(_timm, "convnext_atto", num_classes=10),
    "timm_vit": _timm_vit,
}


def _trained_asr(build, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = attach(build(), "se")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    opt.step()
    return model.eval()


@torch.no_grad()
def _randomise_constants(model: nn.Module) -> nn.Module:
    """Own random values for every constant-initialised tensor: BN weights, biases and running
    statistics, LayerNorm affines, zero conv/linear biases, layer scales."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point() and t.numel() and bool((t == t.flatten()[0]).all()):
            if t.flatten()[0].item():
                t.mul_(torch.empty_like(t).uniform_(0.5, 1.5))  # keeps the sign: variances stay positive
            else:
                t.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", list(BUILDERS))
def test_folded_export_matches_plain_export(name: str, tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = _trained_asr(BUILDERS[name], x)
    report = export_onnx(model, x, tmp_path / "folded.onnx")
    assert report.max_rel is not None and report.max_rel <= 1e-5  # onnxruntime vs PyTorch, float32
    assert report.folded_layers == len(asr_layers(model)) > 0
    # an independent plain instance, never touched by attach, with its own random weights. Its
    # constant-initialised tensors (BN weights/biases/running stats, zero biases, layer scales) are
    # randomised too: the TorchScript exporter merges equal initializers, which adds Identity nodes
    torch.manual_seed(1)
    plain_model = _randomise_constants(BUILDERS[name]()).eval()
    plain = export_onnx(plain_model, x, tmp_path / "plain.onnx")
    assert report.op_counts == plain.op_counts, "the deployed graph must be the plain backbone's graph"
    assert onnx_op_counts(tmp_path / "folded.onnx") == report.op_counts
    assert "ONNX nodes" in str(report)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_unfolded_asr_is_refused_unless_asked(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = _trained_asr(functools.partial(foldattn.create_model, "cifar_resnet20"), x)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"9 unfolded ASR layer\(s\).*allow_unfolded=True"):
        export_onnx(model, x, path, fold_asr=False)
    assert not path.exists()
    # ASR's forward swaps the host's parameters itself (no functional_call), so TorchScript traces it:
    # the dynamo=False default is kept and the attention modules are in the graph
    training_form = export_onnx(model, x, path, fold_asr=False, allow_unfolded=True)
    assert training_form.exporter == "TorchScript" and training_form.max_rel <= 1e-5
    assert training_form.op_counts.get("Sigmoid") == 9
    foldattn.verify(model, torch.jit.trace(model, x), x)
    dynamo = export_onnx(model, x, path, fold_asr=False, allow_unfolded=True, dynamo=True)
    assert dynamo.exporter == "dynamo" and dynamo.max_rel <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "a single self-contained file"
    # (the dynamo exporter constant-folds much of the static attention itself; the refusal above is
    # about intent: a deployed file should come from foldattn.fold, verified, not from an optimiser pass)


def test_export_options_and_errors(tmp_path: Path) -> None:
    model = _trained_asr(BUILDERS["resnet18"], torch.randn(2, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    report = export_onnx(nn.DataParallel(model), (x,), tmp_path / "m.onnx", opset_version=17,
                         input_names=["image"], output_names=["logits"])
    assert report.opset == 17
    import onnx

    proto = onnx.load(str(report.path))
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    with pytest.raises(ValueError, match="float32"):
        export_onnx(model, x.double(), tmp_path / "d.onnx")
    with pytest.raises(RuntimeError, match="ONNX export failed"):
        export_onnx(model, torch.randn(1, 5, 32, 32), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "no temp file left behind"
    with pytest.raises(TypeError, match=r"nn\.Module"):
        export_onnx("model", x, tmp_path / "x.onnx")  # type: ignore[arg-type]


def test_onnx_check_fails_on_non_finite_outputs(tmp_path: Path) -> None:
    model = _trained_asr(BUILDERS["resnet18"], torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        model.fc.bias[3] = float("inf")
    with pytest.raises(EquivalenceError, match=r"PyTorch model's outputs are not finite \(output 0 \(1, 10\): "
                                               r"0 NaN and 1 Inf"):
        export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["resnet18", "timm_vit"])
def test_jit_trace_and_torch_export_of_folded_model(name: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = _trained_asr(BUILDERS[name], x)
    deployed = foldattn.fold(model).eval()
    traced = torch.jit.trace(deployed, x)
    foldattn.verify(model, traced, x)  # float32, 1e-5 relative to the output scale
    assert "attention" not in traced.code
    program = torch.export.export(deployed, (x,))
    with torch.no_grad():
        ref, out = model(x), program.module()(x)  # an exported module cannot be switched to eval(): compare here
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max()
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("sigmoid" in t for t in targets), "no attention left in the exported program"


def test_readme_example_runs(tmp_path: Path) -> None:
    """The README's "Your own model" example, run as written in a fresh interpreter."""
    import os
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Your own model", 1)[1]
    (tmp_path / "example.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    src = str(Path(foldattn.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "OK: max abs error" in run.stdout and "onnxruntime vs PyTorch" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "example.py", "resnet18_asr.json", "resnet18_asr.onnx", "resnet18_asr.safetensors"
    ]


# --- dynamic batch, names, opset, what fold would export, torch.export programs ------------------


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_has_a_dynamic_batch_and_named_io(tmp_path: Path, dynamo: bool) -> None:
    import onnxruntime as ort

    model = foldattn.create_model("cifar_resnet20", attention="se", asr=True).eval()
    x = torch.randn(1, 3, 32, 32)
    report = export_onnx(model, x, tmp_path / "m.onnx", dynamo=dynamo)
    assert report.input_names == ("input",) and report.output_names == ("output",) and report.dynamic_batch
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and session.get_outputs()[0].name == "output"
    x5 = torch.randn(5, 3, 32, 32)
    (got,) = session.run(None, {"input": x5.numpy()})
    with torch.no_grad():
        ref = model(x5)
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_onnx_static_batch_and_custom_names(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    report = export_onnx(model, torch.randn(2, 3, 5, 5), tmp_path / "s.onnx", dynamic_batch=False,
                         input_names=["pixels"], output_names=["features"])
    assert "batch fixed" in str(report)
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2 and session.get_inputs()[0].name == "pixels"
    with pytest.raises(ValueError, match="input_names must be 1 distinct"):
        export_onnx(model, torch.randn(2, 3, 5, 5), tmp_path / "t.onnx", input_names=["a", "b"])
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize(("opset", "dynamo"), [(99, False), (21, False), (6, False), (17, True), ("17", False)])
def test_unsupported_opset_is_refused_before_export(tmp_path: Path, opset: object, dynamo: bool) -> None:
    with pytest.raises(ValueError, match=r"is not supported by the .* exporter .* choose"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.onnx", opset_version=opset, dynamo=dynamo)
    assert not list(tmp_path.iterdir())


def test_plain_reparameterizable_model_exports_its_fused_form(tmp_path: Path) -> None:
    model = foldattn.create_model("cifar_repvgg_a0").eval()
    counts = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r.onnx").op_counts
    assert counts["Conv"] == 22 and "BatchNormalization" not in counts  # fold's form, not the training form


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_repvgg_a0"])
def test_torch_export_program_round_trip(tmp_path: Path, name: str) -> None:
    from foldattn.export import export_program

    model = foldattn.create_model(name, attention="se", asr=True).eval()
    report = export_program(model, torch.randn(1, 3, 32, 32), tmp_path / "m.pt2")
    assert report.batches == (1, 4) and report.max_rel <= 1e-5 and report.folded_layers > 0
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = foldattn.fold(model)(x)
    torch.testing.assert_close(program(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary file left


def test_torch_export_program_refuses_non_finite_outputs(tmp_path: Path) -> None:
    from foldattn.export import export_program

    model = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    with pytest.raises(EquivalenceError, match="not finite"):
        export_program(model, torch.randn(2, 3), tmp_path / "n.pt2")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["fold", "export"])
def test_image_size_is_the_way_out_of_a_recorded_size_too_large(recorded_8192: Path, tmp_path: Path, command: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Refused in one line naming --image-size; with it, a foldattn checkpoint's example batch takes that
    size, and the command writes its file."""
    from foldattn.cli import main

    out = ["-o", str(tmp_path / "o")] if command == "fold" else ["--onnx", str(tmp_path / "o" / "m.onnx")]
    assert main([command, str(recorded_8192), *out]) == 2
    err = capsys.readouterr().err
    assert "pass --image-size N" in err and "3x8192x8192" in err and not (tmp_path / "o").exists()
    assert main([command, str(recorded_8192), "--image-size", "16", *out]) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / ("deployed.safetensors" if command == "fold" else "m.onnx")).is_file()



def test_fuse_bn_export_proves_shape_dependent_pairs_with_its_own_example(tmp_path: Path) -> None:
    """Linear -> BatchNorm1d is exact to fuse only for 2-D inputs: the export's example inputs prove it, so the
    file has no norm left (the model declares no default_input_size that fold could use instead)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    foldattn.export_onnx(model, torch.randn(4, 6), tmp_path / "m.onnx", fuse_bn=True)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and ops >= {"Gemm"}
