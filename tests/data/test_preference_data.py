"""Preference data: the built-in pairs, row shapes (plain, chat, implicit prompt, KTO), malformed
rows, completion-only labels, the batch layout, and `validate --data` on a pair."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import DataConfig, recipe_from_dict
from peftcli.core.errors import DataError
from peftcli.data.preference import (
    KTOCollator,
    PairCollator,
    add_mismatched,
    kto_row,
    pair_row,
    tokenize_preference,
)
from peftcli.data.sources import SENTIMENTS, builtin_rows
from peftcli.data.splits import load_splits
from peftcli.models.loading import load_tokenizer
from peftcli.models.losses import IGNORE
from peftcli.runs.load import prepare_data

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
runner = CliRunner()


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(SMOL)


def _recipe(source: str, objective: str = "dpo", **data):
    return recipe_from_dict({"model": {"name": SMOL, "task": "causal_lm"}, "method": {"name": "lora"},
                             "data": {"source": source, **data}, "train": {"objective": objective}})


@pytest.mark.slow
def test_builtin_pairs_prefer_the_human_label_and_hold_out_the_instruct_tweets():
    rows = builtin_rows("tweets_preference")
    tweets = builtin_rows("tweets")
    assert len(rows) == len(tweets)
    assert all(r["chosen"] == t["label"] and r["rejected"] in SENTIMENTS and r["rejected"] != r["chosen"]
               for r, t in zip(rows, tweets, strict=True))
    assert {r["rejected"] for r in rows if r["chosen"] == "negative"} == {"neutral", "positive"}  # both wrong answers
    from peftcli.data.preference import load_preference_splits

    cfg = DataConfig(source="tweets_preference", eval_size=50, val_size=20, train_size=100)
    pairs = load_preference_splits(cfg, "dpo")
    instruct = load_splits(DataConfig(source="tweets_instruct", eval_size=50, val_size=20, train_size=100), "causal_lm")
    assert [p["prompt"] for p in pairs.eval] == [r["prompt"] for r in instruct.eval]  # the same held-out tweets
    assert [p["prompt"] for p in pairs.val] == [r["prompt"] for r in instruct.val]
    assert (len(pairs.train), len(pairs.val), len(pairs.eval)) == (100, 20, 50)
    kto = builtin_rows("tweets_kto")
    assert [r["label"] for r in kto[:4]] == [True, False, True, False]
    assert all((r["completion"] == r["answer"]) == r["label"] for r in kto)


def test_pair_row_shapes():
    plain = pair_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "prompt")
    assert plain == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    user = [{"role": "user", "content": "2+2?"}]
    chat = pair_row({"prompt": user, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}, "prompt")
    assert chat["prompt"] == user and chat["rejected"] == [{"role": "assistant", "content": "5"}]
    implicit = pair_row({"chosen": user + [{"role": "assistant", "content": "4"}],
                         "rejected": user + [{"role": "assistant", "content": "5"}]}, "prompt")
    assert implicit["prompt"] == user and implicit["chosen"] == [{"role": "assistant", "content": "4"}]
    assert pair_row({"prompt": "x", "chosen": "", "rejected": "5"}, "prompt") == "no chosen completion"
    assert pair_row({"prompt": None, "chosen": "4", "rejected": "5"}, "prompt") == "no prompt"
    assert "not a role/content" in pair_row({"prompt": [{"who": "me"}], "chosen": "4", "rejected": "5"}, "prompt")
    assert "assistant" in pair_row({"prompt": user, "chosen": [{"role": "user", "content": "4"}], "rejected": "5"},
                                   "prompt")
    # every preference loss is flat on a pair whose sides are one text: it trained at loss 0.6931 without a word
    assert pair_row({"prompt": "q", "chosen": "same", "rejected": "same"}, "prompt") == \
        "chosen and rejected are the same completion"
    assert pair_row({"chosen": user + [{"role": "assistant", "content": "4"}],
                     "rejected": user + [{"role": "assistant", "content": "4"}]}, "prompt") == \
        "chosen and rejected are the same completion"
    assert kto_row({"prompt": "p", "completion": "c", "label": "false"}, "prompt")["desirable"] is False
    assert kto_row({"prompt": "p", "completion": "c", "label": 1}, "prompt")["desirable"] is True
    assert "not true / false" in kto_row({"prompt": "p", "completion": "c", "label": "maybe"}, "prompt")


def test_labels_cover_the_completion_only(smol_tok):
    cfg = DataConfig(source="x", max_length=256)
    user = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Sentiment of: I love rain"}]
    rows = [{"prompt": "Sentiment of: I love rain", "chosen": "positive", "rejected": "negative", "row": 1},
            {"prompt": user, "chosen": [{"role": "assistant", "content": "positive"}],
             "rejected": [{"role": "assistant", "content": "negative"}], "row": 2}]
    ex = tokenize_preference(rows, smol_tok, cfg, split="train", malformed=None, untrained=[])
    for e in ex:
        for ids, labels in ((e["input_ids"], e["labels"]), (e["rejected_ids"], e["rejected_labels"])):
            trained = smol_tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE])
            assert trained.startswith(("positive", "negative")) and trained.endswith("<|im_end|>")
            assert "Hello" not in trained  # the prompt's own assistant turn is not trained
        assert e["input_ids"][: e["prompt_len"]] == e["rejected_ids"][: e["prompt_len"]]
        assert e["response"] == "positive"


def test_an_undesirable_kto_completion_is_never_the_reference(smol_tok):
    """generate_accuracy scored a KTO model that produced the undesirable completion as right."""
    cfg = DataConfig(source="x", max_length=256)
    rows = [{"prompt": "Sentiment of: rain", "completion": "negative", "desirable": False, "row": 1},
            {"prompt": "Sentiment of: sun", "completion": "positive", "desirable": True, "row": 2},
            {"prompt": "Sentiment of: fog", "completion": "positive", "desirable": False, "answer": "neutral", "row": 3}]
    ex = tokenize_preference(rows, smol_tok, cfg, split="test", malformed=None, untrained=[])
    assert [e["response"] for e in ex] == [None, "positive", "neutral"]


@pytest.mark.slow
def test_malformed_rows_are_reported_and_strict_refuses(tmp_path, smol_tok):
    rows = [{"prompt": f"say {i}", "chosen": "yes", "rejected": "no"} for i in range(30)]
    rows[3] = {"prompt": "say 3", "chosen": None, "rejected": "no"}
    rows[7] = {"prompt": [{"role": "narrator", "content": "x"}], "chosen": "yes", "rejected": "no"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _recipe(str(path), eval_size=4, val_size=4)
    splits, train, val, test = prepare_data(r, smol_tok)
    assert sorted(row for _, row, _ in splits.malformed) == [4, 8]
    assert {why for *_, why in splits.malformed} == {"no chosen completion",
                                                     "prompt turn 1 is not a role/content mapping with a known role"}
    assert len(train) + len(val) + len(test) == 28
    r.data.strict = True
    with pytest.raises(DataError, match="data.strict"):
        prepare_data(r, smol_tok)
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(DataError, match="no column 'chosen', 'rejected'"):
        prepare_data(_recipe(str(bad)), smol_tok)


def test_batches_put_chosen_rows_before_rejected_and_kto_rows_before_mismatched():
    ex = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "rejected_ids": [1, 4], "rejected_labels": [IGNORE, 4],
           "ref": (-1.0, -2.0)},
          {"input_ids": [5, 6], "labels": [IGNORE, 6], "rejected_ids": [5, 7, 8, 9], "rejected_labels": [IGNORE, 7, 8, 9],
           "ref": (-3.0, -4.0)}]
    b = PairCollator(0)(ex)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert b["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    kto = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "prompt_len": 1, "desirable": 1},
           {"input_ids": [5, 6, 7], "labels": [IGNORE, IGNORE, 7], "prompt_len": 2, "desirable": 0}]
    add_mismatched(kto, max_length=8)
    assert kto[0]["kl_ids"] == [1, 7] and kto[1]["kl_ids"] == [5, 6, 2, 3]  # each prompt, the previous completion
    assert kto[1]["kl_labels"] == [IGNORE, IGNORE, 2, 3]
    b = KTOCollator(0)(kto)
    assert b["input_ids"].shape == (4, 4) and b["desirable"].tolist() == [True, False]


@pytest.mark.slow
def test_validate_data_shows_a_rendered_pair(tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", model={"name": SMOL, "task": "causal_lm"},
                       data={"source": "tweets_preference", "train_size": 8, "val_size": 4, "eval_size": 4},
                       method={"name": "lora"}, train={"objective": "dpo"})
    res = runner.invoke(app, ["validate", rec, "--data"])
    assert res.exit_code == 0, res.output
    assert "first training pair, chosen side" in res.output and "the same pair, rejected side:" in res.output
    shown = res.output.split("first training pair")[1].split("\n", 1)[1]
    marked = [s.split("⟧")[0] for s in shown.split("⟦")[1:]]
    assert len(marked) == 2 and all(m.split("<")[0] in SENTIMENTS for m in marked) and marked[0] != marked[1]


def test_preference_keys_are_checked():
    def problems(**train):
        try:
            recipe_from_dict({"model": {"task": "causal_lm"}, "method": {"name": "lora"}, "train": train,
                              "data": {"packing": train.pop("packing", False)}})
        except Exception as e:  # noqa: BLE001
            return str(e)
        return ""

    assert "beta" in problems(objective="dpo", beta=0)
    assert "label_smoothing: only dpo and simpo" in problems(objective="ipo", label_smoothing=0.1)
    assert "precompute_reference: orpo runs no reference" in problems(objective="orpo", precompute_reference=True)
    assert "data.packing" in problems(objective="dpo", packing=True)
    assert "batch_size" in problems(objective="kto", batch_size=1)
    assert problems(objective="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1) == ""
    with pytest.raises(Exception, match="model.task: causal_lm"):
        recipe_from_dict({"method": {"name": "lora"}, "train": {"objective": "dpo"}})
    with pytest.raises(Exception, match="eval.metric"):
        recipe_from_dict({"model": {"task": "causal_lm"}, "method": {"name": "lora"}, "train": {"objective": "dpo"},
                          "eval": {"metric": "f1"}})


