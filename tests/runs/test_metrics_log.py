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


def test_a_damaged_log_reads_as_torn_lines_and_plots(tmp_path):
    """Lines edited or damaged by hand (no step, a step that is not a number, scores that are not a
    mapping, bytes that are not UTF-8) read as torn lines, so `plot` draws the rest; a log that is
    a folder is bad input (exit 2). Each of these stopped `plot` with exit 1."""
    from typer.testing import CliRunner

    from peftcli.cli import app

    path = _log(tmp_path, [json.dumps(r) for r in RECORDS] + ['{"loss": 1.0}', '{"step": 3, "val": 5}',
                                                            '{"step": "x", "loss": 1.0}'])
    with open(path, "ab") as f:
        f.write(b'{"step": 9, "loss": \xff\xfe}\n')
    m = read_metrics(tmp_path)
    assert len(m.steps) == 1 and len(m.evals) == 2 and len(m.torn) == 4
    res = CliRunner().invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    path.unlink()
    path.mkdir()
    res = CliRunner().invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "d.png")])
    assert res.exit_code == 2 and "is not a file" in res.output, res.output
