"""No silent zero-token training: examples that truncation leaves with no trained token are left
out and counted, a split left with none is refused (exit 2) with the numbers and the fix, and no
metric is computed over zero tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import recipe_from_dict
from peftcli.core.errors import DataError
from peftcli.data.batching import Collator
from peftcli.inference.evaluate import evaluate
from peftcli.models.loading import load_tokenizer
from peftcli.models.losses import IGNORE
from peftcli.runs.load import prepare_data

runner = CliRunner()
LONG = " ".join(f"word{i % 7}" for i in range(60))  # far more than max_length 48 on its own


def _chat(user: str, reply: str = "positive") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(shape: str, n_long: int, n_short: int) -> list[dict]:
    users = [LONG] * n_long + ["is it good"] * n_short
    if shape == "messages":
        return [_chat(u) for u in users]
    return [{"prompt": u, "response": "positive"} for u in users]


def _recipe_file(tmp_path: Path, model: Path, src: str, **data) -> str:
    return write_recipe(tmp_path / "r.yaml", model={"name": str(model), "task": "causal_lm"},
                        data={"source": src, "eval_size": 4, "val_size": 4, "max_length": 48, **data},
                        train={"batch_size": 4, "max_steps": 2, "log_every": 1},
                        eval={"metric": "loss", "generate_samples": 0, "max_new_tokens": 2},
                        output={"dir": str(tmp_path / "run")})


@pytest.mark.parametrize("shape,packing", [("messages", False), ("messages", True), ("messages", "batch"),
                                           ("prompt_response", False)])
def test_a_split_with_no_trained_token_is_refused_by_validate_and_train(tmp_path, tiny_gpt2_dir, shape, packing):
    src = _jsonl(tmp_path / "d.jsonl", _rows(shape, n_long=24, n_short=0))
    rec = _recipe_file(tmp_path, tiny_gpt2_dir, src, packing=packing)
    for cmd in (["validate", rec, "--data"], ["train", rec]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, res.output
        out = " ".join(res.output.split())
        assert "no training example" in out and "keeps a trained token after truncation to 48 tokens" in out, out
        assert "(16 examples; their first trained token comes after" in out, out
        assert "raise data.max_length to at least" in out and "ok" not in out.split()
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_validation_split_with_no_trained_token_is_refused(tmp_path, tiny_gpt2_dir):
    # The last rows of the pool validate: make exactly those the long ones.
    rows = _rows("messages", n_long=0, n_short=20)
    src = _jsonl(tmp_path / "d.jsonl", rows)
    rec = recipe_from_dict({"model": {"name": str(tiny_gpt2_dir), "task": "causal_lm"},
                            "data": {"source": src, "eval_size": 4, "val_size": 4, "max_length": 48}})
    tok = load_tokenizer(str(tiny_gpt2_dir))
    splits, train, val, test = prepare_data(rec, tok)
    val_rows = {r["row"] for r in splits.val}
    rows = [_chat(LONG) if i + 1 in val_rows else r for i, r in enumerate(rows)]
    _jsonl(Path(src), rows)
    with pytest.raises(DataError, match=r"no validation example .* keeps a trained token .*\(4 examples"):
        prepare_data(rec, tok)


@pytest.mark.slow
def test_examples_that_lose_every_trained_token_are_counted_and_left_out(tmp_path, tiny_gpt2_dir):
    src = _jsonl(tmp_path / "d.jsonl", _rows("messages", n_long=10, n_short=30))
    rec = _recipe_file(tmp_path, tiny_gpt2_dir, src)
    res = runner.invoke(app, ["validate", rec, "--data"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    tok = load_tokenizer(str(tiny_gpt2_dir))
    splits, train, val, test = prepare_data(recipe_from_dict(
        {"model": {"name": str(tiny_gpt2_dir), "task": "causal_lm"},
         "data": {"source": src, "eval_size": 4, "val_size": 4, "max_length": 48}}), tok)
    n_train = sum(1 for r in splits.train if LONG in r["messages"][0]["content"])
    assert n_train and f"{n_train} of 32 training examples keep no trained token after truncation; " \
                       "left out of training" in out, out
    assert len(train) == 32 - n_train
    assert all(any(y != IGNORE for y in e["labels"][1:]) for e in train + val + test)

    res = runner.invoke(app, ["train", rec])
    assert res.exit_code == 0, res.output
    assert f"{n_train} of 32 training examples keep no trained token" in " ".join(res.output.split())
    assert "val (data.val_size, held out from the training pool) /" in " ".join(res.output.split())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rows"]["train"] == 32 - n_train
    assert summary["test"]["loss"] > 0.0


def test_the_evaluator_refuses_zero_tokens(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE] * 4}] * 3
    with pytest.raises(DataError, match="nothing to score: none of the 3 examples keeps a trained token"):
        evaluate(model, examples, Collator(0, "causal_lm"), task="causal_lm", device=torch.device("cpu"))
    with pytest.raises(DataError, match="nothing to score: no examples"):
        evaluate(model, [], Collator(0, "causal_lm"), task="causal_lm", device=torch.device("cpu"))
    ok = evaluate(model, [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]}],
                  Collator(0, "causal_lm"), task="causal_lm", device=torch.device("cpu"))
    assert ok["loss"] > 0.0 and ok["perplexity"] > 1.0


@pytest.mark.slow
def test_a_sweep_never_ranks_a_trial_that_would_train_on_nothing(tmp_path, tiny_gpt2_dir):
    rows = [_chat(" ".join(["word"] * 30) + " is it good") for _ in range(40)]  # reply past 48 tokens, not 96
    src = _jsonl(tmp_path / "d.jsonl", rows)
    rec = _recipe_file(tmp_path, tiny_gpt2_dir, src)
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", rec, "data.max_length=48,96", "--out", str(out), "--parallel", "1"])
    recs = {json.loads(line)["settings"]["data.max_length"]: json.loads(line)
            for line in (out / "sweep.jsonl").read_text().splitlines()}
    assert recs[48]["status"] == "failed" and recs[48]["exit_code"] == 2 and recs[48]["value"] is None, recs[48]
    assert recs[96]["status"] == "done", res.output
    assert "best: trial-002" in res.output, res.output
