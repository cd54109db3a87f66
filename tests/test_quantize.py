"""INT8 (`foldattn quantize`) through ONNX Runtime, OpenVINO and ExecuTorch: the folded scale's effect, measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foldattn
from foldattn.cli import main
from foldattn.quantize import fake_quantize_per_channel, fake_quantize_per_tensor, weight_ranges
from foldattn.train import TrainConfig, train
from foldattn.train.data import load_dataset
from foldattn.transforms import scale_out_channels

pytest.importorskip("onnxruntime")


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 6), k=st.sampled_from([1, 3]), seed=st.integers(0, 10_000),
       low=st.floats(1e-3, 1.0), high=st.floats(1.0, 50.0))
def test_a_folded_positive_scale_leaves_per_channel_integers_unchanged(out: int, inp: int, k: int, seed: int,
                                                                      low: float, high: float) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, k, k, generator=g, dtype=torch.float64)
    v = low + (high - low) * torch.rand(out, generator=g, dtype=torch.float64)  # a positive ASR vector
    q, step = fake_quantize_per_channel(w)
    qv, step_v = fake_quantize_per_channel(scale_out_channels(w, v))
    assert torch.equal(q, qv)  # the same integers
    torch.testing.assert_close(step_v, step * v)  # only each channel's step is scaled


def test_per_tensor_loses_levels_in_small_gate_channels() -> None:
    """Measured, not asserted equal: with one step per tensor, a channel scaled by a small gate keeps
    fewer distinct levels (its error relative to its own range grows)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64)
    v = torch.ones(16, dtype=torch.float64)
    v[:8] = 0.02  # half the channels almost closed by the gate
    folded = scale_out_channels(w, v)
    q, step = fake_quantize_per_tensor(folded)
    err = ((q * step - folded).abs().reshape(16, -1).amax(1) / folded.abs().reshape(16, -1).amax(1))
    levels = [len(torch.unique(q[c])) for c in range(16)]
    assert max(levels[:8]) < min(levels[8:])  # fewer levels where the gate is small
    assert err[:8].mean() > 10 * err[8:].mean()
    spread = weight_ranges(nn.Sequential(_conv_with(folded)))["0"]["spread"]
    assert spread > 20


def _conv_with(w: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qrun")
    train(TrainConfig(dataset="digits", epochs=2, batch_size=32, attention="se", asr=True, output=str(out),
                      recipe="digits", lr=0.05, decay_all=True), bundle=load_dataset("digits"), log=None)
    return out


def test_cli_quantize_writes_both_models_and_measures_them(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", str(run), "-o", str(out), "--calib-images", "64", "--val-images", "128"]) == 0
    report = json.loads((out / "quantize.json").read_text())
    assert report["per_channel"] is True and report["method"] == "minmax" and report["calib_images"] == 64
    assert report["val_images"] == 128 and report["top1_fp32"] > 30
    assert abs(report["drop"] - (report["top1_fp32"] - report["top1_int8"])) < 1e-9
    assert report["file_bytes"]["int8"] < report["file_bytes"]["fp32"] / 2
    assert set(report["latency_ms"]) == {"fp32", "int8"} and report["latency_ms"]["int8"]["batch_64"] > 0
    # the ASR model's weights before (v not folded) and after folding, per layer
    assert set(report["weight_ranges"]) == {"folded", "unfolded"}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert not isinstance(shape[0], int)  # dynamic batch
    ops = {n.op_type for n in __import__("onnx").load(str(out / "model.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "BatchNormalization" not in ops


BAD = [
    ("calib-0", ["--calib-images", "0"], "--calib-images"),
    ("method", ["--method", "kl"], "--method"),
    ("deployed-without-data", ["{deployed}"], "--data"),
    ("wrong-data", ["{vit}", "--data", "digits"], "do not fit the model"),
    ("missing", ["{missing}"], "does not exist"),
]


@pytest.mark.parametrize(("case", "extra", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 case: str, extra: list[str], message: str) -> None:
    deployed = tmp_path / "d.safetensors"
    tree = tmp_path / "tree"
    if case == "deployed-without-data":
        foldattn.save_deployed(foldattn.train.load_trained(run)[0], deployed)
    vit = tmp_path / "vit.safetensors"  # a ViT built for 32x32 images, calibrated on the 16x16 digits
    if case == "wrong-data":
        foldattn.save_deployed(foldattn.create_model("cifar_vit_tiny", depth=1), vit)
    source = str(run)
    if extra and extra[0].startswith("{"):
        source, extra = extra[0], extra[1:]
    fmt = {"deployed": deployed, "tree": tree, "missing": tmp_path / "nope", "vit": vit}
    argv = ["quantize", source.format(**fmt), "-o", str(tmp_path / "out"), *[e.format(**fmt) for e in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()


def test_entropy_calibration_is_not_minmax(tmp_path: Path) -> None:
    """onnxruntime's quantize_static alone would give the entropy calibrator a single candidate (the whole
    range, i.e. minmax); foldattn computes the KL ranges on a finer histogram and hands them over."""
    import onnx
    from onnx import numpy_helper

    from foldattn.quantize import quantize_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    fp32 = tmp_path / "m.onnx"
    foldattn.export_onnx(model, torch.randn(2, 3, 8, 8), fp32, input_names=["input"], output_names=["logits"])
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 8, 8, generator=g) * torch.rand(16, 1, 1, 1, generator=g) * 4 for _ in range(4)]
    scales = {}
    for method in ("minmax", "entropy"):
        quantize_onnx(fp32, tmp_path / f"{method}.onnx", calib, method=method)
        scales[method] = {i.name: float(numpy_helper.to_array(i)) for i in
                          onnx.load(str(tmp_path / f"{method}.onnx")).graph.initializer
                          if i.name.endswith("_scale") and numpy_helper.to_array(i).size == 1}
    shared = sorted(set(scales["minmax"]) & set(scales["entropy"]))
    assert shared
    # KL clips outliers: some activation range is narrower than the min-max one, none is wider
    assert any(scales["entropy"][k] < 0.99 * scales["minmax"][k] for k in shared)
    assert all(scales["entropy"][k] <= scales["minmax"][k] * 1.0001 for k in shared)


def _leftovers(folder: Path) -> list[str]:
    """Staged folders a failed quantize would have left (``.NAME.foldattn-*.tmp``)."""
    return [p.name for p in folder.iterdir() if ".foldattn-" in p.name]


@pytest.fixture()
def nan_run(run: Path, tmp_path: Path) -> Path:
    """The run's checkpoint with one NaN weight (a diverged training)."""
    blob = torch.load(run / "last.pt", weights_only=True)
    blob["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan" / "last.pt"
    path.parent.mkdir()
    torch.save(blob, path)
    return path


def _export_differs(*args: object, **kwargs: object) -> None:
    raise foldattn.EquivalenceError("onnxruntime differs from PyTorch: max abs 1.0e+00")


def _verify_fails(*args: object, **kwargs: object) -> None:
    raise foldattn.EquivalenceError("max abs error 3.0e-02 > tolerance")


# (id, source, extra options, what to patch, the one line must contain, must not contain)
FAILURES = [
    ("nan-weights", "{nan}", [], None, "weights hold NaN or Inf (conv1.weight)", "equalization"),
    ("export-check", "{run}", [], ("foldattn.export.export_onnx", _export_differs),
     "the exported ONNX model does not reproduce the deployed model", "equalization"),
    ("equalize-verify", "{run}", ["--equalize"], ("foldattn.quantize.verify", _verify_fails),
     "cross-layer equalization changed the model's outputs", "exported"),
]


@pytest.mark.parametrize(("source", "extra", "patch", "message", "absent"), [c[1:] for c in FAILURES],
                         ids=[c[0] for c in FAILURES])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_quantize_says_what_failed_and_leaves_nothing(
        run: Path, nan_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        source: str, extra: list[str], patch: tuple | None, message: str, absent: str, existing: bool) -> None:
    """Kind 6 of issue 32: each failure named for what it is (not all as "equalization changed the outputs"),
    and no output folder it created, no partial file (an existing empty folder stays empty)."""
    if patch is not None:
        monkeypatch.setattr(*patch)
    out = tmp_path / "new" / "int8"
    if existing:
        out.mkdir(parents=True)
    argv = ["quantize", source.format(run=run, nan=nan_run), "-o", str(out), "--calib-images", "32",
            "--val-images", "32", *extra]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and message in err[0] and absent not in err[0], err
    if existing:
        assert not any(out.iterdir())
    else:
        assert not (tmp_path / "new").exists()
    assert not _leftovers(tmp_path)
    if existing:
        assert not _leftovers(tmp_path / "new")


def test_quantize_into_a_missing_parent_and_over_an_old_result(run: Path, tmp_path: Path) -> None:
    """The staged folder becomes OUT (parents made at the end, usual permissions); --overwrite replaces
    the files of an earlier result and keeps the others."""
    out = tmp_path / "a" / "b"
    argv = ["quantize", str(run), "-o", str(out), "--calib-images", "32", "--val-images", "32"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx", "quantize.json"]
    assert out.stat().st_mode & 0o777 != 0o700 and not _leftovers(out.parent)
    (out / "notes.txt").write_text("mine")
    before = (out / "quantize.json").stat().st_mtime_ns
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "quantize.json").stat().st_mtime_ns >= before
    assert not _leftovers(out.parent) and not (out / ".lock").exists()


@pytest.mark.parametrize(("kwargs", "message"), [({"threads": 100_000}, "threads must be an integer in"),
                                                 ({"threads": 0}, "threads must be an integer in"),
                                                 ({"latency_batches": (1, 10**6)}, "latency_batches")])
def test_the_library_bounds_its_counts_before_any_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    from foldattn.quantize import quantize

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=message):
        quantize(model, [], [], tmp_path / "q", example=torch.zeros(1, 3, 8, 8), **kwargs)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_cli_quantizes_with_every_runtime(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--runtime ort,openvino,executorch: each runtime's float file (checked against PyTorch) and its own INT8
    file, both scored on the same images and timed there; quantize.json keeps ort's figures at the top."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("executorch")
    out = tmp_path / "int8"
    assert main(["quantize", str(run), "-o", str(out), "--calib-images", "64", "--val-images", "96",
                 "--runtime", "ort,openvino,executorch"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    report = json.loads((out / "quantize.json").read_text())
    assert list(report["runtimes"]) == ["ort", "openvino", "executorch"] == list(printed)
    assert report["runtime"] == "ort" and report["top1_int8"] == report["runtimes"]["ort"]["top1_int8"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "model.int8.onnx", "model.int8.pte", "model.onnx", "model.pte", "openvino", "openvino/model.bin",
        "openvino/model.int8.bin", "openvino/model.int8.xml", "openvino/model.xml", "quantize.json"]
    fp32 = {rt: r["top1_fp32"] for rt, r in report["runtimes"].items()}
    assert max(fp32.values()) - min(fp32.values()) < 1.1  # the same float model: at most one image of 96 apart
    for rt, r in report["runtimes"].items():
        assert r["per_channel"] is True and r["method"] == "minmax" and r["calib_images"] == 64
        assert r["val_images"] == 96 and r["top1_fp32"] > 30 and r["nonfinite_int8"] == 0
        assert abs(r["drop"] - (r["top1_fp32"] - r["top1_int8"])) < 1e-9 and r["drop"] < 10, rt
        assert r["file_bytes"]["int8"] < r["file_bytes"]["fp32"] / 2, rt
        assert set(r["latency_ms"]) == {"fp32", "int8"} and r["latency_ms"]["int8"]["batch_64"] > 0
        assert all((out / f).is_file() for f in r["files"].values()) and "weight_ranges" not in r
    assert report["runtimes"]["openvino"]["files"] == {"fp32": "openvino/model.xml", "int8": "openvino/model.int8.xml"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--runtime", "tensorrt"], "unknown runtime(s) tensorrt; valid: ort, openvino, executorch"),
    (["--runtime", "executorch", "--method", "percentile"], "ExecuTorch calibrates with minmax"),
    (["--runtime", "ort,openvino", "--method", "entropy"], "OpenVINO calibrates with minmax or mean-minmax or"),
    (["--runtime", "openvino,ort", "--method", "mean-minmax"], "ONNX Runtime calibrates with minmax or entropy or"),
])
def test_cli_refuses_a_runtime_or_method_it_cannot_do(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      argv: list[str], message: str) -> None:
    assert main(["quantize", str(run), "-o", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err) and not (tmp_path / "q").exists()


def test_cli_names_the_missing_extra(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # an import of it fails as if it were not installed
    assert main(["quantize", str(run), "-o", str(tmp_path / "q"), "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'foldattn[openvino]'" in err and err.count("\n") == 1 and not (tmp_path / "q").exists()
