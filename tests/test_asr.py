"""The ASR layer: for every attention and host type, training form == host(x) * v, and the fold is exact."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foldattn
from foldattn import ASR, attention
from foldattn.asr import absorbing_parameters, host_channels

from .conftest import randomize_norms

C = 12
HOSTS = {
    "batchnorm1d": (lambda: nn.BatchNorm1d(C), (3, C, 5), 1),
    "batchnorm2d": (lambda: nn.BatchNorm2d(C), (3, C, 5, 4), 1),
    "batchnorm3d": (lambda: nn.BatchNorm3d(C), (3, C, 3, 4, 2), 1),
    "groupnorm": (lambda: nn.GroupNorm(3, C), (3, C, 5, 4), 1),
    "conv1d": (lambda: nn.Conv1d(5, C, 3), (3, 5, 7), 1),
    "conv2d": (lambda: nn.Conv2d(5, C, 3, stride=2), (3, 5, 9, 8), 1),
    "conv2d_nobias": (lambda: nn.Conv2d(5, C, 1, bias=False), (3, 5, 4, 4), 1),
    "conv3d": (lambda: nn.Conv3d(5, C, 2), (2, 5, 3, 4, 3), 1),
    "linear": (lambda: nn.Linear(7, C), (3, 4, 7), -1),
    "layernorm": (lambda: nn.LayerNorm(C), (3, 4, C), -1),
}
# classic modules that need a 2-D map cannot run on (N, L, C) tokens or 1-D/3-D maps
NEEDS_2D = {"cbam", "spa"}
ALL = attention.names()


def _make(host_name: str, att: str, dtype: torch.dtype, both: bool = False) -> tuple[ASR, torch.Tensor]:
    build, shape, _ = HOSTS[host_name]
    layer = ASR(randomize_norms(build()), att, both=both).to(dtype)
    with torch.no_grad():
        layer.attention.psi.normal_()
    return layer, torch.randn(shape, dtype=dtype)


def _ref_output(layer: ASR, x: torch.Tensor) -> torch.Tensor:
    """The paper's formulation: the host's plain output multiplied by v."""
    v = layer.vector()
    y = layer.host(x)
    return y * (v if layer.channel_dim == -1 else v.reshape(-1, *([1] * (y.dim() - 2))))


@pytest.mark.parametrize("att", ALL)
@pytest.mark.parametrize("host_name", list(HOSTS))
def test_training_form_is_host_times_v(host_name: str, att: str) -> None:
    layer, x = _make(host_name, att, torch.float64)
    layer.eval()
    out, ref = layer(x), _ref_output(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("att", ["se", "srm", "dia"])
@pytest.mark.parametrize("host_name", ["batchnorm2d", "conv2d", "linear", "layernorm"])
def test_gradients_match_output_scaling(host_name: str, att: str) -> None:
    layer, x = _make(host_name, att, torch.float64)
    ref_layer = copy.deepcopy(layer)
    layer.train()(x).square().sum().backward()
    _ref_output(ref_layer.train(), x).square().sum().backward()
    for (n, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("att", ALL)
@pytest.mark.parametrize("host_name", list(HOSTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fuse_is_exact(host_name: str, att: str, dtype: torch.dtype, tol: float) -> None:
    layer, x = _make(host_name, att, dtype)
    layer.eval()
    host = layer.fuse()
    assert type(host) is type(layer.host)
    report = foldattn.verify(layer, host, x, tolerance=tol)
    assert report.max_rel <= tol
    for p in host.parameters():
        assert p.dtype == dtype


@pytest.mark.parametrize("att", [a for a in ALL if a not in NEEDS_2D])
@pytest.mark.parametrize("host_name", ["batchnorm2d", "conv2d", "linear", "layernorm"])
def test_both_keeps_classic_module(host_name: str, att: str) -> None:
    layer, x = _make(host_name, att, torch.float64, both=True)
    layer.eval()
    deployed = layer.fuse()
    assert isinstance(deployed, nn.Sequential) and deployed[1] is layer.classic
    foldattn.verify(layer, deployed, x)


@settings(max_examples=12, deadline=None)
@given(
    att=st.sampled_from(ALL),
    channels=st.integers(1, 17),
    batch=st.integers(1, 3),
    hw=st.tuples(st.integers(3, 8), st.integers(3, 8)),
    kernel=st.sampled_from([1, 3]),
)
def test_conv_bn_fold_on_odd_shapes(att: str, channels: int, batch: int, hw: tuple[int, int], kernel: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, channels, kernel, padding=kernel // 2), ASR(nn.BatchNorm2d(channels), att))
    randomize_norms(model).double().eval()
    with torch.no_grad():
        model[1].attention.psi.normal_()
    x = torch.randn(batch, 3, *hw, dtype=torch.float64)
    deployed = foldattn.fold(model)
    assert isinstance(deployed[1], nn.BatchNorm2d)
    assert foldattn.verify(model, deployed, x).max_rel <= 1e-10


def test_psi_created_on_host_dtype() -> None:
    layer = ASR(nn.BatchNorm2d(4).double(), "se")
    assert layer.attention.psi.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in layer.parameters())


def test_psi_init_is_configurable() -> None:
    assert bool((ASR(nn.BatchNorm2d(4), "ie", psi_init=0.7).attention.psi == 0.7).all())


@pytest.mark.parametrize(
    "host,match",
    [
        (nn.ReLU(), "cannot absorb a per-channel scale"),
        (nn.BatchNorm2d(4, affine=False), "no affine weight"),
        (nn.LayerNorm(4, elementwise_affine=False), "no affine weight"),
        (nn.ConvTranspose2d(3, 4, 2), "transposed"),
        (nn.LayerNorm((3, 4)), "one \\(the channel\\) dim"),
    ],
)
def test_host_that_cannot_absorb(host: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ASR(host, "se")


def test_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channel mismatch: the host BatchNorm2d has 8"):
        ASR(nn.BatchNorm2d(8), attention.create("se", 4))


def test_unknown_attention_lists_names() -> None:
    with pytest.raises(ValueError, match="valid names: cbam"):
        ASR(nn.BatchNorm2d(8), "nope")


def test_attach_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already has ASR"):
        ASR(ASR(nn.BatchNorm2d(4), "se"), "se")


def test_attention_kwargs_only_with_names() -> None:
    with pytest.raises(TypeError, match="attention_kwargs"):
        ASR(nn.BatchNorm2d(4), attention.create("se", 4), reduction=2)


def test_custom_host_protocol() -> None:
    class TwoBranch(nn.Module):
        """Sum of two BN'd convs: scaling both BNs' affine scales the output."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
            self.b, self.bn_b = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_a(self.a(x)) + self.bn_b(self.b(x))

        def asr_parameters(self) -> list[str]:
            return ["bn_a.weight", "bn_a.bias", "bn_b.weight", "bn_b.bias"]

    host = randomize_norms(TwoBranch()).double()
    assert host_channels(host) == 6 and absorbing_parameters(host) == host.asr_parameters()
    layer = ASR(host, "se").eval()
    with torch.no_grad():
        layer.attention.psi.normal_()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _ref_output(layer, x), rtol=1e-12, atol=1e-12)
    assert foldattn.verify(layer, layer.fuse(), x).max_rel <= 1e-10


def test_custom_host_protocol_errors() -> None:
    class Bad(nn.Conv2d):
        def asr_parameters(self) -> list[str]:
            return ["nope.weight"]

    with pytest.raises(ValueError, match="unknown parameters"):
        ASR(Bad(2, 3, 1), "se")


def test_fuse_refuses_nan_psi() -> None:
    layer = ASR(nn.BatchNorm2d(4), "se")
    with torch.no_grad():
        layer.attention.psi[0, 1] = float("nan")
    with pytest.raises(ValueError, match="psi contains NaN"):
        layer.fuse()


def test_fuse_restores_modes_and_leaves_layer_untouched() -> None:
    layer = ASR(nn.BatchNorm2d(4), "srm").train()
    before = copy.deepcopy(layer.state_dict())
    layer.fuse()
    assert layer.training and layer.attention.training
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sync_batchnorm_conversion_keeps_asr() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ASR(nn.BatchNorm2d(8), "se"))
    randomize_norms(model).eval()
    x = torch.randn(2, 3, 6, 6)
    ref = model(x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[1], ASR) and isinstance(synced[1].host, nn.SyncBatchNorm)
    torch.testing.assert_close(synced.eval()(x), ref)
    deployed = foldattn.fold(synced)
    assert isinstance(deployed[1], nn.SyncBatchNorm)
    foldattn.verify(model, deployed, x)


def test_timm_reparameterize_model_folds_asr() -> None:
    timm_utils = pytest.importorskip("timm.utils")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ASR(nn.BatchNorm2d(8), "se"), nn.ReLU())
    randomize_norms(model).eval()
    with torch.no_grad():
        model[1].attention.psi.normal_()
    deployed = timm_utils.reparameterize_model(model)
    assert isinstance(deployed[1], nn.BatchNorm2d)
    assert not any(isinstance(m, ASR) for m in deployed.modules())
    foldattn.verify(model, deployed, torch.randn(2, 3, 6, 6))


def test_no_warnings_in_normal_use() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = ASR(nn.BatchNorm2d(4), "eca")
        layer(torch.randn(2, 4, 3, 3)).sum().backward()
        foldattn.fold(nn.Sequential(layer))
