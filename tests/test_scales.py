"""foldattn.scales: per-channel scale layers folded into the layer that produces their input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import foldattn
from foldattn.scales import fold_scales

timm = pytest.importorskip("timm")
from timm.layers import DropPath, LayerScale  # noqa: E402


class _Branch(nn.Module):
    """Linear -> (a layer between) -> timm's LayerScale, the shape of a timm ViT block's branch end."""

    def __init__(self, between: nn.Module, width: int = 6) -> None:
        super().__init__()
        self.proj, self.between, self.ls = nn.Linear(width, width), between, LayerScale(width, 1.0)
        with torch.no_grad():
            self.ls.gamma.uniform_(-2.0, 2.0)  # any sign: the fold must not assume a positive scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls(self.between(self.proj(x)))


@pytest.mark.parametrize("between", [nn.Identity(), nn.Dropout(0.3), nn.Dropout1d(0.3), DropPath(0.3)],
                         ids=["identity", "dropout", "dropout1d", "drop-path"])
def test_a_scale_folds_through_masks_exactly_in_training_too(between: nn.Module) -> None:
    """A mask times x commutes with a per-channel scale: the folded branch draws the same mask and computes the
    same output in training mode (same seed) as at inference."""
    torch.manual_seed(0)
    model = _Branch(between).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    folded = _Branch(between).double()
    folded.load_state_dict(model.state_dict())
    report = fold_scales(folded, third_party=True)
    assert report.folded == [("ls", "proj")] and isinstance(folded.ls, nn.Identity)
    for train in (True, False):
        model.train(train), folded.train(train)
        torch.manual_seed(1)
        ref = model(x)
        torch.manual_seed(1)
        out = folded(x)
        assert (ref - out).abs().max() <= 1e-10 * ref.abs().max()


def test_a_scale_is_left_where_the_layer_between_does_not_commute_or_is_shared() -> None:
    model = _Branch(nn.AlphaDropout(0.3))  # adds a constant where it drops: the scale would change it
    report = fold_scales(model, third_party=True)
    assert not report.folded and isinstance(model.ls, LayerScale)
    assert report.left == [("ls", "between cannot absorb a per-channel scale (AlphaDropout cannot absorb a "
                                  "per-channel scale)")]

    class _SharedDrop(nn.Module):  # the dropout's output is read twice: folding into proj would scale both
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.drop, self.ls = nn.Linear(4, 4), nn.Dropout(0.1), LayerScale(4, 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(self.proj(x))
            return self.ls(h) + h

    shared = _SharedDrop()
    assert not fold_scales(shared, third_party=True).folded and isinstance(shared.ls, LayerScale)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_timm_vit_layer_scales_fold_into_proj_and_fc2(name: str) -> None:
    """timm's ViT computes ls1(proj_drop(proj(x))): fold(fuse_bn=True) folds every LayerScale through the
    dropout into the Linear, float64 within 1e-10 of the model's output."""
    torch.manual_seed(0)
    kwargs = {"init_values": 0.5} if name.startswith("vit_") else {}
    model = timm.create_model(name, num_classes=10, img_size=32, patch_size=8, depth=2, **kwargs).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.uniform_(-2.0, 2.0), block.ls2.gamma.uniform_(-2.0, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no ASR layer": this model has only scale layers to fold
        deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True)
    assert not any(isinstance(m, LayerScale) for m in deployed.modules())
    assert sorted(into for _, into in report.scales) == sorted(
        f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.proj", "mlp.fc2"))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref, out = model(x), deployed(x)
    assert (ref - out).abs().max() <= 1e-10 * ref.abs().max()
    if kwargs:  # the ViT built without LayerScale (ls1, ls2 are nn.Identity there) loads the deployed weights
        plain = timm.create_model(name, num_classes=10, img_size=32, patch_size=8, depth=2).double().eval()
        plain.load_state_dict(deployed.state_dict(), strict=True)
        assert (plain(x) - ref).abs().max() <= 1e-10 * ref.abs().max()
