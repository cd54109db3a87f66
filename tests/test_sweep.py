"""`foldattn sweep`: arms x seeds of `foldattn train`, resumable, summarised against a baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from foldattn.cli import main
from foldattn.sweep import SweepError, load_sweep, parse_sweep, stats, summarize, write_summary

FAST = ["--recipe", "digits", "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "32"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _sweep_file(tmp_path: Path, arms: str = "  plain: []\n  asr-se: [--attention, se, --asr]\n",
                seeds: str = "[0, 1]", extra: str = "baseline: plain\n") -> Path:
    base = ", ".join(FAST)
    return _write(tmp_path / "sweep.yaml", f"base: [{base}]\narms:\n{arms}seeds: {seeds}\n{extra}")


def _script(relative: str) -> Any:
    """A script of the repository (not a package module), imported as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / relative
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _cli(args: list[str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "foldattn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]


@pytest.mark.slow
def test_two_arm_two_seed_sweep_resumes_after_a_kill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = _sweep_file(tmp_path)
    out = tmp_path / "out"
    # kill the whole sweep (runner and its run) hard once the first run has a checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "foldattn.cli", "sweep", str(spec_file), "-o", str(out),
                             "--jobs", "1", "--threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "runs" / "plain" / "s0"
    deadline = time.time() + 240
    while not (first / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "last.pt").is_file()
    killed_mid_run = not (first / "summary.json").is_file() or \
        not json.loads((first / "summary.json").read_text()).get("finished")

    # the runner itself in this process (its runs are still `foldattn train` processes)
    with pytest.warns(UserWarning, match="taking over a stale lock"):  # the killed runner's
        rc = main(["sweep", str(spec_file), "-o", str(out), "--jobs", "2", "--threads", "1"])
    done = capsys.readouterr()
    assert rc == 0, done.out + done.err
    if killed_mid_run:
        assert "resume plain-s0" in done.out
        assert "--resume" in (out / "logs" / "plain-s0.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_finished"] == summary["runs_planned"] == 4
    for arm in ("plain", "asr-se"):
        entry = summary["arms"][arm]
        assert entry["seeds"] == [0, 1]
        assert len(entry["final_top1"]["values"]) == 2 and entry["final_top1"]["std"] is not None
        assert entry["best_top1"]["mean"] >= entry["final_top1"]["mean"] - 1e-9
        assert set(entry["commands"]) == {"0", "1"}
    diff = summary["arms"]["asr-se"]["paired_diff"]
    a, b = summary["arms"]["asr-se"]["final_top1"]["values"], summary["arms"]["plain"]["final_top1"]["values"]
    assert diff["seeds"] == [0, 1]
    assert diff["final_top1"]["values"] == pytest.approx([x - y for x, y in zip(a, b, strict=True)])
    assert (out / "summary.png").stat().st_size > 1000 and "| asr-se |" in (out / "summary.md").read_text()

    # a third call finds everything finished: nothing re-runs, the finished runs are kept as they are
    before = (first / "summary.json").stat().st_mtime_ns
    assert main(["sweep", str(spec_file), "-o", str(out)]) == 0
    assert "4 finished, 0 to run" in capsys.readouterr().out
    assert (first / "summary.json").stat().st_mtime_ns == before

    # benchmarks/branch_scales.py reads the finished runs: each ASR site's v = T(psi) and deployed weight
    _branch_scales_of(out, tmp_path / "scales")


def _branch_scales_of(out: Path, dest: Path) -> None:
    pytest.importorskip("matplotlib")
    from foldattn import ASR, fold
    from foldattn.train.model import load_trained

    branch_scales = _script("benchmarks/branch_scales.py")
    assert branch_scales.main([str(out), "--out", str(dest)]) == 0
    result = json.loads((dest / "branch_scales.json").read_text())
    model, _, _ = load_trained(out / "runs" / "asr-se" / "s1" / "last.pt")
    asr = {n: m for n, m in model.named_modules() if isinstance(m, ASR)}
    assert result["sites"] == list(asr) and asr
    run, plain = result["runs"]["asr-se"]["s1"], result["runs"]["plain"]["s1"]
    deployed = dict(fold(model).named_modules())
    for site, layer in asr.items():
        v = layer.vector().detach().double()
        assert run["factor_by_site"][site] == pytest.approx(float(v.pow(2).mean().sqrt()), rel=1e-9)
        assert 0 < run["factor_init_by_site"][site] < 1  # SE's sigmoid
        w = deployed[site].weight.detach().double()
        assert run["deployed_weight_rms"][site] == pytest.approx(float(w.pow(2).mean().sqrt()), rel=1e-9)
        assert site in plain["deployed_weight_rms"] and not plain["factor_by_site"]
    assert "| asr-se | 0,1 |" in (dest / "branch_scales.md").read_text()
    assert (dest / "branch_scales.png").stat().st_size > 1000
    for bad in ([str(dest / "nothing-here")], [str(out), "--arms", "nope"], [str(out), "--arms", "plain"],
                [str(out), "--png", str(dest / "no-folder" / "x.png")]):
        assert branch_scales.main([*bad, "--out", str(dest)]) == 2  # no sweep, no such arm, no ASR arm, no folder


def _finished_runs(out: Path, curves: dict[tuple[str, int], list[float]]) -> None:
    """Fake finished runs: ``curves[(arm, seed)]`` is the validation top-1 per epoch."""
    for (arm, seed), top1 in curves.items():
        folder = out / "runs" / arm / f"s{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"finished": True, "time_per_epoch_s": 2.0,
                                                         "run": {"params_train": 10, "params_deployed": 8}}))
        rows = "".join(f"{i},{v}\n" for i, v in enumerate(top1, 1))
        (folder / "metrics.csv").write_text(f"epoch,val_top1\n{rows}")


def test_summary_statistics_and_paired_differences(tmp_path: Path) -> None:
    spec = parse_sweep({"base": [], "arms": {"a": [], "b": ["--attention", "se"]}, "seeds": [0, 1, 2],
                        "baseline": "a"})
    finals = {("a", 0): 80.0, ("a", 1): 82.0, ("a", 2): 81.0, ("b", 0): 81.0, ("b", 1): 82.5}  # b-s2 unfinished
    _finished_runs(tmp_path, {k: [v - 5, v + 1, v] for k, v in finals.items()})
    summary = summarize(spec, tmp_path)
    a, b = summary["arms"]["a"], summary["arms"]["b"]
    assert a["final_top1"] == stats([80.0, 82.0, 81.0]) and a["final_top1"]["std"] == pytest.approx(1.0)
    assert a["best_top1"]["values"] == [81.0, 83.0, 82.0]
    assert b["seeds"] == [0, 1] and b["final_top1"]["values"] == [81.0, 82.5]
    assert b["paired_diff"]["seeds"] == [0, 1]
    assert b["paired_diff"]["final_top1"]["values"] == pytest.approx([1.0, 0.5])
    assert b["paired_diff"]["final_top1"]["mean"] == pytest.approx(0.75)
    assert "paired_diff" not in a and summary["runs_finished"] == 5 and summary["runs_planned"] == 6
    assert summary["contrasts"] == []


def test_contrasts_are_paired_by_seed_in_json_markdown_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    spec = parse_sweep({"arms": {"plain": [], "asr-se": ["--attention", "se", "--asr"],
                                 "asr-scale": ["--attention", "scale", "--asr"]},
                        "seeds": [0, 1, 2], "baseline": "plain", "contrasts": [["asr-se", "asr-scale"]]})
    assert spec.contrasts == (("asr-se", "asr-scale"),)
    finals = {("plain", 0): 80.0, ("plain", 1): 81.0, ("plain", 2): 82.0, ("asr-se", 0): 81.0,
              ("asr-se", 1): 81.5, ("asr-se", 2): 83.0, ("asr-scale", 0): 80.5, ("asr-scale", 1): 82.5}
    _finished_runs(tmp_path, {k: [v - 5, v] for k, v in finals.items()})
    summary = write_summary(spec, tmp_path)
    (contrast,) = summary["contrasts"]
    assert contrast["arms"] == ["asr-se", "asr-scale"] and contrast["seeds"] == [0, 1]  # asr-scale s2 unfinished
    assert contrast["final_top1"]["values"] == pytest.approx([0.5, -1.0])
    assert contrast["final_top1"]["mean"] == pytest.approx(-0.25)
    md = (tmp_path / "summary.md").read_text()
    assert "| asr-se - asr-scale | 0,1 | -0.25 ± 1.06 (+0.50, -1.00) |" in md
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_learning_curves_are_the_mean_and_range_over_seeds_per_epoch(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    spec = parse_sweep({"arms": {"a": [], "b": ["--attention", "se"], "c": ["--attention", "eca"]},
                        "seeds": [0, 1, 2], "baseline": "a"})
    # b-s2 unfinished: b's curve is over seeds 0 and 1; c's runs differ in length: no curve for c
    _finished_runs(tmp_path, {("a", 0): [10.0, 20.0, 30.0], ("a", 1): [12.0, 18.0, 33.0], ("a", 2): [14.0, 22.0, 30.0],
                              ("b", 0): [11.0, 25.0, 35.0], ("b", 1): [13.0, 21.0, 31.0],
                              ("c", 0): [10.0, 20.0], ("c", 1): [10.0, 20.0, 30.0]})
    summary = write_summary(spec, tmp_path)
    a, b, c = (summary["arms"][n] for n in "abc")
    assert a["curve"] == {"epochs": 3, "mean": pytest.approx([12.0, 20.0, 31.0]), "min": [10.0, 18.0, 30.0],
                          "max": [14.0, 22.0, 33.0]}
    assert b["curve"]["mean"] == pytest.approx([12.0, 23.0, 33.0]) and b["curve"]["min"] == [11.0, 21.0, 31.0]
    assert "curve" not in c and "ema_curve" not in a  # no EMA column in these runs
    assert a["curve"]["mean"][-1] == pytest.approx(a["final_top1"]["mean"])  # the curve ends where the table does
    png = tmp_path / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary["arms"] = {n: {k: v for k, v in x.items() if k != "curve"} for n, x in summary["arms"].items()}
    from foldattn.sweep import plot_curves

    assert plot_curves(summary, tmp_path / "none.png") is False and not (tmp_path / "none.png").exists()


def test_with_an_ema_the_paired_differences_are_the_emas(tmp_path: Path) -> None:
    spec = parse_sweep({"arms": {"plain": [], "asr": ["--attention", "scale", "--asr"]}, "seeds": [0, 1],
                        "baseline": "plain", "contrasts": [["asr", "plain"]]})
    # (model top-1, EMA top-1) per epoch: the model's differences and the EMA's differ in sign
    runs = {("plain", 0): [(50.0, 40.0), (60.0, 55.0)], ("plain", 1): [(52.0, 42.0), (61.0, 56.0)],
            ("asr", 0): [(49.0, 41.0), (59.0, 57.0)], ("asr", 1): [(50.0, 44.0), (60.0, 56.5)]}
    for (arm, seed), rows in runs.items():
        folder = tmp_path / "runs" / arm / f"s{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"finished": True}))
        body = "".join(f"{i},{m},{e}\n" for i, (m, e) in enumerate(rows, 1))
        (folder / "metrics.csv").write_text(f"epoch,val_top1,ema_val_top1\n{body}")
    summary = write_summary(spec, tmp_path)
    asr = summary["arms"]["asr"]
    assert asr["final_ema_top1"]["values"] == [57.0, 56.5] and asr["best_ema_top1"]["values"] == [57.0, 56.5]
    assert asr["paired_diff"]["final_top1"]["values"] == pytest.approx([-1.0, -1.0])
    assert asr["paired_diff"]["final_ema_top1"]["values"] == pytest.approx([2.0, 0.5])
    md = (tmp_path / "summary.md").read_text()
    assert "| final EMA vs plain (per seed) | best EMA vs plain |" in md
    assert "| +1.25 ± 1.06 (+2.00, +0.50) |" in md and "final EMA top-1 difference" in md
    assert asr["ema_curve"]["mean"] == pytest.approx([42.5, 56.75])
    assert asr["curve"]["mean"] == pytest.approx([49.5, 59.5])


# (id, sweep file text after `base`, the one line's text)
BAD = [
    ("unknown-option", "arms:\n  a: []\n  b: [--attenshun, se]\nseeds: [0]\n", "unrecognized arguments"),
    ("bad-value", "arms:\n  a: [--epochs, zero]\nseeds: [0]\n", "'zero' is not an integer"),
    ("repeated-arm", "arms:\n  a: [--attention, se]\n  b: [--attention, se, --epochs, '1']\nseeds: [0]\n",
     "repeats arm 'a'"),
    ("empty-seeds", "arms:\n  a: []\nseeds: []\n", "non-empty list of seeds"),
    ("seed-twice", "arms:\n  a: []\nseeds: [1, 1]\n", "seed 1 is listed twice"),
    ("owned-option", "arms:\n  a: [--seed, '3']\nseeds: [0]\n", "set by the sweep"),
    ("owned-abbreviated", "arms:\n  a: [--outp, x]\nseeds: [0]\n", "set by the sweep"),
    ("baseline-unknown", "arms:\n  a: []\nseeds: [0]\nbaseline: b\n", "baseline 'b' is not an arm"),
    ("unknown-key", "arms:\n  a: []\nseeds: [0]\nrepeat: 3\n", "unknown key(s) repeat"),
    ("cross-option", "arms:\n  a: [--psi-init, '0.5']\nseeds: [0]\n", "--psi-init"),
    ("arm-name", "arms:\n  'a/b': []\nseeds: [0]\n", "arm name"),
    ("unset-env", "arms:\n  a: [--dataset, 'imagefolder:${FOLDATTN_TEST_UNSET}']\nseeds: [0]\n",
     "${FOLDATTN_TEST_UNSET} is not set"),
    ("missing-data", "arms:\n  a: [--dataset, 'imagefolder:/no/such/folder']\nseeds: [0]\n", "does not exist"),
    ("yaml-alias", "arms:\n  a: &x []\n  b: *x\nseeds: [0]\n", "aliases"),
    ("not-a-mapping", "arms: [a, b]\nseeds: [0]\n", "arms must map"),
    ("contrast-unknown-arm", "arms:\n  a: []\nseeds: [0]\ncontrasts: [[a, c]]\n", "'c' is not an arm"),
    ("contrast-not-a-pair", "arms:\n  a: []\nseeds: [0]\ncontrasts: [a]\n", "pair of arm names"),
    ("contrast-self", "arms:\n  a: []\nseeds: [0]\ncontrasts: [[a, a]]\n", "with itself"),
    ("contrast-twice", "arms:\n  a: []\n  b: [--attention, se]\nseeds: [0]\ncontrasts: [[a, b], [b, a]]\n",
     "listed twice"),
    # bounds (issue 32): counts checked before anything is parsed per arm or run
    ("seeds-too-many", "arms:\n  a: []\nseeds: [" + ", ".join(map(str, range(1001))) + "]\n",
     "seeds: 1,001 seeds; at most 1,000"),
    ("arm-seeds-too-many", "arms:\n  a: {seeds: [" + ", ".join(map(str, range(1001))) + "]}\nseeds: [0]\n",
     "arm 'a': seeds: 1,001 seeds; at most 1,000"),
    ("runs-too-many", "arms:\n" + "".join(f"  a{i}: [--lr, '0.{i + 1}']\n" for i in range(11))
     + "seeds: [" + ", ".join(map(str, range(1000))) + "]\n", "11 arms x their seeds are 11,000 runs; at most 10,000"),
    ("jobs-too-many", "arms:\n  a: []\nseeds: [0]\njobs: 1000\n", "jobs: expected an integer in [1, 64]"),
    ("threads-too-many", "arms:\n  a: []\nseeds: [0]\nthreads: 100000\n", "threads: expected an integer in [0, 256]"),
    ("epochs-too-many", "arms:\n  a: [--epochs, '1000000000']\nseeds: [0]\n", "--epochs: 1000000000 is too large"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_sweep_files_are_one_line_and_start_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         case: str, body: str, message: str) -> None:
    spec_file = _write(tmp_path / "s.yaml", "base: [--recipe, digits, --epochs, '1']\n" + body)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_file), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foldattn sweep: error:") and len(err.splitlines()) == 1, err
    assert message in err
    assert not out.exists()


def test_a_folder_with_another_sweep_or_other_files_is_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    first = _sweep_file(tmp_path, arms="  a: []\n", seeds="[0]", extra="")
    load_sweep(first)
    from foldattn.sweep import prepare_folder

    prepare_folder(load_sweep(first), out, str(first))  # as a started sweep leaves it
    other = _write(tmp_path / "other.yaml", "base: [--recipe, digits, --epochs, '1']\narms:\n  a: []\nseeds: [0]\n")
    assert main(["sweep", str(other), "-o", str(out)]) == 2
    assert "holds another sweep" in capsys.readouterr().err
    changed = _sweep_file(tmp_path, arms="  a: [--attention, se]\n", seeds="[0]", extra="")
    assert main(["sweep", str(changed), "-o", str(out)]) == 2
    assert "other options there" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert main(["sweep", str(first), "-o", str(junk)]) == 2
    assert "holds other files" in capsys.readouterr().err
    # adding an arm or a seed to the same sweep is allowed (--dry-run lists the new runs)
    grown = _sweep_file(tmp_path, arms="  a: []\n  b: [--attention, se, --asr]\n", seeds="[0, 1]", extra="")
    assert main(["sweep", str(grown), "-o", str(out), "--dry-run"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_bad_file_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["sweep", "/dev/zero", "-o", str(tmp_path / "o")]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert main(["sweep", "x.yaml", "-o", str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err
    with pytest.raises(SweepError, match="expected a list of options"):
        parse_sweep({"arms": {"a": "--asr"}, "seeds": [0]})


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_the_projects_sweep_files_load(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the CIFAR-10 files name their data through ${CIFAR10}; any folder with a train/ subfolder passes the checks
    (tmp_path / "train").mkdir()
    monkeypatch.setenv("CIFAR10", str(tmp_path))
    spec = load_sweep(path)
    assert spec.runs() and (spec.baseline is None or spec.baseline in {a.name for a in spec.arms})


def test_docs_figure_of_a_sweep_is_drawn_from_its_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    make_figures = _script("docs/make_figures.py")
    docs = tmp_path / "docs"
    docs.mkdir()
    monkeypatch.setattr(make_figures, "DOCS", docs)
    sweep = tmp_path / "sweep"
    spec = parse_sweep({"arms": {"a": [], "b": ["--attention", "se"]}, "seeds": [0], "baseline": "a"})
    _finished_runs(sweep, {("a", 0): [80.0, 82.0], ("b", 0): [81.0, 83.0]})
    write_summary(spec, sweep)
    (sweep / "sweep.json").write_text(json.dumps({"file": "benchmarks/sweeps/my-sweep.yaml"}))
    monkeypatch.setattr(sys, "argv", ["make_figures.py", "--sweep", str(sweep)])
    assert make_figures.main() == 0
    assert (docs / "sweep-my-sweep.png").stat().st_size > 1000
    assert (docs / "curves-my-sweep.png").stat().st_size > 1000
    assert "docs/curves-my-sweep.png" in capsys.readouterr().out
    (sweep / "summary.json").write_text(json.dumps({"format": "something else"}))
    capsys.readouterr()
    for message in ("is not a `foldattn sweep` folder", "summary.json: no such file"):
        with pytest.raises(SystemExit) as exit_info:
            make_figures.main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
        (sweep / "summary.json").unlink(missing_ok=True)


def test_seed_counts_are_refused_before_the_list_is_walked() -> None:
    """150,000 seeds hung --dry-run (a quadratic duplicate check): the count alone refuses them now, and the
    duplicate check within the bound is a set."""
    from foldattn.sweep.spec import MAX_SEEDS, Run

    t0 = time.perf_counter()
    with pytest.raises(SweepError, match="150,000 seeds; at most 1,000"):
        parse_sweep({"arms": {"a": []}, "seeds": list(range(150_000))})
    seeds = [*range(MAX_SEEDS - 1), MAX_SEEDS - 2]
    with pytest.raises(SweepError, match=f"seed {MAX_SEEDS - 2} is listed twice"):
        parse_sweep({"arms": {"a": []}, "seeds": seeds})
    spec = parse_sweep({"arms": {f"a{i}": [] for i in range(10)}, "seeds": list(range(MAX_SEEDS))})
    assert len(spec.runs()) == 10 * MAX_SEEDS and spec.runs()[:2] == [Run("a0", 0), Run("a1", 0)]
    assert time.perf_counter() - t0 < 10


def test_dry_run_shows_how_far_each_run_has_come(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run is the sweep's status: finished, partial with the epochs its metrics.csv holds, or new."""
    from foldattn.sweep import prepare_folder
    from foldattn.sweep.task import epochs_done

    path = _sweep_file(tmp_path, arms="  a: []\n", seeds="[0, 1, 2]", extra="")
    out = tmp_path / "out"
    prepare_folder(load_sweep(path), out, str(path))
    _finished_runs(out, {("a", 0): [80.0, 81.0]})
    partial = out / "runs" / "a" / "s1"
    partial.mkdir(parents=True)
    (partial / "last.pt").write_bytes(b"a checkpoint")
    (partial / "metrics.csv").write_text("epoch,val_top1\n1,50.0\n2,60.0\n3,65.0\n")
    assert main(["sweep", str(path), "-o", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["a-s0", "finished", "-"], ["a-s1", "partial", "(3"],
                                                    ["a-s2", "new", "cpu"]]
    assert "partial (3 ep)" in lines[1]
    (partial / "metrics.csv").unlink()
    os.mkfifo(partial / "metrics.csv")  # not a regular file: not read (a FIFO would block), the state alone
    assert epochs_done(partial) is None
    assert main(["sweep", str(path), "-o", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["a-s1", "partial", "cpu"]
