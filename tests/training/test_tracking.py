"""Trackers: TensorBoard gets the metrics and the recipe; a missing tracker package is exit 2 before training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

runner = CliRunner()


def _recipe(tmp_path: Path, model_dir, chat_file, run: str = "run", packing=None, dropout: float | None = None,
            **train) -> str:
    t = {"epochs": 2, "batch_size": 2, "lr": 5e-3, "progress": False, "log_every": 1, "eval_every": 2, **train}
    packing = (not t.get("group_by_length")) if packing is None else packing
    data = {"source": chat_file, "eval_size": 8, "max_length": 96, "packing": packing}
    method = {"name": "lora", "r": 4, **({"dropout": dropout} if dropout is not None else {})}
    return write_recipe(tmp_path / f"{run}.yaml", model={"name": str(model_dir), "task": "causal_lm"}, data=data,
                        method=method, train=t, output={"dir": str(tmp_path / run), "plot": False})


def app_cli():
    from peftcli.cli import app

    return app


@pytest.fixture(scope="module")
def tracked_run(tiny_gpt2_dir, chat_file, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tracked")
    rec = _recipe(d, tiny_gpt2_dir, chat_file, epochs=1, report_to=["tensorboard"])
    res = runner.invoke(app_cli(), ["train", rec])
    assert res.exit_code == 0, res.output
    return d / "run"


@pytest.mark.slow
def test_tensorboard_gets_the_metrics_and_the_recipe(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity",
            "test/loss"} <= tags
    jsonl = [json.loads(x) for x in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in jsonl if "loss" in r)
    assert acc.Scalars("train/loss")[0].value == pytest.approx(first["loss"])
    assert first["tokens_per_s"] > 0
    assert "recipe" in acc.Tags()["tensors"] or "recipe/text_summary" in acc.Tags()["tensors"]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_package_is_exit_2_before_training(tiny_gpt2_dir, chat_file, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import wandb` now raises ImportError
    rec = _recipe(tmp_path, tiny_gpt2_dir, chat_file, report_to=["tensorboard", tracker])
    res = runner.invoke(app_cli(), ["train", rec])
    assert res.exit_code == 2, res.output
    assert f"train.report_to: {tracker} needs the {tracker} package" in res.output
    assert not (tmp_path / "run").exists()
