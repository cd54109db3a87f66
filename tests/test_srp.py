"""Re-parameterization blocks (RepVGG, ACNet, DBB): exact fuse, ASR composition, bad geometry."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foldattn import ASR, fold, srp, verify

from ._srp_util import randomize

BLOCKS = ["repvgg", "acnet", "dbb", "conv_bn"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make(name: str, stride: int, groups: int, asr: bool, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    out = 4 if stride == 1 else 6  # stride 1 keeps channels (RepVGG identity branch), stride 2 changes them
    block: nn.Module = srp.create(name, 4, out, 3, stride, groups=groups)
    if asr:
        block = ASR(block, "se", reduction=2)
    return randomize(block.to(dtype), seed).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("asr", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", BLOCKS)
def test_fold_is_one_exact_conv(name, stride, groups, asr, dtype):
    model = make(name, stride, groups, asr, dtype)
    deployed = fold(model)
    assert type(deployed) is nn.Conv2d
    assert deployed.weight.dtype == dtype and deployed.groups == groups and deployed.stride == (stride, stride)
    x = torch.randn(3, 4, 8, 8, dtype=dtype)
    report = verify(model, deployed, x, tolerance=TOL[dtype])
    assert report.max_rel <= TOL[dtype]
    # the test can fail: a deployed conv with a perturbed bias is caught
    with torch.no_grad():
        deployed.bias.add_(0.1)
    with pytest.raises(AssertionError):
        verify(model, deployed, x, tolerance=TOL[dtype])


@pytest.mark.parametrize("name", ["repvgg", "acnet", "dbb"])
@pytest.mark.parametrize(("k", "padding"), [(5, 2), (5, 3), (3, 2)])
def test_fuse_other_kernels_and_paddings(name, k, padding):
    torch.manual_seed(1)
    block = randomize(srp.create(name, 4, 4, k, padding=padding).double()).eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert verify(block, block.fuse(), x).max_rel <= 1e-10


def test_expected_branches():
    assert set(srp.create("repvgg", 4, 4).branches) == {"dense", "one_by_one", "identity"}
    assert set(srp.create("repvgg", 4, 8).branches) == {"dense", "one_by_one"}
    assert set(srp.create("repvgg", 4, 4, identity=False).branches) == {"dense", "one_by_one"}
    assert set(srp.create("acnet", 4, 4).branches) == {"square", "hor", "ver"}
    assert set(srp.create("dbb", 4, 4).branches) == {"dense", "one_by_one", "avg", "one_by_one_kxk"}
    assert srp.create("acnet", 4, 4).branches["hor"].conv.kernel_size == (1, 3)
    assert srp.names() == sorted(BLOCKS)


@pytest.mark.parametrize("name", ["repvgg", "acnet", "dbb"])
def test_asr_in_params_equals_scaled_output_in_training(name):
    """ASR(block) trains as block(x) * v, with batch statistics, and psi gets a gradient."""
    torch.manual_seed(0)
    block = srp.create(name, 4, 4).double()
    layer = randomize(ASR(block, "se", reduction=2))
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    layer.train()
    twin = copy.deepcopy(block)  # same state before the running statistics update
    y = layer(x)
    ref = twin(x) * layer.vector().reshape(1, -1, 1, 1)
    assert (y - ref).abs().max() <= 1e-10 * ref.abs().max()
    y.square().mean().backward()
    assert layer.attention.psi.grad is not None and layer.attention.psi.grad.abs().sum() > 0


def test_asr_parameters_are_branch_bns():
    block = srp.create("dbb", 4, 4)
    names = block.asr_parameters()
    assert names == [f"branches.{b}.bn.{p}" for b in block.branches for p in ("weight", "bias")]
    assert ASR(block, "ie").channels == 4


@pytest.mark.parametrize("name", ["repvgg", "acnet", "dbb"])
def test_deploy_form_has_fused_geometry(name):
    block = srp.create(name, 4, 8, 3, 2, groups=2)
    conv = srp.create(name, 4, 8, 3, 2, groups=2, deploy=True)
    assert type(conv) is nn.Conv2d
    conv.load_state_dict(block.eval().fuse().state_dict(), strict=True)
    x = torch.randn(1, 4, 8, 8)
    assert block(x).shape == conv(x).shape == (1, 8, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "acnet", "kernel_size": 4}, "odd and >= 3"),
        ({"name": "dbb", "kernel_size": 1}, "odd and >= 3"),
        ({"name": "repvgg", "padding": 0}, "padding=0 is too small"),
        ({"name": "acnet", "kernel_size": 5, "padding": 1}, "padding=1 is too small"),
        ({"name": "dbb", "padding": 0}, "too small"),
        ({"name": "repvgg", "stride": 2, "identity": True}, "identity branch needs stride 1"),
        ({"name": "repvgg", "out_channels": 8, "identity": True}, "4 -> 8 channels"),
        ({"name": "repvgg", "padding": 2, "identity": True}, "padding 1"),
        ({"name": "dbb", "groups": 3}, "groups=3 must divide"),
        ({"name": "dbb", "mid_channels": 3, "groups": 2}, "mid_channels"),
        ({"name": "conv_bn", "stride": 0}, "stride must be a positive int"),
        ({"name": "conv_bn", "padding": -1}, "padding must be a non-negative int"),
    ],
)
def test_unfusable_geometry_fails_at_construction(kwargs, match):
    args = {"in_channels": 4, "out_channels": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        srp.create(**args)
    with pytest.raises(ValueError, match=match):  # the deploy form checks the same geometry
        srp.create(**args, deploy=True)


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names: acnet"):
        srp.create("repvgg2", 4, 4)
    with pytest.raises(TypeError, match="block 'acnet'"):
        srp.create("acnet", 4, 4, identity=True)
    with pytest.raises(TypeError, match="RepBlock subclass"):
        srp.register("x")(nn.Conv2d)
    with pytest.raises(ValueError, match="already registered"):
        srp.register("acnet")(srp.DBBlock)


def test_reparameterize_model_copy_and_inplace():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(srp.create("acnet", 3, 4), nn.ReLU(), srp.create("dbb", 4, 4, stride=2))).eval()
    x = torch.randn(2, 3, 8, 8)
    deployed = srp.reparameterize(model)
    assert [type(m) for m in deployed] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert isinstance(model[0], srp.RepBlock)  # the original is untouched
    verify(model, deployed, x)
    assert srp.reparameterize(deployed) is not deployed  # idempotent, copies
    same = srp.reparameterize(model, inplace=True)
    assert same is model and type(model[2]) is nn.Conv2d


def test_fold_without_asr_fuses_blocks_silently_and_can_keep_them():
    model = nn.Sequential(srp.create("repvgg", 3, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(fold(model)[0]) is nn.Conv2d
    layer = ASR(srp.create("repvgg", 3, 4), "se")
    kept = fold(nn.Sequential(layer), reparam=False)
    assert isinstance(kept[0], srp.RepVGGBlock)


def test_fold_asr_both_keeps_classic_and_fuses_block():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(ASR(srp.create("dbb", 4, 4), "se", both=True, reduction=2))).eval()
    deployed = fold(model)
    assert type(deployed[0][0]) is nn.Conv2d and type(deployed[0][1]).__name__ == "SE"
    verify(model, deployed, torch.randn(2, 4, 8, 8))


def test_fuse_refuses_nan():
    block = srp.create("acnet", 4, 4)
    with torch.no_grad():
        block.branches["hor"].bn.weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        block.fuse()
    with pytest.raises(ValueError, match="cannot fuse block '0'"):
        srp.reparameterize(nn.Sequential(block))


def test_dbb_pad_value_is_zero_response():
    """In eval mode the BN-and-pad border equals the BN of a zero input."""
    layer = randomize(srp.BNAndPad(3, 2).double()).eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (1, 3, 8, 8)
    zero = layer.bn(torch.zeros(1, 3, 1, 1, dtype=torch.float64)).reshape(1, 3, 1, 1)
    border = torch.ones(8, 8, dtype=torch.bool)
    border[2:6, 2:6] = False
    torch.testing.assert_close(y[..., border], zero.reshape(1, 3, 1).expand(1, 3, int(border.sum())),
                               rtol=0, atol=1e-12)  # every border pixel, not just a corner
    assert torch.equal(y[..., 2:6, 2:6], layer.bn(x))  # the interior is the BN output, bit for bit


def test_dbb_pad_border_carries_the_gradient_of_the_bn_affine():
    # the border is written into the padded tensor in place; autograd must still see it
    layer = randomize(srp.BNAndPad(3, 1).double()).train()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    layer(x)[..., 0, :].sum().backward()  # the top border row only
    assert layer.bn.bias.grad is not None and torch.all(layer.bn.bias.grad == 2 * 6)
    assert torch.autograd.gradcheck(lambda t: layer.eval()(t), (x.clone().requires_grad_(),))


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["repvgg", "acnet", "dbb"]),
    k=st.sampled_from([3, 5]),
    extra_pad=st.integers(0, 1),
    stride=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    channels=st.sampled_from([(2, 2), (2, 4), (4, 2)]),
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
    asr=st.booleans(),
)
def test_fuse_property(name, k, extra_pad, stride, groups, channels, size, asr):
    torch.manual_seed(0)
    block = srp.create(name, *channels, k, stride, padding=k // 2 + extra_pad, groups=groups)
    model = randomize(ASR(block, "ie") if asr else block).double().eval()
    x = torch.randn(2, channels[0], *size, dtype=torch.float64)
    deployed = fold(model)
    assert type(deployed) is nn.Conv2d
    assert verify(model, deployed, x).max_rel <= 1e-10


def test_base_class_without_branches():
    block = srp.RepBlock(2, 2)
    with pytest.raises(RuntimeError, match="no branches"):
        block(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="at least one"):
        block.fused_kernel()
