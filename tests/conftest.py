"""Tiny models built from config: no downloads, milliseconds per forward."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two cores: one process with two threads, or (pytest -n N) N worker processes with one each, so
# that tiny models, whose steps are mostly Python, keep both cores busy. The processes a worker
# starts (sweep trials, servers, CLI runs) take one thread too: two thread pools spinning against
# each other on two cores cost more than they gain.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _ranks_one_at_a_time(request, tmp_path_factory):
    """Tests marked `ranks` take a lock shared by every xdist worker: gloo ranks of two such tests
    started side by side poll while they wait for each other and starve each other's cores. A worker
    waiting here leaves its core to the others."""
    if request.node.get_closest_marker("ranks") is None:
        yield
        return
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "ranks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def tiny_config(kind: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "bert":
        return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    if kind == "gpt2":
        return GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    raise ValueError(kind)


def tiny_model(kind: str, task: str = "classification", num_labels: int = 3, seed: int = 0,
               attn: str = "sdpa"):
    from peftcli.models.loading import model_from_config

    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    cfg._attn_implementation = attn
    m = model_from_config(cfg, task, num_labels=num_labels)
    m.eval()
    return m


@pytest.fixture(params=["bert", "gpt2", "llama"])
def arch_kind(request) -> str:
    return request.param


def batch(vocab: int = 100, b: int = 3, s: int = 7, pad_last: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def have_embedded_minilm() -> bool:
    from peftcli.models.loading import resolve_source

    return resolve_source(MINILM).embedded


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT saved with the embedded MiniLM tokenizer: a real folder, offline."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftcli.models.loading import resolve_source

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(resolve_source(MINILM).path).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 (causal LM) with the MiniLM word-piece tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from peftcli.models.loading import resolve_source

    d = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_source(MINILM).path)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.eos_token = tok.sep_token
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory):
    """Sixty short labelled sentences whose label is learnable from one word."""
    import csv

    d = tmp_path_factory.mktemp("data")
    path = d / "toy.csv"
    words_pos = ["great", "lovely", "superb", "fine", "happy"]
    words_neg = ["awful", "bad", "terrible", "sad", "poor"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label", "prompt", "response"])
        for i in range(60):
            pos = i % 2 == 0
            word = (words_pos if pos else words_neg)[i % 5]
            lab = "positive" if pos else "negative"
            w.writerow([f"the film was {word} today {i}", lab, f"review: the film was {word}", lab])
    return path


def write_recipe(path, **sections) -> str:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return str(path)


def chat_recipe(tmp_path: Path, model_dir, chat_file, run: str = "run", packing=None, dropout: float | None = None,
            **train) -> str:
    """A LoRA recipe on a causal LM over a chat file, packed unless it groups by length; `train` keys
    go through (tests of packing, trackers)."""
    t = {"epochs": 2, "batch_size": 2, "lr": 5e-3, "progress": False, "log_every": 1, "eval_every": 2, **train}
    packing = (not t.get("group_by_length")) if packing is None else packing
    data = {"source": chat_file, "eval_size": 8, "max_length": 96, "packing": packing}
    method = {"name": "lora", "r": 4, **({"dropout": dropout} if dropout is not None else {})}
    return write_recipe(tmp_path / f"{run}.yaml", model={"name": str(model_dir), "task": "causal_lm"}, data=data,
                        method=method, train=t, output={"dir": str(tmp_path / run), "plot": False})


def cache_named_for_peft(model, task: str):
    """PEFT 0.21's prefix tuning for classifiers hands its prefix to the model as `past_key_values`
    and refuses a model whose forward has no argument of that name; transformers 5.24 renamed it
    `cache`. For classifiers, the model's forward is wrapped to take the old name and pass it on
    under the new one: the computation stays HF's own attention over PEFT's prefix cache.
    Causal LMs take the old name through their keyword arguments and are left as they are."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if task != "classification" or "past_key_values" in params:
        return model
    forward = model.forward

    def named(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    model.forward = named
    return model


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> str:
    """Forty-eight chat conversations of random words, a third of them two turns long (JSONL)."""
    import json
    import random

    g = random.Random(0)
    words = ["good", "bad", "rain", "sun", "film", "day", "night", "long", "short", "tea"]
    rows = []
    for i in range(48):
        turns = [{"role": "user", "content": " ".join(g.choices(words, k=g.randint(2, 20)))},
                 {"role": "assistant", "content": " ".join(g.choices(words, k=g.randint(1, 6)))}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "and then"}, {"role": "assistant", "content": "the end"}]
        rows.append({"messages": turns})
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_chat_dir(tmp_path_factory):
    """A tiny random Llama (tied head) with the embedded SmolLM2 tokenizer and its chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.models.loading import load_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama-chat")
    # load_tokenizer reads the embedded GGUF itself until its float32 copy is cached (a fresh machine)
    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d
