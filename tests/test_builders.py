"""Loading trusts data, never code: hostile deployed-file metadata is refused, and nothing runs.

Each case starts from a valid deployed file and rewrites its JSON metadata as an attacker
who can edit the file would (the tensors, and so the embedded checksum, stay valid). Every
case must be refused with a clear error, and a marker that a successful exploit would create
(a folder made by an unpickled payload, a folder made by a timm utility) must not exist.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import foldattn
from foldattn import load_deployed, save_deployed
from foldattn.deploy import (
    ArchitectureMismatchError,
    DeployedFileError,
    UntrustedBuilderError,
    file_sha256,
    read_metadata,
)

tv = pytest.importorskip("torchvision.models")


class _Payload:
    """Unpickling this creates a folder: the evidence of code run from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    good = save_deployed(foldattn.create_model("cifar_resnet20"), tmp_path / "good.safetensors")
    marker = tmp_path / "PWNED"
    pickle = tmp_path / "payload.pt"
    torch.save(_Payload(marker), pickle)
    return {"good": good, "marker": marker, "pickle": pickle, "dir": tmp_path}


def _rewrite(good: Path, dest: Path, **changes: Any) -> Path:
    with safe_open(str(good), "pt") as f:
        meta = json.loads(f.metadata()["foldattn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(changes)
    save_file(tensors, str(dest), metadata={"foldattn": json.dumps(meta)})
    return dest


def _hostile(e: dict[str, Path]) -> list[tuple[str, dict[str, Any], str]]:
    """(case, metadata changes, expected message) for every hostile file."""
    pkl, marker = str(e["pickle"]), str(e["marker"])
    return [
        # functions outside the allowlist, with keyword arguments that would run code or touch files
        ("timm load_state_dict unpickles", {"builder": "timm.models:load_state_dict",
                                            "kwargs": {"checkpoint_path": pkl, "weights_only": False}}, "not allowed"),
        ("timm load_state_dict_from_hf", {"builder": "timm.models:load_state_dict_from_hf",
                                          "kwargs": {"model_id": "x/y"}}, "not allowed"),
        ("timm get_outdir writes", {"builder": "timm.utils:get_outdir", "kwargs": {"path": marker}}, "not allowed"),
        ("torch.load", {"builder": "torch:load", "kwargs": {"f": pkl, "weights_only": False}}, "not allowed"),
        ("os.system", {"builder": "os:system", "kwargs": {"command": "mkdir " + marker}}, "not allowed"),
        ("builtins eval", {"builder": "builtins:eval", "kwargs": {}}, "not allowed"),
        ("subprocess", {"builder": "subprocess:getoutput", "kwargs": {}}, "not allowed"),
        ("a private foldattn function", {"builder": "foldattn.deploy:_read", "kwargs": {}}, "not allowed"),
        ("foldattn but not a model", {"builder": "foldattn.models:create_model", "kwargs": {}}, "not allowed"),
        ("foldattn module prefix", {"builder": "foldattn.models._registry:create_model"}, "not allowed"),
        ("torchvision helper, not a model", {"builder": "torchvision.models:get_weight",
                                             "kwargs": {"name": "ResNet18_Weights.IMAGENET1K_V1"}}, "not allowed"),
        ("timm helper, not a model", {"builder": "timm:load_checkpoint", "kwargs": {}}, "not allowed"),
        ("timm pretrained tag", {"builder": "timm:resnet18.a1_in1k"}, "not allowed"),
        ("builder not a string", {"builder": ["os", "system"]}, "is not a spec"),
        ("builder with two colons", {"builder": "a:b:c"}, "is not a spec"),
        # allowlisted models, hostile keyword arguments
        ("timm checkpoint_path", {"builder": "timm:resnet18", "kwargs": {"checkpoint_path": pkl}}, "loads or fetches"),
        ("timm pretrained", {"builder": "timm:resnet18", "kwargs": {"pretrained": True}}, "loads or fetches"),
        ("timm pretrained_cfg_overlay file", {"builder": "timm:resnet18",
                                              "kwargs": {"pretrained_cfg_overlay": {"file": pkl}}}, "loads or fetches"),
        ("legacy timm create_model pretrained", {"builder": "timm:create_model",
                                                 "kwargs": {"model_name": "resnet18", "pretrained": True}},
         "pretrained weights is refused"),
        ("legacy timm create_model checkpoint", {"builder": "timm:create_model",
                                                 "kwargs": {"model_name": "resnet18", "checkpoint_path": pkl}},
         "loads or fetches"),
        ("torchvision weights download", {"builder": "torchvision.models:resnet18",
                                          "kwargs": {"weights": "IMAGENET1K_V1"}}, "loads or fetches"),
        ("torchvision progress", {"builder": "torchvision.models:resnet18", "kwargs": {"progress": True}},
         "loads or fetches"),
        ("unknown keyword", {"builder": "foldattn.models:cifar_resnet20", "kwargs": {"cache_dir": "x"}},
         "loads or fetches"),
        ("keyword not in the signature", {"builder": "foldattn.models:cifar_resnet20", "kwargs": {"exec": 1}},
         "not a parameter of the constructor"),
        ("dunder keyword", {"builder": "foldattn.models:cifar_resnet20", "kwargs": {"__class__": 1}},
         "not a parameter of the constructor"),
        ("a path as a value", {"builder": "foldattn.models:cifar_resnet20", "kwargs": {"attention": pkl}},
         "no paths or URLs"),
        ("a URL as a value", {"builder": "foldattn.models:cifar_resnet20",
                              "kwargs": {"attention": "https://example.com/x.pt"}}, "no paths or URLs"),
        ("a nested object", {"builder": "torchvision.models:resnet18",
                             "kwargs": {"norm_layer": {"__reduce__": "os.system"}}}, "got a dict"),
        ("a list of objects", {"builder": "torchvision.models:resnet18",
                               "kwargs": {"replace_stride_with_dilation": [{"a": 1}]}}, "got a dict"),
        ("nested lists", {"builder": "torchvision.models:resnet18",
                          "kwargs": {"replace_stride_with_dilation": [[1]]}}, "got a list"),
        ("a huge integer", {"builder": "torchvision.models:resnet18", "kwargs": {"num_classes": 10 ** 15}},
         "integers are limited"),
        ("a huge list", {"builder": "torchvision.models:resnet18",
                         "kwargs": {"replace_stride_with_dilation": [False] * 1000}}, "at most 64"),
        ("kwargs not an object", {"builder": "foldattn.models:cifar_resnet20", "kwargs": ["x"]},
         "kwargs must be an object"),
        ("too many kwargs", {"builder": "foldattn.models:cifar_resnet20",
                             "kwargs": {f"k{i}": i for i in range(100)}}, "at most 32"),
    ]


def test_hostile_metadata_table(env: dict[str, Path]) -> None:
    assert len(_hostile(env)) >= 30
    for case, changes, match in _hostile(env):
        evil = _rewrite(env["good"], env["dir"] / "evil.safetensors", **changes)
        before = sorted(p.name for p in env["dir"].iterdir())
        with pytest.raises(UntrustedBuilderError, match=match) as info:
            load_deployed(evil)
        message = str(info.value)
        assert "\n" not in message and len(message) < 2000, case
        assert not env["marker"].exists(), f"{case}: the exploit ran"
        assert sorted(p.name for p in env["dir"].iterdir()) == before, f"{case}: something was written"


def test_refusal_names_the_builder_and_what_is_allowed(env: dict[str, Path]) -> None:
    evil = _rewrite(env["good"], env["dir"] / "e.safetensors", builder="timm.models:load_state_dict")
    with pytest.raises(UntrustedBuilderError, match=r"'timm\.models:load_state_dict' is not allowed.*"
                                                    r"'foldattn\.models:NAME'.*'torchvision\.models:NAME'.*'timm:NAME'"):
        load_deployed(evil)
    evil = _rewrite(env["good"], env["dir"] / "f.safetensors", kwargs={"nope": 1})
    with pytest.raises(UntrustedBuilderError, match=r"'nope' is refused.*allowed: .*num_classes"):
        load_deployed(evil)


def test_oversized_architecture_is_refused_before_allocation(env: dict[str, Path]) -> None:
    # 4M classes pass the integer bound; a real build would allocate 64M x 4M floats (1 TB)
    evil = _rewrite(env["good"], env["dir"] / "big.safetensors", kwargs={"num_classes": 4_000_000})
    t0 = time.perf_counter()
    with pytest.raises(ArchitectureMismatchError, match=r"asks for more than the file holds"):
        load_deployed(evil)
    assert time.perf_counter() - t0 < 30  # refused by the budgeted meta-device build, not after allocating


@pytest.mark.parametrize("change", ["header", "size", "aliases", "alias-onto-tensor"])
def test_malformed_metadata(env: dict[str, Path], change: str) -> None:
    with safe_open(str(env["good"]), "pt") as f:
        meta_text = f.metadata()["foldattn"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(meta_text)
    if change == "header":
        text = meta_text[:-5] + "{{{"  # not JSON
    elif change == "size":
        text = json.dumps({**meta, "user": {"pad": "x" * (2 << 20)}})
    elif change == "aliases":
        text = json.dumps({**meta, "aliases": ["fc.weight"]})
    else:  # an alias that would overwrite a real tensor with another
        text = json.dumps({**meta, "aliases": {"fc.weight": "conv1.weight"}})
    evil = env["dir"] / "m.safetensors"
    save_file(tensors, str(evil), metadata={"foldattn": text})
    with pytest.raises(DeployedFileError):
        load_deployed(evil)


def test_allowed_builders_still_load(env: dict[str, Path], tmp_path: Path) -> None:
    # the exact allowlist keeps every legitimate use: the three families, their kwargs, the legacy timm spelling
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", num_classes=3)
    path = save_deployed(model, tmp_path / "t.safetensors", "timm:resnet10t", {"num_classes": 3})
    foldattn.verify(model, load_deployed(path), torch.randn(1, 3, 32, 32))
    legacy = _rewrite(path, tmp_path / "legacy.safetensors", builder="timm:create_model",
                      kwargs={"model_name": "resnet10t", "num_classes": 3, "pretrained": False})
    foldattn.verify(model, load_deployed(legacy), torch.randn(1, 3, 32, 32))
    r50 = tv.resnet50(num_classes=4, replace_stride_with_dilation=[False, False, True], width_per_group=32)
    path = save_deployed(r50, tmp_path / "r.safetensors", "torchvision.models:resnet50",
                         {"num_classes": 4, "replace_stride_with_dilation": [False, False, True],
                          "width_per_group": 32})
    foldattn.verify(r50, load_deployed(path), torch.randn(1, 3, 64, 64))
    se = foldattn.create_model("cifar_resnet20", attention="se", reduction=8)
    path = save_deployed(se, tmp_path / "s.safetensors")
    assert read_metadata(path)["kwargs"] == {"attention": "se", "reduction": 8}
    foldattn.verify(se, load_deployed(path), torch.randn(1, 3, 32, 32))


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    model = tv.resnet18(num_classes=10)
    with pytest.raises(UntrustedBuilderError, match="loads or fetches"):
        save_deployed(model, tmp_path / "a.safetensors", "torchvision.models:resnet18", {"weights": None},
                      check_builder=False)
    assert list(tmp_path.iterdir()) == []


def test_checksum_is_not_a_signature_but_sha256_pins_the_file(env: dict[str, Path]) -> None:
    good = env["good"]
    pinned = file_sha256(good)
    assert load_deployed(good, sha256=pinned) is not None
    # an attacker edits a weight and recomputes the embedded checksum: the file loads (documented) ...
    model = load_deployed(good)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    tampered = save_deployed(model, env["dir"] / "tampered.safetensors")  # a loaded model keeps its builder
    assert isinstance(load_deployed(tampered), nn.Module)
    # ... but not against the hash published for the original
    with pytest.raises(DeployedFileError, match="differs from the expected"):
        load_deployed(tampered, sha256=pinned)
