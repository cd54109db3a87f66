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


def _check(model: nn.Module, x: torch.Tensor, fused: int, left: int = 0, tol: float = TOL64,
           example: bool = True) -> FuseReport:
    """Fold with fuse_bn (on ``x`` as example inputs, or without any), count, and verify on ``x``."""
    model = _randomize(model).to(x.dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True,
                                         example_inputs=x if example else None)
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


# --- fusion only where the shapes prove it exact -------------------------------------------------------------------

class _Unbatched(nn.Module):
    """A model fed one unbatched sample: its conv writes channels on axis 0."""

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class _WithDefaultSize(nn.Sequential):
    default_input_size = (5,)  # what foldattn's models declare: an example input without the caller


# (id, model, input shape, example inputs given, fused?, the reason's text when left)
SHAPES = [
    ("linear-bn1d-2d", lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5), True, True, None),
    ("linear-bn1d-3d-N-L-F", lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 6, 5), True, False,
     "normalises axis 1 of the (4, 6, 6) output of 0, whose channels are on axis 2"),
    ("linear-bn1d-3d-N-F-L", lambda: nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)), (4, 6, 6), True, False,
     "normalises axis 1"),
    ("linear-bn1d-3d-other-width", lambda: nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(6)), (4, 6, 5), True,
     False, "has 3 outputs, the norm 6 channels"),
    ("linear-bn1d-no-example", lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5), False, False,
     "input shape unknown"),
    ("linear-bn1d-default-input-size", lambda: _WithDefaultSize(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5), False,
     True, None),
    ("linear-bn1d-one-feature", lambda: nn.Sequential(nn.Linear(5, 1), nn.BatchNorm1d(1)), (4, 1, 5), False, True,
     None),  # one channel: the same affine map everywhere, whatever the shape
    ("conv1d-bn1d-batched", lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 8), True, True, None),
    ("conv1d-bn1d-no-example", lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 8), False,
     False, "input shape unknown"),
    ("conv1d-bn1d-unbatched", lambda: _Unbatched(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (3, 8), True, False,
     "whose channels are on axis 0"),
    ("conv2d-bn2d-no-example", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), (2, 3, 6, 6), False,
     True, None),  # BatchNorm2d accepts 4-D only: the types prove it
    ("conv3d-unbatched-bn2d", lambda: _Unbatched(nn.Conv3d(3, 4, 1), nn.BatchNorm2d(4)), (3, 4, 5, 5), True, False,
     "whose channels are on axis 0"),
    ("conv3d-unbatched-bn2d-no-example", lambda: _Unbatched(nn.Conv3d(3, 4, 1), nn.BatchNorm2d(4)), (3, 4, 5, 5),
     False, False, "input shape unknown"),
    ("conv2d-sync-batched", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6)), (2, 3, 6, 6), True,
     True, None),
    ("conv2d-sync-unbatched", lambda: _Unbatched(nn.Conv2d(3, 6, 1), nn.SyncBatchNorm(6)), (3, 6, 7), True, False,
     "normalises axis 1"),
    ("conv2d-frozen-batched", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), FrozenBatchNorm2d(6)), (2, 3, 6, 6), True,
     True, None),
    ("conv2d-frozen-unbatched", lambda: _Unbatched(nn.Conv2d(3, 6, 1), FrozenBatchNorm2d(6)), (3, 5, 5), True, False,
     "it broadcasts"),
    ("conv3d-frozen", lambda: nn.Sequential(nn.Conv3d(3, 4, 1), FrozenBatchNorm2d(4)), (2, 3, 4, 5, 5), True, False,
     "normalises axis 2"),
]


@pytest.mark.parametrize(("model", "shape", "example", "fused", "reason"), [s[1:] for s in SHAPES],
                         ids=[s[0] for s in SHAPES])
def test_fusion_only_where_the_shapes_prove_it(model: object, shape: tuple[int, ...], example: bool, fused: bool,
                                               reason: str | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    report = _check(model(), x, fused=int(fused), left=int(not fused), example=example)  # verified on x
    if reason is not None:
        assert reason in report.left[0].reason, str(report)


def test_the_attack_linear_bn1d_on_a_sequence_is_left_not_wrong() -> None:
    """The attacker's case: (N, L, F) with L == F ran, was fused, and was off by about 1.0."""
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))).double().eval()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    for kwargs in ({}, {"example_inputs": x}):
        with pytest.warns(UserWarning, match="left 1"):
            deployed = foldattn.fold(model, fuse_bn=True, **kwargs)
        assert isinstance(deployed[1], nn.BatchNorm1d)
        assert foldattn.verify(model, deployed, x, tolerance=TOL64).max_abs == 0


def test_example_inputs_that_do_not_run_are_one_clear_error() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match=r"cannot run on example_inputs to record the shapes.*real inputs"):
        foldattn.fold(model, fuse_bn=True, example_inputs=torch.randn(2, 7))


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.mul_(2)
        return self.bn(y)


def test_recorded_pass_sees_an_input_changed_in_place() -> None:
    from foldattn.fuse import _record, _shape_reason

    model = _InPlace().eval()
    seen = _record(model, torch.randn(2, 3, 5), [("conv", "bn")])
    assert "not exactly conv's output" in _shape_reason("conv", model.conv, model.bn, seen["bn"])
    # and the graph already refuses the pair: mul_ is a second reader of the conv's output
    with pytest.warns(UserWarning, match="left 1"):
        report = foldattn.fold(model, fuse_bn=True, return_report=True, example_inputs=torch.randn(2, 3, 5))[1]
    assert "2 consumers" in report.left[0].reason


@pytest.mark.parametrize("where", ["norm-forward", "norm-pre", "conv-forward", "conv-backward"])
def test_a_pair_with_hooks_is_left(where: str) -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double().eval()
    m = model[1] if where.startswith("norm") else model[0]
    if where.endswith("pre"):
        m.register_forward_pre_hook(lambda *a: None)
    elif where.endswith("backward"):
        m.register_full_backward_hook(lambda *a: None)
    else:
        m.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="left 1"):
        deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True)
    assert "hook" in report.left[0].reason
    foldattn.verify(model, deployed, torch.randn(2, 3, 5, 5, dtype=torch.float64), tolerance=TOL64)


class _OwnForward(nn.Sequential):
    """A Sequential whose forward is not its order (and which torch.fx cannot trace)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: no fx trace
            x = x + 1
        return self[1](self[0](x) + 1)


def test_sequential_order_is_no_proof_when_the_container_has_its_own_forward() -> None:
    model = _randomize(_OwnForward(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).double().eval()
    with pytest.warns(UserWarning, match="left 1"):
        deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True)
    assert "a Sequential with its own forward" in report.left[0].reason
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    foldattn.verify(model, deployed, x, tolerance=TOL64)
    # with example inputs the recorded pass shows the addition between them
    with pytest.warns(UserWarning, match="left 1"):
        report = foldattn.fold(model, fuse_bn=True, return_report=True, example_inputs=x)[1]
    assert "computed by `add`" in report.left[0].reason
