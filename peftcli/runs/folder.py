"""Output folders: where a command may write, and what it may delete.

Every command that writes a folder goes through here, so that three promises hold in one place:

- A destination that is, holds, or lies inside something the command reads (the run, the recipe,
  the data, the base model, a PEFT folder) is refused before any work, and so are '', '.', '/',
  the home folder and the current folder with its parents: one typo must not cost a user's files.
- Replacing (`--force`, `output.overwrite`) deletes only a folder peftcli wrote: one whose MARKER
  lists everything in it, or a run folder without the marker whose entries are all names a run
  writes, whose recipe.yaml parses as a peftcli recipe and whose adapter/meta.json names a
  registered method. Anything else in the way is refused and left byte-identical.
- A new folder is written into a temporary sibling and renamed into place only once complete,
  so a failure (or a kill) leaves the previous folder as it was and nothing half-written at DEST.

The swap and its sibling names are core/files' (`.NAME.peftcli-tmp-PID` being written,
`.NAME.peftcli-old-PID` the old folder moved aside); `recover_stale` tidies those of processes
that died.
`.NAME.peftcli-lock` is the lock of the one process writing NAME (peftcli.runs.lock): beside the
folder, so that it stays put while the folder is swapped, and never one of its entries.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftcli.config.recipe import Recipe, recipe_yaml
from peftcli.core.errors import BadInput
from peftcli.core.files import (
    atomic_file_write,
    fsync_tree,
    is_temp_name,
    recover_dir,
    remove,
    share_modes,
    swap_into_place,
    temp_sibling,
)

MARKER = ".peftcli.json"
KINDS = ("run", "export", "merge", "import", "drop", "fuse", "combine")
# Kinds whose folders are run folders: `peftcli eval` adds eval_*.json to them later.
RUN_KINDS = frozenset({"run", "import", "drop", "fuse", "combine"})
# Every top-level name a run folder has ever held (train, eval, drop); a fused run keeps its
# sources' weights inside adapter/, so it adds no name of its own.
RUN_ENTRIES = frozenset({"recipe.yaml", "adapter", "last", "metrics.jsonl", "summary.json", "curves.png", "drop.json",
                         # train.report_to: what the trackers write into the run (peftcli/training/tracking.py)
                         "tensorboard", "wandb", "mlruns", "mlflow.db", "mlartifacts"})
_EVAL_FILE = re.compile(r"eval_[\w.-]+\.json")
LOCK_SUFFIX = ".peftcli-lock"


class UnsafePathError(BadInput, ValueError):
    """A destination that would overwrite or delete what is not peftcli's: bad input, exit 2."""


# ------------------------------------------------------------------------------ ownership


def is_lock_name(name: str) -> bool:
    """A writer's lock file (peftcli.runs.lock), beside the folder it locks: ours, never deleted
    as a leftover (a live writer may hold it)."""
    return name.startswith(".") and name.endswith(LOCK_SUFFIX) and len(name) > len(LOCK_SUFFIX) + 1


def lock_path(dest: Path) -> Path:
    """Where the lock of the writer of `dest` lives: beside it, under its real (symlink-free) name,
    so that every spelling of one folder meets the same lock."""
    real = Path(os.path.realpath(str(dest)))
    return real.with_name(f".{real.name}{LOCK_SUFFIX}")


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or _EVAL_FILE.fullmatch(name) is not None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's MARKER if it is present and well-formed, else None (a broken marker proves nothing)."""
    f = Path(folder) / MARKER
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return None
    return data


def foreign_entries(path: Path) -> list[str]:
    """Names in `path` that peftcli did not write (all of them when it is not a peftcli folder)."""
    path = Path(path)
    names = sorted(os.listdir(path))
    marker = read_marker(path)
    if marker is not None:
        listed = set(marker["entries"]) | {MARKER}
        run_like = marker["kind"] in RUN_KINDS
        return [n for n in names if not (n in listed or is_temp_name(n) or is_lock_name(n)
                                         or (run_like and _is_run_entry(n)))]
    if "recipe.yaml" not in names:
        return names
    foreign = [n for n in names if not (_is_run_entry(n) or is_temp_name(n) or is_lock_name(n))]
    if foreign:
        return foreign
    # Names alone prove nothing (a user's folder may hold a recipe.yaml and a metrics.jsonl):
    # without a marker, the folder must also read as a run peftcli wrote.
    return [] if reads_as_run(path) else sorted(n for n in names if not (is_temp_name(n) or is_lock_name(n)))


def reads_as_run(path: Path) -> bool:
    """recipe.yaml parses as a peftcli recipe and adapter/meta.json names a registered method."""
    from peftcli.config.recipe import recipe_from_dict
    from peftcli.core.adapter_files import read_run_recipe
    from peftcli.methods import all_methods

    try:
        raw = read_run_recipe(path)
        meta = json.loads((path / "adapter" / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            return False
        recipe_from_dict(raw, str(path / "recipe.yaml"))
    except Exception:  # noqa: BLE001  (anything that does not read as a recipe is not one of ours)
        return False
    return isinstance(meta.get("method"), str) and meta["method"] in all_methods()


def is_ours(path: Path) -> bool:
    """True only for a real folder peftcli wrote: MARKER lists its entries, or it is a run folder
    from before markers whose top-level names are all ones a run writes."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    names = os.listdir(path)
    if MARKER not in names and "recipe.yaml" not in names:
        return False
    if MARKER in names and read_marker(path) is None:
        return False
    return not foreign_entries(path)


def write_marker(folder: Path, kind: str) -> None:
    """(Re)write MARKER listing the folder's entries as they are now (a training run's: only the
    names a run writes): the list is what a later `--force` may delete, so call it after the last
    file is written."""
    from peftcli import __version__

    if kind not in KINDS:
        raise ValueError(f"marker kind {kind!r}; expected one of {', '.join(KINDS)}")
    folder = Path(folder)
    entries = sorted(n for n in os.listdir(folder) if n != MARKER and not is_temp_name(n) and not is_lock_name(n))
    if kind == "run":  # written in place while training: a file someone added meanwhile is not ours
        entries = [n for n in entries if _is_run_entry(n)]
    atomic_file_write(folder / MARKER,
                      json.dumps({"kind": kind, "entries": entries, "peftcli_version": __version__}, indent=2) + "\n")


# ------------------------------------------------------------------------------ refusing


def _abs(p: Path | str) -> Path:
    """Absolute, symlinks resolved where they exist, so two spellings of one folder compare equal."""
    return Path(os.path.realpath(str(p)))


def anchor_path(v: Any) -> Any:
    """`v` made absolute when it names an existing local file or folder; anything else (a hub id,
    a path that does not exist here, None) as it is."""
    if isinstance(v, str) and v and not os.path.isabs(v) and os.path.exists(os.path.expanduser(v)):
        return os.path.abspath(os.path.expanduser(v))
    return v


def anchored(recipe: Recipe) -> Recipe:
    """A copy of `recipe` whose inputs that name an existing local file or folder (model.name,
    data.source, init_from, method.adapters) are absolute paths: what a run folder's recipe.yaml
    keeps. It is read later from wherever its user stands, perhaps by someone else, and a path
    relative to the folder training started in would then load another model or score other data."""
    from peftcli.data.sources import BUILTIN_SOURCES

    r = copy.deepcopy(recipe)
    r.model.name = anchor_path(r.model.name)
    if r.data.source not in BUILTIN_SOURCES:
        r.data.source = anchor_path(r.data.source)
    r.init_from = anchor_path(r.init_from)
    if isinstance(getattr(r.method, "adapters", None), list):
        r.method.adapters = [anchor_path(a) for a in r.method.adapters]
    return r


def run_recipe_yaml(recipe: Recipe) -> str:
    """The recipe.yaml a run folder keeps: every default filled in, local inputs anchored."""
    return recipe_yaml(anchored(recipe))


def local_inputs(recipe) -> list[Path]:
    """The files and folders on this machine a recipe reads: model, data, init_from, fused sources.
    A hub id that is not also a local path is no input here."""
    cands: list[Any] = [recipe.model.name, recipe.data.source, recipe.init_from,
                        *(getattr(recipe.method, "adapters", None) or [])]
    return [Path(c) for c in cands if isinstance(c, str) and c and os.path.exists(c)]


def protected_inputs(recipe) -> list[Path]:
    """Paths a recipe's run folder must never be, hold or sit inside: the recipe file and its inputs."""
    return [*([Path(recipe.source)] if recipe.source else []), *local_inputs(recipe)]


def check_paths(dest: Path, *, what: str, sources: Iterable[Path | str | None] = ()) -> None:
    """The path-only half of check_destination (touches nothing, reads nothing): refuse the
    current folder, its parents, the root, home and its parents, and any overlap with `sources`."""
    raw = str(dest)
    if raw.strip() in ("", "."):
        raise UnsafePathError(f"{what} {raw!r} is the current folder; name a new folder for it (e.g. out/)")
    if raw.startswith("~"):  # a folder literally named ~ invites a later `rm -rf ~`
        raise UnsafePathError(f"{what} {raw!r} starts with '~', which no shell expanded here; write the path out")
    d = _abs(dest)
    if d == Path(d.anchor):
        raise UnsafePathError(f"{what} {dest} is the root of the file system; name a new folder for it")
    cwd = _abs(Path.cwd())
    if d == cwd or d in cwd.parents:
        where = "the current folder" if d == cwd else f"a parent of the current folder ({cwd})"
        raise UnsafePathError(f"{what} {dest} is {where}; name a new folder for it (e.g. {dest}/out)")
    home = _abs(Path.home())
    if d == home or d in home.parents:
        where = "your home folder" if d == home else f"a parent of your home folder ({home})"
        raise UnsafePathError(f"{what} {dest} is {where}; name a new folder for it")
    for s in sources:
        if s is None or str(s) == "":
            continue
        rs = _abs(s)
        if d == rs:
            why = "is the same path as"
        elif rs in d.parents:
            why = "is inside"
        elif d in rs.parents:
            why = "contains"
        else:
            continue
        raise UnsafePathError(
            f"{what} {dest} {why} {s}, which this command reads; choose a folder outside it"
        )


def check_destination(dest: Path, *, what: str, sources: Sequence[Path | str | None] = (),
                      replace: bool = False) -> None:
    """Refuse, before anything is written, a destination that is unsafe to fill or to replace.

    `sources` are what the command reads (run, recipe, data, init_from, base model); `replace` is
    --force / output.overwrite. Leftovers of a killed peftcli writing to `dest` are tidied first
    (only its own `.peftcli-tmp/old-PID` siblings), so a crash never blocks the next try.
    """
    dest = Path(dest)
    check_paths(dest, what=what, sources=sources)
    recover_stale(dest)
    if dest.is_symlink():
        raise UnsafePathError(f"{what} {dest} is a symbolic link; name the folder itself, or a new one")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UnsafePathError(f"{what} {dest} exists and is not a folder; choose another path or move it away")
    if not any(dest.iterdir()):
        return
    if not is_ours(dest):
        foreign = foreign_entries(dest) or [MARKER]
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UnsafePathError(
            f"{what} {dest} is not a folder peftcli wrote (it holds {shown}); refusing to delete it. "
            "Choose another folder, or empty this one yourself"
        )
    if not replace:
        flag = "output.overwrite=true" if what == "output.dir" else "--force"
        raise UnsafePathError(f"{what} {dest} holds what peftcli wrote before; pass {flag} to replace it, "
                              "or choose another folder")


# ------------------------------------------------------------------------------ swapping


def _occupied(path: Path) -> bool:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


@contextmanager
def replacing(dest: Path, *, kind: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dest` to write the new folder into. When the block
    ends normally, MARKER is written, everything is flushed, the old `dest` (already checked) is
    moved aside, the new one renamed into place and the old one removed. When the block raises,
    only the temporary folder is removed: `dest` is never touched."""
    if kind not in KINDS:
        raise ValueError(f"folder kind {kind!r}; expected one of {', '.join(KINDS)}")
    dest = Path(dest)
    check_paths(dest, what=f"{kind} destination")  # cheap, and a caller that skipped the check never moves cwd
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    if tmp.exists() or tmp.is_symlink():  # our own name and pid: a leftover of this very process
        remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, kind)
        share_modes(tmp)
        fsync_tree(tmp)
        if _occupied(dest) and not is_ours(dest):  # something moved in since the destination was checked
            raise UnsafePathError(f"{dest} now holds files peftcli did not write; refusing to replace it")
        aside = swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        discard_aside(aside)


def move_aside(dest: Path) -> Path | None:
    """Rename an existing, already checked `dest` to its aside sibling and return that path
    (None when there is nothing at `dest`). A rename, not a copy: instant, and reversible."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return None
    check_paths(dest, what="folder to move aside")
    aside = temp_sibling(dest, "old")
    if aside.exists() or aside.is_symlink():
        discard_aside(aside)
    os.rename(dest, aside)
    return aside


def restore_aside(aside: Path, dest: Path) -> None:
    """Put a folder moved aside back at `dest` (a new run failed before its first checkpoint).
    Whatever the failed attempt left at `dest` is removed only if peftcli wrote it."""
    aside, dest = Path(aside), Path(dest)
    if dest.exists() or dest.is_symlink():
        if _occupied(dest) and not is_ours(dest):
            raise UnsafePathError(
                f"{dest} holds files peftcli did not write, so the previous folder was not put back; it is at {aside}"
            )
        remove(dest)
    os.rename(aside, dest)


def discard_aside(aside: Path) -> None:
    """Remove a folder moved aside, only if peftcli wrote it (or it is empty)."""
    aside = Path(aside)
    if not aside.exists() and not aside.is_symlink():
        return
    if aside.is_dir() and not aside.is_symlink() and not any(aside.iterdir()):
        aside.rmdir()
        return
    if not is_ours(aside):
        raise UnsafePathError(f"{aside} is not a folder peftcli wrote; left in place")
    shutil.rmtree(aside)


def recover_stale(dest: Path) -> list[Path]:
    """Tidy the siblings a killed peftcli left next to `dest`: its half-written temporary folder
    is removed; its aside folder (the old `dest`) is put back if `dest` is missing, otherwise
    discarded only when peftcli wrote it. Siblings of live processes are left alone. Returns what
    it handled."""
    from peftcli.core.files import pid_alive, temp_siblings

    dest = Path(dest)
    before = [p for p, _, pid in temp_siblings(dest) if not pid_alive(pid)]
    recover_dir(dest, discardable=lambda p: _empty_dir(p) or is_ours(p))
    return [p for p in before if not (p.exists() or p.is_symlink())]


def _empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


__all__ = [
    "KINDS", "MARKER", "RUN_ENTRIES", "UnsafePathError", "anchor_path", "anchored", "check_destination",
    "check_paths", "discard_aside", "foreign_entries", "is_lock_name", "is_ours", "local_inputs", "lock_path",
    "move_aside", "protected_inputs", "read_marker", "reads_as_run", "recover_stale", "replacing",
    "restore_aside", "run_recipe_yaml", "write_marker",
]
