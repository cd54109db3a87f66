"""verify: tolerances, errors, modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from foldattn import TOLERANCES, EquivalenceError, create_model, fold, verify

from .conftest import randomize_norms, randomize_psi


def _pair() -> tuple[nn.Module, nn.Module]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    return model, copy.deepcopy(model)


def test_identical_models_pass_with_zero_error() -> None:
    a, b = _pair()
    report = verify(a, b, torch.randn(2, 3, 5, 5))
    assert report.passed and report.max_abs == 0.0 and report.dtype == torch.float32
    assert report.tolerance == TOLERANCES[torch.float32]
    assert "OK" in str(report)


def test_perturbed_model_raises_with_numbers() -> None:
    a, b = _pair()
    with torch.no_grad():
        b[0].bias.add_(1e-2)
    with pytest.raises(EquivalenceError, match=r"FAILED: max abs error .*tolerance 1e-05, float32"):
        verify(a, b, torch.randn(2, 3, 5, 5))


def test_tolerance_override_and_float64() -> None:
    a, b = _pair()
    with torch.no_grad():
        b[0].bias.add_(1e-7)
    x = torch.randn(2, 3, 5, 5)
    report = verify(a, b, x, dtype=torch.float64, tolerance=1e-5)
    assert report.dtype == torch.float64 and 0 < report.max_rel <= 1e-5
    with pytest.raises(EquivalenceError, match="float64"):
        verify(a, b, x, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tolerances(dtype: torch.dtype) -> None:
    a, b = _pair()
    report = verify(a, b, torch.randn(2, 3, 5, 5), dtype=dtype)
    assert report.tolerance == TOLERANCES[dtype]
    assert next(a.parameters()).dtype == torch.float32  # the caller's models are not cast


@pytest.mark.parametrize("att", ["se", "srm", "dia"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_a_folded_model(att: str, dtype: torch.dtype) -> None:
    model = randomize_psi(randomize_norms(create_model("cifar_resnet20", attention=att, asr=True))).eval()
    deployed = fold(model)
    x = torch.randn(2, 3, 16, 16)
    report = verify(model, deployed, x, dtype=dtype)
    assert report.passed and report.dtype == dtype and report.tolerance == TOLERANCES[dtype]
    # both forms really ran in half precision: their round-off differs (a float32 fold is typically exact)
    assert 0 < report.max_rel <= TOLERANCES[dtype] and report.max_abs > 0
    # a fold that forgot v on one layer: the host's unscaled gamma and beta (about 0.3-0.4 relative here)
    host = model.layer2[1].bn2.host
    with torch.no_grad():
        deployed.layer2[1].bn2.weight.copy_(host.weight)
        deployed.layer2[1].bn2.bias.copy_(host.bias)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(EquivalenceError, match=rf"FAILED: .*tolerance {TOLERANCES[dtype]:.0e}, {name}"):
        verify(model, deployed, x, dtype=dtype)


def test_wrong_input_shape_is_a_clear_error() -> None:
    a, b = _pair()
    with pytest.raises(ValueError, match=r"cannot run on example inputs of shape \(2, 5, 5, 5\)"):
        verify(a, b, torch.randn(2, 5, 5, 5))


def test_bad_example_inputs_type() -> None:
    a, b = _pair()
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        verify(a, b, 3)  # type: ignore[arg-type]


def test_output_structure_mismatch() -> None:
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="output structure differs"):
        verify(a, b, torch.randn(1, 3))


def test_runs_in_eval_mode_and_restores_modes() -> None:
    a, b = _pair()
    a.train()
    b.eval()
    x = torch.randn(4, 3, 5, 5)
    verify(a, b, x)  # would differ if a used batch statistics
    assert a.training and not b.training


def test_nested_outputs_are_compared() -> None:
    class Pair(nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.shift = shift

        def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {"out": (self.lin(x), self.lin(x) + self.shift)}

    a = Pair(0.0)
    b = copy.deepcopy(a)
    assert verify(a, b, torch.randn(2, 3)).outputs == 2
    b.shift = 1.0
    with pytest.raises(EquivalenceError):
        verify(a, b, torch.randn(2, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])  # -inf would be cut to 0 by the ReLU
@pytest.mark.parametrize("where", ["deployed", "reference"])
def test_non_finite_outputs_fail(bad: float, where: str) -> None:
    a, b = _pair()
    broken = b if where == "deployed" else a
    with torch.no_grad():
        broken[0].bias[1] = bad  # channel 1 of every image: 2 images x 3 x 3 positions
    kind = "NaN" if bad != bad else "Inf"
    counts = "18 NaN and 0 Inf" if kind == "NaN" else "0 NaN and 18 Inf"
    with pytest.raises(EquivalenceError, match=rf"the {where} model's outputs are not finite \(output 0 "
                                               rf"\(2, 4, 3, 3\): {counts} of 72 values\)"):
        verify(a, b, torch.randn(2, 3, 5, 5))


def test_non_finite_both_and_nested_outputs_name_the_output() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), self.lin(x) / 0.0 * 0.0  # second output: NaN everywhere

    a = Two()
    with pytest.raises(EquivalenceError, match=r"reference model's outputs are not finite \(output 1 \(4, 2\): "
                                               r"8 NaN"):
        verify(a, copy.deepcopy(a), torch.randn(4, 3))


def test_non_finite_folded_model_fails_verify() -> None:
    model = create_model("cifar_resnet20", attention="se", asr=True).eval()
    deployed = fold(model)
    with torch.no_grad():
        deployed.fc.weight[0, 0] = float("nan")
    with pytest.raises(EquivalenceError, match="deployed model's outputs are not finite"):
        verify(model, deployed, torch.randn(2, 3, 32, 32))
