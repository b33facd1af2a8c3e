"""runs/plot: which validation metric the right-hand panel shows when runs measured different ones."""

from __future__ import annotations

import json

from peftcli.runs.plot import _shared_eval_key, drawn_by_peftcli, plot_runs


def _evals(**scores: float) -> list[dict]:
    return [{"step": 1, "eval": {"loss": 0.5, **scores}}]


def test_the_panel_shows_a_metric_every_run_measured():
    assert _shared_eval_key([]) is None
    assert _shared_eval_key([_evals(accuracy=0.8), _evals(accuracy=0.7)]) == "accuracy"
    assert _shared_eval_key([_evals(perplexity=30.0), _evals(perplexity=20.0, generate_accuracy=0.4)]) == "perplexity"
    # a classifier's accuracy beside a causal LM's exact-match share is not one axis: both have a loss
    assert _shared_eval_key([_evals(accuracy=0.8), _evals(generate_accuracy=0.4, perplexity=9.0)]) == "loss"


def test_runs_of_different_tasks_plot_side_by_side(tmp_path):
    for name, scores in (("cls", {"accuracy": 0.8}), ("lm", {"perplexity": 9.0})):
        (tmp_path / name).mkdir()
        lines = [{"step": 1, "epoch": 0, "loss": 0.7, "lr": 0.01}, {"step": 1, "epoch": 0, "val": {"loss": 0.6, **scores}}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_runs([tmp_path / "cls", tmp_path / "lm"], tmp_path / "both.png")
    assert drawn_by_peftcli(out)
