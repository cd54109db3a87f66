"""Sums of parallel linear branches merged into one conv (foldattn.merge), and fold's smallest form."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import foldattn
from foldattn.merge import merge_branches
from foldattn.srp.declared import reparameterize_declared

from .conftest import randomize_norms, randomize_psi


class MultiBranch(nn.Module):
    """A user's own RepVGG/ACNet/DBB-style block that declares no re-parameterization."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, pool: bool = False,
                 identity: str = "bn", asym: bool = False, k: int = 3) -> None:
        super().__init__()
        self.conv_k = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn_k = nn.BatchNorm2d(c_out)
        self.conv_1 = nn.Conv2d(c_in, c_out, 1, stride, 0, groups=groups, bias=True)
        self.bn_1 = nn.BatchNorm2d(c_out)
        self.asym = nn.Conv2d(c_in, c_out, (1, 3), stride, (0, 1), groups=groups, bias=False) if asym else None
        self.pool = nn.AvgPool2d(3, stride, 1) if pool else None
        self.identity = identity if c_in == c_out and stride == 1 else "none"
        self.bn_id = nn.BatchNorm2d(c_out) if self.identity == "bn" else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_k(self.conv_k(x)) + self.bn_1(self.conv_1(x))
        if self.asym is not None:
            y = y + self.asym(x)
        if self.pool is not None:
            y = y + self.pool(x)
        if self.identity == "bn":
            y = y + self.bn_id(x)
        elif self.identity == "bare":
            y = y + x
        return self.act(y)


def _net(**block: object) -> nn.Module:
    torch.manual_seed(0)
    c = 8
    return nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(), MultiBranch(c, c, **block),
                         MultiBranch(c, 2 * c, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 5))


def _convs(m: nn.Module) -> int:
    return sum(isinstance(x, nn.Conv2d) for x in m.modules())


CASES = {
    "bn-identity": {}, "bare-identity": {"identity": "bare"}, "pool": {"pool": True}, "acnet": {"asym": True},
    "depthwise": {"groups": 8}, "5x5": {"k": 5, "pool": True}, "no-identity": {"identity": "none"},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("asr", [False, True], ids=["plain", "asr"])
def test_branches_merge_into_one_conv_exactly(case: str, asr: bool) -> None:
    model = randomize_norms(_net(**CASES[case])).double()
    if asr:  # one ASR per sum: the same v on every branch's last layer
        model = randomize_psi(foldattn.attach(model, "se"))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    deployed, report = foldattn.fold(model, fuse_bn=True, return_report=True)
    assert foldattn.verify(model, deployed, x).max_rel <= 1e-10
    assert len(report.merged) == 2 and not report.merge_left
    assert not any(isinstance(m, _BatchNorm) for m in deployed.modules())
    assert _convs(deployed) == 3  # stem + one conv per block
    assert isinstance(deployed, torch.fx.GraphModule)


def test_attach_shares_one_attention_per_sum() -> None:
    model = _net()
    attached, report = foldattn.attach(model, "se", return_report=True)
    first = [s for s in report.sites if s.name.startswith("3.")]
    assert {s.name for s in first} == {"3.bn_k", "3.bn_1", "3.bn_id"} and len({s.group for s in first}) == 1
    modules = {id(attached.get_submodule(s.name).attention) for s in first}
    assert len(modules) == 1  # one psi, one T: the sum is scaled by one v
    assert "branch sum" in first[0].note
    # every=2 counts a sum as one unit: the first block's sum is kept, the second's dropped
    kept = foldattn.find_sites(model, every=2)
    assert {s.name for s in kept.sites} == {"3.bn_k", "3.bn_1", "3.bn_id"}


# (id, block options, the reason's text)
LEFT = [
    ("dilated", "dilation", "dilation"),
    ("unaligned", "padding", "padded by half"),
    ("strided-identity", "stride-identity", "identity branch beside convs of stride 2"),
]


class _Odd(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        stride = 2 if kind == "stride-identity" else 1
        self.a = nn.Conv2d(4, 4, 3, stride, 2 if kind == "dilation" else (0 if kind == "padding" else 1),
                           dilation=2 if kind == "dilation" else 1)
        self.b = nn.Conv2d(4, 4, 1, stride, 0)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "stride-identity":
            return self.a(x) + self.b(x) + nn.functional.avg_pool2d(x, 1, 2)
        if self.kind == "padding":
            return self.a(x) + self.b(x)[..., 1:-1, 1:-1]
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(("case", "kind", "reason"), LEFT, ids=[c[0] for c in LEFT])
def test_sums_that_cannot_merge_are_reported_and_kept(case: str, kind: str, reason: str) -> None:
    model = _Odd(kind).double().eval()
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    merged, report = merge_branches(model)
    assert foldattn.verify(model, merged, x).max_rel <= 1e-10
    if kind == "stride-identity" or kind == "padding":  # not a sum of branches of one tensor: silently not one
        assert not report.merged
        return
    assert not report.merged and reason in report.left[0][1], report


def test_a_model_that_does_not_trace_is_reported() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3, 1, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x) if x.sum() > 0 else self.a(x)

    merged, report = merge_branches(Branchy())
    assert "cannot trace" in report.left[0][1] and isinstance(merged, Branchy)


def test_declared_reparameterization_protocol() -> None:
    calls: list[str] = []

    class InPlace(nn.Module):
        def __init__(self, method: str) -> None:
            super().__init__()
            self.inner = nn.Conv2d(2, 2, 1)
            setattr(self, method, lambda: calls.append(method))

    class Replaced(nn.Module):
        def fuse(self) -> nn.Module:
            calls.append("fuse")
            return nn.Identity()

    model = nn.Sequential(InPlace("reparameterize"), InPlace("switch_to_deploy"), Replaced())
    model, done = reparameterize_declared(model)
    assert done == [("0", "reparameterize"), ("1", "switch_to_deploy"), ("2", "fuse")]
    assert isinstance(model[2], nn.Identity) and calls == ["reparameterize", "switch_to_deploy", "fuse"]

    class Bad(nn.Module):
        def fuse(self) -> int:
            return 3

    with pytest.raises(TypeError, match="not a module"):
        reparameterize_declared(nn.Sequential(Bad()))


timm = pytest.importorskip("timm")
FAMILIES = ["repvgg_a0", "mobileone_s0", "repvit_m0_9", "fastvit_t8", "repghostnet_050"]


def _count(m: nn.Module) -> tuple[int, int]:
    norms = sum(isinstance(x, _BatchNorm) or type(x).__name__ in ("BatchNormAct2d", "FrozenBatchNorm2d")
                for x in m.modules())
    return sum(p.numel() for p in m.parameters()), norms


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("asr", [False, True], ids=["plain", "asr"])
def test_timm_families_reach_at_most_timms_own_form(name: str, asr: bool) -> None:
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10)).eval()
    timm_params, timm_norms = _count(reparameterize_model(model))
    if asr:
        model = randomize_psi(foldattn.attach(model, "se")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unfused
        deployed = foldattn.fold(model, fuse_bn=True)
    params, norms = _count(deployed)
    assert params <= timm_params and norms <= timm_norms and norms == 0
    x = torch.randn(2, 3, 64, 64)
    assert foldattn.verify(model, deployed, x).max_rel <= 1e-5


class _ResidualBlock(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class _CalledTwice(nn.Module):
    """One body run on two inputs: merging its identity into the conv would happen once per call site."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ResidualBlock(), _ResidualBlock())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.body(x), "b": self.body(x.flip(-1)) * 2}


@pytest.mark.parametrize("shared", [False, True], ids=["called-once", "called-twice"])
def test_a_sum_is_merged_only_where_its_modules_are_called_once(shared: bool) -> None:
    from foldattn import fold

    model = randomize_norms(_CalledTwice() if shared else nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                                                         _ResidualBlock())).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = model.double()
    with pytest.warns(UserWarning) if shared else contextlib.nullcontext():
        folded, report = fold(model, fuse_bn=True, return_report=True)
    ref, out = model(x), folded(x)
    for key in (("a", "b") if shared else (None,)):
        r, o = (ref[key], out[key]) if key else (ref, out)
        assert (r - o).abs().max() <= 1e-10 * r.abs().max()  # float64: exact up to round-off
    if shared:
        assert not report.merged and any("called 2 times" in why for _, why in report.merge_left)
