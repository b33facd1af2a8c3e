"""Layers without circles: every module imports on its own, no package imports one above it, and no
module-level import closes a loop.

An import circle works or fails depending on which module a program happens to import first, so
it shows up as an ImportError in someone else's script, not in the suite. Two checks catch it here:

- each module of the package is imported alone in a fresh interpreter state: a child process
  forked from a parent that has loaded the heavy third-party libraries (torch, transformers) but
  no peftcli module, which is what `python -c "import peftcli.X"` tests, at a fraction of the cost
  (one `python -c` per module where fork is missing);
- a static walk of the package's import graph fails on any cycle and prints it. Only imports run
  when a module is imported count: module level, including `if`/`try` blocks and class bodies, but
  not imports inside functions (deferred until called) nor under `if TYPE_CHECKING:`. A deferred
  import can still hide a layering mistake; the cycles it hides are listed by
  `deferred_cycles()` for whoever works on the layers, but only module-level ones fail the test.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "peftcli"


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module and package of peftcli."""
    out: dict[str, Path] = {}
    for f in sorted(PKG.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module_level_only: bool) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            elif module_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for n in child.orelse:
                    visit(ast.Module(body=[n], type_ignores=[]))
            else:
                visit(child)

    visit(tree)
    return found


def import_graph(module_level_only: bool = True) -> dict[str, set[str]]:
    """Edges module -> peftcli modules it imports (a package's __init__ counts as importing its
    submodules only where it names them). Importing `peftcli.a.b` also runs `peftcli.a`'s
    __init__, so that is an edge too, unless it is the importer's own ancestor (already running)."""
    mods = package_modules()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(f.read_text(encoding="utf-8")), module_level_only):
            if isinstance(node, ast.Import):
                bases = [a.name for a in node.names]
                subs: list[str] = []
            else:
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                bases = [base]
                subs = [f"{base}.{a.name}" for a in node.names]
            for t in bases + [s for s in subs if s in mods]:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):  # the module and every package above it
                    m = ".".join(parts[:i])
                    if m in mods and not name.startswith(m + ".") and m != name:
                        targets.add(m)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        # Shortest way back to the start inside the component (breadth first).
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def deferred_cycles() -> list[list[str]]:
    """Cycles that appear when imports inside functions count too."""
    return find_cycles(import_graph(module_level_only=False))


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_relative_and_nested_imports():
    g = import_graph()
    assert "peftcli.core.switch" in g["peftcli.runs.load"]
    assert "peftcli.core.arch" in g["peftcli.core.switch"]  # `from ..arch import Arch`
    assert "peftcli.methods" in g["peftcli.commands.drop"]  # `from ..methods.fusion import ...` runs methods/__init__


def test_no_module_level_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_import_cycle_even_inside_functions():
    # A deferred import only hides a circle; the layers (core, methods, library, commands) must not have one.
    cycles = deferred_cycles()
    assert not cycles, "import cycles through function-level imports:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_only_the_cli_and_commands_import_commands():
    graph = import_graph(module_level_only=False)
    above = {"peftcli.cli", "peftcli.training.launch"}
    bad = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
           if d.startswith("peftcli.commands.") and not m.startswith("peftcli.commands") and m not in above]
    assert not bad, "the library must not depend on a command:\n" + "\n".join(bad)


# Bottom to top: a module may import its own package and the packages below it, never one above,
# inside functions included (a deferred import is still a dependency). `peftcli` itself (the
# version) is open to all; `cli` is the top, alone.
LAYERS = ("core", "models", "methods", "config", "data", "runs", "inference", "training", "commands", "cli")


def layer(module: str) -> str | None:
    """The layer of `peftcli.<layer>[.…]`; None for `peftcli` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for mod, deps in sorted(graph.items()):
        own = layer(mod)
        for dep in sorted(deps):
            if any(d.startswith(dep + ".") for d in deps):
                continue  # `peftcli.runs` only because `peftcli.runs.x` is imported: named once, as runs.x
            if layer(dep) is not None and own is not None and rank[layer(dep)] > rank[own]:
                bad.append(f"{mod} ({own}) imports {dep} ({layer(dep)})")
    return bad


# Known upward imports, each waiting for its move; the test fails once one is gone, so the entry goes too.
PENDING: set[str] = set()  # upward imports known and not yet moved: none


def test_every_module_sits_in_a_layer():
    unplaced = sorted(m for m in package_modules() if layer(m) is not None and layer(m) not in LAYERS)
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_layer_check_finds_a_planted_upward_import():
    graph = {"peftcli.core.a": {"peftcli.runs.b", "peftcli"}, "peftcli.runs.b": {"peftcli.core.a"},
             "peftcli.cli": {"peftcli.commands.x"}, "peftcli.commands.x": {"peftcli.cli"}}
    graph["peftcli.core.a"].add("peftcli.runs")  # the package of runs.b, named once
    assert layer_violations(graph) == ["peftcli.commands.x (commands) imports peftcli.cli (cli)",
                                       "peftcli.core.a (core) imports peftcli.runs.b (runs)"]


def test_no_package_imports_one_above_it():
    bad = layer_violations(import_graph(module_level_only=False))
    new = [b for b in bad if b not in PENDING]
    assert not new, f"imports that go up the layers {' < '.join(LAYERS)}:\n" + "\n".join(new)
    assert PENDING <= set(bad), f"no longer true, remove from PENDING: {sorted(PENDING - set(bad))}"


_CHILD = r"""
import importlib, os, sys, traceback
# Third-party libraries are loaded once, here, so that each forked child pays only for peftcli's own
# modules; no peftcli module is loaded here.
import torch, transformers, transformers.generation, tokenizers, safetensors.torch, typer, rich.console  # noqa: F401
assert not [m for m in sys.modules if m == "peftcli" or m.startswith("peftcli.")]
failed = []
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc()[-3000:].encode())
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name + ":\n" + b"".join(chunks).decode(errors="replace"))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.slow
def test_every_module_imports_alone():
    names = sorted(package_modules())
    if hasattr(os, "fork"):
        res = subprocess.run([sys.executable, "-c", _CHILD, *names], capture_output=True, text=True,
                             cwd=ROOT, env=_clean_env(), timeout=600)
        assert res.returncode == 0, "modules that fail to import alone:\n" + res.stdout + res.stderr[-3000:]
        return
    failed = []
    for name in names:  # pragma: no cover - platforms without fork
        res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                             cwd=ROOT, env=_clean_env(), timeout=300)
        if res.returncode:
            failed.append(f"{name}:\n{res.stderr[-3000:]}")
    assert not failed, "modules that fail to import alone:\n" + "\n".join(failed)


@pytest.mark.parametrize("name", ["peftcli.core.precision", "peftcli.core.quiet"])
def test_core_helpers_import_nothing_from_peftcli(name):
    """The bottom of the layers: these import no peftcli module at all, even inside functions."""
    g = import_graph(module_level_only=False)
    assert g[name] <= {"peftcli", "peftcli.core"}, g[name]


def test_no_script_or_harness_edits_sys_path():
    """Scripts import their neighbours and the package as installed (`pip install -e .`); a
    `sys.path` edit would hide a script that only runs from one folder."""
    edits = [str(f.relative_to(ROOT)) for d in ("scripts", "tests/harness") for f in sorted((ROOT / d).rglob("*.py"))
             if any(f"sys.path.{op}(" in f.read_text() for op in ("insert", "append", "extend"))]
    assert edits == []
