"""TEMPORARY stand-in; replaced by the full module at merge."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

MARKER = ".peftcli.json"


class UnsafePathError(ValueError):
    pass


def is_ours(path: Path) -> bool:
    path = Path(path)
    return (path / MARKER).exists() or (path / "recipe.yaml").exists()


def check_destination(dest: Path, *, what: str, sources: Sequence[Path] = (), replace: bool = False) -> None:
    dest = Path(dest)
    if str(dest) in ("", ".") or dest.resolve() in (Path("/"), Path.home(), *Path.cwd().resolve().parents, Path.cwd().resolve()):
        raise UnsafePathError(f"{what}: {dest!s} is not a folder peftcli may use")
    if dest.exists() and any(dest.iterdir()):
        if not replace:
            raise UnsafePathError(f"{dest} already holds a run; pass --resume to continue it, set output.overwrite=true")
        if not is_ours(dest):
            raise UnsafePathError(f"{dest} is not a folder peftcli wrote; refusing to delete it")


def move_aside(dest: Path) -> Path | None:
    dest = Path(dest)
    if not dest.exists():
        return None
    aside = dest.with_name(f".{dest.name}.peftcli-old-{os.getpid()}")
    dest.rename(aside)
    return aside


def restore_aside(aside: Path, dest: Path) -> None:
    if Path(dest).exists() and is_ours(dest):
        shutil.rmtree(dest)
    Path(aside).rename(dest)


def discard_aside(aside: Path) -> None:
    shutil.rmtree(aside)


def write_marker(folder: Path, kind: str) -> None:
    folder = Path(folder)
    (folder / MARKER).write_text(json.dumps({"kind": kind, "entries": sorted(p.name for p in folder.iterdir())}))
