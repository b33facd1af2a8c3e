"""Writing files and folders so that a crash or a kill never leaves half of one.

One scheme for everything peftcli writes: the new file or folder is written under a temporary
sibling name, flushed to disk, and renamed into place; a folder being replaced is first renamed
aside, and removed only once the new one is in place. A kill at any moment leaves the old
version, or the new one complete under its temporary name with the old one aside, and
`recover_dir` turns either back into a folder at its own name.

Temporary names are `.NAME.peftcli-tmp-PID` (being written) and `.NAME.peftcli-old-PID` (moved
aside). The `peftcli-` tag and the writer's pid make them names no user gives a file (a
`.zshrc.old-1` or `.photos.old-2019/` never matches), so that peftcli can tidy them without ever
taking a user's file for its own. Names of the form `.NAME.tmp-PID` / `.NAME.old-PID`, which
versions before this module used for checkpoints, are not read: no released version wrote them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from peftcli.core.faults import kill_point

TAG = "peftcli"
ROLES = ("tmp", "old")  # being written; moved aside
_TEMP = re.compile(r"\.(?P<name>.+)\." + TAG + r"-(?P<role>tmp|old)-(?P<pid>\d+)")


# ------------------------------------------------------------------------------ names


def temp_sibling(path: Path, role: str = "tmp", pid: int | None = None) -> Path:
    """The temporary (`tmp`) or moved-aside (`old`) name of `path` for process `pid` (this one)."""
    if role not in ROLES:
        raise ValueError(f"temporary role {role!r}; expected one of {', '.join(ROLES)}")
    path = Path(path)
    return path.with_name(f".{path.name}.{TAG}-{role}-{os.getpid() if pid is None else pid}")


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """(the name it stands for, role, pid) of a temporary name peftcli gives, else None."""
    m = _TEMP.fullmatch(name)
    return None if m is None else (m.group("name"), m.group("role"), int(m.group("pid")))


def is_temp_name(name: str) -> bool:
    """A name peftcli gives its temporary and moved-aside files and folders (never a user's)."""
    return parse_temp_name(name) is not None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (this one included) still runs: its temporary files are in use."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------ flushing


def fsync_path(path: Path) -> None:
    """Flush one file or folder to disk; file systems that cannot fsync a folder are let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def share_modes(root: Path) -> None:
    """Give each file under `root` (or `root` itself, a file) the mode the user's umask gives a new
    file. Writers that go through a temporary file (safetensors, and tempfile's) create it readable
    by its owner alone, so a merged model or a run folder meant for others would not be readable by
    them, unlike every other file beside it."""
    mode = 0o666 & ~_UMASK
    paths = [Path(root)] if Path(root).is_file() else [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    for f in paths:
        if not f.is_symlink() and f.is_file() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def remove(path: Path) -> None:
    """Remove a file, a link or a folder tree (a link to a folder: the link only)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ------------------------------------------------------------------------------ files


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) to fill a temporary sibling file, flush it, and rename it to `path`:
    a reader sees the old file or the new one, never part of one."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        share_modes(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        raise
    fsync_path(path.parent)


def atomic_file_write(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically (see `atomic_write`)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda tmp: tmp.write_bytes(raw))


# ------------------------------------------------------------------------------ folders


def swap_into_place(tmp: Path, dest: Path) -> Path | None:
    """Rename the complete folder `tmp` to `dest`, moving an existing `dest` aside first; returns
    the aside path (None when there was nothing at `dest`) for the caller to remove. When the
    final rename fails, the old folder is put back."""
    tmp, dest = Path(tmp), Path(dest)
    aside = None
    if dest.exists() or dest.is_symlink():
        aside = temp_sibling(dest, "old")
        if aside.exists() or aside.is_symlink():  # our own name and pid: a leftover of this very process
            remove(aside)
        os.rename(dest, aside)
    kill_point("save:old-moved")
    try:
        os.rename(tmp, dest)
    except BaseException:
        if aside is not None:
            os.rename(aside, dest)
        raise
    fsync_path(dest.parent)
    return aside


def write_dir(dest: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) to fill a temporary sibling folder, then swap it into `dest`.

    A kill at any point leaves either the previous folder, or the new one complete under its
    temporary name with the previous one moved aside; `recover_dir` turns either into `dest`.
    """
    dest = Path(dest)
    tmp = temp_sibling(dest)
    if tmp.exists() or tmp.is_symlink():
        remove(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        share_modes(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kill_point("save:tmp-written")
    aside = swap_into_place(tmp, dest)
    kill_point("save:renamed")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def temp_siblings(dest: Path) -> list[tuple[Path, str, int]]:
    """(path, role, pid) of every temporary sibling of `dest`, oldest first. A temporary of a
    temporary (a folder written atomically into another one's temporary name) counts as `tmp`."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    found = []
    for entry in dest.parent.iterdir():
        parsed = parse_temp_name(entry.name)
        if parsed is None:
            continue
        name, role, pid = parsed
        inner = parse_temp_name(name)
        while inner is not None and name != dest.name:  # .X.peftcli-tmp-1 of .Y.peftcli-tmp-2 ...
            name, role = inner[0], "tmp"
            inner = parse_temp_name(name)
        if name == dest.name:
            found.append((entry, role, pid))
    return sorted(found, key=lambda f: f[0].lstat().st_mtime)


def recover_dir(
    dest: Path,
    *,
    complete: Callable[[Path], bool] = lambda p: False,
    discardable: Callable[[Path], bool] = lambda p: True,
    skip_live: bool = True,
) -> str | None:
    """Bring `dest` back after a kill inside a swap (`write_dir`, `swap_into_place`); say what was done.

    When `dest` is missing, the newest temporary folder that `complete` accepts becomes `dest` if
    an old one was moved aside (the kill fell between the two renames), else the newest folder
    moved aside is put back. Other temporary siblings are removed; a moved-aside one only when
    `discardable` accepts it (else it is left in place). With `skip_live`, siblings of running
    processes are left alone (they are being written); without, the caller knows no other
    process writes here.
    """
    dest = Path(dest)
    sibs = [s for s in temp_siblings(dest) if not (skip_live and pid_alive(s[2]))]
    tmps = [p for p, role, _ in sibs if role == "tmp"]
    olds = [p for p, role, _ in sibs if role == "old"]
    done, placed = None, None
    if not dest.exists() and not dest.is_symlink():
        whole = [t for t in tmps if t.is_dir() and complete(t)]
        if whole and olds:
            placed, done = whole[-1], f"finished an interrupted swap of {dest}"
        elif olds:
            placed, done = olds[-1], f"restored {dest} from its moved-aside copy"
        if placed is not None:
            os.rename(placed, dest)
    for p in tmps:
        if p != placed and (p.exists() or p.is_symlink()):
            remove(p)
    for p in olds:
        if p != placed and (p.exists() or p.is_symlink()) and discardable(p):
            remove(p)
    return done


__all__ = [
    "ROLES", "TAG", "atomic_file_write", "atomic_write", "fsync_path", "fsync_tree", "is_temp_name", "share_modes",
    "parse_temp_name", "pid_alive", "recover_dir", "remove", "swap_into_place", "temp_sibling", "temp_siblings",
    "write_dir",
]
