"""The import floors of the package (docs/decisions.md, "Import floors"): every module imports only modules on
its own floor or below, and no two modules import each other, directly or around a loop, counting every import
(top-level, inside functions, under ``TYPE_CHECKING``, ``importlib.import_module`` with a literal name)."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module takes the first floor with a matching pattern (fnmatch on its dotted name)
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("private helpers", ("foldattn._*",)),
    ("fold algebra", ("foldattn.transforms", "foldattn.srp.declared")),
    ("attention modules", ("foldattn.attention", "foldattn.attention.*")),
    ("mechanism", ("foldattn.hosts", "foldattn.asr", "foldattn.graph", "foldattn.srp", "foldattn.srp.*",
                   "foldattn.scales", "foldattn.merge", "foldattn.fuse", "foldattn.equalize", "foldattn.calibrate",
                   "foldattn.verify")),
    ("models, fold, deploy", ("foldattn.fold", "foldattn.summary", "foldattn.attach", "foldattn.models",
                              "foldattn.models.*", "foldattn.builders", "foldattn.deploy", "foldattn.export",
                              "foldattn.runtimes",
                              "foldattn.quantize")),
    ("public API", ("foldattn",)),
    ("training parts", ("foldattn.train.engine", "foldattn.train.config", "foldattn.train.options",
                        "foldattn.train.arguments", "foldattn.train.augment", "foldattn.train.images",
                        "foldattn.train.data", "foldattn.train.checkpoint", "foldattn.train.optim",
                        "foldattn.train.plots", "foldattn.train.runtime", "foldattn.train.pretrained",
                        "foldattn.train.model", "foldattn.train.source", "foldattn.train.reference")),
    ("stripe", ("foldattn.stripe", "foldattn.stripe.*")),
    ("training loop", ("foldattn.train", "foldattn.train.callbacks", "foldattn.train.trainer")),
    ("bench, integrations", ("foldattn.bench", "foldattn.bench.*", "foldattn.integrations",
                             "foldattn.integrations.*")),
    ("sweep", ("foldattn.sweep", "foldattn.sweep.*")),
    ("commands", ("foldattn.cli.*",)),
    ("command line", ("foldattn.cli", "foldattn.cli.__main__")),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / "foldattn").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


MODULES = _modules()


def _floor(module: str) -> int:
    if module == "foldattn.cli.__main__":
        return len(FLOORS) - 1
    for i, (_, patterns) in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS here and to docs/decisions.md")


def _target(name: str) -> str | None:
    """The package module ``name`` names (the longest known prefix), None outside foldattn."""
    if name != "foldattn" and not name.startswith("foldattn."):
        return None
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> set[str]:
    path, package = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one, else a name of pkg
            names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            target = _target(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_is_on_a_floor() -> None:
    for module in MODULES:
        _floor(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways(module: str) -> None:
    own = _floor(module)
    up = sorted(t for t in GRAPH[module] if _floor(t) > own)
    assert not up, (f"{module} (floor {own}, {FLOORS[own][0]}) imports a module above it: "
                    + ", ".join(f"{t} (floor {_floor(t)}, {FLOORS[_floor(t)][0]})" for t in up))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_the_checks_can_fail() -> None:
    """The cycle finder sees a two-module loop and a longer one; the floor check sees an upward import."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _floor("foldattn.sweep.spec") > _floor("foldattn.train.arguments")
    assert _floor("foldattn.cli") > _floor("foldattn.cli.train")
