"""The CIFAR ViT and ASR on its residual-branch outputs / LayerNorms: exact fold, strict load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import foldattn
from foldattn import ASR, attention, create_model, fold, verify
from foldattn.models import CifarViT
from foldattn.models.vit import LayerScale, attach_vit_asr, vit_asr_sites

from ._srp_util import randomize

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SMALL = {"img_size": 8, "embed_dim": 8, "depth": 2, "num_heads": 2}


def build(dtype: torch.dtype = torch.float64, **kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize(create_model("cifar_vit_tiny", **SMALL, **kw).to(dtype)).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sites", [("proj", "fc2"), ("norm1", "norm2"), ("proj", "fc2", "norm1", "norm2")])
def test_fold_is_exact_and_loads_into_plain_vit(sites, dtype):
    model = build(dtype, attention="se", asr=True, asr_sites=sites, reduction=2)
    hosts = [type(m.host) for m in model.modules() if isinstance(m, ASR)]
    assert len(hosts) == 2 * len(sites)
    deployed = fold(model)
    assert not any(isinstance(m, (ASR, attention.ChannelAttention)) for m in deployed.modules())
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    assert verify(model, deployed, x, tolerance=TOL[dtype]).max_rel <= TOL[dtype]
    plain = create_model("cifar_vit_tiny", **SMALL).to(dtype)
    plain.load_state_dict(deployed.state_dict(), strict=True)
    verify(model, plain, x, tolerance=TOL[dtype])


def test_default_sites_are_branch_output_linears():
    model = create_model("cifar_vit_tiny", **SMALL, attention="se", asr=True)
    for block in model.blocks:
        assert isinstance(block.attn.proj, ASR) and isinstance(block.attn.proj.host, nn.Linear)
        assert isinstance(block.mlp.fc2, ASR) and isinstance(block.mlp.fc2.host, nn.Linear)
        assert isinstance(block.norm1, nn.LayerNorm)


def test_asr_scales_the_branch_before_the_residual_addition():
    """Training form: block(x) == x + proj_branch(x) * v1, then + fc2_branch * v2 (psi matters)."""
    model = build(attention="se", asr=True, reduction=2)
    block = model.blocks[0]
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    v1, v2 = block.attn.proj.vector(), block.mlp.fc2.vector()
    with torch.no_grad():
        h = block.attn.qkv  # the plain computation, spelled out
        n, length, d = x.shape
        q, k, v = h(block.norm1(x)).reshape(n, length, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, d)
        y = x + block.attn.proj.host(a) * v1
        y = y + block.mlp.fc2.host(block.mlp.act(block.mlp.fc1(block.norm2(y)))) * v2
        assert (block(x) - y).abs().max() <= 1e-12 * y.abs().max()
    assert v1.std() > 0 and v2.std() > 0  # a real per-channel scale, not a constant


@pytest.mark.parametrize("name", ["se", "cbam", "srm", "spa", "dia", "eca"])
def test_classic_and_both_with_the_zoo(name):
    """Classic attention sees the tokens as their 2x2 grid; ASR + classic folds only the ASR part."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    classic = build(attention=name)
    assert len(classic.blocks[0].gates) == 2
    classic(x)
    both = build(attention=name, asr=True, both=True)
    deployed = fold(both)
    verify(both, deployed, x)
    assert sum(isinstance(m, ASR) for m in deployed.modules()) == 0


def test_trains_one_step_and_psi_learns():
    torch.manual_seed(0)
    model = create_model("cifar_vit_tiny", **SMALL, attention="se", asr=True, reduction=2)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    psis = [m.attention.psi for m in model.modules() if isinstance(m, ASR)]
    assert psis and all(p.grad is not None and p.grad.abs().sum() > 0 for p in psis)


def test_default_size():
    model = create_model("cifar_vit_tiny")
    assert model.pos_embed.shape == (1, 64, 192) and len(model.blocks) == 6
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"asr_sites": ("qkv",)}, "asr_sites"),
        ({"asr_sites": ()}, "asr_sites"),
        ({"asr_sites": ("proj", "proj")}, "asr_sites"),
        ({"img_size": 10}, "multiple of patch_size"),
        ({"embed_dim": 9}, "divisible by num_heads"),
        ({"asr": True}, "need an attention"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CifarViT(**{**SMALL, **kwargs})


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="img_size"):
        create_model("cifar_vit_tiny", **SMALL)(torch.randn(1, 3, 16, 16))


def _timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3)


def _torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=3)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_timm_vit, ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"]),
        (_torchvision_vit, ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.mlp.3",
                            "encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.mlp.3"]),
        (lambda: create_model("cifar_vit_tiny", **SMALL),
         ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"]),
    ],
)
def test_same_rule_on_timm_and_torchvision_vits(make, expected):
    torch.manual_seed(0)
    plain = make().double().eval()
    for m in plain.modules():  # torchvision starts its head at zero: make every output depend on the blocks
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.3)
    assert vit_asr_sites(plain) == expected
    model = randomize(attach_vit_asr(plain, "se", reduction=2)).eval()
    assert sum(isinstance(m, ASR) for m in model.modules()) == 4
    assert vit_asr_sites(model) == expected  # the rule is stable under ASR
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))  # ASR is really applied in the forward
    deployed = fold(model)
    verify(model, deployed, x, tolerance=1e-10)
    plain.load_state_dict(deployed.state_dict(), strict=True)
    verify(model, plain, x, tolerance=1e-10)


def test_vit_rule_errors():
    with pytest.raises(ValueError, match="no eligible ASR site"):
        vit_asr_sites(nn.Sequential(nn.Linear(2, 2)))
    model = attach_vit_asr(create_model("cifar_vit_tiny", **SMALL), "ie")
    with pytest.raises(ValueError, match="already have ASR"):
        attach_vit_asr(model, "ie")


# --- LayerScale ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"attention": "se", "asr": True}, {"attention": "se"},
                                   {"attention": "scale", "asr": True}], ids=["plain", "asr-se", "se", "asr-scale"])
def test_layer_scale_folds_into_the_branch_linear(extra: dict) -> None:
    torch.manual_seed(0)
    model = create_model("cifar_vit_tiny", depth=2, layer_scale=1e-5, **extra).double()
    with torch.no_grad():  # a trained-looking scale: far from its initial value, one value per channel
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.2, 2.0)
            block.ls2.gamma.uniform_(-1.0, 1.0)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    deployed = foldattn.fold(model)
    assert not any(isinstance(m, LayerScale) for m in deployed.modules())
    assert foldattn.verify(model, deployed, x).max_rel <= 1e-10
    plain = create_model("cifar_vit_tiny", depth=2, **{k: v for k, v in extra.items() if k != "asr"}
                         if not extra.get("asr") else {}).double()
    plain.load_state_dict(deployed.state_dict(), strict=True)  # the ViT built without LayerScale
    assert foldattn.verify(model, plain, x).max_rel <= 1e-10


def test_layer_scale_trains_and_is_a_deploy_free_argument() -> None:
    model = create_model("cifar_vit_tiny", depth=1, layer_scale=0.1)
    assert model.foldattn_builder["kwargs"] == {"depth": 1}  # the deployed model has no LayerScale
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.blocks[0].ls1.gamma.grad is not None
    for bad in (0, -1e-5, float("inf"), True):
        with pytest.raises(ValueError, match="layer_scale"):
            create_model("cifar_vit_tiny", layer_scale=bad)
