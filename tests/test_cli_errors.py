"""Bad command-line input: exit status 2, one line naming what is wrong, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from foldattn.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(digits_asr_run: Path) -> Path:
    return digits_asr_run


@pytest.fixture(scope="module")
def one_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one") / "tree"
    (root / "only").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(root / "only" / f"{i}.png")
    return root


TRAIN = ["train", "--dataset", "digits", "--steps-per-epoch", "1", "--batch-size", "8", "--no-progress"]

# (id, argv after the command's base, text the one-line message must contain)
TRAIN_CASES = [
    ("epochs-0", ["--epochs", "0"], "--epochs: 0 is too small"),
    ("epochs-negative", ["--epochs", "-3"], "--epochs: -3 is too small"),
    ("steps-0", ["--epochs", "1", "--steps-per-epoch", "0"], "--steps-per-epoch: 0 is too small"),
    ("gamma-negative", ["--epochs", "2", "--gamma", "-0.5", "--schedule", "step", "--milestones", "1"], "--gamma"),
    ("threads-negative", ["--epochs", "1", "--threads", "-1"], "--threads: -1 is too small"),
    ("workers-negative", ["--epochs", "1", "--workers", "-2"], "--workers: -2 is too small"),
    ("warmup-negative", ["--epochs", "1", "--warmup-epochs", "-1"], "--warmup-epochs"),
    ("warmup-too-long", ["--epochs", "1", "--warmup-epochs", "5"], "--warmup-epochs"),
    ("batch-0", ["--epochs", "1", "--batch-size", "0"], "--batch-size: 0 is too small"),
    ("smoothing-1.5", ["--epochs", "1", "--label-smoothing", "1.5"], "--label-smoothing"),
    ("smoothing-negative", ["--epochs", "1", "--label-smoothing", "-0.1"], "--label-smoothing"),
    ("lr-0", ["--epochs", "1", "--lr", "0"], "--lr 0"),
    ("lr-nan", ["--epochs", "1", "--lr", "nan"], "--lr"),
    ("momentum-1", ["--epochs", "1", "--momentum", "1"], "--momentum"),
    ("device-unknown", ["--epochs", "1", "--device", "tpu7"], "--device 'tpu7'"),
    ("milestones-with-cosine", ["--epochs", "3", "--milestones", "1"], "only the step schedule"),
    ("milestone-past-end", ["--epochs", "2", "--schedule", "step", "--milestones", "5"], "< --epochs"),
    ("val-split-0", ["--epochs", "1", "--val-split", "0"], "--val-split"),
    ("timm-unknown", ["--epochs", "1", "--model", "timm:no_such_net"], "no_such_net"),
    ("asr-without-attention", ["--epochs", "1", "--asr"], "need --attention"),
    ("psi-init-word", ["--epochs", "1", "--attention", "se", "--asr", "--psi-init", "rand"], "--psi-init"),
    ("psi-init-inf", ["--epochs", "1", "--attention", "se", "--asr", "--psi-init", "inf"], "--psi-init"),
    ("scale-without-asr", ["--epochs", "1", "--attention", "scale"], "no input-dependent form"),
    ("layer-scale-zero", ["--epochs", "1", "--model", "cifar_vit_tiny", "--model-kwargs", "layer_scale=0"],
     "layer_scale"),
    ("preserve-without-asr", ["--epochs", "1", "--preserve-outputs"], "--preserve-outputs"),
    ("where-on-own-model", ["--epochs", "1", "--attention", "se", "--asr", "--where", "norms"], "--where"),
    ("pretrained-missing", ["--epochs", "1", "--pretrained", "/nonexistent/w.pt"], "no such file"),
    ("every-0", ["--epochs", "1", "--attention", "se", "--every", "0"], "--every: 0 is too small"),
    ("sync-bn-one-process", ["--epochs", "1", "--sync-bn"], "--sync-bn"),
    # the modern-recipe options
    ("sched-unknown", ["--epochs", "1", "--sched", "linear"], "--sched"),
    ("sched-and-schedule", ["--epochs", "1", "--sched", "cosine", "--schedule", "step"], "give one of them"),
    ("sched-step-without-decay", ["--epochs", "2", "--sched", "step"], "--decay-epochs"),
    ("decay-epochs-without-step", ["--epochs", "2", "--decay-epochs", "1"], "only --sched step"),
    ("multistep-without-milestones", ["--epochs", "2", "--sched", "multistep"], "needs milestones"),
    ("min-lr-without-sched", ["--epochs", "1", "--min-lr", "0.001"], "--min-lr"),
    ("min-lr-above-lr", ["--epochs", "1", "--sched", "cosine", "--min-lr", "1", "--lr", "0.1"], "below --lr"),
    ("patience-without-plateau", ["--epochs", "1", "--patience-epochs", "3"], "only --sched plateau"),
    ("ema-decay-1", ["--epochs", "1", "--model-ema", "--model-ema-decay", "1"], "--model-ema-decay"),
    ("ema-decay-0", ["--epochs", "1", "--model-ema", "--model-ema-decay", "0"], "copy of the weights"),
    ("psi-init-without-asr", ["--epochs", "1", "--psi-init", "0.3"], "--psi-init 0.3"),
    ("psi-init-with-classic-attention", ["--epochs", "1", "--attention", "se", "--psi-init", "0.3"], "--psi-init"),
    ("every-without-attention", ["--epochs", "1", "--every", "2"], "--every place attention"),
    ("include-without-attention", ["--epochs", "1", "--model", "torchvision:resnet18", "--include", "layer1*"],
     "--include place attention"),
    ("ema-decay-without-ema", ["--epochs", "1", "--model-ema-decay", "0.99"], "add --model-ema"),
    ("mixup-negative", ["--epochs", "1", "--mixup", "-1"], "--mixup"),
    ("mixup-odd-batch", ["--epochs", "1", "--mixup", "0.2", "--batch-size", "7"], "even batch"),
    ("mixup-prob-without-mixup", ["--epochs", "1", "--mixup-prob", "0.5"], "mixing is off"),
    ("mixup-prob-2", ["--epochs", "1", "--mixup", "0.2", "--mixup-prob", "2"], "--mixup-prob"),
    ("aa-garbage", ["--epochs", "1", "--aa", "nonsense"], "--aa 'nonsense'"),
    ("aa-malformed-rand", ["--epochs", "1", "--aa", "rand-mX"], "--aa 'rand-mX'"),
    ("reprob-2", ["--epochs", "1", "--reprob", "2"], "--reprob"),
    ("accum-0", ["--epochs", "1", "--grad-accum-steps", "0"], "--grad-accum-steps"),
    ("accum-more-than-steps", ["--epochs", "1", "--grad-accum-steps", "4", "--steps-per-epoch", "2"],
     "--steps-per-epoch"),
    ("drop-path-1", ["--epochs", "1", "--model", "cifar_vit_tiny", "--drop-path", "1"], "--drop-path"),
    ("drop-path-on-resnet", ["--epochs", "1", "--drop-path", "0.1"], "no stochastic depth"),
    ("model-kwargs-clash", ["--epochs", "1", "--model-kwargs", "num_classes=3"], "--model-kwargs num_classes"),
    ("sched-onecycle-too-short", ["--epochs", "1", "--sched", "onecycle"], "--sched onecycle"),
    # options that would do nothing with the data or optimizer given
    ("image-size-on-digits", ["--epochs", "1", "--image-size", "64"], "--image-size"),
    ("cache-dir-on-digits", ["--epochs", "1", "--cache-dir", "{tmp}/cache"], "--cache-dir"),
    ("workers-without-stream", ["--epochs", "1", "--workers", "2"], "--workers 2"),
    ("download-on-digits", ["--epochs", "1", "--download"], "--download"),
    ("nesterov-with-adamw", ["--epochs", "1", "--opt", "adamw", "--nesterov"], "--nesterov"),
    ("momentum-with-adamw", ["--epochs", "1", "--opt", "adamw", "--momentum", "0.5"], "--momentum"),
    ("val-split-fractional-count", ["--epochs", "1", "--val-split", "2.5"], "--val-split"),
    # upper bounds (issue 32): counts that would run for days or allocate past any machine, refused at parse
    ("epochs-huge", ["--epochs", "1000000000"], "--epochs: 1000000000 is too large; give a positive integer <= 10000"),
    ("batch-huge", ["--epochs", "1", "--batch-size", "100000000"], "--batch-size: 100000000 is too large"),
    ("steps-huge", ["--epochs", "1", "--steps-per-epoch", "100000000"], "--steps-per-epoch: 100000000 is too large"),
    ("threads-huge", ["--epochs", "1", "--threads", "100000"], "--threads: 100000 is too large"),
    ("workers-huge", ["--epochs", "1", "--stream", "--workers", "100000"], "--workers: 100000 is too large"),
    ("accum-huge", ["--epochs", "1", "--grad-accum-steps", "100000"], "--grad-accum-steps: 100000 is too large"),
    ("patience-huge", ["--epochs", "1", "--sched", "plateau", "--patience-epochs", "100000"],
     "--patience-epochs: 100000 is too large"),
    ("stripe-every-huge", ["--epochs", "1", "--stripe-every", "100000"], "--stripe-every: 100000 is too large"),
    ("warmup-huge", ["--epochs", "1", "--warmup-epochs", "1e9"], "--warmup-epochs 1000000000.0: must be a number in"),
    ("decay-epochs-huge", ["--epochs", "2", "--sched", "step", "--decay-epochs", "1e9"], "--decay-epochs"),
    # a config file is bounded by the same declarations (validate, before anything runs)
    ("config-file-epochs-huge", ["-c", "{tmp}/huge.yaml"], "--epochs 1000000000: must be at most 10000"),
]


def _check(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str, out: Path | None = None) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert any(expected in line for line in lines), err
    assert len([line for line in lines if "error" in line]) == 1, err  # one message, not a cascade
    if out is not None:
        assert not out.exists(), f"{out} was created by a refused command"


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    out = tmp_path / "out"
    (tmp_path / "huge.yaml").write_text("epochs: 1000000000\n")
    _check(capsys, [*TRAIN, *[a.format(tmp=tmp_path) for a in argv], "-o", str(out)], expected, out)


def test_train_refuses_a_one_class_dataset(tmp_path: Path, one_class: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _check(capsys, ["train", "--dataset", f"imagefolder:{one_class}", "--val-split", "2", "--epochs", "1",
                    "--no-progress", "-o", str(out)], "at least 2", None)
    assert not (out / "last.pt").exists()


OTHER_CASES = [
    ("eval-batch-0", ["eval", "{run}", "--batch-size", "0"], "--batch-size"),
    ("eval-missing", ["eval", "{tmp}/none.pt"], "does not exist"),
    ("eval-foreign-without-dataset", ["eval", "{tmp}/x.pth", "--model", "cifar_resnet20"], "needs --dataset"),
    ("fold-missing", ["fold", "{tmp}/none.pt", "-o", "{tmp}/o"], "does not exist"),
    ("fold-attention-without-model", ["fold", "{run}", "--attention", "se", "-o", "{tmp}/o"], "needs --model"),
    ("export-opset", ["export", "{run}", "--onnx", "{tmp}/m.onnx", "--opset", "99"], "opset_version=99"),
    ("export-nothing", ["export", "{run}"], "give --onnx"),
    ("export-pt2-suffix", ["export", "{run}", "--pt2", "{tmp}/m.zip"], "must end in .pt2"),
    ("calibrate-bench-batch-0", ["calibrate", "{run}", "--bench-batch", "0", "-o", "{tmp}/c"], "--bench-batch"),
    ("calibrate-lr-negative", ["calibrate", "{run}", "--lr", "-1", "-o", "{tmp}/c"], "--lr"),
    ("demo-epochs-0", ["demo", "--epochs", "0", "-o", "{tmp}/d"], "--epochs"),
    ("demo-threads-negative", ["demo", "--threads", "-1", "-o", "{tmp}/d"], "--threads"),
    ("stripe-val-split-fractional-count", ["stripe", "cifar_resnet20", "--attention", "se", "--val-split", "2.5",
                                           "-o", "{tmp}/s"], "--val-split"),
    ("stripe-num-classes-0", ["stripe", "cifar_resnet20", "--attention", "se", "--num-classes", "0", "-o", "{tmp}/s"],
     "--num-classes"),
    ("export-onnx-suffix", ["export", "{run}", "--onnx", "{tmp}/m.txt"], "must end in .onnx"),
    ("fold-ema-without-ema", ["fold", "{run}", "--ema", "-o", "{tmp}/o"], "no EMA weights"),
    ("bench-out-is-a-file", ["bench", "--quick", "--out", "{run}/last.pt"], "is a file"),
    ("bench-out-under-a-file", ["bench", "--quick", "--out", "{run}/last.pt/sub"], "which is a file"),
    ("calibrate-no-input-dependent-attention", ["calibrate", "{run}", "-o", "{tmp}/c"], "no input-dependent"),
    ("stripe-no-input-dependent-attention", ["stripe", "cifar_resnet20", "--dataset", "digits", "--max-images", "8",
                                             "--samples", "0", "-o", "{tmp}/s"], "no input-dependent"),
]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_other_commands_refuse(tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                               expected: str) -> None:
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"


def test_out_of_memory_is_one_line_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # a real allocation failure, now that no option reaches one (the batch a bench measures is bounded first):
    # a batch of 10^8 CIFAR images is 1.1 TiB
    def allocate(*args: object, **kwargs: object) -> None:
        torch.empty(10**8, 3, 32, 32)

    monkeypatch.setattr("foldattn.cli.bench.run_bench", allocate)
    argv = ["bench", "--models", "cifar_resnet20", "--attentions", "se", "--no-train", "--no-memory", "--reps", "1",
            "--warmup", "0", "--out", str(tmp_path / "b")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("foldattn bench: error: out of CPU memory (it asked for 1144.41 GiB); lower what sets")
    assert "the batch size" in line and "image size" in line
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


# --------------------------------------------------------------------------------------
# Sizes and counts bounded before anything is allocated (issue 32): one line, exit 2, nothing written,
# and no case allocates what it refuses (the process's peak memory grows by far less than the refused size)
# --------------------------------------------------------------------------------------
BOUND_CASES = [
    # a size from a file: the verify / check batch of a recorded 8192x8192 image (19 GB before)
    ("fold-recorded-8192", ["fold", "{big}", "-o", "{tmp}/o"], "pass --image-size N"),
    ("export-recorded-8192", ["export", "{big}", "--onnx", "{tmp}/o/m.onnx"], "pass --image-size N"),
    ("fold-image-size-huge", ["fold", "{run}", "--image-size", "100000", "-o", "{tmp}/o"], "<= 8192"),
    ("fold-image-size-largest", ["fold", "{run}", "--image-size", "8192", "-o", "{tmp}/o"], "the verify batch"),
    # threads
    ("quantize-threads", ["quantize", "{run}", "-o", "{tmp}/q", "--threads", "100000"],
     "--threads: 100000 is too large"),
    ("bench-threads", ["bench", "--quick", "--threads", "4096", "--out", "{tmp}/b"], "--threads: 4096 is too large"),
    # batches and their memory
    ("bench-throughput-batch", ["bench", "--quick", "--throughput-batch", "1000000", "--out", "{tmp}/b"],
     "--throughput-batch: 1000000 is too large; give a positive integer <= 4096"),
    ("bench-latency-batch", ["bench", "--quick", "--latency-batch", "1000000", "--out", "{tmp}/b"],
     "--latency-batch: 1000000 is too large"),
    ("bench-throughput-memory", ["bench", "--models", "resnet50", "--attentions", "se", "--throughput-batch", "4096",
                                 "--out", "{tmp}/b"], "lower --throughput-batch"),
    ("bench-train-memory", ["bench", "--models", "resnet50", "--attentions", "se", "--train-batch", "2048",
                            "--out", "{tmp}/b"], "lower --train-batch"),
    ("bench-reps", ["bench", "--quick", "--reps", "1000000", "--out", "{tmp}/b"], "--reps: 1000000 is too large"),
    ("bench-warmup", ["bench", "--quick", "--warmup", "1000000", "--out", "{tmp}/b"], "--warmup: 1000000 is too large"),
    ("quantize-batch", ["quantize", "{run}", "-o", "{tmp}/q", "--batch-size", "1000000"],
     "--batch-size: 1000000 is too large"),
    ("quantize-calib-images", ["quantize", "{run}", "-o", "{tmp}/q", "--calib-images", "1000000000"],
     "--calib-images: 1000000000 is too large"),
    ("quantize-val-images", ["quantize", "{run}", "-o", "{tmp}/q", "--val-images", "1000000000"],
     "--val-images: 1000000000 is too large"),
    ("quantize-max-drop", ["quantize", "{run}", "-o", "{tmp}/q", "--max-drop", "1000"], "--max-drop"),
    ("stripe-samples", ["stripe", "cifar_resnet20", "--attention", "se", "--samples", "100000000", "--max-images", "64",
                        "-o", "{tmp}/s"], "--samples: 100000000 is too large"),
    ("stripe-batch", ["stripe", "cifar_resnet20", "--attention", "se", "--batch-size", "1000000", "-o", "{tmp}/s"],
     "--batch-size: 1000000 is too large"),
    ("stripe-max-images", ["stripe", "cifar_resnet20", "--attention", "se", "--max-images", "1000000000",
                           "-o", "{tmp}/s"], "--max-images: 1000000000 is too large"),
    ("stripe-num-classes", ["stripe", "cifar_resnet20", "--attention", "se", "--num-classes", "1000000000",
                            "-o", "{tmp}/s"], "--num-classes: 1000000000 is too large"),
    ("stripe-seed", ["stripe", "cifar_resnet20", "--attention", "se", "--seed", "99999999999999999999999",
                     "-o", "{tmp}/s"], "--seed: 99999999999999999999999 is too large"),
    ("bench-seed", ["bench", "--quick", "--seed", "-5", "--out", "{tmp}/b"], "--seed: -5 is too small"),
    # epochs: a duration
    ("calibrate-distill-epochs", ["calibrate", "{run}", "--distill-epochs", "1000000000", "-o", "{tmp}/c"],
     "--distill-epochs: 1000000000 is too large; give an integer in [0, 1000]"),
    ("calibrate-bench-batch-above-batch", ["calibrate", "{run}", "--bench-batch", "200", "--batch-size", "128",
                                           "-o", "{tmp}/c"], "--bench-batch 200: at most --batch-size (128)"),
    ("calibrate-distill-lr", ["calibrate", "{run}", "--distill-epochs", "1", "--distill-lr", "1e9", "-o", "{tmp}/c"],
     "--distill-lr: 1e9 is too large; give a learning rate in (0, 1000]"),
    ("calibrate-lr-nan", ["calibrate", "{run}", "--finetune-epochs", "1", "--lr", "nan", "-o", "{tmp}/c"],
     "--lr: must be a finite number > 0"),
    ("calibrate-finetune-epochs", ["calibrate", "{run}", "--finetune-epochs", "1000000", "-o", "{tmp}/c"],
     "--finetune-epochs: 1000000 is too large"),
    ("calibrate-bench-batch", ["calibrate", "{run}", "--bench-batch", "1000000", "-o", "{tmp}/c"],
     "--bench-batch: 1000000 is too large"),
    ("calibrate-max-images", ["calibrate", "{run}", "--max-images", "1000000000", "-o", "{tmp}/c"],
     "--max-images: 1000000000 is too large"),
]


def _peak_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in BOUND_CASES], ids=[c[0] for c in BOUND_CASES])
def test_sizes_and_counts_are_bounded_before_allocation(tmp_path: Path, run: Path, recorded_8192: Path,
                                                        argv: list[str],
                                                        expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(run=run, big=recorded_8192, tmp=tmp_path) for a in argv]
    peak = _peak_kib()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing may be written"
    assert _peak_kib() - peak < 1 << 20, "the refused size was allocated (the peak grew by over 1 GiB)"


MEMORY_CASES = [
    ("stripe", ["stripe", "cifar_resnet20", "--attention", "se", "--batch-size", "512", "-o", "{tmp}/s"],
     "lower --batch-size"),
    ("calibrate", ["calibrate", "{run}", "--batch-size", "256", "--distill-epochs", "1", "-o", "{tmp}/c"],
     "lower --batch-size"),
    ("quantize", ["quantize", "{run}", "-o", "{tmp}/q"], "lower --calib-images and --val-images"),
    ("bench", ["bench", "--quick", "--out", "{tmp}/b"], "lower --throughput-batch"),
    ("fold", ["fold", "{run}", "--image-size", "256", "-o", "{tmp}/o"], "pass --image-size N"),
    ("train", ["train", "--epochs", "1", "--batch-size", "512", "-o", "{tmp}/t"], "lower --batch-size"),
]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in MEMORY_CASES], ids=[c[0] for c in MEMORY_CASES])
def test_batches_are_estimated_against_the_memory_limit(tmp_path: Path, run: Path, argv: list[str], expected: str,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate is wired into every command that makes batches: with the limit lowered to 1 MiB, a
    small real batch is refused in one line naming what to lower, and nothing is written."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("foldattn._sizes.MAX_BATCH_BYTES", 1 << 20)
    code = main([a.format(run=run, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error") == 1 and expected in err and "over the limit of 1 MiB" in err, err
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_out_of_memory_messages() -> None:
    from foldattn.cli import out_of_memory

    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB")
    assert out_of_memory(gpu).startswith("out of GPU memory (it asked for 2.00 GiB); lower what sets the size")
    assert out_of_memory(MemoryError()).startswith("out of CPU memory; lower")
    assert out_of_memory(RuntimeError("shape mismatch")) is None  # other errors keep their traceback
