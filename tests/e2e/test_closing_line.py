"""The training run's closing line says truly why the kept adapter was kept (issue 28 item 6)."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from peftcli.cli import app, kept_reason

runner = CliRunner()


def test_kept_reason_says_which_case_it_is():
    best = {"best": {"step": 2}, "val": {"accuracy": 0.75, "loss": 0.5}, "rows": {"val": 8}}
    assert kept_reason(best, "accuracy") == "step 2 (best val accuracy 0.7500)"
    none = {"best": {"step": 3}, "val": {}, "rows": {"val": 0}}
    assert kept_reason(none, "accuracy") == "step 3 (no validation rows: the last)"
    unmeasured = {"best": {"step": 3}, "val": {}, "rows": {"val": 8}}
    assert "no validation rows" not in kept_reason(unmeasured, "accuracy")
    assert "validation does not report eval.metric accuracy" in kept_reason(unmeasured, "accuracy")


def test_causal_lm_run_scored_on_validation_does_not_claim_it_had_no_validation_rows(tiny_gpt2_dir, tiny_csv,
                                                                                      tmp_path):
    """A causal LM run choosing by accuracy (which its validation does not report) used to end
    with `(no validation rows: the last)` right after printing a validation loss."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_gpt2_dir), "task": "causal_lm"},
        "data": {"source": str(tiny_csv), "format": "prompt_response", "prompt_column": "prompt",
                 "response_column": "response", "max_length": 32, "eval_size": 8},
        "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "eval_every": 2},
        "eval": {"metric": "accuracy"},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }))
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "val loss" in res.output
    closing = next(line for line in res.output.splitlines() if "kept the adapter of" in line)
    assert "no validation rows" not in closing and "does not report eval.metric accuracy" in closing, closing
