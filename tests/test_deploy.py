"""save_deployed / load_deployed: round trips, wrappers, strict loading, damaged files."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import foldattn
from foldattn import attach, load_deployed, save_deployed
from foldattn.deploy import (
    ArchitectureMismatchError,
    DeployedFileError,
    InvalidWeightsError,
    UntrustedBuilderError,
    file_sha256,
    metadata_path,
    read_metadata,
    register_builder,
    unregister_builder,
)
from foldattn.fold import asr_layers
from foldattn.srp import rep_blocks

tv = pytest.importorskip("torchvision.models")
X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = attach(tv.resnet18(num_classes=10), "se")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(X), torch.tensor([1, 2])).backward()
    opt.step()
    return model.eval()


@pytest.fixture
def saved(trained: nn.Module, tmp_path: Path) -> Path:
    return save_deployed(trained, tmp_path / "r18.safetensors", "torchvision.models:resnet18", {"num_classes": 10})


def test_round_trip_rebuilds_from_metadata(trained: nn.Module, saved: Path) -> None:
    meta = read_metadata(saved)
    assert meta["builder"] == "torchvision.models:resnet18" and meta["kwargs"] == {"num_classes": 10}
    assert meta["folded"] is True and meta["asr_layers_folded"] == 8
    assert meta["foldattn_version"] == foldattn.__version__
    loaded = load_deployed(saved)
    assert type(loaded) is type(tv.resnet18()) and not loaded.training
    foldattn.verify(trained, loaded, X)  # float32, 1e-5 relative
    assert sorted(p.name for p in saved.parent.iterdir()) == ["r18.json", "r18.safetensors"], "no temp file left"
    copy = json.loads(metadata_path(saved).read_text())
    assert copy.pop("file_sha256") == file_sha256(saved)  # bound to these weights
    assert copy == meta  # the readable copy matches the header


def test_weights_path_must_not_be_json(trained: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="another suffix"):
        save_deployed(trained, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_load_into_given_instance(saved: Path, trained: nn.Module) -> None:
    fresh = tv.resnet18(num_classes=10)
    assert load_deployed(saved, model=fresh) is fresh
    foldattn.verify(trained, fresh, X)


def test_builder_as_function_and_foldattn_registry(tmp_path: Path) -> None:
    model = foldattn.create_model("cifar_resnet20", attention="se", asr=True)
    path = save_deployed(model, tmp_path / "c.safetensors", foldattn.models.cifar_resnet20, metadata={"acc": 0.5})
    meta = read_metadata(path)
    assert meta["builder"] == "foldattn.models:cifar_resnet20" and meta["user"] == {"acc": 0.5}
    foldattn.verify(model, load_deployed(path), X)


@pytest.mark.parametrize("wrap", ["dataparallel", "compile"])
def test_wrappers_are_removed(trained: nn.Module, tmp_path: Path, wrap: str) -> None:
    wrapped = nn.DataParallel(trained) if wrap == "dataparallel" else torch.compile(trained)
    path = save_deployed(wrapped, tmp_path / "w.safetensors", "torchvision.models:resnet18", {"num_classes": 10})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    foldattn.verify(trained, load_deployed(path), X)


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    path = save_deployed(model, tmp_path / "tied.safetensors")
    assert read_metadata(path)["aliases"] == {"1.weight": "0.weight"}
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    load_deployed(path, model=fresh)
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_wrong_architecture(saved: Path) -> None:
    with pytest.raises(ArchitectureMismatchError, match=r"another architecture.*missing keys: layer1\.2"):
        load_deployed(saved, model=tv.resnet34(num_classes=10))
    with pytest.raises(ArchitectureMismatchError, match=r"shape mismatches: fc.weight: file \(10, 512\)"):
        load_deployed(saved, model=tv.resnet18(num_classes=1000))
    with pytest.raises(ArchitectureMismatchError, match="unexpected keys"):
        load_deployed(saved, model=nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ArchitectureMismatchError, match="has ASR layers"):
        load_deployed(saved, model=attach(tv.resnet18(num_classes=10), "se"))


def test_builder_that_does_not_fit_is_refused_at_save(trained: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(ArchitectureMismatchError, match="does not build this model"):
        save_deployed(trained, path, "torchvision.models:resnet18")  # 1000 classes, model has 10
    assert not path.exists()


@pytest.mark.parametrize(
    "builder,match",
    [
        ("os:system", "not allowed: a deployed file may only name 'foldattn.models:NAME'"),
        ("torchvision.models.resnet18", "is not a spec"),
        ("torchvision.models:_private", "not allowed"),
        ("torchvision.models:nope", "not allowed"),
        ("torchvision.models.nothere:x", "not allowed"),
        ("timm.models:load_state_dict", "not allowed"),
    ],
)
def test_bad_builders(trained: nn.Module, tmp_path: Path, builder: str, match: str) -> None:
    with pytest.raises(UntrustedBuilderError, match=match):
        save_deployed(trained, tmp_path / "x.safetensors", builder)
    assert list(tmp_path.iterdir()) == []


def test_builder_functions_map_to_their_specs(tmp_path: Path) -> None:
    model = tv.resnet18(num_classes=10)
    path = save_deployed(model, tmp_path / "r.safetensors", tv.resnet18, {"num_classes": 10})
    assert read_metadata(path)["builder"] == "torchvision.models:resnet18"
    with pytest.raises(UntrustedBuilderError, match="register_builder"):
        save_deployed(model, tmp_path / "s.safetensors", torch.nn.Linear)


def test_registered_builder(tmp_path: Path) -> None:
    def my_net(width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))

    register_builder("mypkg:my_net", my_net)
    try:
        model = my_net(width=6)
        path = save_deployed(model, tmp_path / "m.safetensors", my_net, {"width": 6})
        assert read_metadata(path)["builder"] == "mypkg:my_net"
        foldattn.verify(model, load_deployed(path), torch.randn(2, 3))
    finally:
        unregister_builder("mypkg:my_net")
    with pytest.raises(UntrustedBuilderError, match="not allowed"):
        load_deployed(path)


def test_no_builder_needs_model(trained: nn.Module, tmp_path: Path) -> None:
    path = save_deployed(trained, tmp_path / "nb.safetensors")
    with pytest.raises(ValueError, match=r"pass model=<a fresh torchvision\.models\.resnet\.ResNet>"):
        load_deployed(path)
    foldattn.verify(trained, load_deployed(path, model=tv.resnet18(num_classes=10)), X)


@pytest.mark.parametrize("cut", [4, 100, 0.5, -1])
def test_truncated_file(saved: Path, cut: float) -> None:
    data = saved.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    saved.write_bytes(data[:n])
    with pytest.raises(DeployedFileError, match="truncated or corrupted"):
        load_deployed(saved)


def test_corrupted_file(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    saved.write_bytes(bytes(data))
    with pytest.raises(DeployedFileError, match="checksum; the file is corrupted"):
        load_deployed(saved)


def test_corrupted_header_and_foreign_files(saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    saved.write_bytes(bytes(data))
    with pytest.raises(DeployedFileError):
        load_deployed(saved)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(DeployedFileError, match="without foldattn metadata"):
        load_deployed(plain)
    with pytest.raises(FileNotFoundError, match="no deployed file"):
        load_deployed(tmp_path / "missing.safetensors")
    text = tmp_path / "t.safetensors"
    text.write_text("hello")
    with pytest.raises(DeployedFileError, match="truncated or corrupted"):
        load_deployed(text)


def test_failed_save_leaves_no_file(trained: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_deployed(trained, path, metadata={"x": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_deployed(trained, tmp_path / "no" / "m.safetensors")


def _one_step(model: nn.Module) -> nn.Module:
    """One training step, so BN statistics and ASR's psi are no longer their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(X), torch.tensor([1, 2])).backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "name,kwargs,deploy_kwargs",
    [
        ("cifar_resnet20", {"attention": "se", "asr": True, "psi_init": 0.2}, {}),
        ("cifar_resnet20", {"attention": "se", "asr": True, "both": True, "reduction": 8},
         {"attention": "se", "reduction": 8}),  # ASR(X) + X deploys with the classic X
        ("cifar_resnet20_acnet", {"attention": "se", "asr": True}, {"deploy": True}),
        ("cifar_resnet20_acnet", {}, {"deploy": True}),  # no ASR: the blocks are still fused
    ],
)
@pytest.mark.parametrize("save_folded", [False, True])
def test_create_model_records_its_builder(tmp_path: Path, name: str, kwargs: dict, deploy_kwargs: dict,
                                          save_folded: bool) -> None:
    torch.manual_seed(0)
    model = _one_step(foldattn.create_model(name, **kwargs))
    path = save_deployed(foldattn.fold(model) if save_folded else model, tmp_path / "m.safetensors")  # no builder
    meta = read_metadata(path)
    assert meta["builder"] == f"foldattn.models:{name}" and meta["kwargs"] == deploy_kwargs
    loaded = load_deployed(path)
    assert not asr_layers(loaded) and next(rep_blocks(loaded), None) is None
    foldattn.verify(model, loaded, X)  # float32, 1e-5 relative


def test_recorded_builder_that_does_not_fit_is_dropped(tmp_path: Path) -> None:
    model = foldattn.create_model("cifar_resnet20", attention="se", asr=True).eval()
    fused = foldattn.fold(model, fuse_bn=True)  # no BatchNorm left: not cifar_resnet20's tree
    path = save_deployed(fused, tmp_path / "f.safetensors")
    assert read_metadata(path)["builder"] is None
    with pytest.raises(ValueError, match="does not say how to rebuild"):
        load_deployed(path)


def test_no_builder_error_names_the_argument(trained: nn.Module, tmp_path: Path) -> None:
    path = save_deployed(trained, tmp_path / "nb.safetensors")  # torchvision: nothing recorded
    assert read_metadata(path)["builder"] is None
    with pytest.raises(ValueError, match=r'saved without builder=.*builder="torchvision\.models:resnet18", '
                                         r'kwargs=\{"num_classes": 10\}'):
        load_deployed(path)


def test_weights_and_json_copy_are_one_unit(trained: nn.Module, tmp_path: Path) -> None:
    """A JSON copy written for other weights (a kill between the two renames, two saves into one place)
    is refused on load; the weights alone (no JSON beside them) still load."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b" / "a.safetensors"
    b.parent.mkdir()
    save_deployed(trained, a, "torchvision.models:resnet18", {"num_classes": 10})
    other = copy.deepcopy(trained)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_deployed(other, b, "torchvision.models:resnet18", {"num_classes": 10})
    metadata_path(a).write_bytes(metadata_path(b).read_bytes())  # b's JSON beside a's weights
    with pytest.raises(DeployedFileError, match="describes another weights file"):
        load_deployed(a)
    with pytest.raises(DeployedFileError, match="describes another weights file"):
        read_metadata(a)
    metadata_path(a).unlink()
    assert isinstance(load_deployed(a), nn.Module)
    metadata_path(a).write_text("[1, 2")  # a JSON copy that is not one
    with pytest.raises(DeployedFileError, match="not the JSON copy"):
        load_deployed(a)


# --- weights and metadata that cannot be valid: refused on save and on load (unless allow_nonfinite) -------------

def _small() -> nn.Module:
    torch.manual_seed(0)
    return foldattn.create_model("cifar_resnet20").eval()  # records its builder: loads without model=


# (id, tensor, what to write into it, the text naming it)
INVALID = [
    ("nan-weight", "conv1.weight", float("nan"), "conv1.weight: 1 NaN"),
    ("inf-bias", "fc.bias", float("inf"), "fc.bias: 1 +Inf"),
    ("minus-inf-norm-weight", "layer2.1.bn1.weight", float("-inf"), "layer2.1.bn1.weight: 1 -Inf"),
    ("nan-running-mean", "bn1.running_mean", float("nan"), "bn1.running_mean: 1 NaN"),
    ("negative-running-var", "layer1.0.bn2.running_var", -0.5,
     "layer1.0.bn2.running_var: 1 negative value(s), impossible for a variance"),
    ("negative-batch-count", "bn1.num_batches_tracked", -3,
     "bn1.num_batches_tracked: 1 negative value(s), impossible for a count of batches"),
]


def _spoil(model: nn.Module, name: str, value: float) -> nn.Module:
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = value
    return model


@pytest.mark.parametrize(("name", "value", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_weights_are_refused_on_save_and_load(tmp_path: Path, name: str, value: float, text: str) -> None:
    model = _spoil(_small(), name, value)
    path = tmp_path / "m.safetensors"
    with pytest.raises(InvalidWeightsError, match=rf"^save_deployed: 1 tensor\(s\) .*{re.escape(text)}.*nothing "
                                                  r"was written.*allow_nonfinite=True"):
        save_deployed(model, path)
    assert list(tmp_path.iterdir()) == []
    save_deployed(model, path, allow_nonfinite=True)  # written on request ...
    with pytest.raises(InvalidWeightsError, match=rf"m.safetensors: 1 tensor\(s\) .*{re.escape(text)}"):
        load_deployed(path)  # ... and refused on load all the same
    fresh = _small()
    reference = copy.deepcopy(fresh.state_dict())
    with pytest.raises(InvalidWeightsError, match=re.escape(text)):
        load_deployed(path, model=fresh)
    assert all(torch.equal(v, reference[k]) for k, v in fresh.state_dict().items())  # not filled in half
    loaded = load_deployed(path, allow_nonfinite=True)
    torch.testing.assert_close(loaded.state_dict()[name], model.state_dict()[name], rtol=0, atol=0, equal_nan=True)


def test_several_invalid_tensors_are_listed_in_one_line(tmp_path: Path) -> None:
    model = _small()
    for name, value, _ in [c[1:] for c in INVALID]:
        _spoil(model, name, value)
    with pytest.raises(InvalidWeightsError) as info:
        save_deployed(model, tmp_path / "m.safetensors")
    message = str(info.value)
    assert "\n" not in message and "6 tensor(s)" in message and "(and 2 more)" in message


@pytest.mark.parametrize(("metadata", "kwargs", "where"), [
    ({"acc": float("nan")}, None, "metadata['acc'] is nan"),
    ({"history": [0.5, {"loss": float("inf")}]}, None, "metadata['history'][1]['loss'] is inf"),
    ({"curve": (1.0, float("-inf"))}, None, "metadata['curve'][1] is -inf"),
    (None, {"num_classes": 10, "width": float("nan")}, "kwargs['width'] is nan"),
], ids=["top-level", "nested-in-a-list", "in-a-tuple", "builder-kwargs"])
def test_non_finite_metadata_is_refused_before_writing(tmp_path: Path, metadata: dict | None, kwargs: dict | None,
                                                       where: str) -> None:
    builder = "foldattn.models:cifar_resnet20" if kwargs is not None else None
    with pytest.raises(ValueError, match=rf"^save_deployed: {re.escape(where)}, which JSON cannot hold.*nothing was"):
        save_deployed(_small(), tmp_path / "m.safetensors", builder, kwargs, metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_allow_nonfinite_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="allow_nonfinite must be True or False"):
        save_deployed(_small(), tmp_path / "m.safetensors", allow_nonfinite="yes")  # type: ignore[arg-type]
    path = save_deployed(_small(), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="allow_nonfinite must be True or False"):
        load_deployed(path, allow_nonfinite=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the commands on a deployed file
@pytest.fixture(scope="module")
def deployed_file(digits_asr_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from foldattn.cli import main

    out = tmp_path_factory.mktemp("deployed") / "model.safetensors"
    assert main(["fold", str(digits_asr_run), "-o", str(out)]) == 0
    return out


# (id, argv after the deployed file, what the output shows, the files written under {tmp})
ON_DEPLOYED = [
    ("fold-again", ["fold", "{dep}", "-o", "{tmp}/again"], "verify: OK", ["again/deployed.safetensors"]),
    ("fold-fuse-bn", ["fold", "{dep}", "-o", "{tmp}/fused", "--fuse-bn"], "fused all", ["fused/deployed.safetensors"]),
    ("export-onnx", ["export", "{dep}", "--onnx", "{tmp}/m.onnx"], "onnxruntime vs PyTorch", ["m.onnx"]),
    ("eval", ["eval", "{dep}", "--dataset", "digits", "--amp", "none"], '"top1"', []),
]


@pytest.mark.parametrize("argv, shows, written", [c[1:] for c in ON_DEPLOYED], ids=[c[0] for c in ON_DEPLOYED])
def test_fold_export_and_eval_take_a_deployed_file(deployed_file: Path, tmp_path: Path, argv: list[str],
                                                   shows: str, written: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from foldattn.cli import main

    if argv[0] == "export":
        pytest.importorskip("onnxruntime")
    code = main([a.format(dep=deployed_file, tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert shows in out and "Traceback" not in err
    for name in written:
        assert (tmp_path / name).stat().st_size > 0
    if argv[0] == "fold" and "--fuse-bn" not in argv:  # the same architecture and weights, rebuilt from the file
        again = load_deployed(tmp_path / written[0])
        ref = load_deployed(deployed_file)
        for (k, a), (k2, b) in zip(ref.state_dict().items(), again.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("argv, message", [
    (["eval", "{dep}"], "a deployed file records no data: pass --dataset"),
    (["fold", "{dep}", "-o", "{dep}"], "that is the file being read"),
    (["eval", "{dep}", "--ema", "--dataset", "digits"], "holds one set of weights"),
    (["stripe", "{dep}", "-o", "{tmp}/s"], "records no data"),
    (["calibrate", "{dep}", "-o", "{tmp}/c"], "records no data"),
], ids=["eval-without-data", "fold-onto-itself", "eval-ema", "stripe-without-data", "calibrate-without-data"])
def test_a_deployed_file_needs_what_it_does_not_record(deployed_file: Path, tmp_path: Path, argv: list[str],
                                                       message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from foldattn.cli import main

    before = deployed_file.read_bytes()
    assert main([a.format(dep=deployed_file, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert deployed_file.read_bytes() == before and list(tmp_path.iterdir()) == []


def _deep(levels: int) -> dict[str, Any]:
    root = node = {}
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


def _cycle() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


@pytest.mark.parametrize("metadata", [_deep(1000), _deep(31), _cycle(), {"list": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
    []]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}], ids=["1000-deep", "31-deep", "holds-itself", "lists-32-deep"])
def test_save_deployed_refuses_metadata_load_deployed_could_not_read(tmp_path: Path, metadata: Any) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="nested more than 30 levels deep") as info:
        save_deployed(nn.Linear(2, 2), path, metadata=metadata)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_deployed_refuses_metadata_larger_than_load_deployed_reads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than the 1,048,576 load_deployed reads"):
        save_deployed(nn.Linear(2, 2), tmp_path / "m.safetensors", metadata={"log": "x" * (2 << 20)})
    assert list(tmp_path.iterdir()) == []
