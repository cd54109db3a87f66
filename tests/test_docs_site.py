"""The API reference site (mkdocs.yml, docs/api/*.md) documents every public name and its nav is whole.

The checks read the files and import foldattn; they need neither mkdocs nor a built site. The last
test builds the site (``mkdocs build --strict``, as ``make docs`` does) when mkdocs is installed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

# every public package or module whose __all__ the reference must cover
PUBLIC = (
    "foldattn", "foldattn.attention", "foldattn.models", "foldattn.srp", "foldattn.transforms", "foldattn.train",
    "foldattn.stripe", "foldattn.bench", "foldattn.sweep", "foldattn.cli", "foldattn.integrations",
    "foldattn.integrations.lightning",
)


@dataclass(frozen=True)
class Directive:
    page: str
    target: str
    members: tuple[str, ...] | None  # the explicit `members:` list, if any


def directives() -> list[Directive]:
    """The ``::: target`` blocks of docs/api/*.md with their options."""
    found = []
    for page in sorted(API.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            head = re.fullmatch(r":::\s+(\S+)\s*", line)
            if head is None:
                continue
            block = []
            for following in lines[i + 1:]:
                if following.strip() and not following.startswith(" "):
                    break
                block.append(following)
            parsed = yaml.safe_load(textwrap.dedent("\n".join(block))) or {}
            members = (parsed.get("options") or {}).get("members")
            listed = tuple(members) if isinstance(members, list) else None
            found.append(Directive(page.name, head.group(1), listed))
    return found


def public_names(name: str) -> list[str]:
    """``__all__`` of module ``name``: imported, or read from its source when an optional dependency
    (such as ``lightning``) is missing."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} does not exist (yet)")
    try:
        return list(importlib.import_module(name).__all__)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "foldattn":
            raise
    return _literal_all(Path(importlib.util.find_spec(name).origin))


def _literal_all(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                names += ast.literal_eval(node.value)
    return names


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent is a module, not a package
        return False


def _resolve(path: str) -> Any:
    """The object at dotted ``path``: its longest module prefix, imported, then attributes."""
    parts = path.split(".")
    cut = next(c for c in range(len(parts), 0, -1) if _is_module(".".join(parts[:c])))
    obj: Any = importlib.import_module(".".join(parts[:cut]))
    for attr in parts[cut:]:
        obj = getattr(obj, attr)
    return obj


def _shadowed(module: types.ModuleType, name: str) -> bool:
    """A package re-exporting, under ``name``, something other than its submodule ``name``. Griffe
    (which mkdocstrings uses) lists the submodule there, so such a name is documented through its
    own module's path, e.g. ``::: foldattn.fold.fold``."""
    if not hasattr(module, "__path__"):
        return False
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    return name in submodules and not isinstance(getattr(module, name, None), types.ModuleType)


def undocumented(package: str, names: list[str], found: list[Directive]) -> list[str]:
    targets = {d.target for d in found}
    listed = {m for d in found if d.target == package for m in d.members or ()}
    spec = importlib.util.find_spec(package)
    module = importlib.import_module(package) if spec and spec.submodule_search_locations else None
    missing = []
    for name in names:
        if module is not None and _shadowed(module, name):
            obj = getattr(module, name)
            if f"{obj.__module__}.{obj.__qualname__}" not in targets:
                missing.append(f"{package}.{name} (shadowed by a submodule: `::: {obj.__module__}.{obj.__qualname__}`)")
        elif f"{package}.{name}" not in targets and name not in listed:
            missing.append(f"{package}.{name}")
    return missing


@pytest.mark.parametrize("package", PUBLIC)
def test_every_public_name_is_documented(package: str) -> None:
    names = public_names(package)
    missing = undocumented(package, names, directives())
    assert not missing, f"not in docs/api/*.md (a `::: {package}` members: entry or its own directive): {missing}"


def test_the_check_sees_a_missing_name() -> None:
    """The first member of ``::: foldattn.sweep`` taken out of its list is reported."""
    found = directives()
    sweep = next(d for d in found if d.target == "foldattn.sweep")
    assert sweep.members
    found[found.index(sweep)] = Directive(sweep.page, sweep.target, sweep.members[1:])
    missing = undocumented("foldattn.sweep", public_names("foldattn.sweep"), found)
    assert missing == [f"foldattn.sweep.{sweep.members[0]}"]


def test_every_directive_resolves() -> None:
    """Each ``:::`` target and each of its listed members exists (mkdocs would fail on it)."""
    bad = []
    for d in directives():
        try:
            obj = _resolve(d.target)
        except ImportError as e:  # an optional dependency of the module (griffe reads the source instead)
            if (getattr(e, "name", None) or "").split(".")[0] == "foldattn":
                bad.append(f"{d.page}: {d.target}")
            continue
        except (AttributeError, StopIteration):
            bad.append(f"{d.page}: {d.target}")
            continue
        bad += [f"{d.page}: {d.target}.{m}" for m in d.members or () if not hasattr(obj, m)]
    assert not bad, f"directives naming nothing: {bad}"


class _Loader(yaml.SafeLoader):
    """mkdocs.yml's loader for this test: tags such as !!python/name are read as None."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _nav_pages(entry: Any) -> list[str]:
    if isinstance(entry, str):
        return [] if "://" in entry else [entry]
    if isinstance(entry, dict):
        return [p for value in entry.values() for p in _nav_pages(value)]
    if isinstance(entry, list):
        return [p for item in entry for p in _nav_pages(item)]
    return []


def _config() -> dict[str, Any]:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)


def test_nav_entries_exist_and_every_page_is_in_the_nav() -> None:
    config = _config()
    assert (ROOT / config["docs_dir"]).resolve() == DOCS
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    assert [p for p in nav if not (DOCS / p).is_file()] == []
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert [p for p in pages if p not in nav] == [], "pages missing from mkdocs.yml's nav"
    assert any(p.startswith("api/") for p in nav)


def test_relative_links_of_the_pages_resolve() -> None:
    """mkdocs.yml lets links leave docs/ (to ../README.md, ../benchmarks/...: they work on GitHub) without
    a warning, so the strict build no longer checks those targets; this does, for every relative link."""
    broken = []
    for page in sorted(DOCS.rglob("*.md")):
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not in code blocks
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(DOCS)}: {target}")
    assert not broken, f"links to nothing: {broken}"


def _extension() -> types.ModuleType:
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_docstrings", DOCS / "griffe_docstrings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_extension_rewrites_roles_and_grouped_arguments() -> None:
    ext = _extension()
    assert ext.convert_roles("see :func:`foldattn.fold` and :class:`~foldattn.attention.SE`, :mod:`.family`") == (
        'see <autoref identifier="foldattn.fold" optional>`foldattn.fold`</autoref> and '
        '<autoref identifier="foldattn.attention.SE" optional>`SE`</autoref>, `.family`')
    doc = "Fold.\n\nArgs:\n    a, **b: both\n        here.\n    c: one.\n\nReturns:\n    x, y: not arguments.\n"
    assert ext.split_grouped_parameters(doc) == (
        "Fold.\n\nArgs:\n    a: both\n        here.\n    **b: both\n        here.\n    c: one.\n\n"
        "Returns:\n    x, y: not arguments.")


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes and every public name has its anchor on an API page."""
    for needed in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(needed)
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    anchors = set()
    for page in (site / "api").glob("*.html"):
        anchors |= set(re.findall(r'id="([^"]+)"', page.read_text()))
    missing = []
    for package in PUBLIC:
        if importlib.util.find_spec(package) is None:
            continue
        spec = importlib.util.find_spec(package)
        module = importlib.import_module(package) if spec.submodule_search_locations else None
        for name in public_names(package):
            anchor = f"{package}.{name}"
            if module is not None and _shadowed(module, name):
                obj = getattr(module, name)
                anchor = f"{obj.__module__}.{obj.__qualname__}"
            if anchor not in anchors:
                missing.append(anchor)
    assert not missing, f"public names with no anchor in the built site: {missing}"
