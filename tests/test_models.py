"""The paper's CIFAR ResNets: builders, Table 1 parameter counts, ASR placement."""

from __future__ import annotations

import pytest
import torch

import foldattn
from foldattn import ASR, create_model, fold, list_models
from foldattn.summary import count_params

# The ASR paper's Table 1 (CIFAR ResNet-164), parameters in millions, 100 / 10 classes.
TABLE1 = {
    None: (1.73, 1.70),
    "ie": (1.74, 1.72),
    "srm": (1.76, 1.74),
    "cbam": (1.93, 1.90),
    "dia": (1.95, 1.92),
    "se": (1.93, 1.91),
    "spa": (3.86, None),
}


def test_list_models() -> None:
    assert {f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 164)} <= set(list_models())


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet7'; valid names: .*cifar_resnet110"):
        create_model("resnet7")


@pytest.mark.parametrize("att", list(TABLE1))
@pytest.mark.parametrize("classes,col", [(100, 0), (10, 1)])
def test_table1_parameter_counts(att: str | None, classes: int, col: int) -> None:
    expected = TABLE1[att][col]
    if expected is None:
        pytest.skip("the paper gives no 10-class SPA count")
    n = count_params(create_model("cifar_resnet164", num_classes=classes, attention=att))
    assert abs(n / 1e6 - expected) <= 0.01, f"{att}: {n / 1e6:.4f} M vs {expected} M"


def test_plain_resnet164_exact_count() -> None:
    assert count_params(create_model("cifar_resnet164", num_classes=100)) == 1_727_284
    assert count_params(create_model("cifar_resnet164", num_classes=10)) == 1_704_154


def test_resnet164_has_54_asr_layers_on_bn3() -> None:
    model = create_model("cifar_resnet164", num_classes=100, attention="se", asr=True)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ASR)]
    assert len(layers) == 54 and all(n.endswith(".bn3") for n, _ in layers)
    assert count_params(fold(model)) == 1_727_284


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 164])
def test_forward_shapes(depth: int) -> None:
    model = create_model(f"cifar_resnet{depth}", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"asr": True}, "need an attention module"),
        ({"attention": "se", "both": True}, "needs asr=True"),
        ({"attention": "sse"}, "valid names"),
    ],
)
def test_bad_builder_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("cifar_resnet20", **kwargs)


def test_bad_depth() -> None:
    from foldattn.models import CifarResNet

    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="'basic' or 'bottleneck'"):
        CifarResNet(20, block="wide")


def test_dia_cell_shared_per_stage() -> None:
    model = create_model("cifar_resnet20", attention="dia", asr=True)
    cells = {id(model.get_submodule(f"layer{s}.{b}.bn2").attention.shared_cell) for s in (1, 2, 3) for b in range(3)}
    assert len(cells) == 3


def test_models_hold_no_global_state() -> None:
    a = create_model("cifar_resnet20", attention="se", asr=True, psi_init=0.5)
    b = create_model("cifar_resnet20", attention="se", asr=True)
    assert float(a.layer1[0].bn2.attention.psi.detach().mean()) == 0.5
    assert float(b.layer1[0].bn2.attention.psi.detach().mean()) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("name", "kwargs", "sites"),
    [
        ("cifar_resnet20", {}, 9),
        ("cifar_resnet20_acnet", {}, 9),
        ("cifar_repvgg_a0", {"num_blocks": (1, 2, 2, 1), "widths": (8, 8, 16, 16)}, 6),
        ("cifar_vit_tiny", {"embed_dim": 16, "depth": 5, "num_heads": 2}, 10),  # proj and fc2 of 5 blocks
    ],
)
@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("form", ["asr", "classic", "both"])
def test_every_is_a_builder_argument_of_every_family(name: str, kwargs: dict, sites: int, every: int,
                                                     form: str) -> None:
    from foldattn import ASR, fold
    from foldattn.attention import ChannelAttention

    flags = {"asr": {"asr": True}, "classic": {}, "both": {"asr": True, "both": True}}[form]
    model = create_model(name, attention="se", every=every, **flags, **kwargs)
    n_asr = sum(isinstance(m, ASR) for m in model.modules())
    n_classic = sum(isinstance(m, ChannelAttention) and not m.is_static for m in model.modules())
    expected = len(range(0, sites // (2 if name == "cifar_vit_tiny" else 1), every))
    if name == "cifar_vit_tiny":
        expected *= 2  # one schedule per site kind (proj, fc2) along the depth
    assert n_asr == (expected if form != "classic" else 0)
    assert n_classic == (expected if form != "asr" else 0)
    if form == "asr":  # and the folded model is the plain one
        srp = name in ("cifar_resnet20_acnet", "cifar_repvgg_a0")  # fold fuses their blocks too
        plain = create_model(name, **kwargs, **({"deploy": True} if srp else {}))
        plain.load_state_dict(fold(model).state_dict(), strict=True)


def test_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every must be a positive integer"):
        create_model("cifar_resnet20", attention="se", asr=True, every=0)


def test_attention_at_chosen_blocks_only() -> None:
    """``attention_sites`` (what calibrate --max-drop records for the sites it kept): attention, classic or ASR,
    at those blocks only; anything but a list of block indices is refused."""
    model = foldattn.create_model("cifar_resnet20", attention="se", attention_sites=[0, 4, 8])
    names = [n for n, m in model.named_modules() if isinstance(m, foldattn.attention.ChannelAttention)]
    assert names == ["layer1.0.attention", "layer2.1.attention", "layer3.2.attention"]
    assert model.attention_site_indices(reversed(names)) == [0, 4, 8]
    asr = foldattn.create_model("cifar_resnet20", attention="se", asr=True, attention_sites=[1])
    assert [n for n, m in asr.named_modules() if isinstance(m, foldattn.ASR)] == ["layer1.1.bn2"]
    for bad in (["1"], [-1], [True], "01", 3):
        with pytest.raises(ValueError, match="attention_sites must be a list of site indices"):
            foldattn.create_model("cifar_resnet20", attention="se", attention_sites=bad)
    with pytest.raises(ValueError, match="is not an attention module of a block"):
        model.attention_site_indices(["fc"])
