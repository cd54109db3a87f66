"""``foldattn bench``: what the plain backbone, +X, ASR(X) and its folded forms cost, side by side.

ASR (Zhong et al., arXiv 2304.06345) promises "the attention's accuracy at the
backbone's cost". This module measures the cost half of that claim the way a
sceptical user would: for every model family and every attention X, in one run,

- the variants *plain*, *+X* (classic), *+ASR(X)* (training form), *+ASR(X) folded*,
  *+ASR(X) folded + fuse_bn* and *+ASR(X)+X folded* (optionally ONNX Runtime rows);
- inference latency (batch 1), throughput (batch 64), parameters, FLOPs, peak
  memory of one forward and the time of one training step (forward, backward, SGD);
- every figure also as a ratio to the plain backbone measured in the same group.

Timing: all runners of a group are interleaved (A B C, B C A, ... after warm-up
rounds), each sample is ``k`` calls (``k`` chosen during warm-up so a sample lasts at
least ``min_sample_s``), and the median of the samples is reported (quartiles in
the JSON). See ``docs/benchmarks.md`` for the method and its limits.

Example:
    >>> from foldattn.bench import BenchConfig, run_bench, render_markdown
    >>> result = run_bench(BenchConfig(models=("cifar_resnet20",), attentions=("se",), reps=3))
    >>> print(render_markdown(result))
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import attention as _attention
from .._utils import atomic_path, set_submodule
from ..asr import ASR, host_channels
from ..attach import attach, find_sites
from ..export import export_onnx
from ..fold import fold
from ..models import create_model, list_models
from ..summary import count_flops, count_params
from ..train.engine import training_step

__all__ = [
    "BenchConfig", "Family", "Variant", "register_family", "families", "get_family", "VARIANTS",
    "run_bench", "render_markdown", "check_targets", "validate_result", "write_outputs", "register",
    "SCHEMA", "QUICK",
]

SCHEMA = "foldattn.bench/1"
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------
# model families: name -> how to build plain / +X / ASR(X) / ASR(X)+X
# ----------------------------------------------------------------------------------------
Builder = Callable[[str | None, bool, bool], nn.Module]


@dataclass(frozen=True)
class Family:
    """A backbone the benchmark knows how to build with and without attention.

    Args:
        name: the name given to ``--models``.
        input_size: ``(C, H, W)`` of one input image.
        build: ``build(attention, asr, both)`` returns the model: no attention when
            ``attention`` is None, classic X, ASR(X), or ASR(X)+X.
        train_batch: default batch size of the training-step measurement.
        num_classes: classifier outputs (labels of the training step).
    """

    name: str
    input_size: tuple[int, int, int]
    build: Builder
    train_batch: int = 64
    num_classes: int = 10


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` available to :func:`run_bench` and ``--models``."""
    if family.name in _FAMILIES:
        raise ValueError(f"bench family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def families() -> list[str]:
    """Sorted names accepted by ``--models``."""
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family ``name``; a ``ValueError`` lists the valid names."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(families())}")
    return _FAMILIES[name]


def _foldattn_builder(name: str) -> Builder:
    def build(attention: str | None, asr: bool, both: bool) -> nn.Module:
        return create_model(name, num_classes=10, attention=attention, asr=asr, both=both)

    return build


class _StageAttention:
    """Creates classic attention modules; DIA modules of equal width are chained (``previous=``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.previous: _attention.ChannelAttention | None = None

    def __call__(self, channels: int) -> _attention.ChannelAttention:
        kwargs: dict[str, Any] = {}
        if _attention.get(self.name) is _attention.DIA:
            same = self.previous is not None and self.previous.channels == channels
            kwargs["previous"] = self.previous if same else None
        module = _attention.create(self.name, channels, **kwargs)
        self.previous = module
        return module


def _attach_builder(factory: Callable[[], nn.Module]) -> Builder:
    """Builder that puts X / ASR(X) where :func:`foldattn.attach` puts ASR (``where="block"``).

    ASR(X): ``foldattn.attach(model, X)``: the last layer of every residual branch before
    the addition (``bn3`` of a torchvision Bottleneck, ``bn2`` of a BasicBlock), SE-ResNet's
    place. Classic X: the same sites (``foldattn.find_sites``) become ``nn.Sequential(layer, X)``.
    ASR(X)+X: both, from the same site list.
    """

    def build(attention: str | None, asr: bool, both: bool) -> nn.Module:
        model = factory()
        if attention is None:
            return model
        sites = [site.name for site in find_sites(model, "block").sites]
        if asr:
            model = attach(model, attention, "block", inplace=True)
        if both or not asr:
            classic = _StageAttention(attention)
            for name in sites:
                layer = model.get_submodule(name)
                host = layer.host if isinstance(layer, ASR) else layer
                set_submodule(model, name, nn.Sequential(layer, classic(host_channels(host))))
        return model

    return build


def _torchvision(arch: str) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)

    return factory


for _name in list_models():
    register_family(Family(_name, (3, 32, 32), _foldattn_builder(_name), train_batch=64, num_classes=10))
for _arch in ("resnet18", "resnet50"):
    register_family(Family(_arch, (3, 224, 224), _attach_builder(_torchvision(_arch)), train_batch=16,
                           num_classes=1000))


# ----------------------------------------------------------------------------------------
# variants: what is measured for each attention X
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One form of the network, built from a family and an attention name."""

    key: str
    label: str  # "{X}" is replaced by the attention's name
    build: Callable[[Family, str], nn.Module]
    trains: bool = False  # its training step is measured

    def title(self, attention: str) -> str:
        return self.label.replace("{X}", attention.upper())


VARIANTS: tuple[Variant, ...] = (
    Variant("plain", "plain", lambda f, a: f.build(None, False, False), trains=True),
    Variant("x", "+{X}", lambda f, a: f.build(a, False, False), trains=True),
    Variant("asr", "+ASR({X}) train form", lambda f, a: f.build(a, True, False), trains=True),
    Variant("asr_folded", "+ASR({X}) folded", lambda f, a: fold(f.build(a, True, False))),
    Variant("asr_fused", "+ASR({X}) folded+fuse_bn", lambda f, a: fold(f.build(a, True, False), fuse_bn=True)),
    Variant("asr_x_folded", "+ASR({X})+{X} folded", lambda f, a: fold(f.build(a, True, True))),
)
_VARIANT = {v.key: v for v in VARIANTS}
#: ONNX Runtime rows: (key, label, the PyTorch variant that is exported)
ONNX_ROWS: tuple[tuple[str, str, str], ...] = (
    ("ort_plain", "plain (ONNX Runtime)", "plain"),
    ("ort_asr_folded", "+ASR({X}) folded (ONNX Runtime)", "asr"),  # export_onnx folds it
)


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_bench` measures and how.

    Args:
        models: family names (see :func:`families`).
        attentions: attention names (see :func:`foldattn.attention.names`); empty = all.
        latency_batch: batch size of the latency measurement.
        throughput_batch: batch size of the throughput measurement.
        train_batch: batch of the training step; None = the family's default.
        reps: timed samples per runner (the median is reported).
        warmup: untimed interleaved rounds before timing.
        min_sample_s: a sample repeats the call until it lasts at least this long.
        threads: CPU threads (``torch.set_num_threads``, ONNX Runtime intra-op); None = torch's default.
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        channels_last: models and inputs in ``torch.channels_last``.
        memory: measure peak memory of a forward and a training step.
        train: measure the training step.
        onnx: add ONNX Runtime rows for the exported plain and folded models.
        clock: ``"wall"`` (elapsed time) or ``"cpu"`` (CPU time of this process, all
            threads: steadier on a shared machine, meaningful with ``threads=1``; CPU only).
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
    clock: str = "wall"
    seed: int = 0

    def validated(self) -> BenchConfig:
        """A copy with defaults resolved; ``ValueError`` for bad input (saying what is valid)."""
        if not self.models:
            raise ValueError(f"no model given; valid models: {', '.join(families())}")
        for m in self.models:
            get_family(m)
        attentions = tuple(a.lower() for a in self.attentions) or tuple(_attention.names())
        for a in attentions:
            _attention.get(a)
        for key in ("latency_batch", "throughput_batch", "train_batch", "reps", "threads"):
            value = getattr(self, key)
            if value is None and key in ("train_batch", "threads"):
                continue
            if not _is_positive_int(value):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not _is_nonnegative_int(self.warmup):
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if not (isinstance(self.min_sample_s, (int, float)) and self.min_sample_s >= 0):
            raise ValueError(f"min_sample_s must be a number >= 0, got {self.min_sample_s!r}")
        dev = _check_device(self.device)
        if self.clock not in _CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; valid clocks: {', '.join(_CLOCKS)}")
        if self.clock == "cpu" and dev.type != "cpu":
            raise ValueError("--clock cpu measures CPU time and misses GPU work; use --clock wall with --device cuda")
        return replace(self, attentions=attentions, models=tuple(self.models))


#: the settings of ``--quick`` (CI): a tiny model, two attentions, few samples
QUICK = BenchConfig(
    models=("cifar_resnet20",), attentions=("se", "eca"), throughput_batch=32, train_batch=16,
    reps=3, warmup=1, min_sample_s=0.01,
)


_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_nonnegative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported by the benchmark; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device} requested but CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, "
                f"{torch.cuda.device_count()} GPU(s) visible); run with --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _stats(samples: Sequence[float]) -> dict[str, float | int]:
    """Median and quartiles of per-call times, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "n": len(ms)}


def interleaved(
    runners: dict[str, Callable[[], object]],
    reps: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    min_sample_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each runner ``reps`` times, interleaved, after ``warmup`` untimed rounds (at least one).

    Round ``i`` runs the runners in a rotated order (A B C, B C A, C A B, ...) so no
    runner always follows the same neighbour. A sample repeats its runner ``k`` times,
    ``k`` fixed per runner from the last warm-up call so a sample lasts about
    ``min_sample_s``; the per-call time of each sample is returned, in seconds.
    ``clock`` is wall time by default; ``time.process_time`` measures the CPU time of
    the process instead, which other processes on a shared machine disturb less.
    """
    keys = list(runners)
    calls = dict.fromkeys(keys, 1)
    for _ in range(max(1, warmup)):
        for k in keys:
            t0 = clock()
            runners[k]()
            sync()
            dt = clock() - t0
            calls[k] = max(1, min(1000, math.ceil(min_sample_s / max(dt, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(reps):
        for k in keys[i % len(keys):] + keys[: i % len(keys)]:
            run, n = runners[k], calls[k]
            t0 = clock()
            for _ in range(n):
                run()
            sync()
            samples[k].append((clock() - t0) / n)
    return samples


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------
_PEAK_RESET = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _proc_kib(field_name: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"{field_name} not in {_STATUS}")


def cpu_peak_supported() -> bool:
    """True where the peak resident set can be reset (Linux >= 4.0 ``clear_refs`` 5)."""
    try:
        _PEAK_RESET.write_text("5")
        _proc_kib("VmHWM")
        return True
    except OSError:
        return False


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Memory a call needs above what was resident before it (one warm-up call first).

    CUDA: ``max_memory_allocated`` above ``memory_allocated`` (caching allocator).
    CPU: the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``)
    above its resident set just before the call. Meant for a fresh process started
    with a fixed ``MALLOC_MMAP_THRESHOLD_`` so large freed buffers go back to the OS.
    """
    fn()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    before = _proc_kib("VmRSS")
    _PEAK_RESET.write_text("5")
    fn()
    return max(0, _proc_kib("VmHWM") - before) * 1024


def _memory_worker() -> None:
    """Entry point of the memory subprocess: JSON spec on stdin, JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    family, attention = get_family(spec["family"]), spec["attention"]
    device = torch.device(cfg.device)
    warnings.filterwarnings("ignore")
    out: dict[str, dict[str, int | None]] = {}
    for key in spec["variants"]:
        torch.manual_seed(cfg.seed)
        model = _prepare(_VARIANT[key].build(family, attention), cfg, device)
        xb = _inputs(family, cfg.throughput_batch, cfg, device)
        with torch.inference_mode():
            infer = _peak_bytes(lambda m=model, x=xb: m(x), device)
        train = None
        if _VARIANT[key].trains and cfg.train:
            step, _ = _train_step(model, family, spec["train_batch"], cfg, device)
            train = _peak_bytes(step, device)
        out[key] = {"inference": infer, "train": train}
        del model
        gc.collect()
    print(json.dumps(out))


def _memory_subprocess(family: Family, attention: str, cfg: BenchConfig, train_batch: int,
                       threads: int) -> tuple[dict[str, dict[str, int | None]] | None, str | None]:
    spec = {"config": asdict(cfg), "family": family.name, "attention": attention, "threads": threads,
            "variants": [v.key for v in VARIANTS], "train_batch": train_batch}
    env = dict(os.environ)
    # a fixed threshold turns off glibc's adaptive one: buffers >= 64 KiB are mmapped and
    # returned to the OS when freed, so the resident set follows the live tensors
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "from foldattn.bench import _memory_worker; _memory_worker()"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        return None, "memory subprocess timed out"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return None, f"memory subprocess failed ({proc.returncode}): {tail[0]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


# ----------------------------------------------------------------------------------------
# one group: a family and one attention X
# ----------------------------------------------------------------------------------------
def _prepare(model: nn.Module, cfg: BenchConfig, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _inputs(family: Family, batch: int, cfg: BenchConfig, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(cfg.seed + batch)
    x = torch.randn(batch, *family.input_size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _train_step(model: nn.Module, family: Family, batch: int, cfg: BenchConfig,
                device: torch.device) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """A closure doing forward + cross-entropy + backward + SGD step on fixed random data."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = _inputs(family, batch, cfg, device)
    g = torch.Generator().manual_seed(cfg.seed)
    y = torch.randint(0, family.num_classes, (batch,), generator=g).to(device)

    def step() -> None:
        training_step(model, x, y, opt)

    return step, opt


@contextlib.contextmanager
def _onnx_sessions(models: dict[str, nn.Module], family: Family, cfg: BenchConfig, threads: int,
                   batches: Sequence[int]) -> Iterator[dict[tuple[str, int], Callable[[], object]]]:
    """ONNX Runtime runners ``(row key, batch) -> run`` for the exported models (temp files).

    Exported with :func:`foldattn.export_onnx` (folds ASR layers, TorchScript exporter,
    checks the file with onnxruntime against PyTorch), one file per batch size.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("--onnx needs onnxruntime: pip install 'foldattn[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if cfg.device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--onnx with --device cuda needs onnxruntime-gpu (no CUDAExecutionProvider here)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    runners: dict[tuple[str, int], Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="foldattn-bench-") as tmp:
        for row, _, source in ONNX_ROWS:
            model = models[source].cpu().float().eval()
            for batch in batches:
                path = Path(tmp) / f"{row}-{batch}.onnx"
                x = _inputs(family, batch, replace(cfg, device="cpu", channels_last=False), torch.device("cpu"))
                with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                    warnings.simplefilter("ignore")
                    export_onnx(model, (x,), path, input_names=["x"], output_names=["y"], opset_version=17)
                sess = ort.InferenceSession(str(path), opts, providers=providers)
                feed = {"x": x.numpy()}
                runners[(row, batch)] = lambda s=sess, f=feed: s.run(None, f)
            models[source].to(cfg.device)
            if cfg.channels_last:
                models[source].to(memory_format=torch.channels_last)
        yield runners


def bench_group(family: Family, attention: str, cfg: BenchConfig, threads: int,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every variant of ``family`` with attention ``attention``; one JSON-able group."""
    device = torch.device(cfg.device)
    sync = _sync_for(device)
    train_batch = cfg.train_batch or family.train_batch
    models: dict[str, nn.Module] = {}
    for v in VARIANTS:
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[v.key] = _prepare(v.build(family, attention), cfg, device)
    x1 = _inputs(family, cfg.latency_batch, cfg, device)
    xb = _inputs(family, cfg.throughput_batch, cfg, device)
    flops_x = _inputs(family, 1, replace(cfg, channels_last=False), device)
    rows: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        m = models[v.key]
        rows[v.key] = {"variant": v.key, "label": v.title(attention), "params": count_params(m),
                       "flops": count_flops(m, flops_x)}
    for key, label, _ in ONNX_ROWS if cfg.onnx else ():
        rows[key] = {"variant": key, "label": label.replace("{X}", attention.upper()), "params": None, "flops": None}

    with contextlib.ExitStack() as stack:
        ort_runners = (
            stack.enter_context(_onnx_sessions(models, family, cfg, threads,
                                               (cfg.latency_batch, cfg.throughput_batch)))
            if cfg.onnx else {}
        )
        for what, batch, x in (("latency", cfg.latency_batch, x1), ("throughput", cfg.throughput_batch, xb)):
            log(f"  {what} (batch {batch})")
            runners: dict[str, Callable[[], object]] = {k: (lambda m=m, x=x: m(x)) for k, m in models.items()}
            runners.update({row: run for (row, b), run in ort_runners.items() if b == batch})
            with torch.inference_mode():
                samples = interleaved(runners, cfg.reps, cfg.warmup, sync, cfg.min_sample_s, _CLOCKS[cfg.clock])
            for key, s in samples.items():
                st = _stats(s)
                rows[key][f"{what}_ms"] = st
                if what == "throughput":
                    rows[key]["throughput_ips"] = batch / (st["median"] / 1e3)

    for key in rows:
        rows[key].setdefault("train_ms", None)
        rows[key]["memory_mib"] = rows[key]["train_memory_mib"] = None
    if cfg.train:
        log(f"  training step (batch {train_batch})")
        steps = {v.key: _train_step(models[v.key], family, train_batch, cfg, device)[0] for v in VARIANTS if v.trains}
        for key, s in interleaved(steps, cfg.reps, cfg.warmup, sync, clock=_CLOCKS[cfg.clock]).items():
            rows[key]["train_ms"] = _stats(s)
    del models
    gc.collect()

    note = None
    if cfg.memory:
        log("  peak memory")
        mem: dict[str, dict[str, int | None]] | None
        if device.type == "cuda":
            mem = _memory_in_process(family, attention, cfg, device, train_batch)
        elif cpu_peak_supported():
            mem, note = _memory_subprocess(family, attention, cfg, train_batch, threads)
        else:
            mem, note = None, "peak memory needs Linux /proc/self/clear_refs; not measured"
        for key, m in (mem or {}).items():
            rows[key]["memory_mib"] = m["inference"] / MIB
            rows[key]["train_memory_mib"] = None if m["train"] is None else m["train"] / MIB
    _add_ratios(rows)
    return {"family": family.name, "attention": attention, "input_size": list(family.input_size),
            "train_batch": train_batch if cfg.train else None, "rows": list(rows.values()), "note": note}


def _memory_in_process(family: Family, attention: str, cfg: BenchConfig, device: torch.device,
                       train_batch: int) -> dict[str, dict[str, int | None]]:
    out: dict[str, dict[str, int | None]] = {}
    for v in VARIANTS:
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _prepare(v.build(family, attention), cfg, device)
        xb = _inputs(family, cfg.throughput_batch, cfg, device)
        with torch.inference_mode():
            infer = _peak_bytes(lambda m=model, x=xb: m(x), device)
        train = None
        if v.trains and cfg.train:
            train = _peak_bytes(_train_step(model, family, train_batch, cfg, device)[0], device)
        out[v.key] = {"inference": infer, "train": train}
        del model
    return out


_RATIO_FIELDS = {  # figure -> how to read it from a row
    "params": lambda r: r["params"],
    "flops": lambda r: r["flops"],
    "latency": lambda r: r["latency_ms"]["median"] if r.get("latency_ms") else None,
    "throughput": lambda r: r.get("throughput_ips"),
    "memory": lambda r: r.get("memory_mib"),
    "train": lambda r: r["train_ms"]["median"] if r.get("train_ms") else None,
    "train_memory": lambda r: r.get("train_memory_mib"),
}


def _add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """``ratio[figure] = value / plain's value`` (same group, same run); None where undefined."""
    plain = rows["plain"]
    for row in rows.values():
        ratios: dict[str, float | None] = {}
        for name, get in _RATIO_FIELDS.items():
            a, b = get(row), get(plain)
            ratios[name] = None if a is None or not b else a / b
        row["ratio"] = ratios


# ----------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _machine(cfg: BenchConfig, threads: int) -> dict[str, Any]:
    dev = torch.device(cfg.device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError, AttributeError):
        info["load_before"] = list(os.getloadavg())
    return info


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda s: None,
              command: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (see :func:`validate_result` for its schema)."""
    cfg = config.validated()
    t_start = time.perf_counter()
    user_log = log

    def log(message: str) -> None:
        user_log(f"[{time.perf_counter() - t_start:6.0f} s] {message}")

    old_threads = torch.get_num_threads()
    threads = cfg.threads or old_threads
    torch.set_num_threads(threads)
    try:
        machine = _machine(cfg, threads)
        started = _dt.datetime.now(_dt.timezone.utc)
        groups = []
        for name in cfg.models:
            family = get_family(name)
            for attention in cfg.attentions:
                log(f"{name} / {attention}")
                groups.append(bench_group(family, attention, cfg, threads, log))
        with contextlib.suppress(OSError, AttributeError):
            machine["load_after"] = list(os.getloadavg())
    finally:
        torch.set_num_threads(old_threads)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1),
        "config": asdict(cfg),
        "machine": machine,
        "groups": groups,
    }
    result["targets"] = check_targets(result)
    validate_result(result)
    return result


# ----------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------
#: (name, variant, figure, comparison, threshold, description)
TARGETS: tuple[tuple[str, str, str, str, float, str], ...] = (
    ("folded_speed_latency", "asr_folded", "latency", ">=", 0.98, "ASR(X) folded speed at batch {lb}"),
    ("folded_speed_throughput", "asr_folded", "throughput", ">=", 0.98, "ASR(X) folded speed at batch {tb}"),
    ("fused_faster_latency", "asr_fused", "latency", ">", 1.0, "ASR(X) folded+fuse_bn speed at batch {lb}"),
    ("asr_train_step", "asr", "train", "<=", 1.05, "ASR(X) training step time"),
)


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, one entry per group: speed = plain time / variant time."""
    cfg = result["config"]
    out = []
    for g in result["groups"]:
        rows = {r["variant"]: r for r in g["rows"]}
        for name, variant, figure, op, threshold, desc in TARGETS:
            ratio = rows[variant]["ratio"].get(figure)
            if ratio is None:
                continue
            # speed targets compare plain/variant time; the training target compares time/plain
            value = 1.0 / ratio if figure == "latency" else ratio
            passed = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold}[op]
            text = desc.format(lb=cfg["latency_batch"], tb=cfg["throughput_batch"]).replace(
                "X", g["attention"].upper())
            unit = "x plain time" if figure == "train" else "x plain speed"
            out.append({
                "name": name, "family": g["family"], "attention": g["attention"], "value": value,
                "op": op, "threshold": threshold, "passed": bool(passed),
                "text": f"{'PASS' if passed else 'FAIL'} {g['family']}: {text} = {value:.3f}{unit} "
                        f"(target {op} {threshold})",
            })
    return out


# ----------------------------------------------------------------------------------------
# profiles of missed targets
# ----------------------------------------------------------------------------------------
_TARGET_WORK = {"latency": "latency_batch", "throughput": "throughput_batch", "train": None}


def profile_variant(family: Family, attention: str, variant: str, what: str, cfg: BenchConfig,
                    calls: int = 3, row_limit: int = 12) -> dict[str, str]:
    """``torch.profiler`` tables (ops by self CPU time) of plain and ``variant`` doing ``what``.

    Args:
        what: ``"latency"`` / ``"throughput"`` (an inference forward at that batch) or
            ``"train"`` (one training step).
        calls: profiled calls, after two warm-up calls.

    Returns:
        ``{variant key: table text}`` for ``"plain"`` and ``variant``.
    """
    cfg = cfg.validated()
    device = torch.device(cfg.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tables = {}
    for key in ("plain", variant):
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _prepare(_VARIANT[key].build(family, attention), cfg, device)
        if what == "train":
            fn: Callable[[], object] = _train_step(model, family, cfg.train_batch or family.train_batch, cfg, device)[0]
            mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            x = _inputs(family, getattr(cfg, _TARGET_WORK[what]), cfg, device)
            fn, mode = (lambda m=model, x=x: m(x)), torch.inference_mode()
        with mode:
            fn()
            fn()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(calls):
                    fn()
                _sync_for(device)()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[key] = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    return tables


def _profile_failures(result: dict[str, Any], cfg: BenchConfig, log: Callable[[str], None]) -> None:
    variants = {name: (variant, figure) for name, variant, figure, *_ in TARGETS}
    result["profiles"] = []
    for t in result["targets"]:
        if t["passed"]:
            continue
        variant, figure = variants[t["name"]]
        log(f"profiling {t['family']} / {t['attention']}: {variant} vs plain ({figure})")
        tables = profile_variant(get_family(t["family"]), t["attention"], variant, figure, cfg)
        result["profiles"].append({"target": t["text"], "family": t["family"], "attention": t["attention"],
                                   "variant": variant, "work": figure, "tables": tables})


# ----------------------------------------------------------------------------------------
# output: schema check, markdown, files
# ----------------------------------------------------------------------------------------
_ROW_KEYS = {"variant": str, "label": str, "params": (int, type(None)), "flops": (int, type(None)),
             "latency_ms": dict, "throughput_ms": dict, "throughput_ips": (int, float),
             "train_ms": (dict, type(None)), "memory_mib": (int, float, type(None)),
             "train_memory_mib": (int, float, type(None)), "ratio": dict}
_STAT_KEYS = ("median", "q1", "q3", "n")


def validate_result(result: object) -> None:
    """Check that ``result`` follows the ``foldattn.bench/1`` JSON schema; ``ValueError`` lists every problem."""
    problems: list[str] = []

    def need(obj: object, key: str, types: Any, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            problems.append(f"{where}: missing {key!r}")
            return None
        if not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
            return None
        return obj[key]

    if not isinstance(result, dict):
        raise ValueError(f"bench result must be a JSON object, got {type(result).__name__}")
    if result.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA!r}, got {result.get('schema')!r}")
    for key, types in (("date", str), ("config", dict), ("machine", dict), ("groups", list), ("targets", list)):
        need(result, key, types, "result")
    for key in ("latency_batch", "throughput_batch"):
        need(result.get("config"), key, int, "config")
    need(result.get("machine"), "cpu", str, "machine")
    for i, g in enumerate(result.get("groups") or []):
        where = f"groups[{i}]"
        need(g, "family", str, where)
        need(g, "attention", str, where)
        rows = need(g, "rows", list, where) or []
        variants = [r.get("variant") for r in rows if isinstance(r, dict)]
        missing = [v.key for v in VARIANTS if v.key not in variants]
        if missing:
            problems.append(f"{where}: missing variants {missing}")
        for j, r in enumerate(rows):
            rw = f"{where}.rows[{j}]"
            for key, types in _ROW_KEYS.items():
                val = need(r, key, types, rw)
                if isinstance(val, dict) and key.endswith("_ms"):
                    for s in _STAT_KEYS:
                        x = need(val, s, (int, float), f"{rw}.{key}")
                        if x is not None and (not math.isfinite(x) or x < 0):
                            problems.append(f"{rw}.{key}.{s}: not a finite non-negative number ({x})")
            ratio = r.get("ratio") if isinstance(r, dict) else None
            for name in _RATIO_FIELDS:
                need(ratio, name, (int, float, type(None)), f"{rw}.ratio")
            if isinstance(r, dict) and r.get("variant") == "plain" and isinstance(ratio, dict):
                off = [k for k, v in ratio.items() if v is not None and abs(v - 1.0) > 1e-12]
                if off:
                    problems.append(f"{rw}: plain's ratios to itself must be 1, not for {off}")
    for i, prof in enumerate(result.get("profiles") or []):
        need(prof, "tables", dict, f"profiles[{i}]")
    for i, t in enumerate(result.get("targets") or []):
        for key, types in (("name", str), ("passed", bool), ("value", (int, float)), ("text", str)):
            need(t, key, types, f"targets[{i}]")
    if problems:
        raise ValueError("bench result does not follow the schema: " + "; ".join(problems))


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _count_cell(n: int | None, ratio: float | None) -> str:
    return "-" if n is None else f"{_fmt_count(n)} ({ratio:.3f}x)" if ratio is not None else _fmt_count(n)


def _cell(value: float | None, ratio: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}} ({ratio:.2f}x)" if ratio is not None else f"{value:{fmt}}"


def render_markdown(result: dict[str, Any]) -> str:
    """The result as markdown: a header (command, machine, date, load) and one table per model."""
    cfg, mach = result["config"], result["machine"]
    lb, tb = cfg["latency_batch"], cfg["throughput_batch"]
    lines = []
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    load = ""
    if "load_before" in mach:
        load = f"; load average before {mach['load_before'][0]:.2f}"
        if "load_after" in mach:
            load += f", after {mach['load_after'][0]:.2f}"
    where = mach.get("gpu") or f"{mach['cpu']}, {mach['cores']} cores"
    lines += [
        f"Machine: {where}; device {mach['device']}, {mach['threads']} thread(s); torch {mach['torch']}{load}.",
        f"Date: {result['date']} ({result['seconds']} s). Median of {cfg['reps']} interleaved samples after "
        f"{cfg['warmup']} warm-up round(s), {cfg.get('clock', 'wall')} clock; (x) = ratio to plain in the same group."
        + (" channels_last." if cfg["channels_last"] else ""),
        "FLOPs: torch.utils.flop_counter.FlopCounterMode at batch 1 (matmuls and convolutions, 2 per multiply-add; "
        "elementwise work such as BatchNorm, activations and gating products is not counted).",
        "",
    ]
    by_family: dict[str, list[dict[str, Any]]] = {}
    for g in result["groups"]:
        by_family.setdefault(g["family"], []).append(g)
    for fam, groups in by_family.items():
        size = "x".join(str(s) for s in groups[0]["input_size"][1:])
        tr = groups[0].get("train_batch")
        lines += [
            f"### {fam} ({size})",
            "",
            f"| variant | params | FLOPs (b=1) | latency b={lb} ms | throughput b={tb} img/s | "
            f"peak mem b={tb} MiB | train step b={tr or '-'} ms | peak train mem MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in groups:
            for r in g["rows"]:
                q = r["ratio"]
                lines.append("| " + " | ".join([
                    r["label"] if r["variant"] != "plain" else f"plain ({g['attention'].upper()} group)",
                    _count_cell(r["params"], q["params"]), _count_cell(r["flops"], q["flops"]),
                    _cell(r["latency_ms"]["median"], q["latency"], ".2f"),
                    _cell(r["throughput_ips"], q["throughput"], ".1f"),
                    _cell(r["memory_mib"], q["memory"], ".1f"),
                    _cell(r["train_ms"]["median"] if r["train_ms"] else None, q["train"], ".1f"),
                    _cell(r["train_memory_mib"], q["train_memory"], ".1f"),
                ]) + " |")
            if g.get("note"):
                lines.append(f"| note: {g['note']} |||||||")
        lines.append("")
    if result["targets"]:
        lines += ["Targets (speed = plain time / variant time):", "", "```"]
        lines += [t["text"] for t in result["targets"]]
        lines += ["```", ""]
    for prof in result.get("profiles") or []:
        lines += [f"Profile for `{prof['target']}` (torch.profiler, ops by self time):", ""]
        for key, table in prof["tables"].items():
            lines += [f"{key}:", "", "```", table.rstrip(), "```", ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir`` (created), each atomically."""
    validate_result(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "bench.json", out / "bench.md"
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(render_markdown(result))
    return paths
