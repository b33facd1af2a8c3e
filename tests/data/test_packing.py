"""Packing is exact, length grouping is seeded, both resume exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import chat_recipe, tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftcli.training.loop as train_mod
from peftcli.core.errors import DataError
from peftcli.core.precision import forward_inputs
from peftcli.data.batching import Collator, batches
from peftcli.data.packing import pack, pack_balanced
from peftcli.methods.attach import attach_method
from peftcli.methods.registry import get_method
from peftcli.models.losses import (
    IGNORE,
    causal_lm_loss_from_logits,
    chunked_causal_lm_loss,
    hidden_states_out,
)
from peftcli.models.packed_attention import check_packing, packed_rows, use_packed_attention
from peftcli.runs.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _examples(n: int = 10, seed: int = 0) -> list[dict]:
    """Variable-length examples whose first third is a prompt (no labels)."""
    g = random.Random(seed)
    out = []
    for _ in range(n):
        k = g.randint(3, 17)
        ids = [g.randint(1, 99) for _ in range(k)]
        out.append({"input_ids": ids, "labels": [IGNORE if j < k // 3 else t for j, t in enumerate(ids)]})
    return out


def _loss(model, batch: dict, head: str | None = None) -> torch.Tensor:
    if head is None:
        return causal_lm_loss_from_logits(model(**forward_inputs(batch, "causal_lm")).logits, batch["labels"])[0]
    with hidden_states_out(model, head) as h:
        return chunked_causal_lm_loss(model(**forward_inputs(batch, "causal_lm")).logits, h, batch["labels"])[0]


@pytest.mark.slow
@pytest.mark.parametrize("per_example", [False, True], ids=["masked", "per-example"])
@pytest.mark.parametrize("kind,head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("llama", None), ("gpt2", None)])
def test_packed_loss_and_gradients_equal_the_unpacked_token_weighted_ones(kind, head, per_example, monkeypatch):
    model = tiny_model(kind, "causal_lm").float()
    causal_calls = []
    if per_example:  # the CPU path train uses: attention split at each example, where the model allows
        assert use_packed_attention(model, torch.device("cpu"), kind)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def counting(*args, **kwargs):
            causal_calls.append(kwargs.get("is_causal"))
            return sdpa(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    attach_method(model, "lora", get_method("lora").config_cls(r=4, targets=["q", "v"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # LoRA's B starts at zero: make the adapter matter
    ex = _examples()
    collate = Collator(0, "causal_lm")
    rows = pack(ex, 32, seed=0)
    assert len(rows) < len(ex) and sum(r["examples"] for r in rows) == len(ex)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = _loss(model, batch, head)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    unpacked, g_unpacked = loss_and_grads(collate(ex))  # one padded batch: its mean is token-weighted
    causal_calls.clear()
    with packed_rows():
        packed, g_packed = loss_and_grads(collate(rows))
    if per_example and kind == "llama":  # one causal call per example (and pad run) per layer
        assert causal_calls.count(True) >= 2 * len(ex)
    assert abs(packed - unpacked) < 1e-5
    for a, b in zip(g_packed, g_unpacked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pack_is_a_function_of_the_seed_and_keeps_examples_whole():
    ex = _examples(30)
    assert pack(ex, 40, 3) == pack(ex, 40, 3)
    rows = pack(ex, 40, 3)
    assert all(len(r["input_ids"]) <= 40 for r in rows)
    assert sorted(tuple(e["input_ids"]) for e in ex) == sorted(
        tuple(r["input_ids"][s : s + n]) for r in rows for s, n in _spans(r["position_ids"]))


def test_pack_balanced_keeps_examples_whole_in_fewer_slots_than_best_fit():
    def slots(rows: list[dict]) -> int:
        return len(rows) * max(len(r["input_ids"]) for r in rows)

    for seed in range(20):
        ex = _examples(16, seed)
        rows = pack_balanced(ex, 40)
        assert rows == pack_balanced(ex, 40)
        assert all(len(r["input_ids"]) <= 40 for r in rows)
        assert sorted(tuple(e["input_ids"]) for e in ex) == sorted(
            tuple(r["input_ids"][s : s + n]) for r in rows for s, n in _spans(r["position_ids"]))
        assert slots(rows) <= slots(pack(ex, 40, 0))
    one_long = [{"input_ids": [1] * 40, "labels": [1] * 40}, *_examples(3)]  # a full row and a few short ones
    assert all(len(r["input_ids"]) <= 40 for r in pack_balanced(one_long, 40))


def _spans(pos: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(a, b - a) for a, b in zip(starts, starts[1:], strict=False)]


def test_packing_is_refused_by_name_where_examples_would_see_each_other():
    model = tiny_model("llama", "causal_lm")
    assert check_packing(model, torch.device("cpu"), "llama") < 1e-4
    # Prompt tuning prepends the same virtual tokens to every row: examples after the first in a
    # packed row would lose them.
    attach_method(model, "prompt", get_method("prompt").config_cls())
    with pytest.raises(DataError, match=r"data\.packing: llama with method prompt does not keep packed examples "
                                        r"apart .*data\.packing: false"):
        check_packing(model, torch.device("cpu"), "llama with method prompt")


def test_group_by_length_batches_are_similar_seeded_and_cover_every_example():
    ex = [{"input_ids": [1] * n, "labels": [1] * n} for n in random.Random(0).choices(range(2, 200), k=400)]
    collate = Collator(0, "causal_lm")

    def epoch(e: int, group: int) -> list[torch.Tensor]:
        return [b["attention_mask"] for b in batches(ex, 8, collate, shuffle=True, seed=1, epoch=e, length_group=group)]

    grouped, plain = epoch(0, 8), epoch(0, 0)
    padding = [sum(int(m.numel() - m.sum()) for m in bs) for bs in (grouped, plain)]
    assert padding[0] < padding[1] / 4
    assert sum(int(m.sum()) for m in grouped) == sum(len(e["input_ids"]) for e in ex)
    assert [m.shape for m in epoch(0, 8)] == [m.shape for m in grouped]  # same seed, same batches
    assert [m.shape for m in epoch(1, 8)] != [m.shape for m in grouped]  # a new order each epoch
    resumed = [b["attention_mask"] for b in batches(ex, 8, collate, shuffle=True, seed=1, epoch=0, start=5,
                                                    length_group=8)]
    assert [m.shape for m in resumed] == [m.shape for m in grouped[5:]]


# ----------------------------------------------------------------------------- training end to end


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run).steps]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packing", "group_by_length", "packing-batch"])
def test_kill_and_resume_is_exact(tiny_gpt2_dir, chat_file, tmp_path, monkeypatch, mode):
    extra = {"group_by_length": True} if mode == "group_by_length" else {}
    if mode == "packing-batch":
        extra = {"packing": "batch", "group_by_length": True}  # the two combine: grouped batches, each packed
    whole = chat_recipe(tmp_path, tiny_gpt2_dir, chat_file, "whole", **extra)
    res = runner.invoke(app_cli(), ["train", whole])
    assert res.exit_code == 0, res.output
    assert ("packed rows" in res.output) == (mode == "packing")
    assert ("each batch packed" in res.output) == (mode == "packing-batch")

    calls = {"n": 0}

    def kill_at_step_3(name: str) -> None:
        if name == "step":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

    cut = chat_recipe(tmp_path, tiny_gpt2_dir, chat_file, "cut", **extra)
    monkeypatch.setattr(train_mod, "kill_point", kill_at_step_3)
    assert runner.invoke(app_cli(), ["train", cut]).exit_code == 130
    monkeypatch.undo()
    res = runner.invoke(app_cli(), ["train", cut, "--resume"])
    assert res.exit_code == 0, res.output
    assert "resuming at step 2" in res.output
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    for f in (tmp_path / "whole" / "last").glob("*.safetensors"):
        a, b = load_file(f), load_file(tmp_path / "cut" / "last" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packing_each_batch_takes_the_padded_runs_steps(kind, tiny_gpt2_dir, chat_file, tmp_path):
    """data.packing: batch trains on the padded run's batches, so without dropout (whose masks
    follow the tensor's shape) the two runs are the same run: every step's loss and the adapter."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model_dir = tmp_path / f"tiny-{kind}"
    torch.manual_seed(0)
    if kind == "gpt2":  # no dropout inside the model either
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.cls_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    else:  # Llama-like models pass positions to attention: the per-example CPU path
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    runs = {}
    for packing in (False, "batch"):
        name = f"p{packing}"
        rec = chat_recipe(tmp_path, model_dir, chat_file, name, packing=packing, dropout=0.0, batch_size=6, epochs=1)
        res = runner.invoke(app_cli(), ["train", rec])
        assert res.exit_code == 0, res.output
        runs[packing] = tmp_path / name
    padded, packed = (_losses(runs[k]) for k in (False, "batch"))
    assert len(padded) == len(packed) == 6  # 36 training conversations in batches of 6
    assert packed == pytest.approx(padded, abs=2e-5)
    for f in (runs[False] / "adapter").glob("*.safetensors"):
        a, b = load_file(f), load_file(runs["batch"] / "adapter" / f.name)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # and the packed run's batches really were packed: fewer, fuller rows than padding
    from peftcli.config.recipe import load_recipe
    from peftcli.runs.load import collator, prepare_data, train_collator

    r = load_recipe(tmp_path / "pbatch.yaml")
    _, train_ex, _, _ = prepare_data(r, tok)
    first = train_ex[:6]
    plain, packed_b = collator(r, tok)(first), train_collator(r, tok)(first)
    assert packed_b["input_ids"].shape[0] < plain["input_ids"].shape[0]
    assert int(packed_b["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    assert int((packed_b["labels"] != IGNORE).sum()) == int((plain["labels"] != IGNORE).sum())


def test_packing_takes_true_false_or_batch(tiny_gpt2_dir, chat_file, tmp_path):
    bad = chat_recipe(tmp_path, tiny_gpt2_dir, chat_file, "bad", packing="rows")
    res = runner.invoke(app_cli(), ["validate", bad])
    assert res.exit_code == 2 and "data.packing: expected bool or 'batch', got 'rows'" in res.output
    both = chat_recipe(tmp_path, tiny_gpt2_dir, chat_file, "both", packing=True, group_by_length=True)
    res = runner.invoke(app_cli(), ["validate", both])
    assert res.exit_code == 2 and "data.packing: batch combines with it" in res.output
    ok = chat_recipe(tmp_path, tiny_gpt2_dir, chat_file, "ok", packing="batch", group_by_length=True)
    res = runner.invoke(app_cli(), ["validate", ok, "--data"])
    assert res.exit_code == 0, res.output
    assert "packing: each batch of 2 examples packed into rows of 96 tokens" in res.output


def app_cli():
    from peftcli.cli import app

    return app
