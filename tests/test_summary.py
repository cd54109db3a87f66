"""summary: ASR layers and the cost of both forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foldattn import ASR, create_model, summary
from foldattn.summary import count_flops, count_params


def test_summary_lists_layers_and_both_forms() -> None:
    model = create_model("cifar_resnet20", attention="se", asr=True)
    x = torch.randn(1, 3, 32, 32)
    s = summary(model, x)
    assert len(s.layers) == 9 and s.layers[0].name == "layer1.0.bn2"
    assert s.layers[0].psi_shape == (1, 16) and s.layers[0].attention == "se"
    assert 0 < s.layers[0].v_min <= s.layers[0].v_mean <= s.layers[0].v_max < 1
    plain = create_model("cifar_resnet20")
    assert s.params_deploy == count_params(plain) < s.params_train
    assert s.flops_deploy == count_flops(plain, x) < s.flops_train
    text = str(s)
    assert "layer3.2.bn2" in text and "ASR layers: 9" in text and f"{s.params_deploy:,}" in text


def test_summary_without_asr_or_inputs() -> None:
    model = create_model("cifar_resnet20")
    s = summary(model)
    assert not s.layers and s.params_train == s.params_deploy
    assert s.flops_train == s.flops_deploy == count_flops(model, torch.randn(1, 3, 32, 32)) > 0
    assert "on default_input_size (1, 3, 32, 32)" in str(s)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet20_dbb", "cifar_vit_tiny"])
def test_summary_counts_flops_on_the_default_input_size(name: str) -> None:
    model = create_model(name, attention="se", asr=True)
    x = torch.randn(1, *model.default_input_size)
    s = summary(model)
    ref = summary(model, x)
    assert (s.flops_train, s.flops_deploy) == (ref.flops_train, ref.flops_deploy)
    assert s.flops_deploy is not None and s.flops_train is not None and 0 < s.flops_deploy < s.flops_train
    plain = create_model(name, deploy=True) if name.endswith("dbb") else create_model(name)  # the folded tree
    assert s.flops_deploy == count_flops(plain, x)
    assert f"on example_inputs {tuple(x.shape)}" in str(ref)


def test_summary_without_default_input_size_says_how_to_get_flops() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ASR(nn.BatchNorm2d(4), "se"))
    s = summary(model)
    assert s.flops_train is None and s.flops_deploy is None and s.params_deploy < s.params_train
    assert "FLOPs: not counted" in str(s) and "pass example_inputs" in str(s)
    assert summary(model, torch.randn(1, 3, 8, 8)).flops_train is not None


def test_flops_of_every_asr_training_form() -> None:
    from foldattn import attention

    x = torch.randn(1, 3, 32, 32)
    plain = count_flops(create_model("cifar_resnet20"), x)
    for att in attention.names():
        model = create_model("cifar_resnet20", attention=att, asr=True)
        s = summary(model, x)
        assert s.flops_deploy == plain <= s.flops_train, att
        assert all(p.requires_grad for p in model.parameters())  # counted on a copy
