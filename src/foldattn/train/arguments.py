"""``foldattn train``'s command-line arguments: the parser's options (from the TrainConfig declarations)
and the configuration they make. Here, below the command line, so that the CLI and the sweep (which checks
every arm as a ``foldattn train`` command line) share one definition."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .._argtypes import key_values
from .._files import load_yaml_file
from .config import TrainConfig, recipe_defaults
from .options import add_arguments, option_names

__all__ = ["add_train_arguments", "config_from_args", "resumed_config"]

# the options the command line (and a -c file) may set: every declared TrainConfig field
_FIELDS = tuple(option_names(TrainConfig))


# optimizers of timm's factory that take no momentum argument (Adam's relatives)
_NO_MOMENTUM = ("adam", "lamb", "lion", "adafactor", "adabelief", "novograd", "adopt", "laprop", "adan")


#: options that name where a run writes: never read from a file (a -c file is shared, copied, downloaded)
_DESTINATIONS = {"output": "-o/--output", "cache_dir": "--cache-dir", "download": "--download (with --data-dir)"}


def _from_file(path: str) -> dict[str, Any]:
    """The options of a ``-c`` YAML file, by field name; unknown keys are refused."""
    data = load_yaml_file(path, "--config") or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    known = set(_FIELDS)
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        if name in _DESTINATIONS:
            raise ValueError(f"--config {path}: {key!r} says where the run writes, which only the command line may "
                             f"say: pass {_DESTINATIONS[name]} instead")
        out[name] = key_values(value) if name == "model_kwargs" and isinstance(value, str) else value
    return out


def resumed_config(saved: dict[str, Any], resume: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's config to resume from, less the places it would write: a path read from a file is a
    record, never a destination. The run continues in the folder of the checkpoint named (``-o`` on the
    command line may name another), and caches or downloads only where this command line says."""
    path = Path(resume)
    out = dict(saved)
    out["output"] = str(path if path.is_dir() else path.parent)
    out["cache_dir"] = None
    out["download"] = False
    return out


def config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe defaults (or a resumed run's saved config), the ``-c`` file, then every option given explicitly."""
    explicit = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    if getattr(args, "config", None):
        from_file = _from_file(args.config)
        if args.recipe is None and "recipe" in from_file:
            args.recipe = from_file["recipe"]
        explicit = {**{k: v for k, v in from_file.items() if k != "recipe"}, **explicit}
    if saved is not None:
        base = dict(saved)
        if args.recipe is not None and args.recipe != base.get("recipe"):
            base.update(recipe_defaults(args.recipe))
            base["recipe"] = args.recipe
    else:
        recipe = args.recipe or "default"
        base = {**recipe_defaults(recipe), "recipe": recipe}
    if "sched" in explicit and "schedule" in explicit:
        raise ValueError("--sched (timm's schedulers) replaces --schedule (foldattn's); give one of them")
    if explicit.get("sched") is not None and "milestones" not in explicit and explicit["sched"] != "multistep":
        base["milestones"] = []  # a recipe's step milestones do not apply to another schedule
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **base, **explicit})
    if "momentum" in explicit and any(family in cfg.opt for family in _NO_MOMENTUM):
        raise ValueError(f"--momentum: --opt {cfg.opt} has no momentum term (its betas are its own); drop it")
    if "output" not in explicit and saved is None:
        kind = "plain" if cfg.attention is None else (
            f"asr-{cfg.attention}{'-both' if cfg.both else ''}" if cfg.asr else cfg.attention)
        cfg.output = f"runs/{cfg.model.replace(':', '-')}-{kind}-{cfg.dataset.split(':')[0]}-s{cfg.seed}"
    if "progress" not in explicit and saved is None:
        cfg.progress = sys.stderr.isatty()
    return cfg


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``foldattn train`` option to ``parser``: one per declared :class:`TrainConfig` field, grouped,
    plus ``-c/--config``, ``--resume``, ``--allow-config-change`` and ``--overwrite``."""

    def recipe_group(g: argparse._ArgumentGroup) -> None:
        g.add_argument("-c", "--config", metavar="FILE.yaml",
                       help="options from a YAML file whose keys are the option names (epochs, lr, model-kwargs, "
                            "...); the command line overrides it")

    def runtime_group(g: argparse._ArgumentGroup) -> None:
        g.add_argument("--resume", help="checkpoint (or output folder) to continue exactly from")
        g.add_argument("--allow-config-change", action="store_true",
                       help="on --resume, warn about changed options instead of refusing")
        g.add_argument("--overwrite", action="store_true",
                       help="a new run replaces another run's files in -o (refused by default: --resume continues "
                            "that run)")

    # every training option comes from its TrainConfig declaration (foldattn.train.options)
    add_arguments(parser, TrainConfig, {"recipe and overrides": recipe_group, "runtime": runtime_group})
