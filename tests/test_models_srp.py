"""RepVGG / ACNet / DBB CIFAR backbones: fold to a plain conv net, exactly, loading into the deploy form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foldattn import ASR, attention, create_model, fold, list_models, srp, verify
from foldattn.models import CifarRepVGG, SrpCifarResNet

from ._srp_util import DEPLOYED_CONV_NET, leaf_types, randomize

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SMALL_REPVGG = {"num_blocks": (1, 2, 1, 1), "widths": (8, 8, 16, 16)}
SMALL_RESNET = {"widths": (4, 8, 8)}

# name -> kwargs that keep the test small (8x8 inputs)
MODELS = {
    "cifar_repvgg_a0": SMALL_REPVGG,
    "cifar_resnet20_acnet": SMALL_RESNET,
    "cifar_resnet20_dbb": SMALL_RESNET,
}


def build(name: str, dtype: torch.dtype = torch.float64, **kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize(create_model(name, **MODELS[name], **kw).to(dtype)).eval()


def test_registered():
    names = set(list_models())
    assert {"cifar_repvgg_a0", "cifar_resnet20_acnet", "cifar_resnet20_dbb", "cifar_resnet56_acnet",
            "cifar_resnet56_dbb"} <= names


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("asr", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_gives_plain_conv_net(name, asr, dtype):
    model = build(name, dtype, attention="se" if asr else None, asr=asr, reduction=2)
    n_asr = sum(isinstance(m, ASR) for m in model.modules())
    assert (n_asr > 0) == asr
    deployed = fold(model)
    assert leaf_types(deployed) <= set(DEPLOYED_CONV_NET), leaf_types(deployed)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    assert verify(model, deployed, x, tolerance=TOL[dtype]).max_rel <= TOL[dtype]
    # it loads strictly into the deploy form built directly, which then computes the same
    plain = create_model(name, **MODELS[name], deploy=True).to(dtype).eval()
    plain.load_state_dict(deployed.state_dict(), strict=True)
    verify(model, plain, x, tolerance=TOL[dtype])


def test_fold_with_fuse_bn_is_still_exact():
    model = build("cifar_resnet20_dbb", attention="ie", asr=True)
    deployed = fold(model, fuse_bn=True)
    assert leaf_types(deployed) <= set(DEPLOYED_CONV_NET)
    verify(model, deployed, torch.randn(2, 3, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_asr_placement_and_counts(name):
    model = create_model(name, **MODELS[name], attention="se", asr=True)
    hosts = [type(m.host) for m in model.modules() if isinstance(m, ASR)]
    assert hosts and all(issubclass(h, srp.RepBlock) for h in hosts)
    expected = sum(SMALL_REPVGG["num_blocks"]) if "repvgg" in name else 9  # one per residual block of ResNet-20
    assert len(hosts) == expected
    plain = create_model(name, **MODELS[name])
    deployed_params = sum(p.numel() for p in fold(model).parameters())
    assert deployed_params == sum(p.numel() for p in create_model(name, **MODELS[name], deploy=True).parameters())
    assert deployed_params < sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_classic_and_both(name):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    classic = build(name, attention="se", reduction=2)
    deployed = fold(classic)  # blocks fuse, the input-dependent modules stay
    assert any(isinstance(m, attention.SE) for m in deployed.modules())
    verify(classic, deployed, x)
    both = build(name, attention="se", asr=True, both=True, reduction=2)
    deployed = fold(both)
    assert not any(isinstance(m, ASR) for m in deployed.modules())
    assert any(isinstance(m, attention.SE) for m in deployed.modules())
    verify(both, deployed, x)
    target = create_model(name, **MODELS[name], attention="se", asr=True, both=True, deploy=True, reduction=2)
    target.load_state_dict(deployed.state_dict(), strict=True)


def test_dia_chains_per_stage():
    model = create_model("cifar_resnet20_acnet", **SMALL_RESNET, attention="dia", asr=True)
    deployed = fold(randomize(model.double()).eval())
    verify(model, deployed, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_other_block_kinds_by_name():
    model = randomize(SrpCifarResNet(8, "repvgg", widths=(4, 4, 8), attention="se", asr=True).double()).eval()
    verify(model, fold(model), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    model = randomize(CifarRepVGG(block="dbb", **SMALL_REPVGG).double()).eval()
    verify(model, fold(model), torch.randn(2, 3, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("name", ["cifar_resnet20_dbb", "cifar_repvgg_a0"])
def test_train_steps_then_fold_exactly(name):
    """Training moves psi and the BN running statistics (through ASR's functional call); the fold stays exact."""
    torch.manual_seed(0)
    model = create_model(name, **MODELS[name], attention="se", asr=True, reduction=2).double()
    psis = [m.attention.psi for m in model.modules() if isinstance(m, ASR)]
    means = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [p.detach().clone() for p in psis], [m.clone() for m in means]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in psis)
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before[0], psis, strict=True))
    assert all(not torch.equal(a, m) for a, m in zip(before[1], means, strict=True))
    model.eval()
    verify(model, fold(model), x, tolerance=1e-10)


def test_dbb_sequential_branch_starts_as_identity():
    model = create_model("cifar_resnet20_dbb", **SMALL_RESNET)
    branch = model.layer1[0].conv2.branches["one_by_one_kxk"]
    eye = torch.eye(4).reshape(4, 4, 1, 1)
    assert torch.equal(branch.conv1.weight, eye)
    assert not torch.equal(model.layer1[0].conv2.branches["one_by_one"].conv.weight[:, :, 0, 0], torch.eye(4))


@pytest.mark.parametrize(
    ("builder", "kwargs", "match"),
    [
        (lambda **k: SrpCifarResNet(21, "acnet", **k), {}, "6n \\+ 2"),
        (lambda **k: SrpCifarResNet(20, "acnet2", **k), {}, "valid names"),
        (lambda **k: SrpCifarResNet(20, "acnet", **k), {"widths": (4, 4)}, "3 stages"),
        (lambda **k: CifarRepVGG(**k), {"num_blocks": (1, 1, 1)}, "4 stages"),
        (lambda **k: create_model("cifar_repvgg_a0", **k), {"asr": True}, "need an attention"),
        (lambda **k: create_model("cifar_resnet20_dbb", **k), {"attention": "se", "both": True}, "needs asr=True"),
        (lambda **k: create_model("cifar_resnet20_dbb", **k), {"attention": "nope"}, "unknown attention"),
    ],
)
def test_bad_arguments(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)
