"""The command bodies cli.py calls, called as library functions (no CLI runner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.commands.count_params import recipe_to_count
from peftcli.commands.recipes import copy_recipe, recipe_rows, shipped_recipes
from peftcli.commands.validate import data_report
from peftcli.config.recipe import recipe_from_dict
from peftcli.core.errors import BadInput, UsageError


def test_recipe_to_count_from_model_and_method():
    r = recipe_to_count(None, ["method.r=4"], model="gpt2", method="lora", task="classification", num_labels=5)
    assert (r.model.name, r.method_name, r.method.r, r.model.num_labels) == ("gpt2", "lora", 4, 5)
    # `count-params config.json --method ia3`: the first argument is the model ...
    r = recipe_to_count(Path("config.json"), None, model=None, method="ia3", task="causal_lm", num_labels=2)
    assert (r.model.name, r.method_name, r.model.num_labels) == ("config.json", "ia3", None)
    # ... unless it is an override
    r = recipe_to_count(Path("method.r=2"), None, model="gpt2", method="lora", task="causal_lm", num_labels=2)
    assert r.method.r == 2
    with pytest.raises(UsageError, match="--model and --method"):
        recipe_to_count(None, None, model="gpt2", method=None, task="causal_lm", num_labels=2)
    assert issubclass(UsageError, BadInput)


def test_shipped_recipes_list_and_copy(tmp_path):
    rows = {row[0]: row for row in recipe_rows()}
    assert set(rows) == set(shipped_recipes()) and "quickstart" in rows
    assert rows["quickstart"][1]  # its method name, read from the YAML
    key, target = copy_recipe("quickstart.yaml", tmp_path)
    assert (key, target) == ("quickstart", tmp_path / "quickstart.yaml")
    assert target.read_text() == shipped_recipes()["quickstart"].read_text()
    with pytest.raises(UsageError, match="exists"):
        copy_recipe("quickstart", target)
    with pytest.raises(UsageError, match="did you mean 'quickstart'"):
        copy_recipe("quikstart", tmp_path)


def test_data_report_marks_the_tokens_the_loss_covers(tiny_gpt2_dir, tiny_csv):
    r = recipe_from_dict({"model": {"name": str(tiny_gpt2_dir), "task": "causal_lm"},
                          "data": {"source": str(tiny_csv), "prompt_column": "prompt", "response_column": "response",
                                   "eval_size": 10, "max_length": 32},
                          "method": {"name": "lora"}}, "test")
    rep = data_report(r)
    assert rep.causal_lm and sum(rep.rows) == 60 and len(rep.lengths) == rep.rows[0]
    assert 0 < rep.trained_tokens < sum(rep.lengths) and rep.packing == ""
    # The pieces alternate between untrained (the prompt) and trained (the answer) and end trained.
    flags = [trained for text, trained in rep.pieces if text]
    assert flags[0] is False and flags[-1] is True
    assert all(a != b for a, b in zip(flags, flags[1:], strict=False))
    trained_text = "".join(text for text, trained in rep.pieces if trained)
    assert trained_text.split()[0] in ("positive", "negative")  # the answer, not the prompt
    assert "review" in "".join(text for text, trained in rep.pieces if not trained)
