"""The wheel carries every shipped recipe, where `peftcli recipes` looks for them.

The recipes live once, in the top-level recipes/ folder that users run from a clone;
peftcli/recipes links to it. These tests build the wheel offline from a copy of the project (a
build writes build/ and *.egg-info next to the sources, which must not race with other checkouts)
and check what a plain, non-editable install would get.
"""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes_to_ship():
    assert len(RECIPES) > 10


def test_source_tree_package_lists_every_recipe():
    """From a clone (or an editable install), importlib.resources sees the top-level folder."""
    found = sorted(f.name for f in importlib.resources.files("peftcli.recipes").iterdir() if f.name.endswith(".yaml"))
    assert found == RECIPES


def test_cli_reads_the_package_only():
    from peftcli.commands.recipes import shipped_recipes

    assert sorted(f"{name}.yaml" for name in shipped_recipes()) == RECIPES


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "peftcli", src / "peftcli", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    out = tmp / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
         str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = out.glob("peftcli-*.whl")
    return whl


@pytest.mark.slow
@pytest.mark.packaging
def test_wheel_carries_every_recipe_as_package_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for r in RECIPES:
            assert f"peftcli/recipes/{r}" in names, f"{r} is not in the wheel"
            assert z.read(f"peftcli/recipes/{r}") == (ROOT / "recipes" / r).read_bytes()


@pytest.mark.slow
@pytest.mark.packaging
def test_wheel_carries_every_module(wheel):
    """A subpackage the package finder misses would import in a clone and fail once installed."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "peftcli").rglob("*.py")
               if "__pycache__" not in p.parts and str(p.relative_to(ROOT)) not in names]
    assert not missing, f"modules missing from the wheel: {missing}"


@pytest.mark.packaging
def test_installed_wheel_lists_every_recipe(wheel, tmp_path):
    """Import peftcli from the wheel alone (no site-packages, no clone on the path), as a plain
    `pip install .` would leave it, and list `peftcli.recipes` with importlib.resources."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = (
        "import importlib.resources, sys, peftcli\n"
        f"assert peftcli.__file__.startswith({str(site)!r}), peftcli.__file__\n"
        "print('\\n'.join(sorted(f.name for f in importlib.resources.files('peftcli.recipes').iterdir())))\n"
    )
    res = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n{code}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = [n for n in res.stdout.split() if n.endswith(".yaml")]
    assert listed == RECIPES
