"""The import graph of lmlab: no module depends on itself through others (no cycle, inside packages too), and
every module imports on its own in an interpreter that has imported no other lmlab module.

The graph is read from the source (ast), not from a running interpreter: an edge a → b for every `import` or
`from ... import` of b in a's file, at module level and inside functions and classes alike (a function-local
import is still a dependency: it only defers the cycle to the first call), relative imports resolved.
`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg` (its own package too).
Importing `x.y.z` also runs the `__init__` of each package above it, so those packages are edges too, except
the importer's own packages (already being imported when it runs) and `lmlab` itself. Imports under
`if TYPE_CHECKING:` never run and are not edges; nor are modules named in strings (registries that import an
entry on first use).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest
import tomllib

import lmlab

ROOT = Path(lmlab.__file__).resolve().parent  # src/lmlab
PYPROJECT = ROOT.parent.parent / "pyproject.toml"


def _module_files() -> dict[str, Path]:
    """Dotted module name → file, for every .py file under src/lmlab."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("lmlab", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree`, at any depth, except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _targets(name: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> Iterator[str]:
    """The lmlab modules that `node`, written in module `name`, imports."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in modules else base


def import_graph() -> nx.DiGraph:
    """lmlab's import graph; each edge carries `sites`, the `file:line` of each import that makes it."""
    modules = _module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        own = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}  # the module and its packages
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(name, node, modules):
                parts = target.split(".")
                above = {".".join(parts[:k]) for k in range(2, len(parts))}  # the packages the import runs
                for dep in sorted({target} | (above - own)):
                    if dep in modules and dep != name:
                        site = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                        graph.add_edge(name, dep)
                        sites = graph.edges[name, dep].setdefault("sites", [])
                        if site not in sites:
                            sites.append(site)
    return graph


def cycles(graph: nx.DiGraph, limit: int = 40) -> list[str]:
    """Each elementary cycle of `graph` as `a → b → … → a` followed by the import lines that make its edges,
    shortest first, at most `limit` of them (then a line saying how many more)."""
    found = sorted((c for c in nx.simple_cycles(graph)), key=lambda c: (len(c), c))
    lines = []
    for cyc in found[:limit]:
        start = cyc.index(min(cyc))
        cyc = cyc[start:] + cyc[:start]
        steps = list(zip(cyc, cyc[1:] + cyc[:1]))
        lines.append(" → ".join([*cyc, cyc[0]]))
        lines += [f"    {a} → {b}: {', '.join(graph.edges[a, b]['sites'])}" for a, b in steps]
    if len(found) > limit:
        lines.append(f"... and {len(found) - limit} more cycles")
    return lines


def test_the_graph_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The reader itself, on a small package: top-level, function-local, relative (one and two dots), `from pkg
    import submodule`, a package's `__init__` as a dependency (run by an import from outside it, or imported
    from by name), TYPE_CHECKING-only imports left out."""
    pkg = tmp_path / "lmlab"
    (pkg / "a").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "x.py": "import lmlab.a.b\n",
        "y.py": "def f():\n    from .x import g\n",
        "z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import y\nelse:\n    import os\n",
        "a/__init__.py": "from ..z import h\n",
        "a/b.py": "from .. import y\nfrom lmlab.a import c\nfrom . import h\n",
        "a/c.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph = import_graph()
    assert set(graph.edges) == {("lmlab.x", "lmlab.a.b"), ("lmlab.x", "lmlab.a"), ("lmlab.y", "lmlab.x"),
                                ("lmlab.a", "lmlab.z"), ("lmlab.a.b", "lmlab.y"), ("lmlab.a.b", "lmlab.a.c"),
                                ("lmlab.a.b", "lmlab.a")}  # `from . import h`: a name of its own package
    assert graph.edges["lmlab.y", "lmlab.x"]["sites"] == ["lmlab/y.py:2"]
    assert cycles(graph) == [
        "lmlab.a.b → lmlab.y → lmlab.x → lmlab.a.b",
        "    lmlab.a.b → lmlab.y: lmlab/a/b.py:1",
        "    lmlab.y → lmlab.x: lmlab/y.py:2",
        "    lmlab.x → lmlab.a.b: lmlab/x.py:1",
    ]


def test_no_import_cycle_anywhere_in_lmlab():
    graph = import_graph()
    assert graph.number_of_nodes() > 50 and graph.number_of_edges() > 100  # it read the real tree
    found = cycles(graph)
    assert not found, "import cycles in lmlab (a → b: where a imports b):\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------ fresh interpreters
_FORKING_IMPORTER = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name, attrs in preload:  # third-party modules lmlab imports at module level: loaded once, shared by forks
        try:
            mod = importlib.import_module(name)
            for attr in attrs:  # names of lazy modules (transformers) load on first access
                getattr(mod, attr, None)
        except Exception:
            pass
    assert not [m for m in sys.modules if m == "lmlab" or m.startswith("lmlab.")]

    def child(name, write):  # no lmlab module imported yet: import this one alone
        try:
            importlib.import_module(name)
            out = {"ok": True}
        except ModuleNotFoundError as e:
            out = {"ok": False, "missing": e.name or "", "error": traceback.format_exc(limit=-3)}
        except BaseException:
            out = {"ok": False, "missing": None, "error": traceback.format_exc(limit=-3)}
        os.write(write, json.dumps(out).encode())
        os._exit(0)

    results, running, todo = {}, {}, list(modules)
    while todo or running:
        while todo and len(running) < 2:
            name = todo.pop(0)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                child(name, write)
            os.close(write)
            running[pid] = (name, read)
        pid, _ = os.wait()
        name, read = running.pop(pid)
        with os.fdopen(read) as f:
            text = f.read()
        results[name] = json.loads(text) if text else {"ok": False, "missing": None, "error": "child died"}
    print(json.dumps(results))
""")


def _third_party_preload(modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """The non-lmlab modules imported at module level anywhere in lmlab, with the names taken from each (what
    every fork would otherwise load again)."""
    out: dict[str, set[str]] = {}
    for path in modules.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    out.setdefault(a.name, set())
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.setdefault(node.module, set()).update(a.name for a in node.names)
    return [(m, sorted(names)) for m, names in sorted(out.items())
            if m.split(".")[0] not in ("lmlab", "__future__")]


def _core_import_names() -> set[str]:
    """Top-level import names provided by lmlab's required (non-extra) dependencies."""
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    def norm(n: str) -> str:
        return n.lower().replace("_", "-").replace(".", "-")

    core = {norm(Requirement(r).name) for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]}
    return {top for top, dists in packages_distributions().items() if any(norm(d) in core for d in dists)}


@pytest.mark.slow  # ~10 s on 2 cores: the third-party libraries load once, then ~130 forks
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """One interpreter per module (forked from one that preloaded the third-party libraries, never lmlab): a
    module that only imports when another lmlab module was imported first fails here. A module whose import
    needs a missing optional extra (a package outside `[project] dependencies`) passes; a missing required
    dependency or lmlab module fails."""
    modules = _module_files()
    res = subprocess.run([sys.executable, "-c", _FORKING_IMPORTER, json.dumps(sorted(modules)),
                          json.dumps(_third_party_preload(modules))],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(modules)
    core = _core_import_names()
    bad = []
    for name, r in results.items():
        missing = (r.get("missing") or "").split(".")[0]
        optional = r.get("missing") is not None and missing not in core and missing not in ("", "lmlab")
        if not r["ok"] and not optional:
            bad.append(f"{name}:\n{textwrap.indent(r['error'].rstrip(), '    ')}")
    assert not bad, "modules that do not import on their own:\n" + "\n".join(bad)
