"""The ``foldattn`` command line: every command in one place, a module each under ``foldattn.cli``,
each adding its sub-parser through ``register(subparsers)`` (the modules listed in ``_COMMANDS``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

# the argparse value types, shared with the training options' declarations (foldattn._argtypes)
from .._argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int, split_value
from ._errors import CLIError

__all__ = ["main", "build_parser", "CLIError", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float", "split_value"]

# module (relative to foldattn) providing ``register(subparsers)`` for each command
_COMMANDS: tuple[str, ...] = (
    "demo", "train", "evaluate", "fold", "export", "import_reference", "bench", "stripe", "calibrate", "sweep",
    "quantize",
)


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

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
    made = _missing_folders(args)
    previous = None
    if args.command not in _OWN_SIGTERM and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = _dispatch(args)
    except Terminated:
        _remove_empty(made)
        print(f"foldattn {args.command}: stopped by SIGTERM; nothing half-written was kept", file=sys.stderr)
        code = 143
    except BaseException:
        _remove_empty(made)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code not in (0, 130, 143):  # refused or failed: no empty folder of the command's own making is left
        _remove_empty(made)
    return code


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its cleanup runs (temporary files and staged folders
    are removed by the blocks that made them); not an Exception, so nothing swallows it."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


#: commands that turn SIGTERM into a resumable stop themselves (the training loop, the sweep's runs)
_OWN_SIGTERM = ("train", "demo", "sweep")

#: the arguments that name where a command writes (a folder, or a file whose folder is made)
_OUTPUT_ARGS = ("output", "out", "onnx", "pt2")


def _missing_folders(args: argparse.Namespace) -> list[Path]:
    """The folders a command may create for its outputs that do not exist yet, innermost first."""
    missing: list[Path] = []
    for name in _OUTPUT_ARGS:
        value = getattr(args, name, None)
        if not isinstance(value, str) or not value:
            continue
        p = Path(value)
        try:
            while not p.exists() and p != p.parent and p not in missing:
                missing.append(p)
                p = p.parent
        except OSError:  # a name the file system refuses (too long): the command itself says so in one line
            continue
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # innermost first: a folder is removed only once what it held is gone
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()


def _dispatch(args: argparse.Namespace) -> int:
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
    # FloatingPointError: a loss that diverged (calibrate's fine-tuning and distillation), with what to lower
    except (CLIError, ValueError, OSError, TypeError, EquivalenceError, FloatingPointError) as e:
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
