"""Fault injection for crash-safety tests: kill this process at a named point.

`PEFTCLI_KILL_AT="save:renamed:3"` makes the process SIGKILL itself the 3rd time it passes the
point `save:renamed` (count defaults to 1). Points are placed where a real crash would hurt most:
between the writes and renames of a checkpoint and after optimizer steps. Unset, each call is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    spec = os.environ.get("PEFTCLI_KILL_AT")
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if not point or not count.isdigit():
        point, count = spec, "1"
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
