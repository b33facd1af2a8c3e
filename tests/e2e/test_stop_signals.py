"""`kill -TERM` on `peftcli train` and `peftcli sweep`, and two writers on one run folder.

train: a SIGTERM half-way stops at the end of a step with a checkpoint (exit 143), and `--resume`
ends with adapters bit-identical to an uninterrupted run's and one curve; a second `train` on the
folder meanwhile is refused (exit 2) naming the PID that writes it. sweep: a SIGTERM stops the
running trial with it (no process left), the trial is recorded interrupted, and the rerun resumes
it to the uninterrupted trial's adapter.

Runs are the `peftcli` entry point forked from a warm interpreter (tests/helpers/warm_cli.py);
sweep trials are real subprocesses. PEFTCLI_SLOW_AT=step:S makes each step
last S seconds, so that the signal lands half-way through a tiny run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import warm_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # trains, signals and resumes whole runs in subprocesses

TIMING = {"elapsed_s", "samples_per_s", "tokens_per_s"}


def _start(argv: list[str], log: Path, **env: str) -> warm_cli.CliProcess:
    return warm_cli.start(argv, log, env={**os.environ, "PEFTCLI_SLOW_AT": "", **env})


def _finish(p: warm_cli.CliProcess, timeout: float = 300) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"a run did not finish in {timeout} s")


def _wait_for(what: str, cond, p, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if p is not None and p.poll() is not None:
            pytest.fail(f"the run ended (exit {p.poll()}) before {what}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


def _steps(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    return [r["step"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r and "val" not in r]


def _curve(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_adapters(a: Path, b: Path) -> list[str]:
    diff = []
    for sub in ("adapter", "last"):
        x, y = load_file(str(a / sub / "adapter.safetensors")), load_file(str(b / sub / "adapter.safetensors"))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            diff.append(sub)
    return diff


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def recipe(tiny_bert_dir, tiny_csv, tmp_path):
    """Dropout and AdapterDrop's random layer drop on, gradient accumulation, a checkpoint every 4
    steps: a stop between checkpoints must still resume to the same bits."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_bert_dir)},
        "data": {"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "val_size": 4, "max_length": 32},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 10, "batch_size": 4, "grad_accum": 2, "lr": 5e-3, "progress": False, "log_every": 1,
                  "eval_every": 4, "drop_layers": 1, "num_threads": 1, "max_grad_norm": 0.5, "warmup_ratio": 0.2},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }))
    return str(path)


def test_sigterm_stops_train_at_a_step_and_resume_is_bit_identical(recipe, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _finish(_start(["train", recipe, f"output.dir={ref}"], tmp_path / "ref.log")) == 0
    p = _start(["train", recipe], tmp_path / "run.log", PEFTCLI_SLOW_AT="step:1.5")
    lock = tmp_path / ".run.peftcli-lock"
    _wait_for("first step", lambda: len(_steps(run)) >= 1 and lock.exists(), p)

    # A second writer on the same folder, while the first trains: refused, naming the first.
    second = _finish(_start(["train", recipe, "--resume"], tmp_path / "second.log"))
    said = (tmp_path / "second.log").read_text()
    assert second == 2, said
    assert f"PID {p.pid}" in said and str(run) in said

    os.kill(p.pid, signal.SIGTERM)
    assert _finish(p) == 128 + signal.SIGTERM
    log = (tmp_path / "run.log").read_text()
    stopped_at = max(_steps(run))
    assert 1 <= stopped_at < 10 and "stopped by SIGTERM" in log, log
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["position"]["step"] == stopped_at  # the checkpoint is of the step it stopped after
    assert not lock.exists()  # released with the process

    assert _finish(_start(["train", recipe, "--resume"], tmp_path / "resume.log")) == 0
    assert f"resuming at step {stopped_at}" in (tmp_path / "resume.log").read_text()
    assert _same_adapters(ref, run) == []
    assert _curve(ref) == _curve(run)


def test_sigterm_stops_a_sweep_and_its_trial_and_the_rerun_resumes_it(recipe, tmp_path):
    out = tmp_path / "sw"
    # Random mode with one trial: one run of `peftcli train` as a subprocess of the sweep.
    argv = ["sweep", recipe, "train.lr=1e-3:1e-2", "--trials", "1", "--out", str(out)]
    p = _start(argv, tmp_path / "sweep.log", PEFTCLI_SLOW_AT="step:1.5")
    trial, trial_lock = out / "trial-001", out / ".trial-001.peftcli-lock"
    _wait_for("trial step", lambda: len(_steps(trial)) >= 1 and trial_lock.exists(), p)
    trial_pid = int(trial_lock.read_text())
    assert trial_pid != p.pid

    os.kill(p.pid, signal.SIGTERM)
    assert _finish(p) == 128 + signal.SIGTERM, (tmp_path / "sweep.log").read_text()
    assert not _alive(trial_pid)  # stopped with the sweep, not left training as an orphan
    recs = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert [(r["trial"], r["status"], r["exit_code"]) for r in recs] == [("trial-001", "interrupted", 143)]
    assert (trial / "last").is_dir() and not (trial / "summary.json").exists()
    assert "stopped by SIGTERM" in (out / "trial-001.log").read_text()

    assert _finish(_start(argv, tmp_path / "sweep2.log")) == 0, (out / "trial-001.log").read_text()
    recs = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["interrupted", "done"]
    assert "--resume" in (out / "trial-001.log").read_text().split("=== ")[-1].splitlines()[0]

    ref = tmp_path / "ref"
    assert _finish(_start(["train", str(out / "trial-001.yaml"), f"output.dir={ref}"],
                          tmp_path / "ref.log")) == 0
    assert _same_adapters(ref, trial) == []
    assert _curve(ref) == _curve(trial)
