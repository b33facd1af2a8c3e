"""One rank fails, every rank goes: two gloo ranks on CPU under `peftcli train --nproc 2`.

A failing rank leaves its peer inside a collective (the all-reduce of the step's loss, or the
barrier after the run folder is made). The run must end within seconds, not the process group's
timeout, with no process left behind, and the launcher must answer with the failing rank's exit
code: 1 for a failure while running, 2 for bad input (torchrun itself says 1 for both).

Failures are injected with PEFTCLI_RAISE_AT (peftcli/core/faults.py), except the last test's, which is
a real one: an existing run folder that rank 0 refuses while rank 1 already waits at the barrier.
Every process of a launch carries a marker in its environment, so "none left alive" is checked
on all of them, torchrun's workers included (they run in sessions of their own).

Cost: three launches of 2 processes on the tiny model of test_distributed.py, a few seconds each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers.processes import kill_tagged, tagged
from test_distributed import RECIPE, _make_model_and_data

REPO = Path(__file__).resolve().parents[2]
MARK = "PEFTCLI_TEST_LAUNCH"
LIMIT_S = 150  # the whole launch
PROMPT_S = 60  # from the failing rank's message to the launcher's exit






def _launch(recipe: Path, overrides: list[str], env_extra: dict[str, str]) -> dict:
    """Run the launcher; timestamp every output line; return its status, lines and survivors."""
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PEFTCLI_DIST_TIMEOUT",
                        "PEFTCLI_RAISE_AT", "PEFTCLI_RAISE_AS", "PEFTCLI_KILL_AT")}
    # The default collective timeout (600 s) is far above LIMIT_S: a pass cannot come from it.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **{MARK: tag}, **env_extra)
    cmd = [sys.executable, "-m", "peftcli.cli", "train", str(recipe), *overrides, "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        kill_tagged(MARK, tag)
        proc.wait()
        pytest.fail(f"still running after {LIMIT_S} s:\n" + "".join(line for _, line in lines)[-5000:])
    ended = time.monotonic()
    reader.join(timeout=10)
    survivors = tagged(MARK, tag)
    kill_tagged(MARK, tag)  # never leave them to the next test, even when the assertion below fails
    return {"status": status, "ended": ended, "lines": lines, "survivors": survivors,
            "text": "".join(line for _, line in lines)}


def _when(res: dict, needle: str) -> float:
    for t, line in res["lines"]:
        if needle in line:
            return t
    raise AssertionError(f"{needle!r} not in the output:\n{res['text'][-5000:]}")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-fail")
    model_dir, data = _make_model_and_data(root)
    path = root / "tiny.yaml"
    path.write_text(RECIPE.format(model=model_dir, data=data, out=root / "runs" / "unused"))
    return path


def _out(recipe: Path, name: str) -> str:
    return f"output.dir={recipe.parent / 'runs' / name}"


@pytest.mark.slow
@pytest.mark.ranks
def test_a_rank_that_raises_mid_training_stops_every_rank(recipe):
    # Pass 4 of the loss all-reduce on rank 1 is step 4, after the step-3 evaluation and save:
    # rank 0 is then inside that all-reduce, waiting for rank 1.
    res = _launch(recipe, [_out(recipe, "raise"), "train.batch_size=4"],
                  {"PEFTCLI_RAISE_AT": "dist:all-reduce:4:1"})
    assert res["status"] == 1, res["text"][-5000:]
    assert "step 3:" in res["text"]  # it failed mid-training, not at start-up
    failed_at = _when(res, "injected failure at dist:all-reduce (pass 4, rank 1)")
    assert res["ended"] - failed_at < PROMPT_S, res["ended"] - failed_at
    assert res["survivors"] == [], res["survivors"]
    assert "rank 1 failed first (failure, exit 1" in res["text"]
    assert "run saved to" not in res["text"]


@pytest.mark.slow
@pytest.mark.ranks
def test_bad_input_on_one_rank_gives_exit_2(recipe):
    res = _launch(recipe, [_out(recipe, "bad"), "train.batch_size=4"],
                  {"PEFTCLI_RAISE_AT": "dist:all-reduce:2:1", "PEFTCLI_RAISE_AS": "bad-input"})
    assert res["status"] == 2, res["text"][-5000:]
    failed_at = _when(res, "injected bad input at dist:all-reduce (pass 2, rank 1)")
    assert res["ended"] - failed_at < PROMPT_S, res["ended"] - failed_at
    assert res["survivors"] == [], res["survivors"]
    assert "rank 1 failed first (bad input, exit 2" in res["text"]


@pytest.mark.slow
@pytest.mark.ranks
def test_rank_0_refusing_an_existing_run_folder_gives_exit_2(recipe):
    """A real cause: rank 0 refuses the folder while rank 1 already waits at the barrier."""
    run = recipe.parent / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("someone else's run\n")
    res = _launch(recipe, [_out(recipe, "taken"), "output.overwrite=false"], {})
    assert res["status"] == 2, res["text"][-5000:]
    assert "is not a folder peftcli wrote" in " ".join(res["text"].split()) and (run / "notes.txt").exists()
    assert res["survivors"] == [], res["survivors"]
    assert (run / "notes.txt").exists()


# ---------------------------------------------------------------------------------- no processes


def test_raise_spec_and_rank_filter(monkeypatch):
    from peftcli.core import faults

    assert faults.parse_raise_spec("dist:all-reduce") == ("dist:all-reduce", 1, None)
    assert faults.parse_raise_spec("dist:all-reduce:3") == ("dist:all-reduce", 3, None)
    assert faults.parse_raise_spec("dist:all-reduce:3:1") == ("dist:all-reduce", 3, 1)
    assert faults.parse_raise_spec("step:2:0:1") == ("step:2", 0, 1)  # at most two numbers
    monkeypatch.setattr(faults, "_raise_counts", {})
    monkeypatch.setenv("PEFTCLI_RAISE_AT", "here:2:1")
    monkeypatch.setenv("RANK", "0")
    for _ in range(3):
        faults.raise_point("here")  # another rank: never
    monkeypatch.setenv("RANK", "1")
    faults.raise_point("elsewhere")
    faults.raise_point("here")  # pass 1
    with pytest.raises(faults.InjectedFailure, match="pass 2, rank 1"):
        faults.raise_point("here")
    faults.raise_point("here")  # pass 3: only once
    monkeypatch.setattr(faults, "_raise_counts", {})
    monkeypatch.setenv("PEFTCLI_RAISE_AS", "bad-input")
    monkeypatch.setenv("PEFTCLI_RAISE_AT", "here")
    with pytest.raises(faults.InjectedBadInput):
        faults.raise_point("here")


def test_launcher_returns_the_first_failure(tmp_path, monkeypatch):
    from peftcli.training.launch import RankExit, first_failure, read_rank_exits, record_rank_exit

    monkeypatch.setenv("PEFTCLI_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    record_rank_exit(2)
    monkeypatch.setenv("RANK", "0")
    record_rank_exit(0)  # success is not a record
    assert read_rank_exits(tmp_path) == [RankExit(1, 2, read_rank_exits(tmp_path)[0].time)]

    bad_then_torn_down = [RankExit(0, 1, 20.0), RankExit(1, 2, 10.0)]
    assert first_failure(1, bad_then_torn_down) == (2, RankExit(1, 2, 10.0))
    assert first_failure(1, [RankExit(0, 1, 5.0), RankExit(1, 2, 10.0)])[0] == 1
    assert first_failure(0, bad_then_torn_down) == (0, None)
    assert first_failure(1, []) == (1, None)  # e.g. a rank killed by a signal records nothing
    assert first_failure(-9, []) == (137, None)


def test_collective_timeout_from_env(monkeypatch):
    from peftcli.training.distributed import DEFAULT_TIMEOUT_S, DistributedEnvError, collective_timeout

    monkeypatch.delenv("PEFTCLI_DIST_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("PEFTCLI_DIST_TIMEOUT", "90")
    assert collective_timeout().total_seconds() == 90
    for bad in ("0", "-5", "soon", "nan", "inf"):
        monkeypatch.setenv("PEFTCLI_DIST_TIMEOUT", bad)
        with pytest.raises(DistributedEnvError, match="PEFTCLI_DIST_TIMEOUT"):
            collective_timeout()
