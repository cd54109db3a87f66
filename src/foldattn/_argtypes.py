"""argparse value types shared by every command and by the training options' declaration (private)."""

from __future__ import annotations

import argparse
import math
from typing import Any

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "split_value", "psi_init",
           "key_values"]


def _integer(low: int) -> Any:
    kind = "positive integer" if low == 1 else f"integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a {kind}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; give a {kind}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


#: whole numbers >= 1 and >= 0, refused by argparse itself (exit 2, one line)
positive_int = _integer(1)
nonnegative_int = _integer(0)


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
