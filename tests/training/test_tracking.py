"""Trackers: TensorBoard gets the metrics and the recipe; a missing tracker package is exit 2 before training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import chat_recipe
from typer.testing import CliRunner

runner = CliRunner()


def app_cli():
    from peftcli.cli import app

    return app


@pytest.fixture(scope="module")
def tracked_run(tiny_gpt2_dir, chat_file, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tracked")
    rec = chat_recipe(d, tiny_gpt2_dir, chat_file, epochs=1, report_to=["tensorboard"])
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
    rec = chat_recipe(tmp_path, tiny_gpt2_dir, chat_file, report_to=["tensorboard", tracker])
    res = runner.invoke(app_cli(), ["train", rec])
    assert res.exit_code == 2, res.output
    assert f"train.report_to: {tracker} needs the {tracker} package" in res.output
    assert not (tmp_path / "run").exists()
