"""The attention zoo: registry, classic form, ASR (static) form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import foldattn
from foldattn import attention
from foldattn.attention import DIA, ChannelAttention

ALL = attention.names()
#: modules with an input-dependent (classic) form: all but the ASR-only control `scale`
CLASSIC = [n for n in ALL if attention.get(n).has_classic_form]


def test_registry_lists_the_zoo() -> None:
    assert ALL == ["cbam", "dia", "eca", "ge", "ie", "scale", "se", "spa", "srm"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown attention 'nope'.*cbam, dia, eca"):
        attention.create("nope", 8)


def test_create_is_case_insensitive_and_passes_kwargs() -> None:
    se = attention.create("SE", 32, reduction=4)
    assert se.fc1.out_features == 8


def test_bad_kwarg_names_the_module() -> None:
    with pytest.raises(TypeError, match="attention 'se'"):
        attention.create("se", 8, nonsense=1)


def test_register_rejects_duplicates_and_non_modules() -> None:
    with pytest.raises(ValueError, match="already registered"):
        attention.register("se")(attention.IE)
    with pytest.raises(TypeError, match="ChannelAttention subclass"):
        attention.register("bad")(int)  # type: ignore[arg-type]


def test_register_new_module() -> None:
    @attention.register("test_identity_gate")
    class Half(ChannelAttention):
        def gate(self, d: torch.Tensor) -> torch.Tensor:
            return torch.full_like(d, 0.5)

    try:
        x = torch.randn(2, 4, 3, 3)
        torch.testing.assert_close(attention.create("test_identity_gate", 4)(x), x * 0.5)
    finally:
        attention.unregister("test_identity_gate")
    assert "test_identity_gate" not in attention.names()


@pytest.mark.parametrize("channels", [0, -3, 2.5, True])
def test_channels_must_be_positive_int(channels: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        attention.create("se", channels)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", CLASSIC)
def test_classic_form_gates_within_unit_interval(name: str) -> None:
    module = attention.create(name, 16).train()
    x = torch.randn(4, 16, 6, 6)
    y = module(x)
    assert y.shape == x.shape
    g = module.gate(module.descriptor(x))
    assert g.shape == (4, 16) and bool(((g > 0) & (g < 1)).all())
    if name != "cbam":  # CBAM adds a spatial gate on top of the channel gate
        torch.testing.assert_close(y, x * g[:, :, None, None])


@pytest.mark.parametrize("name", CLASSIC)
def test_classic_form_rejects_wrong_channels(name: str) -> None:
    with pytest.raises(ValueError, match=r"expects a feature map \(N, 16"):
        attention.create(name, 16)(torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize("name", ALL)
def test_static_form_has_descriptor_shaped_psi(name: str) -> None:
    module = attention.create(name, 12).make_static(0.3).train()
    assert module.is_static
    assert module.psi is not None and module.psi.shape == (1, *module.descriptor_shape())
    assert bool((module.psi == 0.3).all())
    v = module.static_gate()
    assert v.shape == (12,) and bool(torch.isfinite(v).all())
    v.sum().backward()  # psi and T both learn
    assert module.psi.grad is not None


def test_make_static_twice_fails() -> None:
    module = attention.create("se", 4).make_static()
    with pytest.raises(RuntimeError, match="already in ASR"):
        module.make_static()


def test_static_gate_needs_psi() -> None:
    with pytest.raises(RuntimeError, match="make_static"):
        attention.create("se", 4).static_gate()


def test_srm_static_form_trains_on_a_single_psi() -> None:
    srm = attention.create("srm", 8).make_static().train()
    v = srm.static_gate()  # BatchNorm on a batch of one would raise in train mode
    v.sum().backward()
    assert torch.equal(srm.bn.running_mean, torch.zeros(8))  # running stats untouched


def test_cbam_static_form_drops_spatial_gate() -> None:
    cbam = attention.create("cbam", 16)
    assert cbam.spatial is not None
    cbam.make_static()
    assert cbam.spatial is None
    assert not any("spatial" in n for n, _ in cbam.named_parameters())


def test_cbam_spatial_gate_needs_2d_maps() -> None:
    with pytest.raises(ValueError, match="2-D feature map"):
        attention.create("cbam", 4)(torch.randn(2, 4, 5))


def test_dia_chain_shares_one_cell() -> None:
    a = DIA(8)
    b = DIA(8, previous=a)
    c = DIA(8, previous=b)
    assert b.shared_cell is a.cell and c.shared_cell is a.cell
    assert "cell" not in b._modules
    n_cell = sum(p.numel() for p in a.cell.parameters())
    assert sum(p.numel() for m in (a, b, c) for p in m.parameters()) == n_cell


def test_dia_classic_chain_carries_state() -> None:
    a = DIA(8)
    b = DIA(8, previous=a)
    x = torch.randn(3, 8, 4, 4)
    a(x)
    with_state = b.gate(b.descriptor(x))
    fresh = a.shared_cell(b.descriptor(x), None)[0]  # what b would give from a zero state
    assert not torch.allclose(with_state, fresh)


def test_dia_out_of_order_fails_clearly() -> None:
    a = DIA(8)
    b = DIA(8, previous=a)
    with pytest.raises(RuntimeError, match="must run in order"):
        b(torch.randn(2, 8, 4, 4))


def test_dia_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels must match"):
        DIA(8, previous=DIA(4))


def test_dia_static_chain_uses_earlier_psis() -> None:
    a = DIA(32).make_static()
    b = DIA(32, previous=a).make_static()
    v_before = b.static_gate().detach().clone()
    with torch.no_grad():
        a.psi.add_(1.0)
    assert not torch.allclose(v_before, b.static_gate())


def test_dia_static_needs_chain_order() -> None:
    a = DIA(6)
    b = DIA(6, previous=a)
    with pytest.raises(RuntimeError, match="previous DIA block"):
        b.make_static()


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from([n for n in CLASSIC if n != "dia"]),
    channels=st.integers(1, 24),
    batch=st.integers(1, 3),
    hw=st.tuples(st.integers(4, 9), st.integers(4, 9)),
)
def test_classic_form_on_odd_shapes(name: str, channels: int, batch: int, hw: tuple[int, int]) -> None:
    module = attention.create(name, channels).eval()
    x = torch.randn(batch, channels, *hw)
    assert module(x).shape == x.shape


def test_dia_static_chain_costs_one_cell_step_per_block() -> None:
    from foldattn import create_model

    model = create_model("cifar_resnet56", attention="dia", asr=True)  # 9 blocks per stage
    cells = {id(m): m for m in model.modules() if type(m).__name__ == "DIACell"}
    calls = []
    for cell in cells.values():
        cell.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert len(calls) == 27  # not 3 * (9 * 10 / 2): each block hands its state on


def test_dia_static_handover_equals_recomputation() -> None:
    chain = [DIA(16).make_static()]
    for _ in range(3):
        chain.append(DIA(16, previous=chain[-1]).make_static())
    with torch.no_grad():
        for m in chain:
            m.psi.normal_()
    in_order = [m.static_gate() for m in chain]  # hand-over path
    alone = chain[3].static_gate()  # recomputed from the zero state
    torch.testing.assert_close(in_order[3], alone, rtol=0, atol=0)
    with torch.no_grad():
        chain[0].psi.add_(1.0)  # a stale hand-over must not be used
    chain[2].static_gate()
    torch.testing.assert_close(chain[3].static_gate(), DIA.static_state(chain[3])[0][0])
    assert not torch.allclose(chain[3].static_gate(), alone)


def test_dia_static_gradient_accumulation() -> None:
    a = DIA(8).make_static()
    b = DIA(8, previous=a).make_static()
    for _ in range(2):  # two forward/backward passes without an optimizer step
        (a.static_gate().sum() + b.static_gate().sum()).backward()
    assert a.psi.grad is not None and b.psi.grad is not None


# --- scale: the learnable-scale control ---------------------------------------------------------


def test_scale_is_a_free_vector_starting_at_one() -> None:
    module = attention.create("scale", 6).make_static()
    assert module.psi is not None and module.psi.shape == (1, 6)
    torch.testing.assert_close(module.static_gate(), torch.ones(6))
    with torch.no_grad():
        module.psi.copy_(torch.arange(6.0).reshape(1, 6))
    torch.testing.assert_close(module.static_gate(), torch.arange(6.0))  # v = T(psi) = psi


def test_scale_has_no_classic_form() -> None:
    with pytest.raises(TypeError, match="only the ASR form"):
        attention.create("scale", 4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="no input-dependent form"):
        foldattn.create_model("cifar_resnet20", attention="scale")
    with pytest.raises(ValueError, match="no input-dependent form"):
        foldattn.create_model("cifar_resnet20", attention="scale", asr=True, both=True)


@pytest.mark.parametrize("name", ALL)
def test_psi_init_default_constant_and_random(name: str) -> None:
    cls = attention.get(name)
    default = attention.create(name, 8).make_static()
    assert torch.all(default.psi == cls.default_psi_init)
    assert torch.all(attention.create(name, 8).make_static(0.5).psi == 0.5)
    torch.manual_seed(3)
    a = attention.create(name, 8).make_static("random").psi
    torch.manual_seed(3)
    b = attention.create(name, 8).make_static("random").psi
    assert torch.equal(a, b) and a.std() > 0.3  # seeded standard normal entries
    for bad in ("randn", float("nan"), True):
        with pytest.raises(ValueError, match="psi_init"):
            attention.create(name, 8).make_static(bad)  # type: ignore[arg-type]
