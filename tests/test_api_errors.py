"""Bad input to the public Python API: a clear ValueError/TypeError from foldattn, never a torch-internal
error and never a silent result."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import foldattn
from foldattn import attention


def _small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


@pytest.fixture(scope="module")
def asr_model() -> nn.Module:
    return foldattn.create_model("cifar_resnet20", attention="se", asr=True)


X = torch.randn(2, 3, 32, 32)

# (id, call(model, tmp_path), exception type, text of the message)
CASES: list[tuple[str, Callable[[nn.Module, Path], object], type[Exception], str]] = [
    ("attach-not-a-module", lambda m, t: foldattn.attach("resnet", "se"), TypeError, "expected an nn.Module"),
    ("attach-unknown-attention", lambda m, t: foldattn.attach(_small(), "nope", where="norms"), ValueError,
     "unknown attention 'nope'"),
    ("attach-bad-where", lambda m, t: foldattn.attach(_small(), "se", where="everywhere"), ValueError, "where must"),
    ("attach-every-0", lambda m, t: foldattn.attach(_small(), "se", where="norms", every=0), ValueError, "every"),
    ("attach-psi-nan", lambda m, t: foldattn.attach(_small(), "se", where="norms", psi_init=math.nan), ValueError,
     "psi_init must be a finite number"),
    ("attach-include-matches-nothing", lambda m, t: foldattn.attach(_small(), "se", where=None, include="zzz*"),
     ValueError, "matches no module"),
    ("fold-not-a-module", lambda m, t: foldattn.fold(3), TypeError, "nn.Module"),
    ("fold-flag-not-bool", lambda m, t: foldattn.fold(m, fuse_bn="yes"), TypeError, "fuse_bn must be True or False"),
    ("verify-not-a-module", lambda m, t: foldattn.verify(m, "deployed", X), TypeError, "deployed must be an nn.Module"),
    ("verify-wrong-shape", lambda m, t: foldattn.verify(m, foldattn.fold(m), torch.randn(2, 3)), ValueError,
     "cannot run on example inputs of shape (2, 3)"),
    ("verify-empty-batch", lambda m, t: foldattn.verify(m, foldattn.fold(m), torch.randn(0, 3, 32, 32)),
     ValueError, "batch of 0 samples"),
    ("verify-negative-tolerance", lambda m, t: foldattn.verify(m, foldattn.fold(m), X, tolerance=-1.0), ValueError,
     "tolerance must be"),
    ("create-unknown", lambda m, t: foldattn.create_model("resnet9000"), ValueError, "unknown model 'resnet9000'"),
    ("create-classes-0", lambda m, t: foldattn.create_model("cifar_resnet20", num_classes=0), ValueError,
     "num_classes must be a positive integer"),
    ("create-classes-negative", lambda m, t: foldattn.create_model("cifar_resnet20", num_classes=-3), ValueError,
     "num_classes"),
    ("create-classes-str", lambda m, t: foldattn.create_model("cifar_resnet20", num_classes="10"), ValueError,
     "num_classes"),
    ("create-unknown-kwarg", lambda m, t: foldattn.create_model("cifar_resnet20", colour="red"), ValueError,
     "unknown keyword argument(s) colour"),
    ("create-unknown-attention-kwarg",
     lambda m, t: foldattn.create_model("cifar_resnet20", attention="se", colour="red"), ValueError,
     "SE takes"),
    ("create-psi-inf", lambda m, t: foldattn.create_model("cifar_resnet20", attention="se", asr=True,
                                                          psi_init=math.inf), ValueError, "psi_init"),
    ("create-every-0", lambda m, t: foldattn.create_model("cifar_resnet20", attention="se", every=0), ValueError,
     "every"),
    ("attention-channels-0", lambda m, t: attention.create("se", 0), ValueError, "channels must be"),
    ("attention-channels-float", lambda m, t: attention.create("se", 16.5), ValueError, "channels must be"),
    ("attention-wrong-input", lambda m, t: attention.create("se", 16)(torch.randn(2, 8, 4, 4)), ValueError,
     "expects a feature map (N, 16"),
    ("asr-host-not-a-module", lambda m, t: foldattn.ASR("bn", attention.create("se", 8)), ValueError,
     "cannot absorb"),
    ("asr-channel-mismatch", lambda m, t: foldattn.ASR(nn.BatchNorm2d(8), attention.create("se", 16)),
     ValueError, "channel mismatch"),
    ("save-deployed-json-suffix", lambda m, t: foldattn.save_deployed(m, t / "x.json"), ValueError, "another suffix"),
    ("save-deployed-missing-folder", lambda m, t: foldattn.save_deployed(m, t / "no" / "x.safetensors"),
     FileNotFoundError, "does not exist"),
    ("load-deployed-missing", lambda m, t: foldattn.load_deployed(t / "none.safetensors"), FileNotFoundError,
     "no deployed file"),
    ("export-onnx-opset", lambda m, t: foldattn.export_onnx(m, (X,), t / "m.onnx", opset_version=3), ValueError,
     "opset_version=3"),
    ("summary-not-a-module", lambda m, t: foldattn.summary("m"), TypeError, "summary expects an nn.Module"),
    ("find-sites-bad-where", lambda m, t: foldattn.find_sites(m, where="x"), ValueError, "where must"),
]


@pytest.mark.parametrize(("call", "kind", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_public_api_refuses(asr_model: nn.Module, tmp_path: Path, call, kind: type[Exception], message: str) -> None:
    with pytest.raises(kind) as info:
        call(asr_model, tmp_path)
    assert message in str(info.value)
    torch_frames = [f for f in info.traceback if "site-packages/torch/" in str(f.path)]
    assert not torch_frames or info.traceback[-1] not in torch_frames, "raised inside torch"
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
