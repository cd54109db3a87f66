"""The sweep file: arms (sets of ``foldattn train`` options) x seeds, checked before anything runs.

::

    base: [--recipe, digits, --epochs, "3"]     # options every arm gets
    arms:
      plain: []
      asr-se: [--attention, se, --asr]
      psi-1: {args: [--attention, se, --asr, --psi-init, "1"], seeds: [0, 1]}   # its own seeds
    seeds: [0, 1]
    baseline: plain                             # paired differences are taken against it
    contrasts: [[asr-se, psi-1]]                # more paired differences, first arm minus second (optional)
    jobs: 2                                     # runs at a time (optional; --jobs overrides)
    threads: 1                                  # torch threads per run (optional; --threads overrides)
    slurm: {partition: gpu, time: 240}          # --launcher slurm's job options (optional; --slurm overrides)

``${NAME}`` in a value is replaced by the environment variable ``NAME`` (a data path that
differs per machine); an unset variable is an error. Every arm's command line is parsed by
``foldattn train``'s own parser and its configuration validated, so an unknown option, a bad
value, an arm that repeats another or a missing data folder stops the sweep before any run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._argtypes import MAX_CONFIG_THREADS
from .._files import load_yaml_file

__all__ = ["Arm", "Run", "SweepSpec", "SweepError", "load_sweep", "parse_sweep", "parse_slurm", "SLURM_KEYS",
           "MAX_GPU_IDS", "MAX_GPUS_PER_RUN", "OWNED_OPTIONS", "MAX_SEEDS",
           "MAX_ARMS", "MAX_RUNS", "MAX_JOBS"]

#: seeds of the file (and of one arm): a paired comparison needs tens, not thousands
MAX_SEEDS = 1_000
#: arms of the file (each is parsed and validated, and is a folder of runs)
MAX_ARMS = 1_000
#: runs (every arm x its seeds): each is a training process and a folder, listed by --dry-run
MAX_RUNS = 10_000
#: training processes at a time (``jobs``): each holds a model, its data and its threads
MAX_JOBS = 64
#: GPU ids ``sweep --gpus`` may name (each id below this too)
MAX_GPU_IDS = 1_024
#: GPUs of one run (``--gpus-per-run``, a ``slurm:`` block's ``gpus_per_node``): the ranks of one DDP run on a node
MAX_GPUS_PER_RUN = 64

_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,63}")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KEYS = {"base", "arms", "seeds", "baseline", "contrasts", "jobs", "threads", "slurm"}
#: the keys of a ``slurm:`` block (and of ``sweep --slurm KEY=VALUE``): an integer's (low, high), or the pattern
#: a text value must match (each becomes an ``#SBATCH`` line: no spaces, quotes or line breaks get through)
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,+\-]{1,128}")
SLURM_KEYS: dict[str, tuple[int, int] | re.Pattern[str]] = {
    "partition": _SLURM_NAME,
    "time": (1, 30 * 24 * 60),  # minutes: 30 days
    "gpus_per_node": (0, MAX_GPUS_PER_RUN),
    "cpus_per_task": (1, 1_024),
    "mem_gb": (1, 4_096),
    "constraint": re.compile(r"[A-Za-z0-9_.,+\-&|\[\]*():!]{1,256}"),
    "account": _SLURM_NAME,
    "qos": _SLURM_NAME,
    "max_timeouts": (0, 100),  # time limits a run may reach (each requeues it) before it counts as failed
    "executor": re.compile(r"slurm|local"),  # local: submitit's LocalExecutor (the SLURM path on one machine)
}
#: options the sweep sets for every run itself (TrainConfig/argparse dest -> the option)
OWNED_OPTIONS = {"output": "-o/--output", "seed": "--seed", "resume": "--resume", "threads": "--threads",
                 "config": "-c/--config", "allow_config_change": "--allow-config-change", "progress": "--progress",
                 "overwrite": "--overwrite"}
#: configuration fields that do not change what a run computes (two arms differing only here repeat each other)
_RUNTIME = {"output", "seed", "threads", "progress", "tensorboard", "data_dir", "cache_dir", "download", "workers",
            "compile", "device"}


class SweepError(ValueError):
    """The sweep file or its output folder cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Arm:
    """One set of ``foldattn train`` options, run once per seed."""

    name: str
    args: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Run:
    """One (arm, seed) training run."""

    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}-s{self.seed}"

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.arm / f"s{self.seed}"

    def log(self, out: Path) -> Path:
        return out / "logs" / f"{self.key}.log"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, checked sweep file."""

    base: tuple[str, ...]
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    baseline: str | None = None
    jobs: int = 1
    threads: int = 0
    #: (first, second) arm pairs whose paired difference (first minus second, seed by seed) is summarised
    contrasts: tuple[tuple[str, str], ...] = ()
    #: the ``slurm:`` block, checked (:func:`parse_slurm`): how ``--launcher slurm`` submits each run
    slurm: tuple[tuple[str, Any], ...] = ()

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def runs(self) -> list[Run]:
        """Every (arm, seed), seed-major: each finished seed is a complete comparison."""
        shared = set(self.seeds)
        by_seed: dict[int, list[str]] = {}  # linear in the runs: a sweep may hold thousands
        for a in self.arms:
            for s in a.seeds:
                by_seed.setdefault(s, []).append(a.name)
        order = sorted(by_seed, key=lambda s: (s not in shared, s))
        return [Run(name, s) for s in order for name in by_seed[s]]

    def train_args(self, run: Run) -> list[str]:
        """``foldattn train`` arguments of ``run``, without output, threads and resume."""
        return [*self.base, *self.arm(run.arm).args, "--seed", str(run.seed)]

    def to_dict(self) -> dict[str, Any]:
        return {"base": list(self.base), "seeds": list(self.seeds), "baseline": self.baseline,
                "arms": {a.name: {"args": list(a.args), "seeds": list(a.seeds)} for a in self.arms}}


def _expand(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SweepError(f"{where}: expected option strings (or numbers), got {type(value).__name__} {value!r}")
    text = str(value)

    def env(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise SweepError(f"{where}: ${{{name}}} is not set; export {name}=... before running the sweep")
        return os.environ[name]

    return _ENV.sub(env, text)


def _args(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SweepError(f"{where}: expected a list of options such as [--attention, se, --asr], got {value!r}")
    return tuple(_expand(v, where) for v in value)


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise SweepError(f"{where}: expected a non-empty list of seeds such as [0, 1], got {_short(value)}")
    if len(value) > MAX_SEEDS:  # before looking at each: the count alone decides
        raise SweepError(f"{where}: {len(value):,} seeds; at most {MAX_SEEDS:,} (each is a training run per arm)")
    seen: set[int] = set()  # a set: the duplicate check is linear
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**31:
            raise SweepError(f"{where}: seeds are integers in [0, 2^31), got {_short(s)}")
        if s in seen:
            raise SweepError(f"{where}: seed {s} is listed twice")
        seen.add(s)
    return tuple(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _count(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SweepError(f"{where}: expected an integer in [{low}, {high}], got {_short(value)}")
    return value


def _contrasts(value: Any, arms: Sequence[str], where: str) -> tuple[tuple[str, str], ...]:
    example = "e.g. [[asr-se, asr-scale]]"
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SweepError(f"{where}: expected a list of arm pairs, {example}; got {value!r}")
    out: list[tuple[str, str]] = []
    for pair in value:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise SweepError(f"{where}: each contrast is a pair of arm names, {example}; got {pair!r}")
        first, second = pair
        for name in (first, second):
            if name not in arms:
                raise SweepError(f"{where}: {name!r} is not an arm; arms: {', '.join(arms)}")
        if first == second:
            raise SweepError(f"{where}: [{first}, {second}] compares an arm with itself; name two arms")
        if (first, second) in out or (second, first) in out:
            raise SweepError(f"{where}: [{first}, {second}] is listed twice")
        out.append((first, second))
    return tuple(out)


def parse_sweep(data: Any, source: str = "sweep file") -> SweepSpec:
    """Check the structure of a loaded sweep document (not yet the options; see :func:`check_options`)."""
    if not isinstance(data, Mapping):
        raise SweepError(f"{source}: expected a mapping with base, arms, seeds and baseline")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {', '.join(unknown)}; a sweep file has {', '.join(sorted(_KEYS))}")
    if "arms" not in data or "seeds" not in data:
        raise SweepError(f"{source}: needs 'arms' (name: [options]) and 'seeds' ([0, 1, ...])")
    base = _args(data.get("base"), f"{source}: base")
    seeds = _seeds(data["seeds"], f"{source}: seeds")
    arms_in = data["arms"]
    if not isinstance(arms_in, Mapping) or not arms_in:
        raise SweepError(f"{source}: arms must map arm names to option lists, e.g. {{plain: [], asr-se: [--attention, "
                         "se, --asr]}}")
    if len(arms_in) > MAX_ARMS:
        raise SweepError(f"{source}: {len(arms_in):,} arms; at most {MAX_ARMS:,}")
    arms = []
    for name, value in arms_in.items():
        if not isinstance(name, str) or not _ARM_NAME.fullmatch(name):
            raise SweepError(f"{source}: arm name {name!r}: use letters, digits, '_', '.', '+' or '-' (it names a "
                             "folder)")
        where = f"{source}: arm {name!r}"
        if isinstance(value, Mapping):
            extra = sorted(str(k) for k in value if k not in ("args", "seeds"))
            if extra:
                raise SweepError(f"{where}: unknown key(s) {', '.join(extra)}; an arm has args and seeds")
            arm_seeds = _seeds(value["seeds"], f"{where}: seeds") if "seeds" in value else seeds
            arms.append(Arm(name, _args(value.get("args"), where), arm_seeds))
        else:
            arms.append(Arm(name, _args(value, where), seeds))
    runs = sum(len(a.seeds) for a in arms)
    if runs > MAX_RUNS:
        raise SweepError(f"{source}: {len(arms)} arms x their seeds are {runs:,} runs; at most {MAX_RUNS:,} (each is a "
                         "training process): split the sweep or use fewer seeds")
    baseline = data.get("baseline")
    if baseline is not None and baseline not in {a.name for a in arms}:
        raise SweepError(f"{source}: baseline {baseline!r} is not an arm; arms: {', '.join(a.name for a in arms)}")
    contrasts = _contrasts(data.get("contrasts"), [a.name for a in arms], f"{source}: contrasts")
    jobs = _count(data.get("jobs", 1), f"{source}: jobs", 1, MAX_JOBS)
    threads = _count(data.get("threads", 0), f"{source}: threads", 0, MAX_CONFIG_THREADS)
    slurm = parse_slurm(data.get("slurm") or {}, f"{source}: slurm")
    return SweepSpec(base, tuple(arms), seeds, baseline, jobs, threads, contrasts, slurm)


def parse_slurm(value: Any, where: str) -> tuple[tuple[str, Any], ...]:
    """Check a ``slurm:`` block (or ``--slurm KEY=VALUE`` pairs): known keys, integers in their bounds (a text
    of digits counts, as the command line gives it), names made of the characters SLURM's options use."""
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: expected a mapping such as {{partition: gpu, time: 240}}, got {_short(value)}")
    out: list[tuple[str, Any]] = []
    for key, item in value.items():
        rule = SLURM_KEYS.get(key) if isinstance(key, str) else None
        if rule is None:
            raise SweepError(f"{where}: unknown key {_short(key)}; the keys are {', '.join(SLURM_KEYS)}")
        if isinstance(rule, tuple):
            if isinstance(item, str) and item.isascii() and item.isdigit() and len(item) <= 12:
                item = int(item)
            out.append((key, _count(item, f"{where}: {key}{' (minutes)' if key == 'time' else ''}", *rule)))
        elif isinstance(item, str) and rule.fullmatch(item):
            out.append((key, item))
        else:
            what = {"executor": "slurm or local",
                    "constraint": "a feature expression (letters, digits, _ . , + - & | [ ] * ( ) : !)"}.get(
                key, "a name (letters, digits, _ . , + -)")
            raise SweepError(f"{where}: {key}: expected {what}, got {_short(item)}")
    return tuple(out)


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read (bounded, no YAML aliases), parse and check a sweep file, options included."""
    spec = parse_sweep(load_yaml_file(path, "sweep file"), f"sweep file {path}")
    check_options(spec)
    return spec


def _parse_train(args: Sequence[str], where: str) -> Any:
    import argparse

    from ..train.arguments import add_train_arguments

    parser = argparse.ArgumentParser(prog="foldattn train")
    add_train_arguments(parser)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(list(args))
        except SystemExit:
            pass
    lines = [x for x in err.getvalue().strip().splitlines() if x and not x.startswith("usage:")
             and not x.startswith(" ")]
    message = lines[-1].split("error:", 1)[-1].strip() if lines else "the options do not parse"
    raise SweepError(f"{where}: {message}")


def check_options(spec: SweepSpec) -> None:
    """Parse every arm with ``foldattn train``'s parser and validate its configuration: unknown
    options, bad values, options the sweep sets itself, arms that repeat another, missing data."""
    from ..train.arguments import config_from_args

    seen: dict[tuple[tuple[str, Any], ...], str] = {}
    for arm in spec.arms:
        where = f"arm {arm.name!r}"
        ns = _parse_train([*spec.base, *arm.args], where)
        owned = [flag for dest, flag in OWNED_OPTIONS.items() if getattr(ns, dest, None) not in (None, False)]
        if owned:
            raise SweepError(f"{where}: {', '.join(owned)} are set by the sweep for every run (output folder, seed, "
                             "threads); remove them from the sweep file")
        try:
            cfg = config_from_args(ns)
            cfg.validate()
        except (ValueError, TypeError) as e:
            raise SweepError(f"{where}: {e}") from None
        _check_model(cfg, where)
        folder = cfg.dataset.partition("imagefolder:")[2] if cfg.dataset.startswith("imagefolder:") else None
        if folder is not None and not Path(folder).is_dir():
            raise SweepError(f"{where}: dataset folder {folder} does not exist")
        key = tuple(sorted((k, repr(v)) for k, v in cfg.to_dict().items() if k not in _RUNTIME))
        if key in seen:
            raise SweepError(f"{where} repeats arm {seen[key]!r}: both train with the same options; remove one "
                             "or change its options")
        seen[key] = arm.name


def _check_model(cfg: Any, where: str) -> None:
    """Cross-option rules of the model (e.g. --psi-init without ASR), built on the meta device: no memory."""
    import torch

    from ..train.model import build_model

    try:
        with torch.device("meta"):
            build_model(cfg, 10)
    except (ValueError, TypeError) as e:
        raise SweepError(f"{where}: {str(e).splitlines()[0]}") from None
    except Exception:
        pass
