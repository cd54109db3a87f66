"""How a training option is declared: once, on its :class:`~foldattn.train.TrainConfig` field.

:func:`option` returns a dataclass field whose metadata says everything else needs: the command-line
flag, the help text, the argparse type or action, the range or choices a value must be in, the other
options it only makes sense with (``only_if``), and whether a resumed run may change it. From that one
declaration come the ``foldattn train`` arguments (:func:`add_arguments`), the keys of ``-c FILE.yaml``
(:func:`option_names`), the checks of :meth:`TrainConfig.validate <foldattn.train.TrainConfig.validate>`
(:func:`check_declared`) and the resume rule (:func:`resume_ignored`). Adding an option is one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "option", "add_arguments", "option_names", "resume_ignored", "check_declared", "GROUPS"]

#: the argument groups of ``foldattn train --help``, in order
GROUPS = ("model", "data", "recipe and overrides", "runtime")


@dataclass(frozen=True)
class Option:
    """The declaration of one option (a :class:`TrainConfig` field's metadata).

    Args:
        help: the ``--help`` text.
        group: its group in :data:`GROUPS`.
        flags: the command-line flags (default ``--field-name``); ``()`` for a config-only field.
        argtype: the argparse ``type`` (default: the field's scalar type).
        action: ``"store_true"`` or ``"boolean"`` (``--x/--no-x``) for flags without a value.
        nargs, choices, metavar: as argparse takes them.
        low, high, open_high: the range of a number (``integer=True``: a whole number).
        integer: a whole number (``low`` then is its minimum).
        only_if: ``(condition(cfg), why)``: a value other than the default is refused unless the condition
            holds; ``why`` (a string, or ``why(cfg)``) says what the option needs.
        resume_may_change: a run resumed with another value computes the same (paths, threads, ...).
    """

    help: str | None = None
    group: str = "recipe and overrides"
    flags: tuple[str, ...] | None = None
    argtype: Callable[[str], Any] | None = None
    action: str | None = None
    nargs: str | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    low: float | None = None
    high: float | None = None
    open_high: bool = False
    integer: bool = False
    only_if: tuple[Callable[[Any], bool], str | Callable[[Any], str]] | None = None
    resume_may_change: bool = False


def option(default: Any = None, *, factory: Callable[[], Any] | None = None, **spec: Any) -> Any:
    """A dataclass field with its :class:`Option` declaration (``factory`` for list/dict defaults)."""
    meta = {"option": Option(**spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _declared(cls: type) -> list[tuple[dataclasses.Field[Any], Option]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def _flags(f: dataclasses.Field[Any], opt: Option) -> tuple[str, ...]:
    return opt.flags if opt.flags is not None else (f"--{f.name.replace('_', '-')}",)


def option_names(cls: type) -> list[str]:
    """The fields a command line (and a ``-c`` file) may set."""
    return [f.name for f, opt in _declared(cls) if _flags(f, opt)]


def resume_ignored(cls: type) -> tuple[str, ...]:
    """The fields a resumed run may change without changing what it computes."""
    return tuple(f.name for f, opt in _declared(cls) if opt.resume_may_change)


def add_arguments(parser: argparse.ArgumentParser, cls: type, extra: dict[str, Callable[[Any], None]] | None = None
                  ) -> dict[str, Any]:
    """Add every declared option of ``cls`` to ``parser`` (defaults None: "not given"), by group;
    ``extra[group](group_parser)`` adds a command's own arguments to a group. Returns the groups."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f, opt in _declared(cls):
        flags = _flags(f, opt)
        if not flags:
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        if opt.help is not None:
            kw["help"] = opt.help
        if opt.action == "store_true":
            kw["action"] = "store_true"
        elif opt.action == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = opt.argtype or (_int_type(opt) if opt.integer else _scalar_type(f))
            if opt.integer and opt.high is not None and "at most" not in (opt.help or ""):  # a count's bound
                kw["help"] = f"{opt.help} (at most {int(opt.high)})" if opt.help else f"at most {int(opt.high)}"
            for key in ("nargs", "choices", "metavar"):
                if getattr(opt, key) is not None:
                    kw[key] = getattr(opt, key)
        groups[opt.group].add_argument(*flags, **kw)
    for name, add in (extra or {}).items():
        add(groups[name])
    return groups


def _int_type(opt: Option) -> Callable[[str], int]:
    """A whole number in the declared range, refused by argparse at parse time (before anything runs);
    :func:`check_declared` applies the same range to ``-c`` files and saved configs."""
    from .._argtypes import bounded_int

    return bounded_int(int(opt.low or 0), None if opt.high is None else int(opt.high))


def _scalar_type(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text and "str" not in text:
        return int
    return str


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_declared(cfg: Any) -> None:
    """The checks every declaration states: ranges, choices and ``only_if`` (``ValueError`` naming the
    option, the value and what is allowed)."""
    for f, opt in _declared(type(cfg)):
        value = getattr(cfg, f.name)
        name = f"--{f.name.replace('_', '-')}"
        if value is None or isinstance(value, (list, dict)):
            pass
        elif opt.choices is not None and value not in opt.choices:
            raise ValueError(f"{name} {_short(value)}: choose {_or(opt.choices)}")
        elif opt.integer and (isinstance(value, bool) or not isinstance(value, int) or value < (opt.low or 0)):
            raise ValueError(f"{name} {_short(value)}: must be an integer >= {int(opt.low or 0)}")
        elif opt.integer and opt.high is not None and value > opt.high:
            raise ValueError(f"{name} {_short(value)}: must be at most {int(opt.high)}")
        elif not opt.integer and opt.low is not None and isinstance(value, (int, float)):
            high = math.inf if opt.high is None else opt.high
            ok = not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < opt.low or value > high or (opt.open_high and value == high):
                raise ValueError(f"{name} {_short(value)}: must be a number in [{opt.low:g}, {high:g}"
                                 f"{')' if opt.open_high else ']'}")
        if opt.only_if is not None and value != f.default and not (
                f.default_factory is not dataclasses.MISSING and value == f.default_factory()):
            condition, why = opt.only_if
            if not condition(cfg):
                raise ValueError(f"{name} {_short(value)}: {why(cfg) if callable(why) else why}")


def _or(choices: tuple[Any, ...]) -> str:
    items = [str(c) for c in choices]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
