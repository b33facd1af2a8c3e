"""Fault injection for crash-safety tests: kill this process, or make it fail, at a named point.

`PEFTCLI_KILL_AT="save:renamed:3"` makes the process SIGKILL itself the 3rd time it passes the
point `save:renamed` (count defaults to 1). Points are placed where a real crash would hurt most:
between the writes and renames of a checkpoint and after optimizer steps. Unset, each call is one
dictionary lookup.

`PEFTCLI_SLOW_AT="step:0.3"` makes every pass of the point sleep 0.3 s: a tiny run then lasts long
enough for a test to send it a signal half-way through, from outside, as a user would.

`PEFTCLI_RAISE_AT="dist:all-reduce:2:1"` makes rank 1 raise at the 2nd pass of `dist:all-reduce`
(`name[:count[:rank]]`; count defaults to 1, no rank means every rank). It raises
`InjectedFailure` (the command exits 1), or with `PEFTCLI_RAISE_AS=bad-input` `InjectedBadInput`
(exit 2, as a malformed data file would). A raise, unlike a SIGKILL, runs the error path of the
command, which is what a distributed run must get right: the other ranks are left waiting in a
collective and must not wait there for long.
"""

from __future__ import annotations

import os
import signal
import time

from peftcli.core.errors import BadInput

_counts: dict[str, int] = {}
_raise_counts: dict[str, int] = {}


class InjectedFailure(RuntimeError):
    """A failure while running, on purpose (PEFTCLI_RAISE_AT)."""


class InjectedBadInput(BadInput, ValueError):
    """Bad input, on purpose (PEFTCLI_RAISE_AT with PEFTCLI_RAISE_AS=bad-input): exit 2."""


def _slow_point(name: str) -> None:
    spec = os.environ.get("PEFTCLI_SLOW_AT")
    if not spec:
        return
    point, _, seconds = spec.rpartition(":")
    if point == name:
        time.sleep(float(seconds))


def kill_point(name: str) -> None:
    _slow_point(name)
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


def parse_raise_spec(spec: str) -> tuple[str, int, int | None]:
    """`name[:count[:rank]]` -> (name, count, rank or None).

    Point names contain colons themselves, so only trailing all-digit fields are numbers.
    """
    parts = spec.split(":")
    nums: list[int] = []
    while len(parts) > 1 and len(nums) < 2 and parts[-1].isdigit():
        nums.insert(0, int(parts.pop()))
    count = nums[0] if nums else 1
    rank = nums[1] if len(nums) > 1 else None
    return ":".join(parts), count, rank


def raise_point(name: str) -> None:
    spec = os.environ.get("PEFTCLI_RAISE_AT")
    if not spec:
        return
    point, count, rank = parse_raise_spec(spec)
    if point != name or (rank is not None and int(os.environ.get("RANK", "0")) != rank):
        return
    _raise_counts[name] = _raise_counts.get(name, 0) + 1
    if _raise_counts[name] != count:
        return
    where = f"{name} (pass {count}, rank {os.environ.get('RANK', '0')})"
    if os.environ.get("PEFTCLI_RAISE_AS", "failure") == "bad-input":
        raise InjectedBadInput(f"injected bad input at {where}")
    raise InjectedFailure(f"injected failure at {where}")
