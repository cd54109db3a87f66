"""The fold algebra, each transform on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from foldattn.transforms import fuse_bn, fuse_conv_bn, scale_out_channels


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
