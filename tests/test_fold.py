"""Model-level fold: copies, modes, idempotence, strict load into the plain backbone, BN fusion."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import foldattn
from foldattn import ASR, attention, create_model, fold
from foldattn.fold import asr_layers, conv_bn_pairs
from foldattn.summary import count_params

from .conftest import randomize_norms, randomize_psi

X = torch.randn(2, 3, 16, 16)


def _trained_like(name: str = "cifar_resnet20", **kw: object) -> nn.Module:
    model = create_model(name, **kw)
    return randomize_psi(randomize_norms(model))


@pytest.mark.parametrize("att", attention.names())
@pytest.mark.parametrize("both", [False, True])
def test_fold_cifar_resnet_float64(att: str, both: bool) -> None:
    if both and not attention.get(att).has_classic_form:
        pytest.skip(f"{att} has no classic form, so no ASR(X) + X")
    model = _trained_like(attention=att, asr=True, both=both).double()
    deployed = fold(model)
    assert not asr_layers(deployed)
    assert foldattn.verify(model, deployed, X.double()).max_rel <= 1e-10
    plain = create_model("cifar_resnet20", attention=att if both else None).double()
    plain.load_state_dict(deployed.state_dict(), strict=True)
    assert count_params(deployed) == count_params(plain)
    assert foldattn.verify(model, plain, X.double()).max_rel <= 1e-10


@pytest.mark.parametrize("att", attention.names())
def test_fold_cifar_resnet_float32_after_training_steps(att: str) -> None:
    model = create_model("cifar_resnet20", attention=att, asr=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert foldattn.verify(model, fold(model), x).max_rel <= 1e-5


def test_fold_returns_a_copy_and_keeps_modes() -> None:
    model = _trained_like(attention="se", asr=True).train()
    deployed = fold(model)
    assert deployed is not model and asr_layers(model)
    assert model.training and all(m.training for m in model.modules())
    assert deployed.training  # the caller's mode, kept


def test_fold_inplace() -> None:
    model = _trained_like(attention="se", asr=True).eval()
    ref = model(X)
    out = fold(model, inplace=True)
    assert out is model and not asr_layers(model)
    torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-6)


def test_fold_is_idempotent() -> None:
    model = _trained_like(attention="eca", asr=True).eval()
    once = fold(model)
    with pytest.warns(UserWarning, match="no ASR layer"):
        twice = fold(once)
    for (k, a), (_, b) in zip(once.state_dict().items(), twice.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_fold_without_asr_warns_and_returns_unchanged() -> None:
    model = create_model("cifar_resnet20")
    with pytest.warns(UserWarning, match="no ASR layer; returned unchanged"):
        out = fold(model, inplace=True)
    assert out is model


def _assert_plain_tree(deployed: nn.Module, model: nn.Module) -> None:
    assert isinstance(deployed, type(model)) and not asr_layers(deployed)
    assert not [k for k in deployed.state_dict() if k.startswith(("module.", "_orig_mod."))]
    create_model("cifar_resnet20").load_state_dict(deployed.state_dict(), strict=True)


def test_fold_unwraps_data_parallel_and_compile_wrappers() -> None:
    model = _trained_like(attention="se", asr=True).eval()
    _assert_plain_tree(fold(nn.DataParallel(model)), model)
    compiled = torch.compile(model)  # wrapping only (nothing is compiled until it runs)
    assert hasattr(compiled, "_orig_mod")
    _assert_plain_tree(fold(compiled), model)
    _assert_plain_tree(fold(torch.compile(nn.DataParallel(model))), model)  # nested wrappers


def test_fold_unwraps_distributed_data_parallel(tmp_path: Path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = _trained_like(attention="se", asr=True).eval()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert next(iter(ddp.state_dict())).startswith("module.")
        deployed = fold(ddp)
    finally:
        dist.destroy_process_group()
    _assert_plain_tree(deployed, model)
    assert foldattn.verify(model, deployed, X).max_rel <= 1e-5


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_backward_hooks",
          "_backward_pre_hooks")


@pytest.mark.parametrize(
    "name,kw,fuse_bn",
    [
        ("cifar_resnet20", {"attention": "se", "asr": True}, False),
        ("cifar_resnet20", {"attention": "dia", "asr": True, "both": True}, False),
        ("cifar_resnet20", {"attention": "srm", "asr": True}, True),
        ("cifar_resnet20_dbb", {"attention": "eca", "asr": True}, False),
    ],
)
def test_fold_leaves_no_hooks_or_parametrizations(name: str, kw: dict[str, object], fuse_bn: bool) -> None:
    model = _trained_like(name, **kw)
    model(X).sum().backward()  # a training step's forward and backward first
    deployed = fold(model, fuse_bn=fuse_bn)
    for n, m in deployed.named_modules():
        for attr in _HOOKS:
            assert not getattr(m, attr), f"{n or 'model'}.{attr}"
        assert not parametrize.is_parametrized(m), n
    for n, p in deployed.named_parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None), n


def test_fold_names_the_layer_with_nan() -> None:
    model = _trained_like(attention="se", asr=True)
    with torch.no_grad():
        model.layer2[1].bn2.attention.psi.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"cannot fold ASR layer 'layer2.1.bn2': psi contains NaN or Inf"):
        fold(model)


def test_fold_nan_from_attention_weights() -> None:
    model = _trained_like(attention="se", asr=True)
    with torch.no_grad():
        model.layer1[0].bn2.attention.fc1.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="layer1.0.bn2.*vector contains NaN"):
        fold(model)


def test_fold_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fold("model")  # type: ignore[arg-type]


def test_root_asr_layer_folds() -> None:
    layer = ASR(nn.BatchNorm2d(3), "se")
    assert isinstance(fold(layer), nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet164"])
def test_fuse_bn_removes_every_batchnorm(name: str) -> None:
    model = _trained_like(name, attention="se", asr=True).double().eval()
    deployed = fold(model, fuse_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert foldattn.verify(model, deployed, X[:1].double()).max_rel <= 1e-10


def test_fuse_bn_float32() -> None:
    model = _trained_like(attention="srm", asr=True).eval()
    assert foldattn.verify(model, fold(model, fuse_bn=True), X).max_rel <= 1e-5


def test_conv_bn_pairs_skip_a_conv_used_twice_and_untraceable_models() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return self.seq(self.conv(y))

    assert conv_bn_pairs(Twice()) == [("seq.0", "seq.1")]

    class Branchy(Twice):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                x = self.bn(self.conv(x))
            return self.seq(x)

    assert conv_bn_pairs(Branchy()) == [("seq.0", "seq.1")]
    model = randomize_norms(Branchy()).eval()
    x = torch.rand(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        foldattn.verify(model, fold(model, fuse_bn=True), x)
