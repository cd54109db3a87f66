"""Cross-layer equalization (foldattn.equalize): same function, even ranges, and which pairs qualify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foldattn
from foldattn.equalize import equalization_pairs, equalize
from foldattn.transforms import equalization_scales, in_channel_ranges, out_channel_ranges, scale_in_channels

from .conftest import randomize_norms


# ----------------------------------------------------------------------------- the pure transforms
@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), per_in=st.integers(1, 3), per_out=st.integers(1, 3), seed=st.integers(0, 999))
def test_in_channel_ranges_are_the_columns_each_input_reaches(groups: int, per_in: int, per_out: int,
                                                               seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups * per_out, per_in, 3, 3, generator=g, dtype=torch.float64)
    r = in_channel_ranges(w, groups)
    for c in range(groups * per_in):
        # scaling input channel c alone changes exactly the entries whose largest magnitude is r[c]
        v = torch.ones(groups * per_in, dtype=torch.float64)
        v[c] = 2.0
        changed = (scale_in_channels(w, v, groups) - w).abs()
        assert torch.isclose(changed.max(), r[c])
    assert torch.equal(out_channel_ranges(w), w.abs().flatten(1).amax(1))


def test_equalization_scales_even_out_both_ranges() -> None:
    r1 = torch.tensor([4.0, 0.01, 1.0, 0.0], dtype=torch.float64)
    r2 = torch.tensor([1.0, 1.0, 9.0, 2.0], dtype=torch.float64)
    s = equalization_scales(r1, r2)
    torch.testing.assert_close(r1[:3] / s[:3], r2[:3] * s[:3])  # both sqrt(r1 * r2)
    assert s[3] == 1.0  # a dead channel is left alone
    with pytest.raises(ValueError, match="two vectors"):
        equalization_scales(r1, r2[:2])


# ----------------------------------------------------------------------------- the model pass
def _chain() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Identity(),  # a fused norm stays as Identity
                      nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.LeakyReLU(0.1),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
                      nn.ReLU6(),  # not homogeneous: stops the pair
                      nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 16, 5)).double()
    with torch.no_grad():  # channel ranges far apart, as merged RepVGG branches leave them
        m[0].weight.mul_(torch.logspace(-2, 1, 8, dtype=torch.float64).view(8, 1, 1, 1))
    return m


def test_pairs_follow_homogeneous_activations_only() -> None:
    assert equalization_pairs(_chain()) == [("0", "3"), ("3", "5")]


def test_equalize_keeps_the_function_and_evens_the_ranges() -> None:
    m = _chain().eval()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    eq, pairs = equalize(m)
    assert pairs == [("0", "3"), ("3", "5")] and eq is not m
    foldattn.verify(m, eq, x, dtype=torch.float64)  # float64: 1e-10 relative
    spread = lambda w: float(out_channel_ranges(w).max() / out_channel_ranges(w).min())  # noqa: E731
    assert spread(m[0].weight) > 500 and spread(eq[0].weight) < spread(m[0].weight) / 10
    torch.testing.assert_close(m[7].weight, eq[7].weight)  # behind the ReLU6: untouched


def test_equalize_stops_at_shared_tensors_and_layers_called_twice() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.a(x))
            return self.b(y) + y + self.c(self.c(x))  # y read twice; c called twice

    assert equalization_pairs(Branchy()) == []
    with pytest.raises(ValueError, match="iterations"):
        equalize(Branchy(), iterations=0)


@pytest.mark.parametrize("name", ["cifar_repvgg_a0", "cifar_resnet20"])
def test_deployed_zoo_models_equalize_exactly(name: str) -> None:
    model = randomize_norms(foldattn.create_model(name, num_classes=10, attention="se", asr=True)).eval()
    deployed = foldattn.fold(model, fuse_bn=True).double()
    eq, pairs = equalize(deployed)
    assert len(pairs) >= 9
    foldattn.verify(deployed, eq, torch.randn(2, 3, 32, 32, dtype=torch.float64), dtype=torch.float64)


def test_cli_quantize_equalize(tmp_path: Path, digits_asr_run: Path) -> None:
    pytest.importorskip("onnxruntime")
    from foldattn.cli import main

    out = tmp_path / "int8"
    assert main(["quantize", str(digits_asr_run), "-o", str(out), "--per-tensor", "--equalize",
                 "--calib-images", "32", "--val-images", "64"]) == 0
    report = json.loads((out / "quantize.json").read_text())
    assert report["equalized_pairs"] == 9 and report["per_channel"] is False and report["top1_int8"] >= 0
