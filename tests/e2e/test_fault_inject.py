"""tests/harness/fault_inject.py's judgement, on hand-made run folders: no training, milliseconds.

The script itself (kill, resume, compare) is run by hand: `python tests/harness/fault_inject.py`.
Here only what decides "identical" and "consistent" is checked, since a lenient comparison would
report every resume as bit-identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def fi():
    from harness import fault_inject

    return fault_inject


def _run(root: Path, name: str, records: list[dict | str], tensors: dict[str, torch.Tensor]) -> Path:
    run = root / name
    for sub in ("adapter", "last"):
        (run / sub).mkdir(parents=True)
        save_file(tensors, str(run / sub / "adapter.safetensors"))
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text("{}")
    return run


REF_RECORDS = [
    {"step": 1, "epoch": 0, "loss": 0.7, "lr": 0.01, "elapsed_s": 0.1, "samples_per_s": 90.0},
    {"step": 2, "epoch": 0, "loss": 0.6, "lr": 0.005, "elapsed_s": 0.2, "samples_per_s": 91.0},
    {"step": 2, "epoch": 0, "eval": {"loss": 0.65, "accuracy": 0.5}, "elapsed_s": 0.3},
]
TENSORS = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}


def test_same_records_with_other_timings_are_consistent(fi, tmp_path):
    ref = _run(tmp_path, "ref", REF_RECORDS, TENSORS)
    other = [{**r, "elapsed_s": 9.0} for r in REF_RECORDS]
    run = _run(tmp_path, "run", other, TENSORS)
    assert fi.compare_metrics(ref, run) == []
    assert fi.compare_adapters(ref, run) == []


def test_repeated_missing_changed_and_torn_records_are_reported(fi, tmp_path):
    ref = _run(tmp_path, "ref", REF_RECORDS, TENSORS)
    # Killed after step 1's line, resumed from step 0: step 1 twice; step 2 never written.
    run = _run(tmp_path, "dup", [REF_RECORDS[0], REF_RECORDS[0], REF_RECORDS[2]], TENSORS)
    assert fi.compare_metrics(ref, run) == ["step repeated 1", "step missing 2"]
    changed = [REF_RECORDS[0], REF_RECORDS[1], {**REF_RECORDS[2], "eval": {"loss": 0.66, "accuracy": 0.5}}]
    assert fi.compare_metrics(ref, _run(tmp_path, "changed", changed, TENSORS)) == ["val changed 2"]
    torn = [*REF_RECORDS, '{"step": 3, "lo']
    assert fi.compare_metrics(ref, _run(tmp_path, "torn", torn, TENSORS)) == ["step extra None"]


def test_adapters_must_match_to_the_bit(fi, tmp_path):
    ref = _run(tmp_path, "ref", REF_RECORDS, TENSORS)
    nudged = {"a": torch.nextafter(TENSORS["a"], torch.tensor(9.0)), "b": TENSORS["b"]}
    run = _run(tmp_path, "run", REF_RECORDS, nudged)
    assert fi.compare_adapters(ref, run) == [f"{f}: 1/2 tensors differ" for f in fi.ADAPTER_FILES]
    (run / "last" / "adapter.safetensors").unlink()
    assert fi.compare_adapters(ref, run)[1] == "last/adapter.safetensors missing"
    as_double = {k: v.double() for k, v in TENSORS.items()}  # equal values, another dtype
    assert fi.compare_adapters(ref, _run(tmp_path, "f64", REF_RECORDS, as_double))


def test_kills_are_drawn_within_the_reference_run(fi, tmp_path):
    ref = fi.Reference(tmp_path / "r.yaml", tmp_path / "run", training_s=2.0,
                       events={"steps": 4, "saves": 5, "records": 6})
    rng = random.Random(0)
    for _ in range(200):
        point, delay = fi.draw_kill(rng, "both", ref)
        if point is None:
            assert 0.0 <= delay <= 2.0
        else:
            name, _, count = point.rpartition(":")
            assert 1 <= int(count) <= ref.events[fi.KILL_POINTS[name]]


def test_report_counts_and_exit_status(fi):
    good = fi.TrialResult(1, [fi.Attempt("step:2", fi.KILLED, 1.0, 0.5), fi.Attempt("", 0, 1.0, 0.5)],
                          finished=True, summary_ok=True)
    bad = fi.TrialResult(2, [fi.Attempt("timer 0.30s", fi.KILLED, 1.0, 0.5), fi.Attempt("", 0, 1.0, 0.5)],
                         finished=True, summary_ok=True, metric_problems=["step repeated 3"])
    console = Console(record=True, width=200)
    assert fi.report([good], console) == 0
    assert fi.report([good, bad], console) == 1
    text = console.export_text()
    assert "1/1 resumes bit-identical" in text and "1/2 resumes bit-identical" in text
    assert good.resumes == 1 and good.kills == 1 and not bad.ok
