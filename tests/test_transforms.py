"""The fold algebra, each transform on its own, against the operation it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foldattn.transforms import (
    add_branches,
    avgpool_as_conv,
    bn_zero_response,
    fuse_bn,
    fuse_conv_bn,
    identity_as_conv,
    merge_1x1_kxk,
    pad_kernel,
    scale_in_channels,
    scale_out_channels,
)


@settings(max_examples=25, deadline=None)
@given(cout=st.integers(1, 9), cin=st.integers(1, 5), k=st.integers(1, 3), dim=st.integers(0, 1))
def test_scale_out_channels_matches_broadcast(cout: int, cin: int, k: int, dim: int) -> None:
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    v = torch.rand(w.shape[dim], dtype=torch.float64)
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    torch.testing.assert_close(scale_out_channels(w, v, dim), w * v.reshape(shape), rtol=0, atol=0)


def test_scale_out_channels_keeps_dtype_and_rounds_once() -> None:
    w = torch.randn(8, 3, dtype=torch.float32)
    v = torch.rand(8, dtype=torch.float32)
    out = scale_out_channels(w, v)
    assert out.dtype == torch.float32
    assert torch.equal(out, w * v[:, None])  # the float64 product rounds to the float32 one
    half = scale_out_channels(w.to(torch.bfloat16), v)
    assert half.dtype == torch.bfloat16


def test_scale_out_channels_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="does not match dim 0"):
        scale_out_channels(torch.randn(4, 2), torch.rand(3))


def test_fuse_bn_is_eval_batchnorm() -> None:
    c = 7
    mean, var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.1
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    x = torch.randn(5, c, 3, 3, dtype=torch.float64)
    s, t = fuse_bn(mean, var, 1e-5, w, b)
    ref = F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)
    torch.testing.assert_close(x * s[:, None, None] + t[:, None, None], ref, rtol=1e-12, atol=1e-12)
    s0, t0 = fuse_bn(mean, var, 1e-5, None, None)  # affine=False
    ref0 = F.batch_norm(x, mean, var, None, None, training=False, eps=1e-5)
    torch.testing.assert_close(x * s0[:, None, None] + t0[:, None, None], ref0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fuse_conv_bn(bias: bool, dtype: torch.dtype, tol: float) -> None:
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=bias).to(dtype)
    bn = torch.nn.BatchNorm2d(6).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    w, b = fuse_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert w.dtype == dtype and b.dtype == dtype
    ref = bn(conv(x))
    out = F.conv2d(x, w, b, padding=1)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= tol


def test_fuse_conv_bn_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="BatchNorm has 3 channels"):
        fuse_conv_bn(torch.randn(4, 2, 1, 1), None, torch.zeros(3), torch.ones(3), 1e-5, None, None)

# --- structural re-parameterization transforms (float64, 1e-10) ---

TOL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


@settings(max_examples=25, deadline=None)
@given(
    small=st.sampled_from([(1, 1), (1, 3), (3, 1), (3, 3)]),
    extra=st.sampled_from([(0, 0), (2, 2), (2, 4), (4, 0)]),
    pad=st.integers(0, 2),
    stride=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
)
def test_pad_kernel_equals_smaller_conv(small, extra, pad, stride, groups):
    kh, kw = small[0] + extra[0], small[1] + extra[1]
    ph, pw = pad + extra[0] // 2, pad + extra[1] // 2
    w = torch.randn(4, 4 // groups, *small, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    ref = F.conv2d(x, w, stride=stride, padding=(pad, pad), groups=groups)
    big = pad_kernel(w, (kh, kw))
    assert big.shape == (4, 4 // groups, kh, kw) and big.dtype == w.dtype
    assert close(F.conv2d(x, big, stride=stride, padding=(ph, pw), groups=groups), ref)


@pytest.mark.parametrize(("shape", "target"), [((1, 1), 2), ((3, 3), 1), ((1, 3), (3, 4))])
def test_pad_kernel_refuses_uncentrable(shape, target):
    with pytest.raises(ValueError, match="cannot centre"):
        pad_kernel(torch.zeros(2, 2, *shape), target)


def test_pad_kernel_keeps_dtype():
    assert pad_kernel(torch.ones(1, 1, 1, 1, dtype=torch.float32), 3).dtype == torch.float32


@pytest.mark.parametrize("groups", [1, 2])
def test_add_branches_equals_sum_of_convs(groups):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    branches = [(torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
                for _ in range(3)]
    branches.append((torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64), None))
    ref = sum(F.conv2d(x, w, b, padding=1, groups=groups) for w, b in branches)
    w, b = add_branches(*branches)
    assert w.dtype == torch.float64 and b.shape == (6,)
    assert close(F.conv2d(x, w, b, padding=1, groups=groups), ref)


def test_add_branches_errors():
    with pytest.raises(ValueError, match="at least one"):
        add_branches()
    with pytest.raises(ValueError, match="pad kernels"):
        add_branches((torch.zeros(2, 2, 3, 3), None), (torch.zeros(2, 2, 1, 1), None))
    with pytest.raises(ValueError, match="bias"):
        add_branches((torch.zeros(2, 2, 3, 3), torch.zeros(3)))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("k", "pad"), [(3, 1), (3, 2), (5, 2), (3, 0)])
def test_merge_1x1_kxk_equals_chain(groups, stride, k, pad):
    c, m, o = 4, 6, 8
    x = torch.randn(2, c, 9, 9, dtype=torch.float64)
    w1, b1 = torch.randn(m, c // groups, 1, 1, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    w2, b2 = torch.randn(o, m // groups, k, k, dtype=torch.float64), torch.randn(o, dtype=torch.float64)
    y = F.conv2d(x, w1, b1, groups=groups)
    y = F.pad(y - b1.view(1, -1, 1, 1), [pad] * 4) + b1.view(1, -1, 1, 1)  # pad with the 1x1's zero response
    ref = F.conv2d(y, w2, b2, stride=stride, groups=groups)
    w, b = merge_1x1_kxk(w1, b1, w2, b2, groups)
    assert w.shape == (o, c // groups, k, k)
    assert close(F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups), ref)


def test_merge_1x1_kxk_without_biases():
    w1, w2 = torch.randn(3, 2, 1, 1, dtype=torch.float64), torch.randn(5, 3, 3, 3, dtype=torch.float64)
    w, b = merge_1x1_kxk(w1, None, w2, None)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert close(F.conv2d(x, w, b), F.conv2d(F.conv2d(x, w1), w2)) and b.abs().max() == 0


def test_merge_1x1_kxk_errors():
    with pytest.raises(ValueError, match="1x1"):
        merge_1x1_kxk(torch.zeros(3, 2, 3, 3), None, torch.zeros(5, 3, 3, 3), None)
    with pytest.raises(ValueError, match="do not chain"):
        merge_1x1_kxk(torch.zeros(3, 2, 1, 1), None, torch.zeros(5, 4, 3, 3), None)
    with pytest.raises(ValueError, match="do not chain"):
        merge_1x1_kxk(torch.zeros(3, 2, 1, 1), None, torch.zeros(4, 3, 3, 3), None, groups=2)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [2, 3, (1, 3)])
def test_avgpool_as_conv(groups, stride, k):
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = avgpool_as_conv(4, k, groups)
    assert close(F.conv2d(x, w, stride=stride, groups=groups), F.avg_pool2d(x, k, stride=stride))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identity_as_conv(groups, k):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = identity_as_conv(4, k, groups)
    assert torch.equal(F.conv2d(x, w, padding=k // 2, groups=groups), x)


def test_per_channel_kernel_errors():
    with pytest.raises(ValueError, match="odd"):
        identity_as_conv(4, 2)
    with pytest.raises(ValueError, match="multiple of groups"):
        avgpool_as_conv(6, 3, groups=4)
    with pytest.raises(ValueError, match="kernel_size"):
        avgpool_as_conv(4, 0)


# --- input-channel scale (calibrate folds a constant gate into the conv that reads it) ---
@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 4), per_in=st.integers(1, 3), per_out=st.integers(1, 3), k=st.sampled_from([1, 3]),
       seed=st.integers(0, 10_000))
def test_scale_in_channels_conv(groups: int, per_in: int, per_out: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cin, cout = groups * per_in, groups * per_out
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups).double()
    x = torch.randn(2, cin, 5, 5, generator=g, dtype=torch.float64)
    v = torch.rand(cin, generator=g, dtype=torch.float64) + 0.1
    ref = conv(x * v.view(1, -1, 1, 1))
    with torch.no_grad():
        conv.weight.copy_(scale_in_channels(conv.weight, v, groups))
    torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


def test_scale_in_channels_linear_and_dtype() -> None:
    lin = nn.Linear(4, 3)
    v = torch.tensor([0.5, 1.0, 2.0, 0.25])
    x = torch.randn(5, 4)
    ref = lin(x * v)
    w = scale_in_channels(lin.weight, v)
    assert w.dtype == torch.float32
    torch.testing.assert_close(nn.functional.linear(x, w, lin.bias), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "v", "groups"), [((4, 2, 3, 3), 3, 1), ((4, 2, 3, 3), 4, 3), ((4,), 4, 1)])
def test_scale_in_channels_errors(shape: tuple[int, ...], v: int, groups: int) -> None:
    with pytest.raises(ValueError):
        scale_in_channels(torch.ones(shape), torch.ones(v), groups)


def test_bn_zero_response_is_the_eval_output_at_zero_and_differentiable() -> None:
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        for p in (bn.weight, bn.bias, bn.running_mean):
            p.copy_(torch.randn(5, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(5, dtype=torch.float64) + 0.5)
    bn.eval()
    got = bn_zero_response(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(got, bn(torch.zeros(1, 5, 1, 1, dtype=torch.float64)).flatten(), rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None


def test_scale_out_channels_dtype_argument() -> None:
    w = torch.randn(3, 2, dtype=torch.float32)
    out = scale_out_channels(w, torch.tensor([1.0, 2.0, 3.0]), dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, w.double() * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64))
