"""attach(): site finding on real architectures, end to end (train, fold, verify, strict load)."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import foldattn
from foldattn import ASR, attach, find_sites
from foldattn.attach import AttachReport, is_existing_attention, register_transparent_type
from foldattn.fold import asr_layers
from foldattn.graph import graph_from_run

tv = pytest.importorskip("torchvision.models")


def _timm(name: str, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kw)


class TwoUse(nn.Module):
    """Reuses ``self.block`` twice and branches on the data (torch.fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        )
        self.other = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.GroupNorm(2, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.relu(x + self.block(x)) if x.mean() > 0 else x  # data-dependent control flow
        x = x + self.other(x)
        return self.head(x.mean((2, 3)))


# name -> (builder of the plain model, input size, number of block sites expected)
ZOO = {
    "resnet18": (functools.partial(tv.resnet18, num_classes=10), 32, 8),
    "resnet50": (functools.partial(tv.resnet50, num_classes=10), 32, 16),
    "mobilenet_v2": (functools.partial(tv.mobilenet_v2, num_classes=10), 32, 10),
    "mobilenet_v3_small": (functools.partial(tv.mobilenet_v3_small, num_classes=10), 32, 6),
    "efficientnet_b0": (functools.partial(tv.efficientnet_b0, num_classes=10), 32, 9),
    "regnet_y_400mf": (functools.partial(tv.regnet_y_400mf, num_classes=10), 32, 16),
    "convnext_tiny": (functools.partial(tv.convnext_tiny, num_classes=10), 32, 18),
    "vit_b_16": (functools.partial(tv.vit_b_16, image_size=32, num_classes=10), 32, 12),
    "timm_resnet50": (functools.partial(_timm, "resnet50", num_classes=10), 32, 16),
    "timm_efficientnet_b0": (functools.partial(_timm, "efficientnet_b0", num_classes=10), 32, 9),
    "timm_convnext_atto": (functools.partial(_timm, "convnext_atto", num_classes=10), 32, 12),
    "timm_vit_tiny_patch16_224": (
        functools.partial(_timm, "vit_tiny_patch16_224", num_classes=10, img_size=32), 32, 24),
    "two_use": (TwoUse, 16, 2),
}
HEAVY = {"vit_b_16", "convnext_tiny", "resnet50", "timm_resnet50"}


def _train_steps(model: nn.Module, x: Tensor, steps: int = 2) -> None:
    # Adam: ConvNeXt's layer-scale (1e-6 at init) makes psi's SGD gradient vanishingly small
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = torch.arange(x.shape[0]) % 10
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ZOO]
)
def test_end_to_end(name: str) -> None:
    """attach -> 2 SGD steps -> fold -> verify (float32, 1e-5) -> strict load into a fresh plain model."""
    build, size, expected = ZOO[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    plain = build()
    model, report = attach(plain, "se", example_inputs=x, return_report=True)
    assert len(report) == expected, report
    assert len(asr_layers(model)) == expected
    assert not any(isinstance(m, ASR) for m in plain.modules()), "inplace=False must not touch the input"
    psi_before = [layer.attention.psi.clone() for _, layer in asr_layers(model)]
    _train_steps(model, x)
    psi_after = [layer.attention.psi for _, layer in asr_layers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(psi_before, psi_after, strict=True)), "psi must train"
    deployed = foldattn.fold(model)
    result = foldattn.verify(model, deployed, x)
    assert result.max_rel <= 1e-5
    fresh = build()
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    foldattn.verify(deployed, fresh, x)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in plain.parameters())


def test_custom_model_needs_example_inputs_and_counts_reuse() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        find_sites(TwoUse())
    report = find_sites(TwoUse(), example_inputs=[torch.randn(2, 3, 8, 8)])  # a list of inputs works too
    assert report.method == "recorded forward pass"
    assert report.names == ["block.4", "other.1"]
    assert report.sites[0].calls == 2
    assert "called 2x" in str(report)
    with pytest.raises(ValueError, match=r"cannot run on example_inputs.*real inputs"):
        find_sites(TwoUse(), example_inputs=torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"])
def test_fx_and_recorded_graph_agree(name: str) -> None:
    build, size, _ = ZOO[name]
    model = build()
    traced = find_sites(model)
    assert traced.method == "torch.fx trace"
    recorded = find_sites(model, graph=graph_from_run(model, torch.randn(1, 3, size, size)))
    assert recorded.method == "recorded forward pass" and recorded.names == traced.names


def test_block_sites_of_known_families() -> None:
    assert find_sites(tv.resnet18()).names[:2] == ["layer1.0.bn2", "layer1.1.bn2"]
    assert find_sites(tv.resnet50()).names[0] == "layer1.0.bn3"
    assert find_sites(tv.mobilenet_v2()).names[0] == "features.3.conv.3"
    assert find_sites(tv.regnet_y_400mf()).names[0] == "trunk_output.block1.block1-0.f.c.1"
    assert find_sites(tv.convnext_tiny()).names[0] == "features.1.0.block.5"
    vit = find_sites(tv.VisionTransformer(32, 16, 2, 2, 32, 64))
    assert vit.names == ["encoder.layers.encoder_layer_0.mlp.3", "encoder.layers.encoder_layer_1.mlp.3"]
    assert any("MultiheadAttention" in s.reason for s in vit.skipped)


def test_existing_attention_is_left_alone() -> None:
    model = tv.mobilenet_v3_small()
    se = [n for n, m in model.named_modules() if is_existing_attention(m)]
    assert se, "mobilenet_v3_small has SqueezeExcitation modules"
    out = attach(model, "se")
    for n in se:
        assert type(out.get_submodule(n)).__name__ == "SqueezeExcitation"
    # naming a layer inside an existing attention module does not put ASR there
    with pytest.raises(ValueError, match=r"inside SqueezeExcitation 'features.1.block.1', left as it is"):
        attach(model, "se", where=None, include="features.*.block.*.fc1")


def test_timm_se_resnet_keeps_its_se_and_gets_asr_before_it() -> None:
    model = _timm("seresnet18", num_classes=10)
    out, report = attach(model, "se", return_report=True)
    assert report.names[0] == "layer1.0.bn2" and "before the existing SEModule 'layer1.0.se'" in report.sites[0].note
    assert type(out.layer1[0].se).__name__ == "SEModule"
    x = torch.randn(2, 3, 32, 32)
    foldattn.verify(out, foldattn.fold(out), x)


def test_timm_eca_is_left_alone() -> None:
    model = _timm("ecaresnet26t", num_classes=10)
    eca = {n: m for n, m in model.named_modules() if type(m).__name__ == "EcaModule"}
    assert len(eca) == 8 and all(is_existing_attention(m) for m in eca.values())
    before = {n: (repr(m), copy.deepcopy(m.state_dict())) for n, m in eca.items()}
    out, report = attach(model, "se", return_report=True)
    for n, (text, state) in before.items():
        kept = out.get_submodule(n)
        assert type(kept).__name__ == "EcaModule" and repr(kept) == text and not asr_layers(kept)
        assert all(torch.equal(v, state[k]) for k, v in kept.state_dict().items())
    # ASR goes on the norm before each ECA ("ASR(X) + X" with the model's ECA), and the report says so
    assert report.names == [f"layer{i}.{j}.bn3" for i in range(1, 5) for j in range(2)]
    assert [s.note for s in report.sites] == [f"before the existing EcaModule '{n}'" for n in eca]
    with pytest.raises(ValueError, match=r"layer1\.0\.se\.conv: inside EcaModule 'layer1\.0\.se', left as it is"):
        attach(model, "se", where=None, include="layer1.0.se.*")
    foldattn.verify(out.eval(), foldattn.fold(out), torch.randn(2, 3, 32, 32))


def test_recorded_pass_does_not_change_the_model() -> None:
    model = TwoUse().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_sites(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm statistics must not move"
    assert not model._forward_hooks and not model.block[1]._forward_pre_hooks, "hooks are removed"


def test_walks_through_existing_attention_at_branch_end() -> None:
    class SEBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.se = foldattn.attention.create("se", 4, reduction=2)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.se(self.bn(self.conv(x)))

    report = find_sites(nn.Sequential(SEBlock(), SEBlock()))
    assert report.names == ["0.bn", "1.bn"]
    assert "before the existing SE" in report.sites[0].note


def test_norms_mode_and_vgg_without_residuals() -> None:
    vgg = tv.vgg16_bn(num_classes=10)
    with pytest.raises(ValueError, match=r"no eligible ASR site: looked for additions.*where='norms'"):
        attach(vgg)
    model, report = attach(vgg, "se", where="norms", return_report=True)
    assert len(report) == 13 and all(s.host_type == "BatchNorm2d" for s in report.sites)
    x = torch.randn(2, 3, 32, 32)
    _train_steps(model, x, steps=1)
    deployed = foldattn.fold(model)
    foldattn.verify(model, deployed, x)
    tv.vgg16_bn(num_classes=10).load_state_dict(deployed.state_dict(), strict=True)


def test_norms_skips_unusable_norms() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.GroupNorm(2, 4))
    report = find_sites(model, "norms")
    assert report.names == ["2"]
    assert "affine" in report.skipped[0].reason


@pytest.mark.parametrize("every,expected", [(1, 8), (2, 4), (3, 3), (8, 1), (100, 1)])
def test_every(every: int, expected: int) -> None:
    report = find_sites(tv.resnet18(), every=every)
    assert len(report) == expected
    assert report.names[0] == "layer1.0.bn2"
    assert sum(s.reason == f"every={every}" for s in report.skipped) == 8 - expected


def test_include_exclude_patterns() -> None:
    model = tv.resnet18()
    assert find_sites(model, include="layer4.*").names == ["layer4.0.bn2", "layer4.1.bn2"]
    assert len(find_sites(model, exclude=["layer1.*", "layer2.0.bn2"])) == 5
    explicit = find_sites(model, where=None, include=["conv1", "layer1.0.conv2"])
    assert explicit.names == ["conv1", "layer1.0.conv2"]
    with pytest.raises(ValueError, match=r"include pattern 'layer9\.\*' matches none"):
        find_sites(model, include="layer9.*")
    with pytest.raises(ValueError, match="exclude pattern 'nope' matches no module"):
        find_sites(model, exclude="nope")
    with pytest.raises(ValueError, match="leave no site"):
        find_sites(model, exclude="*")
    with pytest.raises(ValueError, match=r"include pattern 'layer1\.9\.bn2' matches no module name"):
        find_sites(model, where=None, include=["conv1", "layer1.9.bn2"])
    with pytest.raises(ValueError, match=r"no eligible ASR site.*layer1\.0\.relu: ReLU cannot absorb"):
        find_sites(model, where=None, include="layer1.0.relu")
    with pytest.raises(ValueError, match=r"include= names the sites|include is empty"):
        find_sites(model, where=None)


def test_bad_arguments() -> None:
    model = tv.resnet18()
    with pytest.raises(ValueError, match="where must be"):
        find_sites(model, where="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every must be a positive integer"):
        find_sites(model, every=0)
    with pytest.raises(ValueError, match="unknown attention"):
        attach(model, "nope")
    with pytest.raises(TypeError, match=r"expected an nn.Module"):
        find_sites("resnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no eligible ASR site"):
        attach(nn.Sequential(nn.ReLU()))


def test_attach_twice_is_an_error() -> None:
    model = attach(tv.resnet18(), "se", every=2)
    with pytest.raises(ValueError, match=r"already have ASR.*layer1.0.bn2"):
        attach(model, "se")
    with pytest.raises(ValueError, match="already have ASR"):
        attach(model, "se", where="norms")
    # the remaining sites can still be added explicitly
    again = attach(model, "ie", exclude=["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2", "layer4.0.bn2"])
    assert len(asr_layers(again)) == 8


@pytest.mark.parametrize(
    "replacement,match",
    [
        (nn.BatchNorm2d(32), "replaced after ASR was attached: now BatchNorm2d with 32 channels"),
        (nn.Identity(), "replaced by a layer that cannot absorb the scale: Identity"),
        (nn.BatchNorm2d(64, affine=False), "replaced by a layer that cannot absorb the scale: BatchNorm2d has no"),
    ],
)
def test_fold_after_host_was_replaced(replacement: nn.Module, match: str) -> None:
    model = attach(tv.resnet18(), "se")
    model.layer1[0].bn2.host = replacement
    with pytest.raises(ValueError, match=f"cannot fold ASR layer 'layer1.0.bn2': its host was {match}"):
        foldattn.fold(model)


def test_inplace_wrappers_and_options(caplog: pytest.LogCaptureFixture) -> None:
    model = tv.resnet18()
    with caplog.at_level(logging.INFO, logger="foldattn.attach"):
        out = attach(nn.DataParallel(model), "eca", inplace=True, psi_init=0.5)
    assert out is model and isinstance(model.layer1[0].bn2, ASR)
    assert "layer1.0.bn2" in caplog.text
    assert torch.allclose(model.layer1[0].bn2.attention.psi, torch.full_like(model.layer1[0].bn2.attention.psi, 0.5))
    both = attach(tv.resnet18(), "se", both=True, reduction=4)
    assert both.layer1[0].bn2.classic is not None
    dia = attach(tv.resnet18(), "dia")
    assert dia.layer1[1].bn2.attention.previous is dia.layer1[0].bn2.attention
    assert dia.layer2[0].bn2.attention.previous is None  # a new stage (new width) starts a new chain
    custom = attach(tv.resnet18(), lambda c: foldattn.attention.create("ie", c))
    assert custom.layer1[0].bn2.attention_name == "ie"
    x = torch.randn(2, 3, 32, 32)
    for m in (both, dia, custom):
        foldattn.verify(m, foldattn.fold(m), x)


def test_register_transparent_type() -> None:
    class Scale(nn.Module):  # a custom parametrised per-channel scale: a leaf, unknown by default
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.g

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.scale = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), Scale()

        def forward(self, x: Tensor) -> Tensor:
            return x + self.scale(self.bn(self.conv(x)))

    report = find_sites(Block(), where="norms")
    with pytest.raises(ValueError, match="Scale, which is not an ASR host"):
        find_sites(Block())
    register_transparent_type(Scale)
    assert find_sites(Block()).names == ["bn"] == report.names


class _MySE(nn.Module):  # a user's own SE: unknown to attach until registered
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def test_register_attention_type() -> None:
    from foldattn.attach import register_attention_type

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.se = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), _MySE(4)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.se(self.bn(self.conv(x)))

    net = nn.Sequential(Block(), Block())
    with pytest.raises(ValueError, match=r"register_attention_type\(cls\)"):  # the error says what to do
        find_sites(net)
    register_attention_type(_MySE)
    report = find_sites(net)
    assert report.names == ["0.bn", "1.bn"]  # ASR before the existing attention: "ASR(X) + X"
    model = attach(net, "se")
    assert all(isinstance(m.se, _MySE) for m in model)  # left as it is
    x = torch.randn(2, 4, 8, 8)
    foldattn.verify(model, foldattn.fold(model), x)


def test_report_type() -> None:
    report = find_sites(tv.resnet18())
    assert isinstance(report, AttachReport)
    text = str(report)
    assert "layer1.0.bn2  BatchNorm2d(64)" in text and "torch.fx" in text
    assert copy.copy(report).names == report.names


# --- property test: random residual networks ---------------------------------------------------------------

class _RandomBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, tail: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 1, bias=norm == "none")
        self.norm2 = {"bn": lambda: nn.BatchNorm2d(cout), "gn": lambda: nn.GroupNorm(2, cout),
                      "none": nn.Identity}[norm]()
        self.tail = tail
        self.gamma = nn.Parameter(torch.rand(cout, 1, 1) + 0.5)
        self.drop = nn.Dropout(0.1)
        self.proj = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.expected = "norm2" if norm != "none" else "conv2"

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.tail == "scale":
            out = self.gamma * out
        elif self.tail == "dropout":
            out = self.drop(out)
        elif self.tail == "relu":
            out = torch.relu(out)
        shortcut = x if self.proj is None else self.proj(x)
        return torch.relu(shortcut + out) if self.tail != "iadd" else out.add_(shortcut)


class _RandomNet(nn.Module):
    def __init__(self, spec: list[tuple[int, str, str]]) -> None:
        super().__init__()
        blocks, cin = [], 4
        for width, norm, tail in spec:
            blocks.append(_RandomBlock(cin, width, norm, tail))
            cin = width
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, 3)
        self.dynamic = False

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic and bool(x.isnan().any()):  # data-dependent: torch.fx cannot trace this
            raise ValueError("NaN input")
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@given(
    spec=st.lists(
        st.tuples(st.sampled_from([4, 6, 8]), st.sampled_from(["bn", "gn", "none"]),
                  st.sampled_from(["plain", "scale", "dropout", "relu", "iadd"])),
        min_size=1, max_size=4,
    ),
    every=st.integers(1, 3),
    traced=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_random_residual_nets(spec: list[tuple[int, str, str]], every: int, traced: bool) -> None:
    """The site is the branch's last norm (or its conv without a norm); the fold is exact in float64."""
    torch.manual_seed(0)
    model = _RandomNet(spec).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = [f"blocks.{i}.{b.expected}" for i, b in enumerate(model.blocks)][::every]
    model.dynamic = not traced  # forces the recorded-forward-pass path
    out, report = attach(model, "se", every=every, example_inputs=x, return_report=True, reduction=2)
    assert report.method == ("torch.fx trace" if traced else "recorded forward pass")
    assert report.names == expected
    with torch.no_grad():
        for _, layer in asr_layers(out):
            layer.attention.psi.uniform_(-1, 1)
    foldattn.verify(out, foldattn.fold(out), x)  # float64: 1e-10 relative


def test_dia_both_chains_the_classic_twins() -> None:
    import torchvision

    from foldattn import ASR
    from foldattn.attention import DIA

    model = foldattn.attach(torchvision.models.resnet18(num_classes=10), "dia", both=True)
    layers = [m for m in model.modules() if isinstance(m, ASR)]
    assert all(isinstance(m.classic, DIA) for m in layers)
    assert layers[1].classic.previous is layers[0].classic  # same stage: one shared classic cell
    assert layers[1].classic.shared_cell is not layers[1].attention.shared_cell  # ASR chain is separate
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).sum().backward()
    deployed = foldattn.fold(model)
    foldattn.verify(model, deployed, x)
