"""Deployment fusion of norms into the conv/linear layer before them (``fold(fuse_bn=True)``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

import foldattn
from foldattn.fuse import FuseReport, fuse_norms, is_batch_norm, norm_pairs

TOL64 = 1e-10


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters, so a fusion is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if is_batch_norm(m) and getattr(m, "running_mean", None) is not None:
            with torch.no_grad():
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
    return model


def _check(model: nn.Module, x: torch.Tensor, fused: int, left: int = 0, tol: float = TOL64) -> FuseReport:
    model = _randomize(model).to(x.dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True)
    assert (len(report.fused), len(report.left)) == (fused, left), str(report)
    assert sum(is_batch_norm(m) for m in deployed.modules()) == left
    foldattn.verify(model, deployed, x, tolerance=tol)
    return report


@settings(max_examples=20, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), dilation=st.integers(1, 2),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_conv_then_batch_norm_any_geometry(dims: int, groups: int, dilation: int, bias: bool, seed: int) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](4, 6, 3, padding=dilation, dilation=dilation, groups=groups,
                                                        bias=bias)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](6)
    torch.manual_seed(seed)
    x = torch.randn(2, 4, *([5] * dims), dtype=torch.float64)
    _check(nn.Sequential(conv, bn, nn.ReLU()), x, fused=1)


@pytest.mark.parametrize("norm", ["sync", "frozen", "linear-bn1d", "conv-norm-act"])
def test_every_norm_type(norm: str) -> None:
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    if norm == "sync":  # SyncBatchNorm in eval mode is an ordinary BatchNorm
        model = nn.Sequential(nn.Conv2d(4, 5, 3), nn.SyncBatchNorm(5))
    elif norm == "frozen":
        model = nn.Sequential(nn.Conv2d(4, 5, 3, bias=False), FrozenBatchNorm2d(5), nn.ReLU())
    elif norm == "linear-bn1d":
        model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 7), nn.BatchNorm1d(7), nn.ReLU())
    else:
        model = nn.Sequential(Conv2dNormActivation(4, 5, 3), Conv2dNormActivation(5, 5, 3, groups=5))
    _check(model, x, fused=2 if norm == "conv-norm-act" else 1)


def test_timm_batch_norm_act_keeps_its_activation() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.Hardswish), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    _check(model, x, fused=1)
    deployed = foldattn.fold(_randomize(model).double().eval(), fuse_bn=True)
    assert isinstance(deployed[1].act, nn.Hardswish)  # the norm went into the conv, the activation stayed
    assert timm is not None


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "regnety_002"])
def test_timm_models_fuse_every_norm(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    n = sum(is_batch_norm(m) for m in model.modules())
    assert n > 30
    _check(model, torch.randn(2, 3, 64, 64), fused=n, tol=1e-5)


def test_classic_attention_does_not_stop_the_fusion() -> None:
    model = foldattn.create_model("cifar_resnet20", attention="se", asr=True, both=True)
    _check(model.double(), torch.randn(2, 3, 32, 32, dtype=torch.float64), fused=21)


class _AfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # branches of two different tensors (the same tensor's would merge into one conv first)
        return self.bn(self.a(x) + self.b(x.flip(-1)))


class _TwoUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bn(self.conv(x)))


@pytest.mark.parametrize(("model", "reason"), [
    (_AfterAdd(), "computed by `add`"),
    (_TwoUses(), "feeds 2 consumers"),
    (_Shared(), "called 2 times"),
    (nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)), "transposed"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), "no running statistics"),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)), "model input"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), "is a ReLU"),
], ids=["after-add", "two-uses", "shared", "transposed", "no-stats", "input", "after-relu"])
def test_left_norms_are_reported_with_the_reason(model: nn.Module, reason: str) -> None:
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model = _randomize(model).double().eval()
    with pytest.warns(UserWarning, match="left 1"):
        deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True)
    assert not report.fused and len(report.left) == 1
    assert reason in report.left[0].reason, str(report)
    assert reason in str(report)
    foldattn.verify(model, deployed, x, tolerance=TOL64)


def test_norm_pairs_does_not_change_the_model_and_fuse_norms_reports() -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    pairs, report = norm_pairs(model)
    assert pairs == [("0", "1"), ("2", "3")] and not report.left
    assert isinstance(model[1], nn.BatchNorm2d)
    report = fuse_norms(model.eval())
    assert [p.norm for p in report.fused] == ["1", "3"]
    assert isinstance(model[1], nn.Identity)


def test_detection_backbone_with_frozen_batch_norm() -> None:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=5)
    report = _check(backbone.double(), torch.randn(1, 3, 64, 64, dtype=torch.float64), fused=20)
    assert {p.norm_type for p in report.fused} == {"FrozenBatchNorm2d"}
