"""What a benchmark run measures and how: :class:`BenchConfig`, its checks, and the ``--quick`` settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import attention as _attention
from .._argtypes import MAX_BATCH, MAX_REPS, MAX_THREADS
from .family import RUNTIMES, families, get_family
from .timing import _CLOCKS, _check_device

__all__ = ["BenchConfig", "QUICK"]


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`~foldattn.bench.run_bench` measures and how.

    Args:
        models: family names (see :func:`~foldattn.bench.families`).
        attentions: attention names (see :func:`foldattn.attention.names`); empty = all.
        latency_batch: batch size of the latency measurement.
        throughput_batch: batch size of the throughput measurement.
        train_batch: batch of the training step; None = the family's default.
        reps: timed samples per runner (the median is reported).
        warmup: untimed interleaved rounds before timing.
        min_sample_s: a sample repeats the call until it lasts at least this long.
        threads: CPU threads (``torch.set_num_threads``, ONNX Runtime intra-op); None = 1 on CPU (the
            steadiest figures on a shared machine), torch's default with CUDA.
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        channels_last: models and inputs in ``torch.channels_last``.
        memory: measure peak memory of a forward and a training step.
        train: measure the training step.
        onnx: add ONNX Runtime rows for the exported plain, +X and folded models (``runtimes`` with "ort").
        runtimes: where the deployed models are timed besides eager PyTorch: ``"ort"`` (ONNX Runtime,
            exported with :func:`foldattn.export_onnx`), ``"ort-int8"`` (quantized by
            :func:`foldattn.quantize.quantize_onnx`, per-channel, calibrated on the benchmark's random
            inputs: a cost figure, not an accuracy one), ``"compile"`` (``torch.compile``, where it works),
            ``"openvino"`` / ``"openvino-int8"`` (OpenVINO's CPU plugin, f32 / quantized by NNCF) and
            ``"executorch"`` / ``"executorch-int8"`` (XNNPACK, f32 / quantized by the PT2E flow); the INT8 rows
            are calibrated like ``"ort-int8"``.
        clock: ``"wall"`` (elapsed time), ``"cpu"`` (CPU time of this process, all
            threads: steadier on a shared machine, meaningful with ``threads=1``; CPU only) or
            ``"cuda"`` (CUDA events: the GPU's time; CUDA only); None = ``"cuda"`` on a GPU,
            ``"cpu"`` on CPU with one thread, else ``"wall"``.
        seed: seed of the weights and inputs.
    """

    models: tuple[str, ...] = ("cifar_resnet164", "resnet50")
    attentions: tuple[str, ...] = ()
    latency_batch: int = 1
    throughput_batch: int = 64
    train_batch: int | None = None
    reps: int = 7
    warmup: int = 2
    min_sample_s: float = 0.1
    threads: int | None = None
    device: str = "cpu"
    channels_last: bool = False
    memory: bool = True
    train: bool = True
    onnx: bool = False
    runtimes: tuple[str, ...] = ()
    clock: str | None = None
    seed: int = 0

    def validated(self) -> BenchConfig:
        """A copy with defaults resolved; ``ValueError`` for bad input (saying what is valid)."""
        if not self.models:
            raise ValueError(f"no model given; valid models: {', '.join(families())}")
        for m in self.models:
            get_family(m)
        classic = tuple(a for a in _attention.names() if _attention.get(a).has_classic_form)
        attentions = tuple(a.lower() for a in self.attentions) or classic
        for a in attentions:
            if not _attention.get(a).has_classic_form:
                raise ValueError(f"attention {a!r} has no input-dependent form, and the benchmark compares +X with "
                                 f"ASR(X); choose from {', '.join(classic)}")
        highs = {"latency_batch": MAX_BATCH, "throughput_batch": MAX_BATCH, "train_batch": MAX_BATCH,
                 "reps": MAX_REPS, "threads": MAX_THREADS}
        for key, high in highs.items():
            value = getattr(self, key)
            if value is None and key in ("train_batch", "threads"):
                continue
            if not _is_positive_int(value) or value > high:
                raise ValueError(f"{key} must be a positive integer <= {high}, got {value!r}")
        if not _is_nonnegative_int(self.warmup) or self.warmup > MAX_REPS:
            raise ValueError(f"warmup must be an integer in [0, {MAX_REPS}], got {self.warmup!r}")
        # a sample repeats its call until it lasts this long: past a minute a benchmark runs for days
        if not (isinstance(self.min_sample_s, (int, float)) and 0 <= self.min_sample_s <= 60):
            raise ValueError(f"min_sample_s must be a number in [0, 60], got {self.min_sample_s!r}")
        dev = _check_device(self.device)
        threads = self.threads if self.threads is not None or dev.type != "cpu" else 1
        default = "cuda" if dev.type == "cuda" else ("cpu" if threads == 1 else "wall")
        clock = self.clock if self.clock is not None else default
        if clock not in _CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; valid clocks: {', '.join(_CLOCKS)}")
        if clock == "cpu" and dev.type != "cpu":
            raise ValueError("--clock cpu measures CPU time and misses GPU work; use --clock cuda (or wall) with "
                             "--device cuda")
        if clock == "cuda" and dev.type != "cuda":
            raise ValueError("--clock cuda times with CUDA events and needs --device cuda; use cpu or wall on the CPU")
        runtimes = tuple(dict.fromkeys(r for r in (*self.runtimes, *(("ort",) if self.onnx else ())) if r != "eager"))
        unknown = [r for r in runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime(s) {', '.join(unknown)}; valid: eager, {', '.join(RUNTIMES)}")
        return replace(self, attentions=attentions, models=tuple(self.models), threads=threads, clock=clock,
                       runtimes=runtimes, onnx="ort" in runtimes)


#: the settings of ``--quick`` (CI): a tiny model, two attentions, few samples
QUICK = BenchConfig(
    models=("cifar_resnet20",), attentions=("se", "eca"), throughput_batch=32, train_batch=16,
    reps=3, warmup=1, min_sample_s=0.01,
)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_nonnegative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
