"""Prefix and prompt tuning: the formula, KV-cache generation, padding, saving, and `generate`."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_model, write_recipe

from peftcli.methods.attach import attach_method
from peftcli.methods.prefix import PROMPT_KEY, LayerPrefix, PrefixConfig, export_state, find_store, load_state
from peftcli.methods.prompt import PromptConfig
from peftcli.methods.prompt import find_store as find_prompt

L = 4
DECODERS = ["gpt2", "llama"]


def randomize(model, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("peftcli_prefix", "peftcli_prompt")):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def with_method(kind: str, task: str, name: str, attn: str = "sdpa", **cfg):
    m = tiny_model(kind, task, attn=attn)
    cfg_obj = PrefixConfig(num_virtual_tokens=L, **cfg) if name == "prefix" else PromptConfig(num_virtual_tokens=L, **cfg)
    arch, spec = attach_method(m, name, cfg_obj)
    randomize(m)
    return m, arch, spec


def right_padded(b: int = 3, s: int = 7, pad: int = 3):
    """Real pad ids where the mask is 0, so decoder classifiers can find the last real token."""
    bt = batch(b=b, s=s, pad_last=pad)
    bt["input_ids"][bt["attention_mask"] == 0] = 0
    return bt


# ------------------------------------------------------------------ prefix: the definition


@pytest.mark.parametrize("kind,task", [("bert", "classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm")])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_equals_keys_values_in_the_cache(kind, task, attn):
    """Plain re-computation: the prefix handed to the unmodified model as a ready-made cache."""
    from transformers import DynamicCache

    ref = tiny_model(kind, task, attn=attn)
    m, arch, _ = with_method(kind, task, "prefix", attn=attn, reparameterize=False)
    store = find_store(m)
    bt = right_padded()
    cache = DynamicCache(config=ref.config)
    for i in range(arch.num_layers):
        k, v = store.layer_kv(i)
        cache.update(k.unsqueeze(0).expand(3, -1, -1, -1), v.unsqueeze(0).expand(3, -1, -1, -1), i)
    mask = torch.cat([torch.ones(3, L, dtype=torch.long), bt["attention_mask"]], dim=1)
    with torch.no_grad():
        expect = ref(input_ids=bt["input_ids"], attention_mask=mask, past_key_values=cache).logits
        got = m(**bt).logits
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", *DECODERS])
def test_prefix_sdpa_equals_eager(kind):
    bt = right_padded()
    a = with_method(kind, "classification", "prefix", attn="sdpa")[0](**bt).logits
    b = with_method(kind, "classification", "prefix", attn="eager")[0](**bt).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_prefix_without_position_shift_and_adapter_drop():
    ref = tiny_model("llama", "causal_lm")
    m, arch, _ = with_method("llama", "causal_lm", "prefix", shift_positions=False)
    bt = batch()
    full = m(**bt).logits
    mods = [mod for mod in m.modules() if isinstance(mod, LayerPrefix)]
    assert len(mods) == arch.num_layers
    mods[0].adapter_enabled = False
    partial = m(**bt).logits
    for mod in mods:
        mod.adapter_enabled = False
    assert torch.equal(m(**bt).logits, ref(**bt).logits)
    assert not torch.allclose(partial, full) and not torch.allclose(partial, ref(**bt).logits)


def test_prefix_gqa_shapes():
    m, arch, _ = with_method("llama", "causal_lm", "prefix")
    store = find_store(m)
    assert arch.num_kv_heads < arch.num_heads
    assert store.width == arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim
    k, v = store.layer_kv(1)
    assert k.shape == v.shape == (arch.num_kv_heads, L, arch.head_dim)


# ------------------------------------------------------------------ generation with the KV cache


@pytest.mark.slow
@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_generate_with_cache_equals_without(kind, name):
    m, _, _ = with_method(kind, "causal_lm", name)
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[2, :2], mask[2, :2] = 0, 0  # left padding, as generate_texts does
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    cached = m.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    plain = m.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the left-padded row continues exactly as the same prompt alone
    alone = m.generate(input_ids=ids[2:, 2:], attention_mask=mask[2:, 2:], use_cache=True, **kw)
    assert torch.equal(alone.sequences[0, 4:], cached.sequences[2, 6:])
    # and as a hand-written greedy loop over full forwards
    cur = ids[2:, 2:]
    with torch.no_grad():
        for _ in range(6):
            cur = torch.cat([cur, m(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cur[0, 4:], cached.sequences[2, 6:])


# ------------------------------------------------------------------ padding and output alignment


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", *DECODERS])
@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_right_padded_rows_equal_unpadded(kind, name):
    m, _, _ = with_method(kind, "classification", name)
    bt = right_padded()
    logits = m(**bt).logits
    n = int(bt["attention_mask"][-1].sum())
    alone = m(input_ids=bt["input_ids"][-1:, :n], attention_mask=bt["attention_mask"][-1:, :n]).logits
    torch.testing.assert_close(logits[-1:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", DECODERS)
def test_prompt_logits_line_up_with_input(kind):
    from peftcli.models.losses import chunked_causal_lm_loss, hidden_states_out

    m, arch, _ = with_method(kind, "causal_lm", "prompt")
    bt = batch()
    out = m(**bt)
    assert out.logits.shape[:2] == bt["input_ids"].shape
    labels = bt["input_ids"].masked_fill(bt["attention_mask"] == 0, -100)
    with hidden_states_out(m, arch.spec.lm_head) as head:
        hidden = m(**bt).logits
        loss, n = chunked_causal_lm_loss(hidden, head, labels)
    loss.backward()
    assert find_prompt(m).prompt_embeddings.grad.abs().sum() > 0
    assert n == int((labels[:, 1:] != -100).sum())


def test_prompt_token_type_ids_are_extended():
    m, _, _ = with_method("bert", "classification", "prompt")
    bt = batch()
    tt = torch.zeros_like(bt["input_ids"])
    torch.testing.assert_close(m(**bt, token_type_ids=tt).logits, m(**bt).logits)


# ------------------------------------------------------------------ initialisation


def test_prompt_init_vocab_and_random():
    m, arch, _ = with_method("llama", "causal_lm", "prompt")  # randomized after init: start again
    table = arch.embeddings().weight
    torch.manual_seed(0)
    m2 = tiny_model("llama", "causal_lm")
    attach_method(m2, "prompt", PromptConfig(num_virtual_tokens=L, init="vocab"))
    p = find_prompt(m2).prompt_embeddings
    for row in p:
        assert any(torch.equal(row, t) for t in table)
    m3 = tiny_model("llama", "causal_lm")
    attach_method(m3, "prompt", PromptConfig(num_virtual_tokens=200, init="random"))
    std = float(find_prompt(m3).prompt_embeddings.detach().std())
    assert abs(std - float(table.std())) < 0.2 * float(table.std())


def test_prompt_init_text():
    from conftest import have_embedded_minilm

    if not have_embedded_minilm():
        pytest.skip("needs the embedded MiniLM tokenizer")
    from transformers import BertConfig

    from peftcli.models.loading import model_from_config, resolve_source

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    m = model_from_config(cfg, "classification", num_labels=2)
    tok_path = resolve_source("sentence-transformers/all-MiniLM-L6-v2").path
    attach_method(m, "prompt", PromptConfig(num_virtual_tokens=5, init="text", init_text="good bad", tokenizer=tok_path))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tok_path)("good bad", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    expect = m.bert.embeddings.word_embeddings.weight[[ids[0], ids[1], ids[0], ids[1], ids[0]]]
    torch.testing.assert_close(find_prompt(m).prompt_embeddings, expect)


def test_prompt_text_init_needs_text():
    with pytest.raises(ValueError, match="init_text"):
        PromptConfig(init="text")


# ------------------------------------------------------------------ reparameterisation, saving, loading


@pytest.mark.slow
def test_prefix_mlp_trains_and_gradient_checkpointing_agrees():
    m, _, _ = with_method("llama", "causal_lm", "prefix")
    m.train()
    bt = batch()
    params = [p for p in m.parameters() if p.requires_grad]
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert "peftcli_prefix.transform.2.weight" in names and "peftcli_prefix.embedding.weight" in names
    g1 = torch.autograd.grad(m(**bt).logits.square().mean(), params)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g2 = torch.autograd.grad(m(**bt).logits.square().mean(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(float(g.abs().sum()) > 0 for g in g1)


def test_prefix_table_cache_follows_weight_updates():
    m, _, _ = with_method("llama", "causal_lm", "prefix")
    store = find_store(m)
    with torch.no_grad():
        t1 = store.table().clone()
        assert store.table() is store.table()  # reused under no_grad
        store.transform[2].bias.add_(1.0)
        torch.testing.assert_close(store.table(), t1 + 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prefix_save_eject_and_resume(kind):
    from peftcli.core.errors import CheckpointError

    task = "classification"
    m, arch, _ = with_method(kind, task, "prefix")
    bt = right_padded()
    ref = m(**bt).logits
    sd = {k: v.detach().clone() for k, v in export_state(m, arch, None).items()}
    assert sd[PROMPT_KEY].shape == (L, find_store(m).width)
    head = {k: v for k, v in sd.items() if not k.startswith("peftcli_prefix")}
    assert head  # the task head travels with the adapter

    # PEFT-style file (the tensor + head): the MLP is ejected, the tensor stays trainable
    m2, a2, _ = with_method(kind, task, "prefix")
    load_state(m2, a2, None, {PROMPT_KEY: sd[PROMPT_KEY], **head})
    assert not find_store(m2).reparameterized
    torch.testing.assert_close(m2(**bt).logits, ref, atol=1e-6, rtol=1e-6)
    assert [n for n, p in m2.named_parameters() if p.requires_grad and n.startswith("peftcli")] == [PROMPT_KEY]

    # our own file: the MLP itself comes back, so --resume trains the same parameters
    m3, a3, _ = with_method(kind, task, "prefix")
    load_state(m3, a3, None, sd)
    assert find_store(m3).reparameterized
    torch.testing.assert_close(m3(**bt).logits, ref, atol=1e-6, rtol=1e-6)

    # a model built without the MLP takes the tensor in place (an optimizer holding it keeps it)
    m5, a5, _ = with_method(kind, task, "prefix", reparameterize=False)
    param = find_store(m5).prompt_embeddings
    load_state(m5, a5, None, sd)
    assert find_store(m5).prompt_embeddings is param
    torch.testing.assert_close(m5(**bt).logits, ref, atol=1e-6, rtol=1e-6)

    with pytest.raises(CheckpointError, match="missing"):
        load_state(m5, a5, None, {PROMPT_KEY: sd[PROMPT_KEY]})  # no head
    bad = dict(sd)
    bad[PROMPT_KEY] = torch.zeros(L + 1, find_store(m).width)
    m4, a4, _ = with_method(kind, task, "prefix")
    with pytest.raises(CheckpointError):
        load_state(m4, a4, None, {k: v for k, v in bad.items() if k == PROMPT_KEY or k in head})
    bad[PROMPT_KEY] = sd[PROMPT_KEY] + 1.0  # MLP weights that do not give the saved tensor
    with pytest.raises(CheckpointError, match="reproduce"):
        load_state(m4, a4, None, bad)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_meta_device_attach(name):
    from conftest import tiny_config

    from peftcli.models.loading import model_from_config

    with torch.device("meta"):
        m = model_from_config(tiny_config("llama"), "causal_lm")
    cfg = PrefixConfig() if name == "prefix" else PromptConfig(init="text", init_text="never read on meta")
    attach_method(m, name, cfg)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) > 0


def test_not_mergeable():
    from peftcli.methods import get_method

    for name in ("prefix", "prompt"):
        spec = get_method(name)
        assert spec.merge is None and spec.merge_refusal


# ------------------------------------------------------------------ train, evaluate by generating, `generate`


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_train_generate_eval_and_generate_command(tmp_path, tiny_gpt2_dir, tiny_csv, name):
    from typer.testing import CliRunner

    from peftcli.cli import app
    from peftcli.config.recipe import load_recipe
    from peftcli.inference.generate import generate
    from peftcli.training.loop import train

    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name": str(tiny_gpt2_dir), "task": "causal_lm"},
        data={"source": str(tiny_csv), "prompt_column": "prompt", "response_column": "response",
              "train_size": 16, "eval_size": 8, "max_length": 32},
        method={"name": name, "num_virtual_tokens": 3},
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False, "device": "cpu"},
        eval={"generate_accuracy": True, "max_new_tokens": 2, "generate_samples": 1},
        output={"dir": str(run), "plot": False},
    )
    summary = train(load_recipe(recipe))
    assert "generate_accuracy" in summary["test"]

    texts = generate(run, ["review: the film was great"], max_new_tokens=3, device="cpu")
    assert len(texts) == 1 and isinstance(texts[0], str)
    fresh = generate(recipe, ["review: the film was great"], max_new_tokens=3, device="cpu")
    assert isinstance(fresh[0], str)

    res = CliRunner().invoke(app, ["generate", str(run), "review: the film was great", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == texts[0]


def test_generate_refuses_classification(tmp_path):
    from typer.testing import CliRunner

    from peftcli.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", model={"name": "sentence-transformers/all-MiniLM-L6-v2",
                                                      "task": "classification"}, method={"name": "prefix"})
    res = CliRunner().invoke(app, ["generate", recipe, "hello"])
    assert res.exit_code == 2 and "causal_lm" in res.output


@pytest.mark.slow
def test_prefix_resume_keeps_training_the_mlp(tmp_path, tiny_gpt2_dir, tiny_csv):
    from peftcli.config.recipe import load_recipe
    from peftcli.training.loop import train

    run = tmp_path / "run"
    sections = dict(
        model={"name": str(tiny_gpt2_dir), "task": "causal_lm"},
        data={"source": str(tiny_csv), "prompt_column": "prompt", "response_column": "response",
              "train_size": 16, "eval_size": 8, "max_length": 32},
        method={"name": "prefix", "num_virtual_tokens": 3},
        train={"max_steps": 2, "eval_every": 1, "batch_size": 4, "lr": 1e-2, "progress": False, "device": "cpu"},
        eval={"metric": "loss", "generate_samples": 0},
        output={"dir": str(run), "plot": False},
    )
    train(load_recipe(write_recipe(tmp_path / "a.yaml", **sections)))
    sections["train"]["max_steps"] = 4
    summary = train(load_recipe(write_recipe(tmp_path / "b.yaml", **sections)), resume=True)
    assert summary["steps"] == 4
