"""`peftcli recipes`: the shipped recipes, listed and copied out to edit."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from peftcli.core.errors import UsageError
from peftcli.core.files import atomic_file_write

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; annotations only


def shipped_recipes() -> dict[str, Traversable]:
    """The shipped recipes by name, read as package data of `peftcli.recipes`.

    That package is the clone's top-level recipes/ folder (peftcli/recipes links to it, and the
    wheel carries it as peftcli/recipes/), so a clone, an editable install and a wheel install
    list the same recipes. Nothing else is searched: a recipe missing here is a packaging bug
    that should show, not be papered over by a second place to look.
    """
    from importlib.resources import files

    try:
        root = files("peftcli.recipes")
    except ModuleNotFoundError:
        return {}
    found = [f for f in root.iterdir() if f.name.endswith(".yaml") and f.is_file()]
    return {f.name.removesuffix(".yaml"): f for f in sorted(found, key=lambda f: f.name)}


def recipe_rows() -> list[tuple[str, str, str, str, str]]:
    """(name, method, model, data source, description) of each shipped recipe; the description is
    the text of its first comment line."""
    rows = []
    for name, f in shipped_recipes().items():
        text = f.read_text(encoding="utf-8")
        desc = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        raw = yaml.safe_load(text) or {}
        rows.append((name, str((raw.get("method") or {}).get("name", "")), str((raw.get("model") or {}).get("name", "")),
                     str((raw.get("data") or {}).get("source", "")), desc))
    return rows


def copy_recipe(name: str, dest: Path) -> tuple[str, Path]:
    """Copy shipped recipe `name` to `dest` (a file, or a folder to put NAME.yaml in), never over
    an existing file; returns the recipe's name and the file written."""
    names = shipped_recipes()
    key = name.removesuffix(".yaml")
    if key not in names:
        close = difflib.get_close_matches(key, list(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; `peftcli recipes` lists them"
        raise UsageError(f"no shipped recipe named {name!r}{hint}")
    target = dest / f"{key}.yaml" if dest.is_dir() else dest
    if target.exists() or target.is_symlink():  # a dangling link too: writing would go where it points
        raise UsageError(f"{target} exists; choose another destination")
    if not target.parent.is_dir():
        what = "is not a folder" if target.parent.exists() else "does not exist"
        raise UsageError(f"{target}: {target.parent} {what}; copy into an existing folder")
    atomic_file_write(target, names[key].read_text(encoding="utf-8"))
    return key, target
