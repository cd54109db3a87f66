"""argparse value types shared by every command and by the training options' declaration, and the
upper bounds of the counts they accept (private).

Every count a user gives that sets a size or a duration has an upper bound checked when the
command line is parsed, before anything is allocated or started (docs/decisions.md, "Bounds on
sizes and counts"); memory that depends on several options together is estimated before it is
allocated (:mod:`foldattn._sizes`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

__all__ = ["learning_rate", "MAX_LR", "positive_int", "nonnegative_int", "positive_float", "nonnegative_float",
           "split_value", "psi_init",
           "key_values", "bounded_int", "MAX_THREADS", "MAX_WORKERS", "MAX_EPOCHS", "MAX_TUNE_EPOCHS", "MAX_BATCH",
           "MAX_TRAIN_BATCH", "MAX_IMAGES", "MAX_SAMPLES", "MAX_REPS", "MAX_STEPS", "MAX_ACCUM_STEPS",
           "MAX_CONFIG_THREADS", "MAX_CLASSES", "MAX_SEED"]

#: threads (torch, ONNX Runtime) of a command run here: past 4 per core they only contend, and each is an
#: OS thread with its stack; 4096 of them made ``bench`` crawl and 100,000 took 6 GB
MAX_THREADS = min(256, 4 * (os.cpu_count() or 1))
#: threads a saved setting may hold (``train --threads``, a sweep file's ``threads``): the same bound, but
#: not this machine's, so that a config or checkpoint written on a larger machine still loads here
MAX_CONFIG_THREADS = 256
#: data-loading processes of ``train --stream`` (each a process holding a copy of the loader)
MAX_WORKERS = 64
#: training epochs (``train``): the paper's schedules are 164-300; more is a typo, or days of compute
MAX_EPOCHS = 10_000
#: fine-tuning / distillation epochs of ``calibrate`` (a recovery of a few epochs, not a training)
MAX_TUNE_EPOCHS = 1_000
#: one forward's batch (``bench``, ``stripe``, ``calibrate``, ``quantize``); its bytes are estimated too
MAX_BATCH = 4_096
#: ``train``'s global batch (large-batch recipes reach 32k-64k); its memory is the trainer's to check
MAX_TRAIN_BATCH = 65_536
#: images a command reads (``--max-images``, ``--calib-images``, ``--val-images``): ten ImageNets
MAX_IMAGES = 10_000_000
#: images whose attention vectors ``stripe`` keeps for its heat maps (each kept per layer, in the JSON)
MAX_SAMPLES = 1_024
#: timed samples and warm-up rounds of ``bench``
MAX_REPS = 1_000
#: batches accumulated into one optimizer update (``train --grad-accum-steps``)
MAX_ACCUM_STEPS = 1_024
#: classes of a model built by name (``stripe``/``calibrate --num-classes``): its classifier is allocated;
#: ImageNet-21k has 21,841
MAX_CLASSES = 100_000
#: seeds: what torch's generators take (a larger one overflowed in torch, a cryptic error)
MAX_SEED = 2**32 - 1
#: batches per epoch, optimizer steps and other step counts of ``train``
MAX_STEPS = 10_000_000


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    if low == 1:
        kind = "a positive integer" + (f" <= {high}" if high is not None else "")
    else:
        kind = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give {kind}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; give {kind}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is too large; give {kind}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]" if high is not None else f"integer >= {low}"
    return parse


def bounded_int(low: int, high: int | None) -> Callable[[str], int]:
    """An argparse type for a whole number in ``[low, high]`` (``high`` None: no upper bound, for values
    that size nothing): out of range is argparse's one-line refusal (exit 2) at parse time, before the
    command allocates or starts anything."""
    if high is not None and high < low:
        raise ValueError(f"bounded_int: high {high} < low {low}")
    return _integer(low, high)


#: whole numbers >= 1 and >= 0, refused by argparse itself (exit 2, one line)
positive_int = _integer(1)
nonnegative_int = _integer(0)


#: learning rates (``calibrate --lr/--distill-lr``; ``train --lr`` has the same bound): past float32's range
#: the update itself overflows
MAX_LR = 1e3


def learning_rate(text: str) -> float:
    """A learning rate: a finite number in (0, :data:`MAX_LR`]."""
    value = positive_float(text)
    if value > MAX_LR:
        raise argparse.ArgumentTypeError(f"{text} is too large; give a learning rate in (0, {MAX_LR:g}]")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def top1_points(text: str) -> float:
    """A number of top-1 points, in [0, 100] (``--max-drop``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points in [0, 100], got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a number of points in [0, 100], got {text}")
    return value


def split_value(text: str) -> float | int:
    """``--val-split``: a fraction in (0, 1) or a whole number of images >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.1) or a count (5000), got {text!r}") from None
    if 0 < value < 1:
        return value
    if value >= 1 and value.is_integer():
        return int(value)
    raise argparse.ArgumentTypeError(f"{text}: give a fraction in (0, 1) or a whole number of images >= 1")


def psi_init(text: str) -> float | str:
    """``--psi-init``: a finite number or ``random``."""
    if text == "random":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'random', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number or 'random', got {text}")
    return value


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def key_values(text: str) -> dict[str, Any]:
    """``k=v,k=v`` with numbers, booleans and ``none`` read as such (``--model-kwargs``)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value...], got {item!r}")
        out[key.strip()] = _scalar(value.strip())
    return out
