"""The package's layering, checked from the source: every import between its
modules (top level, inside functions, and ``importlib.import_module`` by
name) must be an edge DESIGN.md allows, and there must be no cycle.

    cli -> api (+ calibrate) -> wrapper -> cache -> ops -> backends -> kernels / _C
    models -> models.base / models.common / models.record only; nothing below api knows models
    (but wrapper, which reads the Adapter record); nothing imports cli.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "teacache_fast"

# module (or package prefix) -> the internal modules it may import (prefixes).
# The first matching key wins, longest first. "*" means anything but cli.
ALLOWED: Dict[str, Tuple[str, ...]] = {
    f"{PKG}.__main__": (f"{PKG}.cli",),
    f"{PKG}.cli": ("*",),
    f"{PKG}.__init__": (f"{PKG}.api", f"{PKG}.cache", f"{PKG}.ops", f"{PKG}._version"),
    f"{PKG}.api": (f"{PKG}.wrapper", f"{PKG}.cache", f"{PKG}.models", f"{PKG}.preset_json",
                   f"{PKG}.distributed", f"{PKG}.ops", f"{PKG}.calibrate.auto"),
    f"{PKG}.calibrate": (f"{PKG}.calibrate", f"{PKG}.api", f"{PKG}.cache", f"{PKG}.models", f"{PKG}.preset_json",
                         f"{PKG}.ops", f"{PKG}._version", f"{PKG}.backends"),
    # coefficients="auto" sits below api (api creates it): the calibrate modules it
    # uses never import api (only calibrate.run, which auto does not import, does)
    f"{PKG}.calibrate.auto": (f"{PKG}.calibrate.fit", f"{PKG}.calibrate.recording",
                              f"{PKG}.calibrate.result", f"{PKG}.preset_json"),
    f"{PKG}.calibrate.fit": (f"{PKG}.calibrate.recording", f"{PKG}.preset_json"),
    f"{PKG}.calibrate.recording": (f"{PKG}.ops",),
    f"{PKG}.calibrate.result": (f"{PKG}.calibrate.fit", f"{PKG}.calibrate.recording",
                                f"{PKG}.calibrate.replay", f"{PKG}.preset_json", f"{PKG}._version",
                                f"{PKG}.models.base"),
    f"{PKG}.calibrate.replay": (f"{PKG}.calibrate.recording", f"{PKG}.ops", f"{PKG}.models.base"),
    f"{PKG}.quality": (),
    f"{PKG}.sync_free": (f"{PKG}.cache", f"{PKG}.wrapper"),
    f"{PKG}.wrapper": (f"{PKG}.wrapper", f"{PKG}.cache", f"{PKG}.models.base"),
    f"{PKG}.cache": (f"{PKG}.cache", f"{PKG}.lanes", f"{PKG}.ops", f"{PKG}.distributed"),
    f"{PKG}.lanes": (f"{PKG}.ops", f"{PKG}._registered", f"{PKG}.backends"),
    f"{PKG}.distributed": (),
    f"{PKG}.preset_json": (f"{PKG}.ops", f"{PKG}._version"),
    f"{PKG}.ops": (f"{PKG}.backends", f"{PKG}._checks", f"{PKG}._registered"),
    f"{PKG}._registered": (f"{PKG}.backends",),
    f"{PKG}._checks": (),
    f"{PKG}.backends": (f"{PKG}.backends", f"{PKG}.kernels", f"{PKG}._C"),
    f"{PKG}.kernels": (f"{PKG}.kernels",),
    f"{PKG}.models.base": (),
    f"{PKG}.models.common": (f"{PKG}.models.base",),
    f"{PKG}.models.record": (f"{PKG}.models.base",),
    f"{PKG}.models.__init__": (f"{PKG}.models",),
    f"{PKG}.models": (f"{PKG}.models.base", f"{PKG}.models.common", f"{PKG}.models.record"),
    f"{PKG}._version": (),
}


def module_files() -> Dict[str, Path]:
    """Dotted name -> file, for the package and kernels/ (installed as teacache_fast.kernels)."""
    out = {}
    for base, prefix in ((ROOT / PKG, PKG), (ROOT / "kernels", f"{PKG}.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            out[".".join((prefix,) + rel.parts)] = path
    return out


def _resolve(module: str, level: int, name: str, is_package: bool) -> str:
    if level == 0:
        return name
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, source: str, known: Iterable[str]) -> Set[str]:
    """Every internal module ``module`` imports, wherever the import sits."""
    known = set(known) | {f"{PKG}._C"}   # the compiled extension has no .py file
    is_package = module.endswith(".__init__")
    owner = module[:-len(".__init__")] if is_package else module
    found: Set[str] = set()

    def add(target: str) -> None:
        if not target.startswith(PKG):
            return
        # the longest known module that the dotted name starts with
        while target and target not in known and f"{target}.__init__" not in known:
            target = target.rpartition(".")[0]
        if target and target != owner:
            found.add(target if target in known else f"{target}.__init__")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(owner, node.level, node.module or "", is_package)
            for alias in node.names:  # "from . import ops" imports the module ops
                full = f"{base}.{alias.name}"
                add(full if (full in known or f"{full}.__init__" in known) else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            add(str(node.args[0].value))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.JoinedStr):
            head = node.args[0].values[0]
            if isinstance(head, ast.Constant):
                add(str(head.value).rstrip("."))
    return found


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {m: imports_of(m, p.read_text(), files) for m, p in files.items()}


def _rule_for(module: str) -> Tuple[str, ...]:
    for key in sorted(ALLOWED, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return ALLOWED[key]
    raise KeyError(module)


def _allowed(target: str, rule: Tuple[str, ...]) -> bool:
    if target.startswith(f"{PKG}.cli"):
        return False
    return any(r == "*" or target == r or target.startswith(r + ".") for r in rule)


def violations(graph: Dict[str, Set[str]]):
    bad = []
    for module, targets in sorted(graph.items()):
        if module.startswith(f"{PKG}.cli") or module == f"{PKG}.__main__":
            rule = _rule_for(module)
            bad += [(module, t) for t in sorted(targets) if not any(
                r == "*" or t.startswith(r) for r in rule)]
            continue
        rule = _rule_for(module)
        bad += [(module, t) for t in sorted(targets) if not _allowed(t, rule)]
    return bad


def cycles(graph: Dict[str, Set[str]]):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges(graph):
    # a package's __init__ importing its own submodules is not a cycle with them
    return {m: {t for t in ts if not (m.endswith(".__init__") and t.startswith(m[:-9] + "."))}
            for m, ts in graph.items()}


def test_every_module_has_a_layer():
    missing = [m for m in module_files() if not _has_rule(m)]
    assert not missing, f"modules outside DESIGN's layering (add them to ALLOWED): {missing}"


def _has_rule(module):
    try:
        _rule_for(module)
        return True
    except KeyError:
        return False


def test_imports_follow_the_layering():
    bad = violations(import_graph())
    assert not bad, "imports outside the layering:\n" + "\n".join(f"  {a} -> {b}" for a, b in bad)


def test_no_import_cycles():
    found = cycles(_package_edges(import_graph()))
    assert not found, f"import cycles: {found}"


def test_nothing_imports_cli():
    graph = import_graph()
    users = [m for m, ts in graph.items() if any(t.startswith(f"{PKG}.cli") for t in ts)
             and not m.startswith(f"{PKG}.cli") and m != f"{PKG}.__main__"]
    assert not users, users


# ---------------------------------------------------------------- the checker itself

def test_checker_sees_lazy_relative_and_importlib_imports():
    known = {f"{PKG}.ops", f"{PKG}.cache.__init__", f"{PKG}.cache.state", f"{PKG}.cli.__init__",
             f"{PKG}.models.base", f"{PKG}.wrapper.host"}
    src = ("from .. import ops\n"
           "def f():\n    from ..cli import main\n"
           "import importlib\nimportlib.import_module('teacache_fast.models.base')\n")
    found = imports_of(f"{PKG}.cache.state", src, known)
    assert found == {f"{PKG}.ops", f"{PKG}.cli.__init__", f"{PKG}.models.base"}
    assert violations({f"{PKG}.cache.state": found}) == [
        (f"{PKG}.cache.state", f"{PKG}.cli.__init__"), (f"{PKG}.cache.state", f"{PKG}.models.base")]


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),                       # bench_ops <-> bench_e2e
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected
