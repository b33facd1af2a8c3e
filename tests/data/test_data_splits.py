"""Three splits: training rows, validation rows that make every choice, test rows scored once."""

from __future__ import annotations

import json

import pytest
from conftest import have_embedded_minilm, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import DataConfig, load_recipe
from peftcli.core.errors import DataError
from peftcli.data.splits import load_splits
from peftcli.runs.metrics import read_metrics

runner = CliRunner()


def _texts(rows: list[dict]) -> list[str]:
    return [r["text"] for r in rows]


@pytest.mark.slow
@pytest.mark.skipif(not have_embedded_minilm(), reason="needs the embedded tweets corpus")
def test_validation_comes_off_the_end_of_the_pool_and_leaves_train_and_test_alone():
    plain = load_splits(DataConfig(source="tweets", train_size=8000, eval_size=2000, val_fraction=0.0), "classification")
    split = load_splits(DataConfig(source="tweets", train_size=8000, eval_size=2000, val_size=1000), "classification")
    assert plain.val == [] and len(split.val) == 1000
    # The shipped recipes' training and test rows do not move when validation is added ...
    assert _texts(split.train) == _texts(plain.train) and _texts(split.eval) == _texts(plain.eval)
    # ... and validation is the pool's last 1,000 rows: no row of either (the corpus repeats some
    # texts, so rows are compared by place, not by text).
    pool = load_splits(DataConfig(source="tweets", eval_size=2000, val_fraction=0.0), "classification").train
    assert _texts(split.val) == _texts(pool[-1000:]) and _texts(split.train) == _texts(pool[:8000])
    assert len(pool) - 1000 >= 8000
    default = load_splits(DataConfig(source="tweets", train_size=8000, eval_size=2000), "classification")
    assert _texts(default.train) == _texts(plain.train) and len(default.val) == 800  # 10 % of train_size


def test_validation_of_a_small_file_shrinks_training_and_too_much_is_refused(tiny_csv):
    cfg = dict(source=str(tiny_csv), text_column="sentence", eval_size=12)
    s = load_splits(DataConfig(**cfg), "classification")
    assert (len(s.train), len(s.val), len(s.eval)) == (44, 4, 12)
    s = load_splits(DataConfig(**cfg, val_size=8, train_size=100), "classification")
    assert (len(s.train), len(s.val)) == (40, 8)
    with pytest.raises(DataError, match="data.val_size: 48 validation rows leave no training rows"):
        load_splits(DataConfig(**cfg, val_size=48), "classification")


def test_unknown_val_split_is_named(tiny_csv):
    with pytest.raises(DataError, match="data.val_split: 'validation' not in"):
        load_splits(DataConfig(source=str(tiny_csv), text_column="sentence", val_split="validation"), "classification")


def _recipe(d, tiny_bert_dir, tiny_csv, **train) -> str:
    return write_recipe(
        d / "r.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "val_size": 8, "max_length": 32},
        method={"name": "lora", "r": 4, "targets": ["q", "v"]},
        train={"epochs": 3, "batch_size": 8, "lr": 3e-2, "progress": False, "log_every": 1, "eval_every": 2,
               "scheduler": "constant", "warmup_ratio": 0.0, **train},
        eval={"metric": "loss"},
        output={"dir": str(d / "run"), "plot": False},
    )


@pytest.mark.slow
def test_test_rows_are_scored_once_with_the_adapter_validation_chose(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    """Only the first evaluation is 'better', so the kept adapter is step 2's while training goes
    on to step 15: the test score must be that adapter's, not the last weights'."""
    import peftcli.training.loop as train_mod

    calls = []

    def first_only(metric, new, best):
        calls.append(new)
        return len(calls) == 1

    monkeypatch.setattr(train_mod, "better", first_only)
    r = load_recipe(_recipe(tmp_path, tiny_bert_dir, tiny_csv), [])
    summary = train_mod.train(r)
    run = tmp_path / "run"
    assert summary["best"]["step"] == 2 and summary["steps"] == 15 and len(calls) > 3
    assert summary["rows"] == {"train": 40, "val": 8, "test": 12}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("test" in x for x in records) == 1 and records[-1]["kept_step"] == 2
    assert summary["val"]["loss"] == records[[i for i, x in enumerate(records) if "val" in x][0]]["val"]["loss"]

    res = runner.invoke(app, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    kept = json.loads((run / "eval_test.json").read_text())
    assert abs(kept["loss"] - summary["test"]["loss"]) < 1e-6
    # The last weights score differently: the reload above is what made the numbers agree.
    import shutil

    shutil.copytree(run / "last", tmp_path / "last_only" / "adapter")
    for f in ("recipe.yaml", ".peftcli.json"):
        shutil.copy2(run / f, tmp_path / "last_only" / f)
    res = runner.invoke(app, ["eval", str(tmp_path / "last_only")])
    assert res.exit_code == 0, res.output
    last = json.loads((tmp_path / "last_only" / "eval_test.json").read_text())
    assert abs(last["loss"] - kept["loss"]) > 1e-4


@pytest.mark.slow
def test_without_validation_the_last_adapter_is_kept(tiny_bert_dir, tiny_csv, tmp_path):
    recipe = _recipe(tmp_path, tiny_bert_dir, tiny_csv)
    res = runner.invoke(app, ["train", recipe, "data.val_size=null", "data.val_fraction=0", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "no validation rows: the last" in res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val"] == {} and summary["best"]["step"] == summary["steps"] == 6 and summary["test"]
    assert not read_metrics(tmp_path / "run").evals
    res = runner.invoke(app, ["eval", str(tmp_path / "run"), "--split", "val"])
    assert res.exit_code == 2 and "no validation rows" in res.output


@pytest.mark.slow
def test_same_recipe_and_seed_give_identical_metrics_and_the_summary_says_what_ran(tiny_bert_dir, tiny_csv, tmp_path):
    import torch
    import transformers

    import peftcli

    recipe = _recipe(tmp_path, tiny_bert_dir, tiny_csv, epochs=2)
    runs = []
    for name in ("a", "b"):
        res = runner.invoke(app, ["train", recipe, f"output.dir={tmp_path / name}"])
        assert res.exit_code == 0, res.output
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        timing = ("elapsed_s", "samples_per_s", "tokens_per_s")
        runs.append(([{k: v for k, v in x.items() if k not in timing} for x in records],
                     json.loads((tmp_path / name / "summary.json").read_text())))
    (rec_a, sum_a), (rec_b, sum_b) = runs
    assert rec_a == rec_b
    assert (sum_a["val"], sum_a["test"], sum_a["best"]) == (sum_b["val"], sum_b["test"], sum_b["best"])
    assert sum_a["versions"] == {"peftcli": peftcli.__version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__, "python": sum_a["versions"]["python"]}
    assert len(sum_a["recipe_sha256"]) == 64 and sum_a["recipe_sha256"] == sum_b["recipe_sha256"]
    # The hash is of what decides the numbers: not the output folder, but a changed lr.
    res = runner.invoke(app, ["train", recipe, f"output.dir={tmp_path / 'c'}", "train.lr=1e-2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["recipe_sha256"] != sum_a["recipe_sha256"]
