"""The one place that knows where things live inside a transformer.

Every method asks this module for "the value projection of layer 3" or "the FFN output of every
layer" instead of spelling module names itself, so supporting a new architecture means adding one
`ArchSpec` here and nothing else.

Paths inside a layer are relative to that layer. `None` means the architecture has no such part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftcli.core.errors import BadInput


@dataclass(frozen=True)
class ArchSpec:
    family: str
    # Candidate paths (from the model root) of the ModuleList of transformer layers; the first that
    # exists wins. Several are listed because task heads wrap the backbone under different names.
    layers: tuple[str, ...]
    # Self-attention sub-layer: its forward input is the attention sub-layer input.
    attn: str
    q: str
    k: str
    v: str
    o: str
    # FFN sub-layer: the module whose forward input is the FFN sub-layer input.
    ffn: str
    ffn_in: tuple[str, ...]  # up-projection(s); gated FFNs list gate and up
    ffn_out: str  # down-projection
    # Layer norms. For post-LN models they normalise (sub-layer output + residual); for pre-LN
    # models they normalise the sub-layer input.
    attn_norm: str
    ffn_norm: str
    post_norm: bool
    # Post-LN only: the block computing LN(dropout(dense(x)) + residual); its 2nd forward argument
    # is the residual. Bottleneck adapters that sit between the residual add and the norm use it.
    attn_out_block: str | None = None
    ffn_out_block: str | None = None
    ffn_act: str | None = None  # module producing the FFN intermediate activation (IA³ scales it)
    fused_qkv: bool = False  # q, k and v come from one projection (GPT-2's c_attn)
    conv1d: bool = False  # weights stored as (in, out), GPT-2's Conv1D
    heads: tuple[str, ...] = ("classifier", "score")  # task heads trained with any method
    lm_head: str | None = None
    embeddings: tuple[str, ...] = ()  # candidate paths of the input token embedding
    # Pretrained pooler between the encoder and a one-layer classifier (BERT). Trained only with
    # model.train_pooler; heads that already have two layers (RoBERTa, ELECTRA, DistilBERT) have none.
    pooler: tuple[str, ...] = ()
    # Candidate paths of a learned absolute position embedding: its rows bound a sequence's length
    # (rotary positions, Llama's, have no such table and no hard bound).
    positions: tuple[str, ...] = ()


_BERT = dict(
    attn="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn="intermediate",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_norm="output.LayerNorm",
    post_norm=True,
    attn_out_block="attention.output",
    ffn_out_block="output",
    ffn_act="intermediate",
    heads=("classifier",),
)

SPECS: dict[str, ArchSpec] = {
    "bert": ArchSpec(
        family="bert",
        layers=("bert.encoder.layer", "encoder.layer"),
        embeddings=("bert.embeddings.word_embeddings", "embeddings.word_embeddings"),
        positions=("bert.embeddings.position_embeddings", "embeddings.position_embeddings"),
        pooler=("bert.pooler",),
        **_BERT,
    ),
    "roberta": ArchSpec(
        family="bert",
        layers=("roberta.encoder.layer", "encoder.layer"),
        embeddings=("roberta.embeddings.word_embeddings", "embeddings.word_embeddings"),
        positions=("roberta.embeddings.position_embeddings", "embeddings.position_embeddings"),
        **_BERT,
    ),
    "xlm-roberta": ArchSpec(
        family="bert",
        layers=("roberta.encoder.layer", "encoder.layer"),
        embeddings=("roberta.embeddings.word_embeddings", "embeddings.word_embeddings"),
        positions=("roberta.embeddings.position_embeddings", "embeddings.position_embeddings"),
        **_BERT,
    ),
    "electra": ArchSpec(
        family="bert",
        layers=("electra.encoder.layer", "encoder.layer"),
        embeddings=("electra.embeddings.word_embeddings", "embeddings.word_embeddings"),
        positions=("electra.embeddings.position_embeddings", "embeddings.position_embeddings"),
        **_BERT,
    ),
    "distilbert": ArchSpec(
        family="distilbert",
        layers=("distilbert.transformer.layer", "transformer.layer"),
        attn="attention",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        ffn="ffn",
        ffn_in=("ffn.lin1",),
        ffn_out="ffn.lin2",
        attn_norm="sa_layer_norm",
        ffn_norm="output_layer_norm",
        post_norm=True,
        ffn_act="ffn.activation",
        heads=("pre_classifier", "classifier"),
        embeddings=("distilbert.embeddings.word_embeddings", "embeddings.word_embeddings"),
        positions=("distilbert.embeddings.position_embeddings", "embeddings.position_embeddings"),
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        layers=("transformer.h", "h"),
        attn="attn",
        q="attn.c_attn",
        k="attn.c_attn",
        v="attn.c_attn",
        o="attn.c_proj",
        ffn="mlp",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        attn_norm="ln_1",
        ffn_norm="ln_2",
        post_norm=False,
        ffn_act="mlp.act",
        fused_qkv=True,
        conv1d=True,
        heads=("score",),
        lm_head="lm_head",
        embeddings=("transformer.wte", "wte"),
        positions=("transformer.wpe", "wpe"),
    ),
}

_LLAMA = ArchSpec(
    family="llama",
    layers=("model.layers", "layers"),
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    ffn="mlp",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    attn_norm="input_layernorm",
    ffn_norm="post_attention_layernorm",
    post_norm=False,
    ffn_act="mlp.act_fn",
    heads=("score",),
    lm_head="lm_head",
    embeddings=("model.embed_tokens", "embed_tokens"),
)
for _name in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
    SPECS[_name] = _LLAMA

# Model types that look like a mapped family but are not: refused by name, with the reason, rather
# than mapped to a spec whose module paths they lack.
REFUSED: dict[str, str] = {
    "phi3": "Phi-3 fuses q, k and v into one `self_attn.qkv_proj` and the FFN's gate and up projections "
            "into one `mlp.gate_up_proj`; the architecture map does not split fused projections for it, "
            "so the roles q, k, v and ffn_in have no module of their own",
}

# Architecture-neutral target names users write in recipes.
ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
QKV = ("q", "k", "v")  # in this order in a fused projection's output (GPT-2's c_attn)


class UnsupportedArchitecture(BadInput, ValueError):
    pass


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class Arch:
    """An `ArchSpec` resolved against one live model instance."""

    spec: ArchSpec
    model: nn.Module
    layers_path: str
    config: Any
    train_pooler: bool = False  # the pooler counts as part of the trained task head

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        c = self.config
        return getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.dim

    @property
    def num_heads(self) -> int:
        c = self.config
        return getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or c.n_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        c = self.config
        return (
            getattr(c, "intermediate_size", None)
            or getattr(c, "n_inner", None)
            or getattr(c, "hidden_dim", None)
            or 4 * self.hidden_size
        )

    @property
    def post_norm(self) -> bool:
        return self.spec.post_norm

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def path(self, i: int, role: str) -> str | None:
        """Full module path of `role` (a field name of ArchSpec, e.g. "v" or "ffn_out") in layer i."""
        rel = getattr(self.spec, role)
        if rel is None:
            return None
        return f"{self.layers_path}.{i}.{rel}"

    def get(self, i: int, role: str) -> nn.Module | None:
        rel = getattr(self.spec, role)
        if rel is None:
            return None
        if isinstance(rel, tuple):
            raise TypeError(f"role {role!r} names several modules; use get_all")
        return _get(self.layers[i], rel)

    def get_all(self, i: int, role: str) -> list[tuple[str, nn.Module]]:
        """(full path, module) for a role; tuple roles (ffn_in) give several."""
        rel = getattr(self.spec, role)
        rels = rel if isinstance(rel, tuple) else (rel,)
        out = []
        for r in rels:
            if r is None:
                continue
            m = _get(self.layers[i], r)
            if m is not None:
                out.append((f"{self.layers_path}.{i}.{r}", m))
        return out

    def role_paths(self, roles: list[str] | tuple[str, ...], layers: list[int] | None = None) -> list[str]:
        """Full paths for architecture-neutral roles (q, k, v, o, ffn_in, ffn_out), deduplicated
        (GPT-2's fused c_attn serves q, k and v)."""
        seen: dict[str, None] = {}
        for i in layers if layers is not None else range(self.num_layers):
            for role in roles:
                if role not in ROLES:
                    raise ValueError(f"unknown target role {role!r}; known: {', '.join(ROLES)}")
                for p, _ in self.get_all(i, role):
                    seen[p] = None
        return list(seen)

    def fused_qkv_rows(self, roles: set[str]) -> list[int] | None:
        """Output rows of a fused [q; k; v] projection that belong to `roles`; None = all of them."""
        if roles >= set(QKV):
            return None
        sizes = {"q": self.num_heads * self.head_dim, "k": self.num_kv_heads * self.head_dim,
                 "v": self.num_kv_heads * self.head_dim}
        rows, start = [], 0
        for r in QKV:
            if r in roles:
                rows.extend(range(start, start + sizes[r]))
            start += sizes[r]
        return rows

    def pooler(self) -> tuple[str, nn.Module] | None:
        for name in self.spec.pooler:
            m = _get(self.model, name)
            if m is not None:
                return name, m
        return None

    def head_modules(self) -> list[tuple[str, nn.Module]]:
        out = [self.pooler()] if self.train_pooler and self.pooler() is not None else []
        for name in self.spec.heads:
            m = _get(self.model, name)
            if m is not None:
                out.append((name, m))
        return out

    def embeddings(self) -> nn.Embedding:
        for p in self.spec.embeddings:
            m = _get(self.model, p)
            if m is not None:
                return m
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module | None:
        return _get(self.model, self.spec.lm_head) if self.spec.lm_head else None

    def position_limit(self) -> int | None:
        """The most tokens a sequence may hold: the rows of the learned absolute position table
        (less RoBERTa's padding offset, whose positions start after its padding index); None where
        positions are rotary or relative, which have no table to run past."""
        if getattr(self.config, "position_embedding_type", "absolute") != "absolute":
            return None
        for p in self.spec.positions:
            m = _get(self.model, p)
            if isinstance(m, nn.Embedding):
                return m.num_embeddings - (m.padding_idx + 1 if m.padding_idx is not None else 0)
        return None


def model_type(config: Any) -> str:
    return getattr(config, "model_type", "") or ""


def resolve(model: nn.Module) -> Arch:
    """Find the ArchSpec for a model and check that its paths exist."""
    config = model.config
    mt = model_type(config)
    if mt in REFUSED:
        raise UnsupportedArchitecture(f"model_type {mt!r} is not supported: {REFUSED[mt]}")
    spec = SPECS.get(mt)
    if spec is None:
        raise UnsupportedArchitecture(
            f"model_type {mt!r} is not in the architecture map; supported: {', '.join(sorted(SPECS))}"
        )
    for path in spec.layers:
        m = _get(model, path)
        if isinstance(m, nn.ModuleList):
            arch = Arch(spec=spec, model=model, layers_path=path, config=config)
            layer0 = arch.layers[0]
            for role in ("q", "v", "o", "ffn_out"):
                if _get(layer0, getattr(spec, role)) is None:
                    raise UnsupportedArchitecture(
                        f"{mt}: expected module {getattr(spec, role)!r} in each layer; "
                        "this transformers version may have renamed it"
                    )
            return arch
    raise UnsupportedArchitecture(f"{mt}: none of {spec.layers} is a ModuleList in this model")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out). By name, so that no code
    outside this map needs transformers' class."""
    return type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) for nn.Linear and GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    if is_conv1d(module):
        return w.shape[0], w.shape[1]
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """Weight as (out, in) whatever the storage convention."""
    if is_conv1d(module):
        return module.weight.t()
    return module.weight


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
