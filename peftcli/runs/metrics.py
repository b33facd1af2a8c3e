"""metrics.jsonl, a run's record: one JSON object a line, appended by training.loop.log.

Every reader of the log comes through here (the plot, the resume trim, the sweep report, the
benchmarks and the crash test), so a line cut short by a kill and the records of runs written
before the validation split (`eval` where newer runs write `val`) are handled once, the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from peftcli.core.errors import BadInput

METRICS_FILE = "metrics.jsonl"


def read_lines(path: Path) -> list[tuple[str, dict | None]]:
    """Each non-blank line of a metrics log with its record, in file order.

    The record is None where the line is not a JSON object: the last line of a run killed while
    writing it. Callers decide what a torn line means (the trim drops it, the crash test reports it).
    """
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise MetricsError(f"{path} is not a file; a run's metrics log is one JSON object a line")
    lines = []
    # Bytes that are not UTF-8 make their line unreadable, like a torn one, not the whole log.
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        lines.append((line, rec if isinstance(rec, dict) else None))
    return lines


class MetricsError(BadInput, ValueError):
    """A metrics log that cannot be read at all: bad input, exit 2."""


def _well_formed(rec: dict) -> bool:
    """A record a reader can use: an integer step, and a numeric loss or a mapping of scores where
    its kind has them. Anything else reads as a torn line (a log edited or damaged by hand)."""
    k = kind(rec)
    if k in ("step", "val") and (not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool)):
        return False
    if k == "step":
        return isinstance(rec["loss"], int | float) and not isinstance(rec["loss"], bool)
    if k == "val":
        return isinstance(rec.get("val", rec.get("eval")), dict)
    return True


def kind(rec: dict) -> str:
    """'test', 'val' (also a pre-validation-split run's 'eval'), 'error', 'step' or 'other'."""
    if "test" in rec:
        return "test"
    if "val" in rec or "eval" in rec:
        return "val"
    if "error" in rec:
        return "error"
    return "step" if "loss" in rec else "other"


@dataclass
class Metrics:
    """A run's log sorted by kind, each list in file order. An evaluation's scores are under
    `eval` whichever key the run wrote them under."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    tests: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)


def read_metrics(run: Path) -> Metrics:
    """The run folder's metrics log; FileNotFoundError where the folder has none."""
    path = Path(run) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run}: no {METRICS_FILE}; is it a training run folder?")
    m = Metrics()
    for line, rec in read_lines(path):
        if rec is None or not _well_formed(rec):
            m.torn.append(line)
            continue
        k = kind(rec)
        if k == "val":
            m.evals.append({**rec, "eval": rec.get("val", rec.get("eval"))})
        elif k != "other":
            {"step": m.steps, "test": m.tests, "error": m.errors}[k].append(rec)
    return m
