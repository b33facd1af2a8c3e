"""No recipe makes the loop spin without progress: each case is a `peftcli` process of its own under
a timeout (forked from a warm interpreter, tests/helpers/warm_cli.py; the launch of two ranks is a
real one), refused with exit 2 and the numbers that do not fit before any step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe
from helpers import warm_cli

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _peftcli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftcli.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def recipe(tiny_bert_dir, tiny_csv, tmp_path) -> str:
    return write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 16},
        method={"name": "lora", "r": 2},
        train={"epochs": 1, "batch_size": 8, "progress": False, "num_threads": 1, "device": "cpu"},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )


@pytest.mark.slow
@pytest.mark.parametrize("override,words", [
    ("train.grad_accum=7", ["44 training rows", "grad_accum 7", "56 rows"]),
    ("train.epochs=0", ["train.epochs"]),
    ("train.max_steps=0", ["train.max_steps"]),
    ("train.batch_size=64", ["44 training rows", "batch_size 64"]),
])
def test_a_recipe_that_cannot_step_is_refused(recipe, tmp_path, override, words):
    res = warm_cli.run(["train", recipe, override], tmp_path / "out", env=_env(), cwd=REPO, timeout=180)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2, out[-2000:]
    assert all(w in out for w in words), out[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.ranks
def test_a_rank_without_a_batch_is_refused_on_every_rank(recipe, tmp_path):
    # 44 rows, 2 ranks, batch 32: rank 1 would get no batch and wait forever for rank 0.
    res = _peftcli("train", recipe, "train.batch_size=32", "--nproc", "2", timeout=240)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2, out[-3000:]
    assert "2 rank(s)" in out
