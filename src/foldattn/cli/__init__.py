"""The ``foldattn`` command line: every command in one place, a module each under ``foldattn.cli``,
each adding its sub-parser through ``register(subparsers)`` (the modules listed in ``_COMMANDS``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

# module (relative to foldattn) providing ``register(subparsers)`` for each command
_COMMANDS: tuple[str, ...] = (
    "demo", "train", "evaluate", "fold", "export", "import_reference", "bench", "stripe", "calibrate",
)


class CLIError(Exception):
    """An error the CLI reports as one line, without a traceback."""


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
    args = parser.parse_args(argv)
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
        return 130
    # OSError: unwritable or clashing output paths (a file where a folder should be, ...);
    # EquivalenceError: a fold that does not reproduce its model, reported as such
    except (CLIError, ValueError, OSError, TypeError, EquivalenceError) as e:
        print(f"foldattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
