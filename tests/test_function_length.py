"""No function of peftcli is longer than a reader can hold: 80 lines, docstring included.

A function that grows past it does several things; split it into functions whose names say what
each does (issue 29). Declarative tables are module-level data, not functions, so they are not
counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "peftcli"
LIMIT = 80


def long_functions(root: Path) -> list[str]:
    out = []
    for f in sorted(root.rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > LIMIT:
                out.append(f"{f.relative_to(root.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    return out


def test_no_function_over_80_lines():
    found = long_functions(PKG)
    assert not found, "functions over 80 lines:\n" + "\n".join(found)


def test_the_check_sees_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n" + "    x = 1\n" * 81)
    assert long_functions(pkg) == ["pkg/m.py:1 f (82 lines)"]
