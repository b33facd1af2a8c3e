"""Finding and ending the processes one test launched, by a tag in their environment.

A launch starts launchers, torchrun agents and ranks that a test cannot list by PID; each is
started with `MARK=tag` in its environment, which every child inherits, so /proc finds them all.
"""

from __future__ import annotations

import os
import signal


def tagged(mark: str, tag: str) -> list[int]:
    """Live processes whose environment carries mark=tag."""
    needle = f"{mark}={tag}".encode() + b"\0"
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read():
                    pids.append(int(name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return pids


def kill_tagged(mark: str, tag: str) -> None:
    """SIGKILL every process of the launch, so none is left to the next test."""
    for pid in tagged(mark, tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
