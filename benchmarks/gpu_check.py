"""The prepared GPU check: one command on a machine with one GPU, under ten minutes, results in one folder.

1. The CUDA test tier (``pytest -m cuda tests/test_cuda.py``): passed / failed / skipped.
2. The paper's Table-1-style cost: CIFAR-100 ResNet-164 at batch 1 and 128, plain, +X, +ASR(X)
   folded for every attention module, timed with CUDA events (``foldattn bench``), with the GPU's name.
3. CIFAR-10 ResNet-56 plain / +SE / +ASR(SE), the paper's recipe (SGD 0.1, step decay at 49 % and 74 %
   of the epochs) compressed to the epochs that fit in ``--train-budget-s`` (about five minutes for
   the three), images on the GPU: top-1 on 5,000 held-out training images, and images per second.
4. ``foldattn sweep --gpus 0``: a two-run sweep (one epoch of 4 steps on the embedded digits each) on the GPU
   pool of the sweep runner; every run's ``summary.json`` must say it trained on CUDA and its log that the
   sweep gave it GPU 0 (seconds).

Everything goes to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (and each part's own files beside them).
``--dry-run`` runs the same steps at CPU size (the tier skips, a tiny bench, one short training on the
embedded digits) to check the script on any machine. Nothing is downloaded; ``--data`` is the CIFAR-10
ImageFolder tree (``DIR/train/<class>/*.jpg``) or the ``cifar10-train-jpg.tar.gz`` archive.

    bash benchmarks/gpu_check.sh --out runs/gpu-check --data cifar10-train-jpg.tar.gz
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; ``(exit status, seconds)``."""
    t0 = time.time()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n(timed out after {timeout:.0f} s)\n")
            rc = 124
    print(f"  {shlex.join(cmd[:6])} ... exit {rc} in {time.time() - t0:.0f} s (log: {log})", flush=True)
    return rc, time.time() - t0


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _foldattn(*args: str) -> list[str]:
    return [sys.executable, "-m", "foldattn.cli", *args]


def _gpu() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count())
    return info


def _tier(out: Path, timeout: float) -> dict[str, Any]:
    xml = out / "cuda-tier.xml"
    rc, secs = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
                     f"--junitxml={xml}"], out / "cuda-tier.log", timeout)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in counts}
    failed = [c.get("name") for c in ET.parse(xml).getroot().iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None] if xml.is_file() else []
    return {"exit": rc, "seconds": round(secs), **counts,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"], "failed": failed}


def _cost(out: Path, dry: bool, timeout: float) -> dict[str, Any]:
    if dry:
        args = ["bench", "--models", "cifar_resnet20", "--attentions", "se", "--reps", "1", "--warmup", "1",
                "--throughput-batch", "4", "--no-train", "--no-memory", "--device", "cpu"]
    else:  # the paper's Table 1: CIFAR-100 ResNet-164, every attention module, inference
        args = ["bench", "--models", "cifar_resnet164", "--latency-batch", "1", "--throughput-batch", "128",
                "--device", "cuda", "--clock", "cuda", "--reps", "15", "--no-train"]
    rc, secs = _run(_foldattn(*args, "--out", str(out / "cost")), out / "cost.log", timeout)
    result: dict[str, Any] = {"exit": rc, "seconds": round(secs), "command": shlex.join(["foldattn", *args])}
    bench = out / "cost" / "bench.json"
    if bench.is_file():
        data = json.loads(bench.read_text())
        result["machine"] = data.get("machine")
        rows = []
        for g in data["groups"]:
            for r in g["rows"]:
                if r["variant"] in ("plain", "x", "asr_folded"):
                    rows.append({"attention": g["attention"], "variant": r["label"], "params": r["params"],
                                 "latency_ms_b1": r["latency_ms"]["median"], "images_per_s": r["throughput_ips"],
                                 "ratio_latency": r["ratio"]["latency"], "ratio_throughput": r["ratio"]["throughput"]})
        result["rows"] = rows
    return result


def _data_root(data: str | None, out: Path) -> Path | None:
    if data is None:
        return None
    path = Path(data)
    if path.is_dir():
        return path / "train" if (path / "train").is_dir() else path
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        dest = out / "data"
        if not (dest / "train").is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=out))
            with tarfile.open(path) as t:
                t.extractall(tmp, filter="data")
            tmp.rename(dest)
        return dest / "train"
    raise SystemExit(f"gpu_check: --data {data}: not a folder or a .tar.gz archive")


def _train(out: Path, root: Path | None, dry: bool, budget_s: float, timeout: float) -> dict[str, Any]:
    variants = {"plain": [], "+SE": ["--attention", "se"], "+ASR(SE)": ["--attention", "se", "--asr"]}
    if dry:
        common = ["--model", "cifar_resnet20", "--dataset", "digits", "--steps-per-epoch", "2", "--device", "cpu"]
        epochs = 1
    else:
        if root is None:
            return {"skipped": "no --data: the CIFAR-10 part needs the training JPEGs (DIR/train or the .tar.gz)"}
        common = ["--model", "cifar_resnet56", "--recipe", "paper-cifar", "--dataset", f"imagefolder:{root}",
                  "--val-split", "5000", "--cache-dir", str(out / "cache"), "--device", "cuda", "--data-on-device"]
        # one probe epoch of the slowest variant sizes the schedule to the budget
        probe = out / "train" / "probe"
        _run(_foldattn("train", *common, *variants["+SE"], "--epochs", "2", "--milestones", "1",
                       "--steps-per-epoch", "60", "-o", str(probe), "--no-progress"), out / "train-probe.log", timeout)
        per_step = 0.0
        if (probe / "metrics.csv").is_file():
            rows = _csv(probe / "metrics.csv")
            per_step = float(rows[-1]["epoch_time_s"]) / 60 if rows else 0.0
        steps = 45000 // 128
        epoch_s = max(per_step * steps, 1e-3)
        epochs = max(3, int(budget_s / 3 / epoch_s))
    results: dict[str, Any] = {"epochs": epochs, "variants": {}}
    for label, extra in variants.items():
        milestones = [] if dry else ["--milestones", str(max(1, round(epochs * 81 / 164))),
                                     str(max(2, round(epochs * 122 / 164)))]
        run = out / "train" / label.replace("+", "").replace("(", "-").replace(")", "").lower()
        args = ["train", *common, *extra, "--epochs", str(epochs), *milestones, "-o", str(run), "--no-progress"]
        rc, secs = _run(_foldattn(*args), out / f"train-{run.name}.log", timeout)
        entry: dict[str, Any] = {"exit": rc, "seconds": round(secs), "command": shlex.join(["foldattn", *args])}
        if (run / "summary.json").is_file():
            s = json.loads((run / "summary.json").read_text())
            rows = _csv(run / "metrics.csv")
            entry.update(final_top1=s["final"]["top1"], best_top1=s["best"]["top1"], device=s["run"]["device"],
                         params_deployed=s["run"]["params_deployed"],
                         images_per_s=sum(float(r["images_per_s"]) for r in rows) / max(len(rows), 1))
        results["variants"][label] = entry
    return results


SWEEP = """\
base: [--recipe, digits, --epochs, "1", --steps-per-epoch, "4", --batch-size, "32"]
arms:
  plain: []
  asr-se: [--attention, se, --asr]
seeds: [0]
baseline: plain
"""


def _sweep(out: Path, dry: bool, timeout: float) -> dict[str, Any]:
    """A two-run sweep on GPU 0 (``--gpus none`` in the dry run): did every run train on CUDA, on the GPU given?"""
    folder = out / "sweep"
    shutil.rmtree(folder, ignore_errors=True)  # a sweep folder keeps finished runs: this check starts afresh
    spec = out / "sweep.yaml"
    spec.write_text(SWEEP)
    gpus = "none" if dry else "0"
    args = ["sweep", str(spec), "-o", str(folder), "--gpus", gpus, "--threads", "1"]
    rc, secs = _run(_foldattn(*args), out / "sweep.log", timeout)
    want = "cpu" if dry else "cuda"
    runs: dict[str, Any] = {}
    for arm in ("plain", "asr-se"):
        summary, log = folder / "runs" / arm / "s0" / "summary.json", folder / "logs" / f"{arm}-s0.log"
        s = json.loads(summary.read_text()) if summary.is_file() else {}
        device = s.get("run", {}).get("device")
        given = dry or (log.is_file() and " on cuda 0\n" in log.read_text())  # the log header of each attempt
        runs[arm] = {"finished": s.get("finished") is True, "device": device, "given_gpu_0": given,
                     "ok": s.get("finished") is True and str(device).startswith(want) and given}
    return {"exit": rc, "seconds": round(secs), "command": shlex.join(["foldattn", *args]), "runs": runs,
            "ok": rc == 0 and all(r["ok"] for r in runs.values())}


def _markdown(report: dict[str, Any]) -> str:
    gpu = report["gpu"]
    lines = [f"# GPU check{' (dry run, CPU)' if report['dry_run'] else ''}", "",
             f"Command: `{report['command']}`; {report['date']}; GPU: {gpu.get('name', 'none')} "
             f"({gpu.get('memory_gib', '-')} GiB), torch {gpu['torch']}, CUDA {gpu['cuda']}.", "",
             "## 1. CUDA tier", ""]
    t = report["tier"]
    lines += [f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
              f"({t['seconds']} s){': ' + ', '.join(t['failed']) if t['failed'] else ''}.", "",
              "## 2. Cost (Table 1 style)", "", f"`{report['cost']['command']}`", "",
              "| attention | variant | params | latency b=1 ms (x plain) | images/s (x plain) |",
              "|---|---|---:|---:|---:|"]
    for r in report["cost"].get("rows", []):
        lines.append(f"| {r['attention']} | {r['variant']} | {r['params']:,} | {r['latency_ms_b1']:.2f} "
                     f"({r['ratio_latency']:.2f}x) | {r['images_per_s']:.0f} ({r['ratio_throughput']:.2f}x) |")
    tr = report["train"]
    lines += ["", "## 3. CIFAR-10 ResNet-56, the paper's recipe compressed", ""]
    if "skipped" in tr:
        lines.append(f"Skipped: {tr['skipped']}.")
    else:
        lines += [f"{tr['epochs']} epochs per variant.", "", "| variant | final top-1 | best top-1 | images/s | "
                  "params deployed | command |", "|---|---:|---:|---:|---:|---|"]
        for label, v in tr["variants"].items():
            if "final_top1" in v:
                lines.append(f"| {label} | {v['final_top1']:.2f} | {v['best_top1']:.2f} | {v['images_per_s']:.0f} | "
                             f"{v['params_deployed']:,} | `{v['command']}` |")
            else:
                lines.append(f"| {label} | failed (exit {v['exit']}) | | | | `{v['command']}` |")
    sw = report["sweep"]
    runs = "; ".join(f"{arm} {'finished' if r['finished'] else 'not finished'} on {r['device']}"
                     + ("" if r["given_gpu_0"] else " (its log does not show GPU 0)") for arm, r in sw["runs"].items())
    lines += ["", "## 4. `foldattn sweep --gpus`", "",
              f"`{sw['command']}`: exit {sw['exit']} in {sw['seconds']} s; {runs}: {'ok' if sw['ok'] else 'FAILED'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run every step at CPU size (no GPU needed)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--data", help="CIFAR-10 ImageFolder tree or cifar10-train-jpg.tar.gz (part 3)")
    p.add_argument("--train-budget-s", type=float, default=300.0, help="seconds for the three trainings [300]")
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    command = "bash benchmarks/gpu_check.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    print("1/4 CUDA tier", flush=True)
    tier = _tier(args.out, 300)
    print("2/4 cost (Table 1 style)", flush=True)
    cost = _cost(args.out, args.dry_run, 240)
    print("3/4 CIFAR-10 training", flush=True)
    train = _train(args.out, _data_root(args.data, args.out), args.dry_run, args.train_budget_s, 400)
    print("4/4 foldattn sweep --gpus", flush=True)
    sweep = _sweep(args.out, args.dry_run, 180)
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "dry_run": args.dry_run, "gpu": _gpu(), "tier": tier, "cost": cost, "train": train,
              "sweep": sweep,
              "skipped": [s for s in ([f"CUDA tier: {tier['skipped']} skipped"] if tier["skipped"] else [])
                          + ([train["skipped"]] if "skipped" in train else [])]}
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", _markdown(report))):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(args.out / name)
    print(_markdown(report))
    for s in report["skipped"]:
        print(f"skipped: {s}")
    failed = tier["failures"] + tier["errors"] or cost["exit"] or any(
        v.get("exit") for v in train.get("variants", {}).values()) or not sweep["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
