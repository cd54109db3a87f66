"""Tests of ``foldattn bench``: output format, bad input, the timing/memory helpers, the builders.

(The ASR layer itself is tested in test_asr.py.)

Nothing here asserts a speed: timings are checked by the benchmark's own PASS/FAIL lines.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from foldattn import ASR, attention, bench, fold, verify
from foldattn.bench import memory, runner, targets, timing
from foldattn.cli import main
from foldattn.summary import count_flops

from .conftest import shared_folder


# --------------------------------------------------------------------------------------
# `foldattn bench --quick`: the CI run, and its output format
# --------------------------------------------------------------------------------------
def _quick(out: Path) -> None:
    torch.manual_seed(0)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "--quick", "--out", str(out)])
    (out / "stdout.txt").write_text(buf.getvalue())
    (out / "rc.txt").write_text(str(rc))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str, str]:
    out = shared_folder(tmp_path_factory, "bench-quick", _quick)
    result = json.loads((out / "bench.json").read_text())
    return int((out / "rc.txt").read_text()), result, (out / "bench.md").read_text(), (out / "stdout.txt").read_text()


def test_quick_writes_valid_json(quick_run: tuple[int, dict, str, str]) -> None:
    rc, result, _, _ = quick_run
    assert rc == 0
    bench.validate_result(result)  # raises if the schema is not followed
    assert result["schema"] == bench.SCHEMA
    assert result["command"] == "foldattn bench --quick --out " + result["command"].split("--out ")[1]
    groups = result["groups"]
    assert [(g["family"], g["attention"]) for g in groups] == [("cifar_resnet20", "se"), ("cifar_resnet20", "eca")]
    for g in groups:
        rows = {r["variant"]: r for r in g["rows"]}
        assert list(rows) == [v.key for v in bench.VARIANTS] + ["reference"]
        # the folded form is the plain backbone: same parameters and FLOPs
        assert rows["asr_folded"]["params"] == rows["plain"]["params"]
        assert rows["asr_folded"]["flops"] == rows["plain"]["flops"]
        assert rows["asr_fused"]["params"] < rows["plain"]["params"]  # BN gone, conv biases added
        assert rows["asr"]["params"] > rows["plain"]["params"]
        for r in g["rows"]:
            assert r["latency_ms"]["n"] == bench.QUICK.reps
            assert r["ratio"]["params"] == pytest.approx(r["params"] / rows["plain"]["params"])
            if bench.cpu_peak_supported() and r["variant"] != "reference":
                assert r["memory_mib"] > 0
        trained = {k for k, r in rows.items() if r["train_ms"] is not None}
        assert trained == {v.key for v in bench.VARIANTS if v.trains} | {"reference"}
    assert len(result["targets"]) == 4 * len(groups)


def test_quick_markdown_table(quick_run: tuple[int, dict, str, str]) -> None:
    _, result, md, stdout = quick_run
    assert md in stdout  # the table is also printed
    assert "Command: `foldattn bench --quick" in md
    assert "Intel" in md or result["machine"]["cpu"] in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header, body = table[0], table[1:]
    assert header.count("|") == 9
    assert len(body) == (len(bench.VARIANTS) + 1) * 2  # + the reference-layout row
    assert all(ln.count("|") == 9 for ln in body)
    cells = r"\| \+ASR\(SE\) folded \| [\d.]+k \(1.000x\) \| [\d.]+M \(1.000x\) \| ~?[\d.]+ \([\d.]+x\) \|"
    assert re.search(cells, md)
    target_lines = [ln for ln in md.splitlines() if ln.startswith(("PASS ", "FAIL "))]
    assert len(target_lines) == len(result["targets"])


# --------------------------------------------------------------------------------------
# the schema check must reject broken results
# --------------------------------------------------------------------------------------
def _break_missing_variant(r: dict) -> None:
    r["groups"][0]["rows"] = [x for x in r["groups"][0]["rows"] if x["variant"] != "asr_folded"]


def _break_stats(r: dict) -> None:
    r["groups"][0]["rows"][1]["latency_ms"]["median"] = float("nan")


def _break_plain_ratio(r: dict) -> None:
    r["groups"][0]["rows"][0]["ratio"]["latency"] = 0.9


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (lambda r: r.update(schema="other/1"), "schema must be"),
        (lambda r: r.pop("groups"), "missing 'groups'"),
        (_break_missing_variant, "missing variants ['asr_folded']"),
        (_break_stats, "not a finite non-negative number"),
        (_break_plain_ratio, "plain's ratios to itself must be 1"),
        (lambda r: r["targets"][0].update(passed="yes"), "targets[0].passed"),
        (lambda r: r["groups"][0]["rows"][2].pop("ratio"), "missing 'ratio'"),
    ],
)
def test_validate_rejects(quick_run: tuple[int, dict, str, str], breaker, message: str) -> None:
    result = copy.deepcopy(quick_run[1])
    breaker(result)
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.validate_result(result)


def test_write_outputs_refuses_invalid_and_writes_nothing(quick_run, tmp_path) -> None:
    result = copy.deepcopy(quick_run[1])
    result["schema"] = "nope"
    with pytest.raises(ValueError):
        bench.write_outputs(result, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    paths = bench.write_outputs(copy.deepcopy(quick_run[1]), tmp_path / "ok" / "deeper")
    assert [p.name for p in paths] == ["bench.json", "bench.md"]
    assert not [p for p in paths[0].parent.iterdir() if p.name.endswith(".tmp")]


def test_targets_pass_and_fail(quick_run) -> None:
    result = copy.deepcopy(quick_run[1])
    rows = {r["variant"]: r for r in result["groups"][0]["rows"]}
    rows["asr_folded"]["ratio"]["latency"] = 1 / 0.97  # 0.97x plain speed: FAIL
    rows["asr_folded"]["ratio"]["throughput"] = 0.99  # PASS
    rows["asr_fused"]["ratio"]["latency"] = 1.0  # not faster: FAIL
    rows["asr"]["ratio"]["train"] = 1.05  # at the limit: PASS
    got = {t["name"]: t for t in bench.check_targets(result) if t["attention"] == "se"}
    assert got["folded_speed_latency"]["passed"] is False
    assert got["folded_speed_latency"]["value"] == pytest.approx(0.97)
    assert got["folded_speed_latency"]["text"].startswith("FAIL cifar_resnet20: ASR(SE) folded speed at batch 1")
    assert got["folded_speed_throughput"]["passed"] is True
    assert got["fused_faster_latency"]["passed"] is False
    assert got["asr_train_step"]["passed"] is True


# --------------------------------------------------------------------------------------
# bad input: clear errors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "resnet9000"], "unknown model 'resnet9000'; valid models: cifar_"),
        (["--attentions", "se", "magic"], "unknown attention 'magic'; valid names: cbam"),
    ],
)
def test_cli_unknown_names(argv: list[str], message: str, capsys, tmp_path) -> None:
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--latency-batch", "--throughput-batch", "--train-batch", "--threads", "--reps"])
@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_cli_rejects_non_positive_integers(option: str, value: str, capsys) -> None:
    assert main(["bench", option, value]) == 2  # argparse's refusal, returned as the exit status
    err = capsys.readouterr().err
    assert option in err
    assert "positive integer" in err


def test_cli_cuda_without_cuda(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda requested but CUDA is not available" in err
    assert "--device cpu" in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": ()}, "no model given"),
        ({"throughput_batch": 0}, "throughput_batch must be a positive integer"),
        ({"latency_batch": True}, "latency_batch must be a positive integer"),
        ({"threads": -1}, "threads must be a positive integer"),
        ({"warmup": -1}, "warmup must be an integer in [0, 1000]"),
        # upper bounds (issue 32): the library refuses what the command line refuses
        ({"throughput_batch": 1_000_000}, "throughput_batch must be a positive integer <= 4096"),
        ({"train_batch": 5000}, "train_batch must be a positive integer <= 4096"),
        ({"threads": 4096}, "threads must be a positive integer <= "),
        ({"reps": 10**6}, "reps must be a positive integer <= 1000"),
        ({"warmup": 10**6}, "warmup must be an integer in [0, 1000]"),
        ({"min_sample_s": 3600.0}, "min_sample_s must be a number in [0, 60]"),
        ({"device": "meta"}, "not supported by the benchmark"),
        ({"clock": "sundial"}, "unknown clock 'sundial'; valid clocks: wall, cpu"),
        ({"reps": 2.5}, "reps must be a positive integer"),
        ({"device": "gpu0"}, "unknown device 'gpu0'"),
    ],
)
def test_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.BenchConfig(**change).validated()


def test_cpu_clock_refused_on_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--clock cpu measures CPU time"):
        bench.BenchConfig(device="cuda", clock="cpu").validated()


def test_config_defaults() -> None:
    cfg = bench.BenchConfig().validated()
    assert cfg.models == ("cifar_resnet164", "resnet50")
    assert cfg.attentions == tuple(a for a in attention.names() if attention.get(a).has_classic_form)
    assert (cfg.latency_batch, cfg.throughput_batch) == (1, 64)
    assert bench.BenchConfig(attentions=("SE",)).validated().attentions == ("se",)
    # steady CPU defaults: one thread, CPU-time clock; several threads mean elapsed time
    assert (cfg.threads, cfg.clock) == (1, "cpu")
    assert bench.BenchConfig(threads=2).validated().clock == "wall"
    assert bench.BenchConfig(threads=2, clock="cpu").validated().clock == "cpu"


def test_quick_has_the_reference_layout_row(quick_run) -> None:
    _, result, md, _ = quick_run
    rows = {r["variant"]: r for r in result["groups"][0]["rows"]}
    ref = rows["reference"]
    assert ref["label"] == "plain, reference implementation" and ref["label"] in md
    assert ref["params"] == rows["plain"]["params"] and ref["flops"] == rows["plain"]["flops"]
    assert ref["train_ms"] is not None and ref["ratio"]["latency"] is not None
    assert all(isinstance(r["unreliable"], list) for r in rows.values())


def test_unreliable_timings_are_flagged_and_marked() -> None:
    from foldattn.bench.report import _cell
    from foldattn.bench.runner import _flag_unreliable

    steady = {"median": 10.0, "q1": 9.5, "q3": 10.5, "n": 5}
    noisy = {"median": 10.0, "q1": 5.0, "q3": 30.0, "n": 5}
    rows = {"plain": {"latency_ms": steady, "throughput_ms": noisy, "train_ms": None}}
    _flag_unreliable(rows)
    assert rows["plain"]["unreliable"] == ["throughput"]
    assert _cell(10.0, 1.0, ".1f", noisy=True).startswith("~10.0")


def test_reference_layout_computes_what_plain_computes() -> None:
    from foldattn.bench.family import get_family
    from foldattn.models import create_model

    for name in ("cifar_resnet20", "cifar_resnet164"):
        plain = create_model(name).eval()
        ref = get_family(name).reference(plain)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ref.eval()(x), plain(x), rtol=0, atol=0)
    assert get_family("resnet18").reference is None
    pytest.importorskip("timm")
    vit = create_model("cifar_vit_tiny").eval()
    ref = get_family("cifar_vit_tiny").reference(vit).eval()
    assert type(ref).__name__ == "VisionTransformer"
    verify(vit, ref, torch.randn(2, 3, 32, 32))  # float32, 1e-5 relative (LayerNorm eps differs)


@pytest.mark.parametrize("name", ["cifar_repvgg_a0", "cifar_resnet20_acnet", "cifar_resnet20_dbb"])
def test_reparameterization_references_compute_what_plain_computes(name: str) -> None:
    from foldattn.bench.family import get_family
    from foldattn.bench.reference import reference_srp_deployed
    from foldattn.models import create_model
    from foldattn.srp import rep_blocks

    torch.manual_seed(0)
    plain = create_model(name).eval()
    for m in plain.modules():  # statistics and affines away from their defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    family = get_family(name)
    assert family.reference_deployed is reference_srp_deployed
    ref, deployed = family.reference(plain), family.reference_deployed(plain)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == len(list(rep_blocks(plain)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = plain(x)
        scale = y.abs().max()
        assert (ref.eval()(x) - y).abs().max() <= 1e-6 * scale
        assert (deployed(x) - y).abs().max() <= 1e-5 * scale
        plain.train()
        ref.train()
        assert (ref(x) - plain(x)).abs().max() <= 1e-6 * scale  # batch statistics too
    assert ref.training and not any(m.training for m in deployed.modules())


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:mobilenet_v3_small"])
def test_bench_with_a_timm_or_torchvision_model(name: str, tmp_path, capsys) -> None:
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    argv = ["bench", "--models", name, "--attentions", "se", "--reps", "1", "--warmup", "0", "--no-memory",
            "--no-train", "--throughput-batch", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    group = result["groups"][0]
    assert group["family"] == name and group["input_size"] == [3, 224, 224]
    rows = {r["variant"]: r for r in group["rows"]}
    assert rows["asr_folded"]["params"] == rows["plain"]["params"]  # folds back to the plain network
    assert rows["asr_fused"]["params"] < rows["plain"]["params"]  # no BatchNorm parameters left
    assert name in capsys.readouterr().out


@pytest.mark.parametrize(("name", "message"), [("timm:no_such_net", "unknown model timm:no_such_net"),
                                               ("torchvision:resnet", "did you mean")])
def test_bench_refuses_unknown_library_models(name: str, message: str, tmp_path, capsys) -> None:
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    assert main(["bench", "--models", name, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------
# timing and memory helpers
# --------------------------------------------------------------------------------------
def test_interleaved_rotates_and_counts() -> None:
    calls: list[str] = []
    runners = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    samples = bench.interleaved(runners, reps=3, warmup=1, min_sample_s=0.0)
    assert calls == list("ABC" "ABC" "BCA" "CAB")
    assert {k: len(v) for k, v in samples.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t >= 0 for v in samples.values() for t in v)


def test_interleaved_repeats_short_calls() -> None:
    count = {"n": 0}
    samples = bench.interleaved({"A": lambda: count.__setitem__("n", count["n"] + 1)}, reps=2, warmup=1,
                                min_sample_s=0.001)
    assert count["n"] > 3  # a sample of a ~microsecond call repeats it many times
    assert len(samples["A"]) == 2


def test_stats_median_and_quartiles() -> None:
    st = timing._stats([0.001, 0.003, 0.002, 0.010])
    assert st["median"] == pytest.approx(2.5)
    assert st["q1"] <= st["median"] <= st["q3"]
    assert st["n"] == 4


@pytest.mark.skipif(not bench.cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_sees_a_large_temporary() -> None:
    """In a fresh process set up like the bench's memory worker (glibc's heap of this test
    process may hold freed pages that a new tensor reuses without growing the resident set)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from foldattn.bench import memory; size = 64 * memory.MIB; cpu = torch.device('cpu'); "
        "print(memory._peak_bytes(lambda: torch.ones(size // 4).sum(), cpu), "
        "memory._peak_bytes(lambda: None, cpu))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    peak, idle = map(int, out.stdout.split())
    size = 64 * memory.MIB
    assert 0.9 * size <= peak <= 2 * size
    assert idle < 8 * memory.MIB


def test_ratios_relative_to_plain() -> None:
    def row(lat: float, thr: float, train: float | None) -> dict:
        return {"params": 10, "flops": 100, "latency_ms": {"median": lat}, "throughput_ips": thr,
                "memory_mib": 2.0, "train_ms": None if train is None else {"median": train},
                "train_memory_mib": None}

    rows = {"plain": row(2.0, 50.0, 4.0), "x": row(3.0, 25.0, 5.0), "asr_folded": row(2.0, 50.0, None)}
    runner._add_ratios(rows)
    assert rows["plain"]["ratio"]["latency"] == 1.0
    assert rows["x"]["ratio"]["latency"] == pytest.approx(1.5)
    assert rows["x"]["ratio"]["throughput"] == pytest.approx(0.5)
    assert rows["x"]["ratio"]["train"] == pytest.approx(1.25)
    assert rows["asr_folded"]["ratio"]["train"] is None
    assert rows["x"]["ratio"]["train_memory"] is None


# --------------------------------------------------------------------------------------
# model families
# --------------------------------------------------------------------------------------
def test_family_registry() -> None:
    assert {"cifar_resnet20", "cifar_resnet164", "resnet50"} <= set(bench.families())
    with pytest.raises(ValueError, match="unknown model 'nope'; valid models: "):
        bench.get_family("nope")
    with pytest.raises(ValueError, match="already registered"):
        bench.register_family(bench.get_family("resnet50"))
    with pytest.raises(TypeError, match="expects a Family"):
        bench.register_family("resnet50")  # type: ignore[arg-type]


def test_register_and_unregister_a_family() -> None:
    """A user's family goes through the public register/unregister functions, and bench_group measures it."""
    base = bench.get_family("cifar_resnet20")
    fam = bench.Family("test_tiny_family", base.input_size, base.build, train_batch=2)
    assert bench.register_family(fam) is fam
    try:
        assert "test_tiny_family" in bench.families()
        assert bench.get_family("test_tiny_family") is fam
        cfg = bench.BenchConfig(models=("test_tiny_family",), attentions=("se",), throughput_batch=2, reps=1,
                                warmup=0, min_sample_s=0.0, memory=False, train=False).validated()
        group = bench.bench_group(fam, "se", cfg, threads=1)
        assert group["family"] == "test_tiny_family"
        assert [r["variant"] for r in group["rows"]] == [v.key for v in bench.VARIANTS]
    finally:
        assert bench.unregister_family("test_tiny_family") is fam
    assert "test_tiny_family" not in bench.families()
    with pytest.raises(KeyError, match="test_tiny_family"):
        bench.unregister_family("test_tiny_family")
    with pytest.raises(ValueError, match="unknown model 'test_tiny_family'"):
        bench.BenchConfig(models=("test_tiny_family",)).validated()


@pytest.mark.parametrize("name", ["se", "dia"])
def test_torchvision_variants_fold_exactly(name: str) -> None:
    """The torchvision stand-in for attach: ASR on every block's last BN folds to the plain tree."""
    fam = bench.get_family("resnet18")
    torch.manual_seed(0)
    asr = fam.build(name, True, False).eval()
    layers = [m for m in asr.modules() if isinstance(m, ASR)]
    assert len(layers) == 8  # one per BasicBlock
    with torch.no_grad():  # a v far from 1 so a missed fold would show
        for layer in layers:
            layer.attention.psi.normal_()
    deployed = fold(asr)
    plain = fam.build(None, False, False)
    assert deployed.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    report = verify(asr, deployed, x)  # float32: max relative error <= 1e-5 of the output scale
    assert report.passed
    classic = fam.build(name, False, False)
    assert sum(isinstance(m, attention.get(name)) for m in classic.modules()) == 8
    both = fold(fam.build(name, True, True))
    assert sum(isinstance(m, attention.get(name)) for m in both.modules()) == 8
    assert not [m for m in both.modules() if isinstance(m, ASR)]


def test_every_variant_runs_on_a_cifar_model() -> None:
    fam = bench.get_family("cifar_resnet20")
    x = torch.randn(2, 3, 32, 32)
    for v in bench.VARIANTS:
        model = v.build(fam, "eca").eval()
        with torch.no_grad():
            assert model(x).shape == (2, 10)
        assert isinstance(model, nn.Module)
    assert count_flops(bench.VARIANTS[2].build(fam, "eca"), x[:1]) > 0  # ASR(ECA) training form


@pytest.mark.parametrize("what", ["latency", "train"])
def test_profile_variant_tables(what: str) -> None:
    cfg = bench.BenchConfig(train_batch=2)
    tables = bench.profile_variant(bench.get_family("cifar_resnet20"), "se", "asr", what, cfg, calls=1,
                                  row_limit=200)
    assert list(tables) == ["plain", "asr"]
    assert "aten::convolution" in tables["plain"] or "aten::conv2d" in tables["plain"]
    assert "aten::sigmoid" in tables["asr"]  # the SE gate on psi runs in the training form
    assert "aten::sigmoid" not in tables["plain"]
    assert "Self CPU" in tables["asr"]


def test_markdown_shows_profiles(quick_run) -> None:
    result = copy.deepcopy(quick_run[1])
    result["profiles"] = [{"target": "FAIL x", "family": "f", "attention": "se", "variant": "asr", "work": "train",
                           "tables": {"plain": "TABLE-PLAIN", "asr": "TABLE-ASR"}}]
    bench.validate_result(result)
    md = bench.render_markdown(result)
    assert "Profile for `FAIL x`" in md
    assert md.index("TABLE-PLAIN") < md.index("TABLE-ASR")
    result["profiles"][0].pop("tables")
    with pytest.raises(ValueError, match="profiles"):
        bench.validate_result(result)


# --------------------------------------------------------------------------------------
# the CLI's exit code, CUDA synchronisation, ONNX Runtime rows
# --------------------------------------------------------------------------------------
def test_strict_exits_1_on_a_missed_target(monkeypatch, capsys, tmp_path) -> None:
    impossible = (("folded_speed_latency", "asr_folded", "latency", ">=", 100.0, "ASR(X) folded speed at batch {lb}"),)
    monkeypatch.setattr(targets, "TARGETS", impossible)
    argv = ["bench", "--quick", "--attentions", "se", "--reps", "1", "--warmup", "0", "--no-memory", "--no-train",
            "--out", str(tmp_path), "--strict"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL cifar_resnet20: ASR(SE) folded speed at batch 1 = " in out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [t["passed"] for t in result["targets"]] == [False]
    assert all(r["train_ms"] is None and r["memory_mib"] is None for r in result["groups"][0]["rows"])


def test_cuda_runs_are_synchronised(monkeypatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    timing._sync_for(torch.device("cuda"))()
    timing._sync_for(torch.device("cpu"))()
    assert calls == [torch.device("cuda")]


def test_onnx_rows_and_channels_last() -> None:
    pytest.importorskip("onnxruntime")
    cfg = bench.BenchConfig(models=("cifar_resnet20",), attentions=("se",), reps=1, warmup=1, min_sample_s=0.0,
                            throughput_batch=4, channels_last=True, onnx=True, memory=False, train=False, threads=1)
    result = bench.run_bench(cfg)
    bench.validate_result(result)
    assert result["config"]["channels_last"] and result["config"]["onnx"]
    rows = {r["variant"]: r for r in result["groups"][0]["rows"]}
    onnx_keys = [row for row, _, _ in bench.ONNX_ROWS]
    assert set(onnx_keys) <= set(rows)
    for key in onnx_keys:
        assert rows[key]["latency_ms"]["median"] > 0 and rows[key]["throughput_ips"] > 0
    md = bench.render_markdown(result)
    assert "channels_last" in md and all(rows[k]["label"] in md for k in onnx_keys)
    # without the training figures the training target is not checked (no FAIL line for it)
    assert {t["name"] for t in result["targets"]} == {"folded_speed_latency", "folded_speed_throughput",
                                                      "fused_faster_latency"}


def _resnet8_runtime_bench(name: str, runtimes: tuple[str, ...], throughput_batch: int) -> dict:
    """``run_bench`` of a ResNet-8 family at 16x16 (registered for the call) with ``runtimes``, no memory or
    training measurement, one rep: what the runtime-row tests time."""
    from foldattn.models.cifar_resnet import CifarResNet

    fam = bench.Family(name, (3, 16, 16), lambda attention, asr, both: CifarResNet(
        8, attention=attention, asr=asr, both=both), train_batch=2)
    bench.register_family(fam)
    try:
        cfg = bench.BenchConfig(models=(name,), attentions=("se",), reps=1, warmup=1, min_sample_s=0.0,
                                throughput_batch=throughput_batch, memory=False, train=False, threads=1,
                                runtimes=runtimes)
        return bench.run_bench(cfg)
    finally:
        bench.unregister_family(name)


@pytest.mark.slow
def test_every_runtime_times_the_deployed_forms() -> None:
    """--runtime eager,ort,ort-int8,compile: plain, +X and ASR-folded in each runtime, with ratios to the same
    runtime's plain; a runtime that cannot run here is a note, not a failure."""
    pytest.importorskip("onnxruntime")
    # a ResNet-8 at 16x16: torch.compile with a cold cache (as on CI) compiles each form and batch size; throughput
    # at batch 1 too: one compile per form instead of two (each costs seconds)
    result = _resnet8_runtime_bench("test_resnet8", ("eager", "ort", "ort-int8", "compile"), throughput_batch=1)
    bench.validate_result(result)
    group = result["groups"][0]
    rows = {r["variant"]: r for r in group["rows"]}
    for prefix in ("ort", "ortq"):
        for v in ("plain", "x", "asr_folded"):
            row = rows[f"{prefix}_{v}"]
            assert row["latency_ms"]["median"] > 0 and row["throughput_ips"] > 0
            assert row["runtime_ratio"]["latency"] == pytest.approx(
                row["latency_ms"]["median"] / rows[f"{prefix}_plain"]["latency_ms"]["median"])
        assert rows[f"{prefix}_plain"]["runtime_ratio"]["latency"] == pytest.approx(1.0)
    assert ("compile_plain" in rows) != ("torch.compile" in (group.get("note") or ""))
    md = bench.render_markdown(result)
    assert "+SE (ONNX Runtime INT8)" in md


@pytest.mark.parametrize("argv", [["--runtime", "tensorrt"], ["--runtime", ""]])
def test_unknown_runtime_is_refused(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from foldattn.cli import main

    assert main(["bench", "--quick", *argv, "--out", str(tmp_path / "b")]) == 2
    assert "runtime" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"models": ("resnet50",), "throughput_batch": 4096}, "resnet50: --throughput-batch 4096 of 3x224x224 inputs and "
                                                          "the activations of a forward pass would take about"),
    ({"models": ("resnet50",), "train_batch": 2048}, "resnet50: --train-batch 2048 of 3x224x224 inputs and the "
                                                     "activations of a training step"),
])
def test_batches_are_bounded_by_their_estimated_memory_before_any_model_is_built(change: dict, message: str) -> None:
    """bench --throughput-batch 1000000 reached 12.7 GB before its out-of-memory line: the inputs' and
    activations' bytes (traced on the meta device) are refused first, naming the option and the limit."""
    import resource

    from foldattn.bench.runner import check_memory

    cfg = bench.BenchConfig(attentions=("se",), **change).validated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="over the limit of") as e:
        check_memory(cfg)
    assert message in str(e.value) and "lower --" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20  # KiB: nothing of that size made
    check_memory(bench.BenchConfig(models=("resnet50",), attentions=("se",), throughput_batch=8,
                                   train_batch=4).validated())  # a small batch passes


@pytest.mark.parametrize(("option", "value"), [("--threads", "4096"), ("--throughput-batch", "1000000"),
                                               ("--reps", "1000000"), ("--warmup", "1000000")])
def test_cli_refuses_counts_past_their_bound(option: str, value: str, capsys, tmp_path) -> None:
    assert main(["bench", option, value, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value} is too large" in err and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_openvino_and_executorch_rows_time_the_deployed_forms() -> None:
    """--runtime openvino,openvino-int8,executorch,executorch-int8: plain, +X and ASR-folded read back in each
    runtime (each float file checked against PyTorch when written) and quantized by its own tools, timed, with
    ratios to the same runtime's plain."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("executorch")
    result = _resnet8_runtime_bench("test_resnet8_rt", ("eager", "openvino", "openvino-int8", "executorch",
                                                        "executorch-int8"), throughput_batch=2)
    bench.validate_result(result)
    rows = {r["variant"]: r for r in result["groups"][0]["rows"]}
    for prefix in ("ov", "ovq", "et", "etq"):
        for v in ("plain", "x", "asr_folded"):
            row = rows[f"{prefix}_{v}"]
            assert row["latency_ms"]["median"] > 0 and row["throughput_ips"] > 0
        assert rows[f"{prefix}_plain"]["runtime_ratio"]["latency"] == pytest.approx(1.0)
    md = bench.render_markdown(result)
    assert "+ASR(SE) folded (OpenVINO f32)" in md and "+SE (ExecuTorch XNNPACK)" in md
    assert "+ASR(SE) folded (OpenVINO INT8)" in md and "plain (ExecuTorch XNNPACK INT8)" in md
