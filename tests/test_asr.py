"""The ASR layer: for every attention and host type, training form == host(x) * v, and the fold is exact."""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import foldattn
from foldattn import ASR, attention
from foldattn.asr import absorbing_parameters, host_channels

from .conftest import randomize_norms

C = 12
# (N, C_in, *spatial) maps or (N, L, C_in) tokens, from the host's channels, a batch size and spatial sizes
Shape = Callable[[int, int, Sequence[int]], tuple[int, ...]]


def _maps(dims: int, in_channels: int | None = None) -> Shape:
    """A norm's input has the host's channels, a conv's its own ``in_channels``."""
    return lambda c, n, s: (n, in_channels or c, *s[:dims])


def _tokens(in_features: int | None = None) -> Shape:
    return lambda c, n, s: (n, s[0], in_features or c)


# name -> (build(channels), input shape, channel dim of the output)
HOSTS: dict[str, tuple[Callable[[int], nn.Module], Shape, int]] = {
    "batchnorm1d": (nn.BatchNorm1d, _maps(1), 1),
    "batchnorm2d": (nn.BatchNorm2d, _maps(2), 1),
    "batchnorm3d": (nn.BatchNorm3d, _maps(3), 1),
    # without an initialised process group, SyncBatchNorm runs plain batch_norm in both modes on CPU
    # (test_gradients_match_output_scaling trains it); under one it refuses CPU input in training
    "syncbatchnorm": (nn.SyncBatchNorm, _maps(2), 1),
    "groupnorm": (lambda c: nn.GroupNorm(math.gcd(c, 3), c), _maps(2), 1),
    "instancenorm1d": (lambda c: nn.InstanceNorm1d(c, affine=True), _maps(1), 1),
    "instancenorm2d_tracked": (lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True), _maps(2), 1),
    "conv1d": (lambda c: nn.Conv1d(5, c, 3), _maps(1, 5), 1),
    "conv2d": (lambda c: nn.Conv2d(5, c, 3, stride=2), _maps(2, 5), 1),
    "conv2d_nobias": (lambda c: nn.Conv2d(5, c, 1, bias=False), _maps(2, 5), 1),
    "conv3d": (lambda c: nn.Conv3d(5, c, 2), _maps(3, 5), 1),
    "linear": (lambda c: nn.Linear(7, c), _tokens(7), -1),
    "layernorm": (nn.LayerNorm, _tokens(), -1),
    "rmsnorm": (nn.RMSNorm, _tokens(), -1),
}
SPATIAL = (5, 4, 3)  # >= 3 everywhere: conv2d's 3x3 kernel
# classic modules that need a 2-D map cannot run on (N, L, C) tokens or 1-D/3-D maps
NEEDS_2D = {"cbam", "spa"}
ALL = attention.names()


def _randomize(host: nn.Module, seed: int = 0) -> nn.Module:
    """``randomize_norms``, plus the norms it does not know: InstanceNorm (affine, tracked) and RMSNorm."""
    randomize_norms(host, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in host.modules():
            if isinstance(m, (_InstanceNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if isinstance(m, _InstanceNorm) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, _InstanceNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return host


def _make(
    host_name: str,
    att: str,
    dtype: torch.dtype,
    both: bool = False,
    channels: int = C,
    batch: int = 3,
    spatial: Sequence[int] = SPATIAL,
    seed: int = 0,
) -> tuple[ASR, torch.Tensor]:
    build, shape, dim = HOSTS[host_name]
    layer = ASR(_randomize(build(channels), seed), att, both=both).to(dtype)
    assert layer.channel_dim == dim
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        layer.attention.psi.copy_(torch.randn(layer.attention.psi.shape, generator=g))
    return layer, torch.randn(shape(channels, batch, spatial), generator=g).to(dtype)


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
@pytest.mark.parametrize(
    "host_name", ["batchnorm2d", "syncbatchnorm", "instancenorm1d", "conv2d", "linear", "layernorm", "rmsnorm"]
)
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


@pytest.mark.parametrize("att", [a for a in ALL if a not in NEEDS_2D and attention.get(a).has_classic_form])
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


@settings(max_examples=30, deadline=None)
@given(
    host_name=st.sampled_from(list(HOSTS)),
    att=st.sampled_from(ALL),
    channels=st.integers(1, 17),
    batch=st.integers(1, 4),
    spatial=st.tuples(st.integers(3, 9), st.integers(3, 9), st.integers(3, 6)),
    dtype_tol=st.sampled_from([(torch.float64, 1e-10), (torch.float32, 1e-5)]),
    seed=st.integers(0, 2**16),
)
def test_fold_every_host_on_odd_shapes(
    host_name: str,
    att: str,
    channels: int,
    batch: int,
    spatial: tuple[int, int, int],
    dtype_tol: tuple[torch.dtype, float],
    seed: int,
) -> None:
    dtype, tol = dtype_tol
    layer, x = _make(host_name, att, dtype, channels=channels, batch=batch, spatial=spatial, seed=seed)
    layer.eval()
    deployed = foldattn.fold(layer)
    assert type(deployed) is type(layer.host)
    report = foldattn.verify(layer, deployed, x, tolerance=tol)  # max |a - b| / max |a|: the output scale
    assert report.dtype == dtype and report.max_rel <= tol


class _BigOps(TorchDispatchMode):
    """Counts the aten ops (forward and backward) with an output of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops, self.small = numel, Counter[str](), 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(n >= self.numel for n in sizes):
            self.ops[func.overloadpacket.__name__] += 1
        else:
            self.small += 1
        return out


def _big_ops(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> _BigOps:
    x = x.clone().requires_grad_()  # as inside a network: the input gradient is computed too
    grad = torch.randn(x.shape)
    with _BigOps(x.numel()) as rec:
        fn(x).backward(grad)
    return rec


@pytest.mark.parametrize("att", ALL)
def test_training_form_adds_no_pass_over_the_feature_map(att: str) -> None:
    # the cost rule: v goes into the host's C-sized parameters, never onto its N*C*H*W output
    x = torch.randn(2, 8, 16, 16)  # 4096 elements, more than any psi/gate tensor (SPA's largest: 168)
    plain = _big_ops(randomize_norms(nn.BatchNorm2d(8)).train(), x)
    layer = ASR(randomize_norms(nn.BatchNorm2d(8)), att).train()
    asr = _big_ops(layer, x)
    assert plain.ops["native_batch_norm_backward"] == 1  # the backward pass was recorded
    assert asr.ops == plain.ops, asr.ops - plain.ops
    assert asr.small > plain.small  # the attention's work is there, on small tensors
    # negative control, the reference code's host(x) * v: three full-size muls (y * v forward,
    # grad * v and grad * y backward), which this check would catch
    scaled = _big_ops(lambda t: _ref_output(layer, t), x)
    assert scaled.ops - plain.ops == Counter(mul=3)


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


# --------------------------------------------------------------------------------------
# ASR.forward == the host's functional form on p * v (outputs, gradients, buffers)
# --------------------------------------------------------------------------------------
class _SumOfConvs(nn.Module):
    """A custom host with dotted absorbing parameters (two parallel convs, summed) and no ``forward_scaled``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)

    def asr_parameters(self) -> list[str]:
        return ["a.weight", "a.bias", "b.weight", "b.bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _host_on_scaled_parameters(host: nn.Module, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``host(x)`` written out with torch.nn.functional, every absorbing parameter ``p`` replaced by ``p * v``
    (output channel ``c``, dim 0, times ``v[c]``). Buffers are copied: the host's running statistics stay put."""
    F = torch.nn.functional

    def p(name: str) -> torch.Tensor:
        t = host.get_parameter(name)
        return t * v.reshape(-1, *([1] * (t.dim() - 1)))

    if isinstance(host, _SumOfConvs):
        return F.conv2d(x, p("a.weight"), p("a.bias"), padding=1) + F.conv2d(x, p("b.weight"), p("b.bias"))
    if isinstance(host, nn.BatchNorm2d):
        return F.batch_norm(x, host.running_mean.clone(), host.running_var.clone(), p("weight"), p("bias"),
                            host.training, host.momentum, host.eps)
    if isinstance(host, nn.Conv2d):
        return F.conv2d(x, p("weight"), p("bias"), host.stride, host.padding, host.dilation, host.groups)
    if isinstance(host, nn.Linear):
        return F.linear(x, p("weight"), p("bias"))
    if isinstance(host, nn.LayerNorm):
        return F.layer_norm(x, host.normalized_shape, p("weight"), p("bias"), host.eps)
    if isinstance(host, nn.GroupNorm):
        return F.group_norm(x, host.num_groups, p("weight"), p("bias"), host.eps)
    raise AssertionError(f"no functional reference for {type(host).__name__}")


@pytest.mark.parametrize(
    ("make_host", "shape", "train", "absorbing"),
    [
        (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5), True, ["weight", "bias"]),
        (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5), False, ["weight", "bias"]),
        (lambda: nn.Conv2d(3, 6, 3), (2, 3, 7, 7), True, ["weight", "bias"]),
        (lambda: nn.Linear(5, 6), (3, 5), True, ["weight", "bias"]),
        (lambda: nn.LayerNorm(6), (3, 4, 6), True, ["weight", "bias"]),
        (lambda: nn.GroupNorm(2, 6), (2, 6, 4, 4), True, ["weight", "bias"]),
        (_SumOfConvs, (2, 3, 5, 5), True, ["a.weight", "a.bias", "b.weight", "b.bias"]),
    ],
)
def test_forward_matches_the_host_on_scaled_parameters(
    make_host: Callable[[], nn.Module], shape: tuple[int, ...], train: bool, absorbing: list[str]
) -> None:
    """Same outputs and gradients (float64, 1e-12 relative) as the host computed with p * v; the host's
    buffers (running statistics) move exactly as its own forward moves them."""
    torch.manual_seed(0)
    layer = ASR(make_host(), "se", reduction=2).double().train(train)
    assert absorbing_parameters(layer.host) == absorbing
    with torch.no_grad():
        layer.attention.psi.normal_()
    ref_layer, own_forward = copy.deepcopy(layer), copy.deepcopy(layer.host)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), _host_on_scaled_parameters(ref_layer.host, ref_layer.vector(), x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for (n, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters(), strict=True):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
    with torch.no_grad():
        own_forward(x.detach())
    torch.testing.assert_close(layer.host.state_dict(), own_forward.state_dict(), rtol=0, atol=0)
