"""Reading files foldattn did not write itself: structure and size first (private).

Every configuration, metadata document, lock or cache index is read through these helpers:
only regular files (a FIFO or ``/dev/zero`` would block or never end), at most a stated
number of bytes, JSON with a bound on nesting, YAML without anchors and aliases (an alias
"bomb" expands to billions of nodes once walked). Errors are ``ValueError`` naming the file.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from ._utils import require

__all__ = ["read_bounded", "load_json_text", "load_json_file", "load_yaml_file", "check_depth", "check_zip",
           "torch_load", "UnreadableFile",
           "MAX_CONFIG_BYTES", "MAX_DEPTH"]

#: the largest configuration file read (a real one is a few kB)
MAX_CONFIG_BYTES = 1 << 20
#: the deepest nesting of lists/mappings accepted in a document foldattn reads
MAX_DEPTH = 32


def read_bounded(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``ValueError`` naming ``what`` otherwise."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ValueError(f"{what} {p}: no such file") from None
    except OSError as e:
        raise ValueError(f"{what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise ValueError(f"{what} {p}: is {kind}; name a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{what} {p}: {st.st_size:,} bytes, more than the {max_bytes:,} accepted; "
                         "this is not a file foldattn wrote or expects")
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the stat cannot block the open
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"{what} {p}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{what} {p}: is not a regular file; name a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} {p}: more than {max_bytes:,} bytes; this is not a file foldattn expects")
    return data


def check_depth(obj: Any, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """``obj`` if its lists/mappings nest at most ``max_depth`` deep (iteratively: no recursion limit)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > max_depth:
                raise ValueError(f"{what}: nested more than {max_depth} levels deep; not a document foldattn wrote")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children)
    return obj


def load_json_text(text: str | bytes, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON with a bound on nesting (checked on the raw text first, before Python's recursive
    parser can overflow its stack) and without NaN/Infinity literals."""
    raw = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    depth = level = 0
    in_string = escaped = False
    for ch in raw:  # brackets outside strings: a cheap bound on the parser's recursion
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            depth = max(depth, level)
            if depth > max_depth:
                raise ValueError(f"{what}: JSON nested more than {max_depth} levels deep; not a document "
                                 "foldattn wrote")
        elif ch in "]}":
            level -= 1

    def no_constant(name: str) -> Any:
        raise ValueError(f"{what}: {name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from None


def load_json_file(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A bounded regular file parsed as bounded JSON."""
    return load_json_text(read_bounded(path, what, max_bytes), f"{what} {path}")


# YAML 1.1 (PyYAML) reads 1e-3 as a string: only a number with a dot (1.0e-3) is a float there. YAML 1.2,
# and everyone who writes `lr: 1e-3`, means a number, so exponent forms without a dot are floats too.
_FLOAT_1_2 = r"""^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> Any:
    """PyYAML's safe loader, refusing anchors/aliases, nesting past :data:`MAX_DEPTH` and duplicate keys,
    and reading exponent numbers as floats (built once: PyYAML's resolvers are per class)."""
    import re

    yaml = require("yaml", "train")
    safe_loader: Any = yaml.SafeLoader  # imported at run time: a base class mypy takes as Any

    class _Loader(safe_loader):  # aliases refused: an alias bomb cannot expand
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "anchors and aliases (*name) are not accepted",
                                                  event.start_mark)
            if getattr(self, "_depth", 0) > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # PyYAML keeps the last of two equal keys: a second `plain:` arm or `seeds:` would win silently
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base constructor reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"the key {key!r} is given twice (the second "
                        "would silently replace the first); keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_1_2), list("-+0123456789."))
    return _Loader


def load_yaml_file(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A bounded regular file parsed by ``yaml.safe_load`` with anchors/aliases and duplicate keys refused,
    nesting bounded, and ``1e-3`` read as a number (as YAML 1.2 does)."""
    loader = _yaml_loader()
    import yaml

    data = read_bounded(path, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
        if problem and mark is not None:  # line and column of the problem, without PyYAML's source excerpt
            raise ValueError(f"{what} {path}: line {mark.line + 1}, column {mark.column + 1}: {problem}") from None
        first = str(e).strip().splitlines()
        raise ValueError(f"{what} {path}: not valid YAML ({' '.join(x.strip() for x in first[:3])})") from None


#: entries of a torch.save archive at most this many times larger inflated than the whole file
_MAX_INFLATION = 4
_MAX_ENTRIES = 1 << 20


def check_zip(path: str | os.PathLike[str], what: str) -> None:
    """Before ``torch.load``: a zip archive (torch's format) must not inflate to far more than it is.

    ``torch.save`` stores its entries uncompressed, so a real checkpoint inflates to about its own
    size; a crafted one with deflated entries could ask for gigabytes from a small file. Files that
    are not zip archives (torch's legacy format) pass: their size is what is read.
    """
    p = Path(path)
    if not zipfile.is_zipfile(p):
        return
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{what} {p}: a damaged zip archive ({e})") from None
    size = p.stat().st_size
    inflated = sum(i.file_size for i in infos)
    if len(infos) > _MAX_ENTRIES or inflated > _MAX_INFLATION * size + (1 << 20):
        raise ValueError(f"{what} {p}: its archive inflates to {inflated:,} bytes from a {size:,}-byte file "
                         f"({len(infos):,} entries); torch.save writes uncompressed archives, so this file was "
                         "crafted or corrupted and is not read")


class UnreadableFile(ValueError):
    """``torch.load`` refused the file; ``why`` is its reason in a few words, for the caller's message."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def torch_load(path: str | os.PathLike[str], what: str, map_location: Any = "cpu") -> Any:
    """The one way foldattn unpickles a file: a regular file, whose zip archive does not inflate past
    its size (:func:`check_zip`), read with ``torch.load(weights_only=True)``.

    Raises ``ValueError`` for a file that is not regular or is a zip bomb, and :class:`UnreadableFile`
    (a ``ValueError``) when ``torch.load`` refuses it: truncated, corrupt, or holding Python objects.
    """
    import torch

    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise ValueError(f"{what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {p}: is not a regular file; name a file")
    check_zip(p, what)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle, EOF and weights-only errors all mean the same to the user
        text = str(e).strip()
        if "Weights only load failed" in text:
            why = "it holds Python objects other than tensors and plain values, which safe loading refuses"
        else:
            why = (text.splitlines()[0] if text else type(e).__name__)[:200]
        raise UnreadableFile(f"{what} {p}: cannot be read with torch.load(weights_only=True): {why}", why) from None
