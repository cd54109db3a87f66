"""``foldattn bench``: what the plain backbone, +X, ASR(X) and its folded forms cost, side by side.

ASR (Zhong et al., arXiv 2304.06345) promises "the attention's accuracy at the backbone's
cost". The benchmark measures the cost half: for every model family and attention X, in
one run, the variants plain, +X, +ASR(X) (training form), +ASR(X) folded, folded+fuse_bn
and +ASR(X)+X folded (optionally ONNX Runtime rows): latency (batch 1), throughput
(batch 64), parameters, FLOPs, peak memory and one training step, each also as a ratio
to plain in the same group, interleaved and median-of-N; then PASS/FAIL target lines.
See ``docs/benchmarks.md`` for the method and its limits.

Run it with ``foldattn bench --quick`` (CI size) or ``foldattn bench --models cifar_resnet164
--attentions se --threads 1 --clock cpu --out runs/bench`` (``foldattn bench --help``).

Modules: :mod:`.family` (what is built: families, variants), :mod:`.config` (what is measured),
:mod:`.timing`, :mod:`.memory`, :mod:`.runner` (the run), :mod:`.targets` (the checks),
:mod:`.report` (schema, markdown, files).

Example:
    >>> from foldattn.bench import BenchConfig, run_bench, render_markdown
    >>> result = run_bench(BenchConfig(models=("cifar_resnet20",), attentions=("se",), reps=3))
    >>> print(render_markdown(result))
"""

from __future__ import annotations

from .config import QUICK, BenchConfig
from .family import (
    ONNX_ROWS,
    RUNTIMES,
    VARIANTS,
    Family,
    Variant,
    families,
    get_family,
    list_families,
    register_family,
    unregister_family,
)
from .memory import MIB, cpu_peak_supported
from .report import SCHEMA, render_markdown, validate_result, write_outputs
from .runner import bench_group, run_bench
from .targets import TARGETS, check_targets, profile_variant
from .timing import interleaved

__all__ = [
    "BenchConfig", "Family", "Variant", "register_family", "unregister_family", "list_families", "families",
    "get_family",
    "VARIANTS", "run_bench", "render_markdown", "check_targets", "validate_result", "write_outputs",
    "SCHEMA", "QUICK",
    # public names of the single-module bench, kept importable from the package
    "bench_group", "interleaved", "cpu_peak_supported", "profile_variant", "ONNX_ROWS", "RUNTIMES", "TARGETS", "MIB",
]
