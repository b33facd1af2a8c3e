"""Recipe validation: every problem at once, named by key, with a fix."""

from __future__ import annotations

import pytest

from peftcli.config.recipe import RecipeError, describe_sections, load_recipe, recipe_from_dict


def problems(raw: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw, "r.yaml", overrides)
    return e.value.problems


def test_defaults_resolve():
    r = recipe_from_dict({"method": {"name": "lora"}})
    assert r.method.r == 8 and r.method.targets == ["q", "v"]
    assert r.train.lr == 1e-3 and r.model.task == "classification"


def test_unknown_key_did_you_mean():
    ps = problems({"train": {"lrr": 1e-3}})
    assert ps == ["train.lrr: unknown key; did you mean 'lr'?"]


def test_unknown_method_option_and_section():
    ps = problems({"method": {"name": "lora", "rank": 4}, "trian": {}})
    assert any(p.startswith("trian: unknown section; did you mean 'train'?") for p in ps)
    assert any(p.startswith("method.rank: unknown key") for p in ps)


def test_unknown_method_name():
    ps = problems({"method": {"name": "loar"}})
    assert ps == ["method.name: unknown method 'loar'; did you mean 'lora'?"]


def test_all_problems_reported_at_once():
    ps = problems({"train": {"lr": "fast", "batch_size": 0, "scheduler": "exp"}, "method": {"name": "lora", "r": 2.5}})
    assert len(ps) == 4
    joined = "\n".join(ps)
    assert "train.lr: expected float" in joined
    assert "train.batch_size: 0 is below the minimum 1" in joined
    assert "train.scheduler: expected 'linear' | 'cosine' | 'constant'" in joined
    assert "method.r: expected int, got 2.5" in joined


def test_yaml_exponent_string_accepted_as_float():
    r = recipe_from_dict({"train": {"lr": "3e-4"}})
    assert r.train.lr == 3e-4


def test_overrides():
    r = recipe_from_dict({"method": {"name": "lora"}}, overrides=["train.lr=3e-4", "method.r=16",
                                                                  "method.targets=[q,k,v]"])
    assert r.train.lr == 3e-4 and r.method.r == 16 and r.method.targets == ["q", "k", "v"]
    ps = problems({}, overrides=["train.lrate=1", "nonsense"])
    assert any("train.lrate: unknown key" in p for p in ps)
    assert any("not key=value" in p for p in ps)


def test_override_switches_method_keeps_strictness():
    # `r` does not exist on bitfit, even as null: unknown keys are never silently dropped.
    ps = problems({"method": {"name": "lora", "r": 4}}, overrides=["method.name=bitfit"])
    assert ps == ["method.r: unknown key; did you mean 'include_norm_bias'?"] or ps[0].startswith("method.r: unknown key")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)


def test_causal_prompt_response_pairing():
    ps = problems({"model": {"task": "causal_lm"}, "data": {"prompt_column": "p"}})
    assert any("set both" in p for p in ps)


def test_every_key_documented():
    rows = describe_sections()
    assert len(rows) > 40
    assert all(help_ for _, _, _, help_ in rows)


def test_shipped_recipes_validate():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        load_recipe(f)


@pytest.mark.parametrize(("task", "ev", "words"), [
    ("classification", {"metric": "generate_accuracy"}, "a classifier picks its checkpoint by accuracy, f1 or loss"),
    ("causal_lm", {"metric": "generate_accuracy"}, "needs eval.generate_accuracy: true"),
])
def test_a_metric_validation_never_measures_is_refused(task, ev, words):
    """It was accepted, and the run kept its last step with a note at the end."""
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {"name": "gpt2", "task": task}, "method": {"name": "lora"}, "eval": ev})
    assert words in str(e.value)
    recipe_from_dict({"model": {"name": "gpt2", "task": "causal_lm"}, "method": {"name": "lora"},
                      "eval": {"metric": "generate_accuracy", "generate_accuracy": True}})


def test_a_key_given_twice_is_refused(tmp_path):
    """Plain YAML keeps the last of two equal keys without a word."""
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: gpt2, task: causal_lm}\ntrain:\n  lr: 0.001\n  lr: 0.5\n")
    with pytest.raises(RecipeError, match="line 4, column 3: key 'lr' given twice in one section"):
        load_recipe(path)


def test_a_key_in_the_wrong_section_names_its_section():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {"name": "gpt2", "lr": 3}, "method": {"name": "lora"}, "train": {"r": 4, "lrr": 1}})
    assert "train.r: unknown key; it belongs in method: method.r" in e.value.problems
    assert "model.lr: unknown key; it belongs in train: train.lr" in e.value.problems
    assert "train.lrr: unknown key; did you mean 'lr'?" in e.value.problems


def test_override_slips_are_named_in_one_line():
    """An unclosed list printed PyYAML's five-line dump; `model=null` reset the whole section to
    its defaults without a word; `output.dir=~` said "got None"."""
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"method": {"name": "lora"}}, "r.yaml", ["method.targets=[q,k", "model=null", "output.dir=~"])
    assert e.value.problems == [
        "override 'method.targets=[q,k': the value is not YAML (expected ',' or ']', but got '<stream end>'); "
        "quote it, or close its brackets (e.g. method.targets=[q,v])",
        "override 'model=null': model is a section; set its keys (model.KEY=VALUE)",
        "output.dir: expected str, got null (YAML reads ~, null and an empty value so; quote a path)",
    ]
