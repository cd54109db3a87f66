"""The accuracy-budget search over attention sites (foldattn.stripe.budget): the order, the bisection, the costs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import foldattn
from foldattn.cli import main
from foldattn.stripe.budget import BudgetPoint, SiteCost, _time_points, keep_order, search_budget, site_costs
from foldattn.train.data import load_dataset

TEACHER = 90.0


def _search(accuracy: list[float], max_drop: float) -> tuple[int, list[int]]:
    """Run the search on sites s0..s{n-1} whose model keeping the first k scores ``accuracy[k]``; returns the
    chosen k and the ks evaluated."""
    order = [f"s{i}" for i in range(len(accuracy))]
    calls: list[int] = []

    def evaluate(kept: list[str]) -> BudgetPoint:
        assert kept == order[: len(kept)]
        calls.append(len(kept))
        return BudgetPoint(kept, accuracy[len(kept)], 100 - len(kept))

    result = search_budget(order, evaluate, BudgetPoint(order, TEACHER, 100), max_drop)
    assert {p.num_kept for p in result.points} == {*calls, len(order)}
    return result.chosen.num_kept, calls


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.floats(0, 3), min_size=1, max_size=24), budget=st.floats(0, 10))
def test_bisection_finds_the_fewest_sites_kept_within_the_budget(steps: list[float], budget: float) -> None:
    # accuracy grows with the sites kept and reaches the teacher's with all of them
    n = len(steps)
    accuracy = [TEACHER - sum(steps[k:]) for k in range(n)] + [TEACHER]
    chosen, calls = _search(accuracy[:n], budget) if n else (0, [])
    fewest = min(k for k in range(n + 1) if TEACHER - accuracy[k] <= budget + 1e-9)
    assert chosen == fewest
    assert n not in calls  # the teacher is never trained
    assert len(calls) <= math.ceil(math.log2(n + 1)) + 1 and len(set(calls)) == len(calls)


def test_a_budget_met_by_converting_all_costs_one_evaluation() -> None:
    chosen, calls = _search([89.9, 89.95, 90.0], 0.3)
    assert chosen == 0 and calls == [0]


def test_a_budget_that_forces_every_site_kept_returns_the_teacher() -> None:
    chosen, calls = _search([80.0, 85.0, 89.0], 0.3)
    assert chosen == 3 and 3 not in calls


@settings(max_examples=100, deadline=None)
@given(accuracy=st.lists(st.floats(70, 95), min_size=1, max_size=12), budget=st.floats(0, 5))
def test_without_monotonicity_the_choice_is_still_within_the_budget(accuracy: list[float], budget: float) -> None:
    chosen, _ = _search(accuracy, budget)
    chosen_top1 = TEACHER if chosen == len(accuracy) else accuracy[chosen]
    assert TEACHER - chosen_top1 <= budget + 1e-9


def test_keep_order_puts_the_costliest_conversion_per_ms_first() -> None:
    costs = [SiteCost("a", ms=1.0, gap=0.1), SiteCost("b", ms=0.1, gap=0.1), SiteCost("c", ms=1.0, gap=math.nan),
             SiteCost("d", ms=2.0, gap=0.2)]
    # c: unknown gap, kept first; b: the same gap for a tenth of the time; a and d tie (0.1 per ms): model order
    assert keep_order(costs) == ["c", "b", "a", "d"]


def test_bad_searches_are_refused() -> None:
    teacher = BudgetPoint([], TEACHER, 1)
    with pytest.raises(ValueError, match="max_drop must be"):
        search_budget(["a"], lambda kept: teacher, teacher, -0.1)
    with pytest.raises(ValueError, match="max_drop must be"):
        search_budget(["a"], lambda kept: teacher, teacher, float("nan"))
    with pytest.raises(ValueError, match="twice"):
        search_budget(["a", "a"], lambda kept: teacher, teacher, 0.3)


def test_site_costs_time_each_module_and_leave_no_hook() -> None:
    model = foldattn.create_model("cifar_resnet20", attention="se").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, foldattn.attention.ChannelAttention)]
    assert len(names) == 9
    costs = site_costs(model, names, torch.randn(1, 3, 32, 32), {names[0]: 0.5}, repeats=3)
    assert [c.name for c in costs] == names and all(c.ms > 0 for c in costs)
    assert costs[0].gap == 0.5 and math.isnan(costs[1].gap)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no module named nope"):
        site_costs(model, ["nope"], torch.randn(1, 3, 32, 32), {})


# --- `foldattn calibrate --max-drop` on a digits SE model ----------------------------------------------------------

def test_a_budget_met_by_converting_every_site(teacher_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["calibrate", str(teacher_run), "--max-drop", "100", "--distill-epochs", "1", "--max-images", "256",
                 "-o", str(out)]) == 0
    budget = json.loads((out / "calibration.json").read_text())["budget"]
    assert budget["met"] and budget["chosen"]["kept"] == [] and len(budget["curve"]) == 2  # k=0 and the teacher
    assert [p["num_kept"] for p in budget["curve"]] == [0, 9] and budget["curve"][1]["note"] == "teacher"
    assert {r["action"] for r in budget["plan"]} == {"converted"} and len(budget["costs"]) == 9
    assert all(c["ms"] > 0 for c in budget["costs"]) and sorted(budget["order"]) == sorted(c["site"] for c in
                                                                                            budget["plan"])
    assert all(set(p["latency_ms"]) == {"batch_1", "batch_64"} for p in budget["curve"])  # every point timed
    # the chosen point is every site converted: all of the overhead (null where timing noise hid the overhead)
    assert budget["overhead_removed"]["batch_1"] in (None, pytest.approx(1.0))
    assert (out / "budget.png").stat().st_size > 0 and (out / "budget.json").is_file()
    plain = foldattn.load_deployed(out / "calibrated.safetensors")  # every site converted: the plain ResNet-20
    assert not any(isinstance(m, foldattn.attention.ChannelAttention) for m in plain.modules())
    assert "0 of 9 site(s) kept" in capsys.readouterr().out


def _five_points_per_converted_site(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scoring stand-in: top-1 = 50 + 5 per attention module present (the teacher, with 9, scores 95)."""
    import foldattn.stripe.calibration as calibration

    def scored(model: torch.nn.Module, loader: object, max_images: int | None = None) -> dict[str, float]:
        present = sum(isinstance(m, foldattn.attention.ChannelAttention) for m in model.modules())
        return {"top1": 50.0 + 5 * present, "top5": 100.0, "loss": 1.0, "images": 10.0}

    monkeypatch.setattr(calibration, "evaluate", scored)


def test_a_budget_that_forces_every_site_kept(teacher_run: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each converted site costs 5 points here, so only the teacher is within 0.3: the search bisects, never
    trains the teacher, and saves it unchanged."""
    _five_points_per_converted_site(monkeypatch)
    out = tmp_path / "out"
    assert main(["calibrate", str(teacher_run), "--max-drop", "0.3", "--max-images", "128", "-o", str(out)]) == 0
    result = json.loads((out / "calibration.json").read_text())
    budget = result["budget"]
    assert budget["teacher_top1"] == 95.0 and len(budget["chosen"]["kept"]) == 9 and budget["met"]
    tried = [p["num_kept"] for p in budget["curve"]]
    assert tried[-1] == 9 and 8 in tried and len(tried) <= 6  # bisection: log2(9) + 1 points and the teacher
    assert all(p["top1"] == 50.0 + 5 * p["num_kept"] for p in budget["curve"])
    assert {r["action"] for r in budget["plan"]} == {"kept"} and "keeping 8 reached top-1 90.00" in \
        budget["plan"][0]["why"]
    assert result["params_after"] == result["params_before"]  # the teacher itself
    kept = foldattn.load_deployed(out / "calibrated.safetensors")  # rebuilt by name: SE at all 9 blocks
    assert sum(isinstance(m, foldattn.attention.ChannelAttention) for m in kept.modules()) == 9


def test_kept_sites_rebuild_by_name_from_the_allowlist(teacher_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of 12 points allows two sites converted (5 each): the file names the builder with the blocks
    that keep SE (attention_sites), and loads back by name with SE exactly there, computing what was saved."""
    _five_points_per_converted_site(monkeypatch)
    out = tmp_path / "out"
    assert main(["calibrate", str(teacher_run), "--max-drop", "12", "--distill-epochs", "1", "--max-images", "128",
                 "-o", str(out)]) == 0
    budget = json.loads((out / "calibration.json").read_text())["budget"]
    kept = budget["chosen"]["kept"]
    assert len(kept) == 7 and budget["chosen"]["top1"] == 85.0
    assert set(kept) == {r["site"] for r in budget["plan"] if r["action"] == "kept"} and kept == budget["order"][:7]
    meta = foldattn.deploy.read_metadata(out / "calibrated.safetensors")
    assert meta["builder"] == "foldattn.models:cifar_resnet20" and len(meta["kwargs"]["attention_sites"]) == 7
    model = foldattn.load_deployed(out / "calibrated.safetensors")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, foldattn.attention.ChannelAttention)) == \
        sorted(kept)
    x = torch.randn(2, 3, 32, 32)
    again = foldattn.load_deployed(out / "calibrated.safetensors")
    torch.testing.assert_close(model(x), again(x))
    # it exports and quantizes as any deployed file
    assert main(["export", str(out / "calibrated.safetensors"), "--onnx", str(tmp_path / "x" / "m.onnx")]) == 0
    assert main(["quantize", str(out / "calibrated.safetensors"), "--data", "digits", "-o", str(tmp_path / "q"),
                 "--calib-images", "32", "--val-images", "64"]) == 0
    assert (tmp_path / "q" / "model.int8.onnx").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-drop", "-1"], "--max-drop"),
    (["--max-drop", "101"], "--max-drop"),
    (["--max-drop", "0.3", "--finetune-epochs", "1"], "drop --finetune-epochs"),
    (["--max-drop", "0.3", "--layers", "layer1.*"], "drop --layers"),
])
def test_bad_budgets_are_one_line(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  extra: list[str], message: str) -> None:
    assert main(["calibrate", str(teacher_run), *extra, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not (tmp_path / "out").exists()


def test_a_cbam_site_splits_its_spatial_gate_from_its_channel_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """CBAM is two items in the keep order, its spatial part first: keeping only that part splits the module (the
    channel gate a constant folded into bn2, the spatial gate kept at the site, unchanged). Scored by a stand-in
    (-2 per site converted whole, -1 per site split), 9 items must be kept within 9.5 points."""
    import foldattn.stripe.calibration as calibration
    from foldattn.attention.cbam import CBAM, SpatialGate
    from foldattn.stripe.budget import calibrate_within_budget
    from foldattn.train.data import TensorLoader

    def scored(model: torch.nn.Module, loader: object, max_images: int | None = None) -> dict[str, float]:
        whole = sum(isinstance(m, CBAM) for m in model.modules())
        alone = sum(isinstance(m, SpatialGate) for m in model.modules()) - whole
        return {"top1": 100.0 - 2 * (9 - whole - alone) - alone, "top5": 100.0, "loss": 1.0, "images": 1.0}

    monkeypatch.setattr(calibration, "evaluate", scored)
    torch.manual_seed(0)
    from .conftest import randomize_norms

    teacher = randomize_norms(foldattn.create_model("cifar_resnet20", attention="cbam")).eval()
    bundle = load_dataset("digits")
    loader = TensorLoader(bundle.val, 64, bundle.mean, bundle.std, train=False)
    example = next(iter(loader))[0]
    chosen, found = calibrate_within_budget(teacher, loader, loader, loader, 9.5, example=example, max_images=128)
    order = found.order
    assert len(order) == 18 and all(order.index(n + ".spatial") < order.index(n) for n in order
                                    if not n.endswith(".spatial"))
    assert found.chosen.num_kept == 9 and found.chosen.top1 == 91.0 and found.chosen.kept == order[:9]
    actions = {row["site"]: row["action"] for row in found.plan()}
    assert len(actions) == 9 and "split" in actions.values()
    for site, action in actions.items():
        module = chosen.get_submodule(site)
        expected = {"kept": CBAM, "split": SpatialGate, "converted": torch.nn.Identity}[action]
        assert type(module) is expected, (site, action, type(module))
        if action == "split":
            torch.testing.assert_close(module.conv.weight, teacher.get_submodule(site).spatial.conv.weight)
    # the fold is exact: the chosen model computes the unfolded constants with the spatial gates put back
    from foldattn.stripe.budget import _spatial_parts, _with_parts

    converted = [s for s, a in actions.items() if a != "kept"]
    unfolded, _ = calibration.calibrate(teacher, loader, layers=converted, max_images=128, fold=False)
    reference = _with_parts(unfolded, _spatial_parts(teacher, converted),
                            [s for s, a in actions.items() if a == "split"])
    x = example[:8]
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(chosen(x), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_round_robin_timing_times_every_model_on_every_input() -> None:
    models = {0: torch.nn.Identity(), 3: torch.nn.Linear(8, 8)}
    inputs = {"batch_1": torch.randn(1, 8), "batch_4": torch.randn(4, 8)}
    calls: list[int] = []
    models[3].register_forward_hook(lambda m, a, o: calls.append(1))
    models[3].train()
    times, how = _time_points(models, inputs, reps=3, min_sample_s=0.0)
    assert set(times) == {0, 3} and all(set(t) == set(inputs) for t in times.values())
    assert all(math.isfinite(v) and v >= 0 for t in times.values() for v in t.values())
    assert len(calls) == 2 * (2 + 3)  # inputs x (2 warm-up rounds + 3 samples of one call each)
    assert models[3].training  # the mode is restored
    assert "interleaved" in how and ("CPU time" in how) == (torch.get_num_threads() == 1)
