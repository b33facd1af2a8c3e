"""A model's parameters from its config.json alone: `peftcli count-params` without transformers.

Building the real model on the meta device costs seconds before any counting: importing
transformers and its modelling code (most of `count-params`' time on a 70B config). For the
families of the architecture map whose parameters follow from a few config numbers in closed form
— BERT (classification), GPT-2 and Llama/Mistral, from a local folder, a config.json or an
embedded model's folder — this module builds a skeleton instead: plain
torch modules on the meta device, named as transformers names them, with the shapes the config
implies. Methods attach to it exactly as to the real model (they find layers through core.arch),
so trainable and total counts, the per-module table and the memory estimate's inputs come out the
same; tests/models/test_skeleton.py holds every family's names and shapes, and several methods'
budgets, to the real meta-device model's.

Anything else (a hub id, a GGUF file, another model type, a config.json without one of the size
fields) gets None, and the caller builds the real model. Defaults are filled only for switches whose default
transformers documents and that change no size field (biases, tied embeddings, eps).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# The config.json fields each family needs, and the switches' defaults (transformers' own).
_NEEDS = {
    "bert": ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"),
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_positions"),
    "llama": ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"),
}
_FAMILY = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "mistral": "llama"}
_DEFAULTS = {
    "bert": {"type_vocab_size": 2, "layer_norm_eps": 1e-12},
    "gpt2": {"n_inner": None, "tie_word_embeddings": True, "layer_norm_epsilon": 1e-5},
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": None,
              "num_key_value_heads": None, "rms_norm_eps": 1e-6},
}


class Conv1D(nn.Module):
    """GPT-2's linear layer, weight stored (in, out); core.arch knows it by this class name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.empty(nf))


class SkeletonModel(nn.Module):
    """The root: what methods and core.arch ask of a transformers model (its config, its input
    embedding), and no forward: it is counted, never run."""

    def __init__(self, config: SimpleNamespace, embeddings: str) -> None:
        super().__init__()
        self.config = config
        self.name_or_path = config._name_or_path
        self._embeddings = embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self._embeddings)


# In-place fills that modules run at construction: nn.init's functions (a torch function mode sees
# them first, and not what they call inside) and the tensor methods they end in.
_FILLS = frozenset({
    *(getattr(torch.nn.init, n) for n in ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                                          "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                                          "kaiming_normal_", "orthogonal_", "sparse_")),
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_, torch.Tensor.copy_,
    torch.Tensor.fmod_, torch.Tensor.erfinv_, torch.Tensor.clamp_, torch.Tensor.mul_, torch.Tensor.add_,
    torch.Tensor.bernoulli_})


class _SkipMetaFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FILLS:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # nn.init passes it by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextmanager
def skip_meta_fills() -> Iterator[None]:
    """Modules built on the meta device skip filling their weights with values.

    A meta tensor holds no values, so the fill changes nothing but costs time: torch routes each
    one through its decompositions (a second's import at the first call, then about a
    millisecond per layer; thousands of layers in a 70B model with LoRA on every linear)."""
    with _SkipMetaFills():
        yield


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set `module` at a dotted path, making plain containers on the way."""
    *parents, name = path.split(".")
    for p in parents:
        if not hasattr(root, p):
            root.add_module(p, nn.Module())
        root = getattr(root, p)
    root.add_module(name, module)


def local_config(name: str) -> dict[str, Any] | None:
    """The config.json of a local folder or file, or of an embedded model shipped as a folder; None
    for anything else (hub ids, GGUF files), which transformers knows how to find and read."""
    p = Path(name).expanduser()
    if not p.exists():
        from peftcli.models.loading import resolve_source

        src = resolve_source(name)
        if not src.embedded or src.gguf_file:
            return None
        p = Path(src.path)
    f = p / "config.json" if p.is_dir() else p if (p.is_file() and p.suffix == ".json") else None
    if f is None or not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # transformers' loader gives the message
    return d if isinstance(d, dict) else None


def _config(d: dict[str, Any], name: str, task: str, num_labels: int) -> SimpleNamespace | None:
    mt = d.get("model_type")
    family = _FAMILY.get(mt) if isinstance(mt, str) else None
    if family is None or (family == "bert" and task != "classification"):
        return None
    if any(not isinstance(d.get(k), int) for k in _NEEDS[family]):
        return None
    values = {**_DEFAULTS[family], **d}
    if family == "llama" and values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if family == "bert" and "num_attention_heads" not in values:
        return None
    if family == "gpt2" and "n_head" not in values:
        return None
    values.update(_name_or_path=name, _attn_implementation=None,
                  num_labels=num_labels if task == "classification" else values.get("num_labels", 2))
    return SimpleNamespace(**values)


def _bert(c: SimpleNamespace, task: str) -> SkeletonModel:
    h, eps = c.hidden_size, c.layer_norm_eps
    m = SkeletonModel(c, "bert.embeddings.word_embeddings")
    _put(m, "bert.embeddings.word_embeddings", nn.Embedding(c.vocab_size, h))
    _put(m, "bert.embeddings.position_embeddings", nn.Embedding(c.max_position_embeddings, h))
    _put(m, "bert.embeddings.token_type_embeddings", nn.Embedding(c.type_vocab_size, h))
    _put(m, "bert.embeddings.LayerNorm", nn.LayerNorm(h, eps=eps))
    layers = nn.ModuleList()
    for _ in range(c.num_hidden_layers):
        layer = nn.Module()
        for part in ("query", "key", "value"):
            _put(layer, f"attention.self.{part}", nn.Linear(h, h))
        _put(layer, "attention.output.dense", nn.Linear(h, h))
        _put(layer, "attention.output.LayerNorm", nn.LayerNorm(h, eps=eps))
        _put(layer, "intermediate.dense", nn.Linear(h, c.intermediate_size))
        _put(layer, "intermediate.intermediate_act_fn", nn.GELU())
        _put(layer, "output.dense", nn.Linear(c.intermediate_size, h))
        _put(layer, "output.LayerNorm", nn.LayerNorm(h, eps=eps))
        layers.append(layer)
    _put(m, "bert.encoder.layer", layers)
    _put(m, "bert.pooler.dense", nn.Linear(h, h))
    _put(m, "bert.pooler.activation", nn.Tanh())
    _put(m, "classifier", nn.Linear(h, c.num_labels))
    return m


def _gpt2(c: SimpleNamespace, task: str) -> SkeletonModel:
    h, eps = c.n_embd, c.layer_norm_epsilon
    inner = c.n_inner or 4 * h
    m = SkeletonModel(c, "transformer.wte")
    _put(m, "transformer.wte", nn.Embedding(c.vocab_size, h))
    _put(m, "transformer.wpe", nn.Embedding(c.n_positions, h))
    layers = nn.ModuleList()
    for _ in range(c.n_layer):
        layer = nn.Module()
        _put(layer, "ln_1", nn.LayerNorm(h, eps=eps))
        _put(layer, "attn.c_attn", Conv1D(3 * h, h))
        _put(layer, "attn.c_proj", Conv1D(h, h))
        _put(layer, "ln_2", nn.LayerNorm(h, eps=eps))
        _put(layer, "mlp.c_fc", Conv1D(inner, h))
        _put(layer, "mlp.c_proj", Conv1D(h, inner))
        _put(layer, "mlp.act", nn.GELU(approximate="tanh"))
        layers.append(layer)
    _put(m, "transformer.h", layers)
    _put(m, "transformer.ln_f", nn.LayerNorm(h, eps=eps))
    _head(m, c, task, h, tied="transformer.wte")
    return m


def _llama(c: SimpleNamespace, task: str) -> SkeletonModel:
    h, d = c.hidden_size, c.head_dim or c.hidden_size // c.num_attention_heads
    q, kv, inner = c.num_attention_heads * d, c.num_key_value_heads * d, c.intermediate_size
    m = SkeletonModel(c, "model.embed_tokens")
    _put(m, "model.embed_tokens", nn.Embedding(c.vocab_size, h))
    layers = nn.ModuleList()
    for _ in range(c.num_hidden_layers):
        layer = nn.Module()
        for part, n_in, n_out in (("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)):
            _put(layer, f"self_attn.{part}", nn.Linear(n_in, n_out, bias=c.attention_bias))
        for part, n_in, n_out in (("gate_proj", h, inner), ("up_proj", h, inner), ("down_proj", inner, h)):
            _put(layer, f"mlp.{part}", nn.Linear(n_in, n_out, bias=c.mlp_bias))
        _put(layer, "mlp.act_fn", nn.SiLU())
        _put(layer, "input_layernorm", nn.RMSNorm(h, eps=c.rms_norm_eps))
        _put(layer, "post_attention_layernorm", nn.RMSNorm(h, eps=c.rms_norm_eps))
        layers.append(layer)
    _put(m, "model.layers", layers)
    _put(m, "model.norm", nn.RMSNorm(h, eps=c.rms_norm_eps))
    _head(m, c, task, h, tied="model.embed_tokens")
    return m


def _head(m: SkeletonModel, c: SimpleNamespace, task: str, h: int, *, tied: str) -> None:
    """A decoder's head: `score` for classification; `lm_head`, sharing the input embedding's
    weight when the config ties them (named_parameters then lists it once, under the embedding)."""
    if task == "classification":
        _put(m, "score", nn.Linear(h, c.num_labels, bias=False))
        return
    _put(m, "lm_head", nn.Linear(h, c.vocab_size, bias=False))
    if c.tie_word_embeddings:
        m.lm_head.weight = m.get_submodule(tied).weight


_BUILD = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def skeleton_model(name: str, task: str, num_labels: int = 2) -> SkeletonModel | None:
    """The skeleton of model `name` for `task`, on the meta device; None when no closed form covers it."""
    d = local_config(name)
    c = _config(d, name, task, num_labels) if d is not None else None
    if c is None:
        return None
    with torch.device("meta"):
        return _BUILD[_FAMILY[c.model_type]](c, task)
