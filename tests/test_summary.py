"""summary: ASR layers and the cost of both forms."""

from __future__ import annotations

import torch

from foldattn import create_model, summary
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
    s = summary(create_model("cifar_resnet20"))
    assert not s.layers and s.params_train == s.params_deploy and s.flops_train is None
