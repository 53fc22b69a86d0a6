"""The import graph of bnspec/ and conformance/: no cycle (in-function imports count, since
they run too), no import of another module's underscore name, and the public imports work.

Imports run one way: commands -> runner (plugin, results, report) -> suite -> candidates
and isolation -> reference; a cycle means two modules cannot be read (or changed) apart.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bnspec", "conformance")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    """Every module of the checked packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a checked module,
    at module level or inside a function. ``from pkg import sub`` is an import of the
    module ``pkg.sub`` when that is a module, else of ``pkg``."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "", node.lineno) if sub in known else (base, a.name, node.lineno))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """The edges between checked modules, and the imports of another module's private names."""
    found = sources()
    known = set(found)
    edges: dict[str, set[str]] = {m: set() for m in found}
    private = []
    for name, path in found.items():
        for target, attr, line in imports(name, path, known):
            if target in known and target != name:
                edges[name].add(target)
            leaf = (attr or target.rsplit(".", 1)[-1])
            dunder = leaf.startswith("__") and leaf.endswith("__")
            same_package = not attr and target.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]
            if leaf.startswith("_") and not dunder and not same_package:
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}{'.' + attr if attr else ''}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    edges, _ = graph()
    found = cycles(edges)
    assert not found, "import cycles (in-function imports included):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_private_name_imported_from_another_module():
    _, private = graph()
    assert not private, "imports of another module's underscore name:\n" + "\n".join(private)


def test_the_graph_sees_in_function_imports():
    """The checker itself: a cycle made only by an in-function import is found."""
    edges = {"a": {"b"}, "b": set()}
    assert not cycles(edges)
    edges["b"].add("a")
    assert cycles(edges) == [["a", "b"]]
    src = ROOT / "bnspec" / "cli.py"
    assert any(t.startswith("bnspec.commands") for t, _, _ in imports("bnspec.cli", src, set(sources())))


PUBLIC = [
    "from bnspec import SyncBatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, reference, swap, __version__",
    "import bnspec.testing; bnspec.testing.check; bnspec.testing.assert_conforms",
    "import bnspec.pytest_plugin as p; p.pytest_addoption; p.SuiteRun",
    "from bnspec.options import DTYPES, PROFILES, UsageProblem",
    "from bnspec.commands.check import check",
    "from bnspec.output import write_json_atomic, emit",
    "import bnspec.cli; bnspec.cli.main; bnspec.cli.BUDGETS",
    "from bnspec.report import run, render, timing",
    "from bnspec.distributed import check as c, ranks as r; c.synced_document; r.run_ranks",
]


@pytest.mark.parametrize("statement", PUBLIC)
def test_public_imports_work(statement):
    done = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_console_script_and_entry_points_are_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'bnspec = "bnspec.cli:main"' in text
    assert 'bnspec = "bnspec.pytest_plugin"' in text
    assert importlib.import_module("bnspec.cli").main


if __name__ == "__main__":  # a listing for a person: python tests/test_import_graph.py
    e, p = graph()
    print("\n".join(" <-> ".join(c) for c in cycles(e)) or "no cycle")
    print("\n".join(p) or "no private import")
