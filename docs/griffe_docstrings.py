"""Griffe extension used by the API reference (mkdocs.yml loads it; it is not part of the site).

It adapts two habits of foldattn's docstrings to the Google style that mkdocstrings parses, before
each docstring is parsed:

- Sphinx roles, ``:func:`foldattn.fold` `` or ``:class:`~foldattn.attention.SE` ``, which Markdown
  would print as they are, become cross-references: mkdocs-autorefs turns one into a link when its
  target is documented on the site and into plain code when it is not (an optional reference never
  fails the strict build). A leading ``~`` shows the last component only, as in Sphinx.
- An ``Args:`` entry naming several parameters, ``a, b: text``, becomes one entry per name, each
  with the text, so that every name is still checked against the signature.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`<>]+)`")
PARAMETER_SECTION = re.compile(r"(?P<indent>\s*)(?:Args|Arguments|Parameters|Other Parameters|Keyword Args):\s*$")
GROUPED_ENTRY = re.compile(r"(?P<indent>\s+)(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)\s*:(?P<text>\s.*|)$")


def _reference(match: re.Match[str]) -> str:
    target = match["target"].strip()
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    if target.startswith("."):  # relative (Sphinx resolves it against the current module): shown as written
        return f"`{shown}`"
    return f'<autoref identifier="{target}" optional>`{shown}`</autoref>'


def convert_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by an optional cross-reference in code font."""
    return ROLE.sub(_reference, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_parameters(text: str) -> str:
    """``text`` with each grouped entry of a parameter section repeated once per name."""
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # indentation of the parameter section's header while inside one
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip() and section is not None and _indent(line) <= section:
            section = None
        header = PARAMETER_SECTION.fullmatch(line)
        if header:
            section = len(header["indent"])
        entry = GROUPED_ENTRY.fullmatch(line) if section is not None else None
        if entry is None:
            out.append(line)
            continue
        # the entry's continuation lines: indented deeper than the entry, or blank inside it
        body = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(entry["indent"])):
            body.append(lines[i])
            i += 1
        trailing = []
        while body and not body[-1].strip():
            trailing.append(body.pop())
        for name in re.split(r"\s*,\s*", entry["names"]):
            out.append(f"{entry['indent']}{name}:{entry['text']}")
            out.extend(body)
        out.extend(trailing)
    return "\n".join(out)


class FoldattnDocstrings(griffe.Extension):
    """Applies both rewrites to every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = split_grouped_parameters(convert_roles(obj.docstring.value))
