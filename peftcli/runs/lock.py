"""One writer per folder: an OS lock that a second writer meets, and that dies with its holder.

Two processes writing one run folder interleave their checkpoints and metrics (a sweep re-run
beside an orphaned trial once wrote a curve whose steps went backwards), so every command that
writes a folder holds `folder_lock(dest)` from its first check to its last write. The lock is
`flock` on `.NAME.peftcli-lock` beside the folder (peftcli.runs.folder.lock_path): beside it so
that it stays put while the folder is moved aside and swapped, and `flock` so that the kernel
releases it when the holder exits, however it exits: a `kill -9` leaves no lock to clean up. The
holder writes its PID into the file for the message a second writer gets; the file is removed
when the lock is released.

Removing a lock file is safe only with a check: a waiter may have opened the file just before it
was removed, and then holds a lock on a file no one else can find. So after locking, the holder
checks that the path still names the file it locked, and tries again otherwise.

Under torchrun only rank 0 writes, so only rank 0 locks (the caller decides). The lock is
re-entrant within a process: a command that calls another on the same folder (merge of a PEFT
folder imports it first) does not refuse itself.

A command function whose destination is known only part-way (drop names its folder after the
layers it drops) is decorated `@writes_folders` and calls `hold(dest)` just before it checks
the destination; what it holds is released when it returns or raises.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import ParamSpec, TypeVar

from peftcli.core.errors import BadInput
from peftcli.runs.folder import UnsafePathError, check_paths, lock_path

_held: dict[str, tuple[int, int, list[Path]]] = {}  # lock file -> (descriptor, depth, folders made for it)
_guard = threading.Lock()
_scope: ContextVar[ExitStack | None] = ContextVar("peftcli_lock_scope", default=None)
P = ParamSpec("P")
R = TypeVar("R")


class FolderBusyError(BadInput, RuntimeError):
    """Another process is writing the folder: exit 2, naming it and its PID."""


def _holder(path: Path) -> str:
    """The PID written into the lock file by its holder ("unknown" while it is being written)."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"


def _missing_parents(folder: Path) -> list[Path]:
    """The folders `folder.mkdir(parents=True)` would create, outermost first; refuses a file in the way."""
    missing = []
    for d in [folder, *folder.parents]:
        if d.is_dir():
            break
        if d.exists() or d.is_symlink():
            raise UnsafePathError(f"{d} is a file, not a folder; choose a destination under a folder")
        missing.append(d)
    return missing[::-1]


def _acquire(path: Path, dest: Path, what: str, created: list[Path]) -> int:
    """Lock `path` for this process; returns the open descriptor, or refuses. The folders made for
    the lock file are listed in `created`, for `_release` to remove when nothing else went in them."""
    while True:
        try:
            made = _missing_parents(path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            created += [d for d in made if d not in created]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UnsafePathError(f"{what} {dest}: cannot create its lock file {path} ({e.strerror}); "
                                  "choose a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(
                f"{what} {dest} is being written by another peftcli (PID {_holder(path)}); wait for it to finish, "
                "or stop it first") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            on_disk, mine = os.stat(path), os.fstat(fd)
            same = (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file while we waited for it: lock the one in place now
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _release(path: Path, fd: int, created: list[Path] = ()) -> None:
    """Remove the lock file, then unlock: the order that lets a waiter notice (see the module).
    Then the folders made for it, innermost first, while they are empty: a refused command leaves
    no empty parent behind, and a folder something was written into stays."""
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break


@contextmanager
def folder_lock(dest: Path | str, *, what: str = "folder",
                sources: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Hold the one-writer lock of `dest` for the block; refuse (FolderBusyError, exit 2) when
    another process holds it. `what` names the destination in messages (output.dir, --out, ...).

    The path checks that need nothing on disk (peftcli.runs.folder.check_paths, with the command's
    `sources`) run first, so that nothing is created for a destination that will be refused; the
    lock's own folder (dest's parent) is created.
    """
    dest = Path(dest)
    check_paths(dest, what=what, sources=sources)
    path = lock_path(dest)
    key = str(path)
    with _guard:
        if key in _held:
            fd, depth, created = _held[key]
            _held[key] = (fd, depth + 1, created)
        else:
            created: list[Path] = []
            _held[key] = (_acquire(path, dest, what, created), 1, created)
    try:
        yield path
    finally:
        with _guard:
            fd, depth, created = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1, created)
            else:
                del _held[key]
                _release(path, fd, created)


def writes_folders(fn: Callable[P, R]) -> Callable[P, R]:
    """The locks `fn` takes with `hold` are released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with ExitStack() as stack:
            token = _scope.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _scope.reset(token)

    return wrapper


def hold(dest: Path | str, *, what: str, sources: Iterable[Path | str | None] = ()) -> None:
    """Take `folder_lock(dest)` until the enclosing `@writes_folders` function ends."""
    stack = _scope.get()
    if stack is None:
        raise RuntimeError("hold() outside a @writes_folders function: the lock would never be released")
    stack.enter_context(folder_lock(dest, what=what, sources=sources))


__all__ = ["FolderBusyError", "folder_lock", "hold", "writes_folders"]
