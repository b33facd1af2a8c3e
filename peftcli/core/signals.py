"""Stopping on SIGTERM as on Ctrl-C: at a point where the work can be picked up again.

A scheduler, a container runtime or `kill` sends SIGTERM; Python's default is to die on the spot,
with no checkpoint written and child processes left running. Within `stop_signals()`, SIGTERM and
SIGINT both raise `Stopped` (a KeyboardInterrupt, so every Ctrl-C path handles it too), whose exit
code is the shell's 128 + signal. Within `deferred()` as well, the first signal only records a
request that the work polls at its own boundaries (a training step, a sweep's poll), so that it
can write a checkpoint or stop its children first; a second signal raises at once.

`ProcessGroup` starts a child in a session of its own and signals its whole process group: a
terminal's Ctrl-C then reaches the parent alone, which forwards the stop and waits, and nothing a
child started outlives the stop. On Linux the child is also sent SIGTERM when the parent dies,
even by `kill -9`, so that it stops at its next safe point instead of running on as an orphan.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None  # the first stop signal received inside `deferred()`
_deferring = 0
_depth = 0  # nested `stop_signals()` blocks


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal; `exit_code` is what a shell reports for it (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _note(signum: int) -> None:
    """One line on stderr, written with os.write: printing from a signal handler must not re-enter
    a stream that was half-way through a write."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    name = signal.Signals(signum).name
    try:
        os.write(2, f"\n{name}: stopping at the next safe point (send it again to stop at once)\n".encode())
    except OSError:
        pass


def _handler(signum: int, frame: Any) -> None:
    global _requested
    if _deferring and _requested is None:
        _requested = signum
        _note(signum)
        return
    raise Stopped(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` for the block (main thread only; elsewhere a no-op).
    A signal the process was started to ignore (`nohup`, a background job's SIGINT) stays ignored."""
    global _requested, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    mine = [s for s, h in previous.items() if h is not signal.SIG_IGN]
    if _depth == 0:
        _requested = None
    _depth += 1
    for s in mine:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])
        _depth -= 1
        if _depth == 0:  # a request belongs to the block it was made in
            _requested = None


@contextmanager
def deferred() -> Iterator[None]:
    """Inside `stop_signals()`: the first stop signal is recorded for `requested()`, not raised."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def requested() -> int | None:
    """The stop signal received inside `deferred()`, if any."""
    return _requested


def stop_if_requested() -> None:
    """Raise `Stopped` now if a stop was requested (at a boundary of the deferring work)."""
    if _requested is not None:
        raise Stopped(_requested)


class Stoppable(Protocol):
    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def stop_and_wait(procs: Sequence[Stoppable]) -> None:
    """SIGTERM each running process, then wait for all: they stop at their own safe point. A
    second stop signal (Ctrl-C again) kills them instead and propagates once they are gone."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    try:
        for p in procs:
            p.wait()
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        raise


_PR_SET_PDEATHSIG = 1


def _prctl() -> Any:
    """libc's prctl, looked up in the parent: nothing may be loaded between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _term_with_parent(prctl: Any, parent: int):
    """The child's last step before exec: SIGTERM when the parent dies (and now, if it already has)."""

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class ProcessGroup(subprocess.Popen):
    """A child in a session (and process group) of its own, signalled as a group, and sent
    SIGTERM if this process dies first (Linux)."""

    def __init__(self, args: Sequence[str], **kwargs: Any) -> None:
        prctl = _prctl()
        arm = _term_with_parent(prctl, os.getpid()) if prctl is not None else None
        super().__init__(args, start_new_session=True, preexec_fn=arm, **kwargs)

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is not None:  # reaped: its number may already be someone else's
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


__all__ = ["ProcessGroup", "STOP_SIGNALS", "Stopped", "deferred", "requested", "stop_and_wait", "stop_if_requested",
           "stop_signals"]
