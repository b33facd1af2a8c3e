"""`kill -TERM` on `peftcli train --nproc 2` (two gloo ranks on CPU): the launcher forwards the
stop to torchrun, which forwards it to both ranks; the ranks agree on one step, rank 0 writes the
checkpoint of that step, and the launcher exits 143 with no process of the launch left alive
(torchrun's workers run in sessions of their own, so they are found by a marker in their
environment). Only rank 0 holds the run folder's lock, and it is gone afterwards.

PEFTCLI_SLOW_AT=step:S makes each step last S seconds, so that the signal lands half-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from helpers.processes import kill_tagged, tagged

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # two gloo ranks under torchrun

MARK = "PEFTCLI_TEST_STOP"




@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_on_the_launcher_stops_both_ranks_at_one_step(tiny_bert_dir, tiny_csv, tmp_path):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_bert_dir)},
        "data": {"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 10, "batch_size": 4, "progress": False, "log_every": 1, "eval_every": 4,
                  "num_threads": 1, "device": "cpu"},
        "output": {"dir": str(run), "plot": False},
    }))
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PEFTCLI_SLOW_AT="step:2", **{MARK: tag})
    launcher = subprocess.Popen([sys.executable, "-m", "peftcli.cli", "train", str(recipe), "--nproc", "2"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run / "metrics.jsonl"
        end = time.monotonic() + 240
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert launcher.poll() is None, launcher.stdout.read()
            assert time.monotonic() < end, "no step after 240 s"
            time.sleep(0.1)
        assert (tmp_path / ".run.peftcli-lock").exists()
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        kill_tagged(MARK, tag)
    assert launcher.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out, out
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["world"] == 2 and state["position"]["step"] == max(steps) < 10
    time.sleep(1)
    assert tagged(MARK, tag) == [], "a process of the launch outlived the stop"
    assert not (tmp_path / ".run.peftcli-lock").exists()
