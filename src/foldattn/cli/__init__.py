"""The ``foldattn`` command line: every command in one place, a module each under ``foldattn.cli``,
each adding its sub-parser through ``register(subparsers)`` (the modules listed in ``_COMMANDS``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "CLIError", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float", "split_value"]

# module (relative to foldattn) providing ``register(subparsers)`` for each command
_COMMANDS: tuple[str, ...] = (
    "demo", "train", "evaluate", "fold", "export", "import_reference", "bench", "stripe", "calibrate", "sweep",
    "quantize",
)


class CLIError(Exception):
    """An error the CLI reports as one line, without a traceback."""


# the argparse value types, shared with the training options' declarations (foldattn._argtypes)
from .._argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int, split_value  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="foldattn",
        description="ASR: channel attention that trains with a learnable input and folds into the backbone.",
    )
    parser.add_argument("--version", action="version", version=f"foldattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMANDS:
        importlib.import_module(f"foldattn.cli.{mod}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage line and one error line (or --help)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from ..train import TrainingInterrupted
    from ..verify import EquivalenceError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingInterrupted as e:  # Ctrl-C inside a training loop (train, demo, calibrate's fine-tuning)
        print(f"foldattn {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum  # 130 after Ctrl-C, 143 after SIGTERM
    # OSError: unwritable or clashing output paths (a file where a folder should be, ...);
    # EquivalenceError: a fold that does not reproduce its model, reported as such
    except (CLIError, ValueError, OSError, TypeError, EquivalenceError) as e:
        print(f"foldattn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        message = out_of_memory(e)
        if message is None:
            raise
        print(f"foldattn {args.command}: error: {message}", file=sys.stderr)
        return 1


def out_of_memory(error: BaseException) -> str | None:
    """One line for an allocation failure (CPU or GPU), with what to change; None for other errors."""
    import re

    import torch

    text = str(error)
    if isinstance(error, torch.OutOfMemoryError):  # CUDA's: "... Tried to allocate 2.00 GiB. GPU 0 has ..."
        where, found = "GPU", re.search(r"Tried to allocate ([\d.]+ \w+)", text)
        size = found.group(1) if found else None
    elif isinstance(error, MemoryError) or "can't allocate memory" in text:  # torch's CPU allocator
        where, found = "CPU", re.search(r"allocate (\d+) bytes", text)
        size = f"{int(found.group(1)) / 2**30:.2f} GiB" if found else None
    else:
        return None
    asked = f" (it asked for {size})" if size else ""
    return (f"out of {where} memory{asked}; lower what sets the size of the allocation: the batch size "
            "(--batch-size or this command's batch options), the image size, or the model (its width, depth or "
            "class count); the files already written are intact")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
