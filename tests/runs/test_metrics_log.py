"""runs/metrics: the one reader of metrics.jsonl, on hand-written logs (no training)."""

from __future__ import annotations

import json

import pytest

from peftcli.runs.metrics import kind, read_lines, read_metrics
from peftcli.runs.state import trim_metrics

RECORDS = [
    {"step": 1, "epoch": 0, "loss": 0.7, "lr": 0.01},
    {"step": 2, "epoch": 0, "val": {"loss": 0.65, "accuracy": 0.5}},
    {"step": 2, "epoch": 0, "eval": {"loss": 0.6}},  # a run written before the validation split
    {"step": 3, "error": "non-finite", "detail": "loss is nan"},
    {"step": 3, "epoch": 1, "test": {"loss": 0.5}, "kept_step": 2},
]


def _log(tmp_path, lines: list[str]):
    (tmp_path / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    return tmp_path / "metrics.jsonl"


def test_records_are_sorted_by_kind_and_torn_lines_kept_apart(tmp_path):
    _log(tmp_path, [json.dumps(r) for r in RECORDS] + ["", '{"step": 4, "lo'])
    m = read_metrics(tmp_path)
    assert [kind(r) for r in RECORDS] == ["step", "val", "val", "error", "test"]
    assert [r["step"] for r in m.steps] == [1]
    assert [e["eval"] for e in m.evals] == [{"loss": 0.65, "accuracy": 0.5}, {"loss": 0.6}]
    assert m.errors == [RECORDS[3]] and m.tests == [RECORDS[4]]
    assert m.torn == ['{"step": 4, "lo']
    assert [rec for _, rec in read_lines(tmp_path / "metrics.jsonl")][-1] is None


def test_a_folder_without_log_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    assert read_lines(tmp_path / "metrics.jsonl") == []


def test_trim_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    path = _log(tmp_path, [json.dumps(r) for r in RECORDS] + ['{"step": 1, "loss": 0.4}', "[1, 2]", '{"st'])
    assert trim_metrics(path, 2) == 4  # the error, the test score, a non-object and a torn line
    assert path.read_text().splitlines() == [json.dumps(r) for r in RECORDS[:3]] + ['{"step": 1, "loss": 0.4}']
    assert trim_metrics(path, 2) == 0
