"""Prefix tuning (Li & Liang 2021): per layer, L trainable keys and values in front of the real ones.

Mechanism. Every attention module of transformers 5 calls the function registered under
`config._attn_implementation` with keys and values already projected (and rotated, for rope
models), shaped [batch, kv_heads, tokens, head_dim]. We register our own attention function
through the public `AttentionInterface`, point the model's config at it, and give each attention
module a `LayerPrefix` child. The function concatenates that layer's prefix in front of the keys
and values, adds always-visible columns to the mask (building the causal mask when the model
relied on SDPA's `is_causal`), and hands over to the implementation the model had (sdpa or
eager). Nothing is copied or patched, grouped-query attention works because prefixes have the
model's kv_heads, and the KV cache only ever holds real tokens, so `generate` needs nothing special.

Positions. As in PEFT (and the paper's GPT-2 code), the prefix stands for positions 0..L-1, so real
tokens are moved to L.. by a forward pre-hook on the backbone (`shift_positions`). Prefix keys are
not rotated, as in PEFT, where they are handed over as a ready-made cache.

Training and saving. The prefix is reparameterised as Embedding(L, hidden) -> Linear(hidden, 512)
-> tanh -> Linear(512, layers * 2 * kv_heads * head_dim), which trains more stably than the raw
tensor. The adapter file holds the MLP's output as `peftcli_prefix.prompt_embeddings` (PEFT's
`prompt_embeddings`, same layout) and, while the MLP exists, the MLP weights too, so that
`--resume` continues the same reparameterisation with its optimizer state. Loading a file with
only `prompt_embeddings` (e.g. one converted from PEFT) "ejects" the MLP: the layers then read the
plain tensor, which stays trainable. Under `torch.no_grad` the MLP output is computed once and
reused until a weight changes, so inference costs the same either way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import AdapterModule
from peftcli.core.arch import Arch
from peftcli.core.hf_call import BackboneCall, accepts, backbone
from peftcli.core.precision import float_dtype
from peftcli.methods.registry import PeftTwin, register

ATTR = "peftcli_prefix"  # the store on the top model, and the LayerPrefix child of each attention module
PROMPT_KEY = f"{ATTR}.prompt_embeddings"  # HF PEFT's `prompt_embeddings` [L, layers * 2 * kv_heads * head_dim]
SUPPORTED = ("sdpa", "eager")


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = field(default=20, metadata={"min": 1, "help": "prefix length L per layer"})
    reparameterize: bool = field(
        default=True, metadata={"help": "train through an MLP (Embedding -> Linear -> tanh -> Linear); saved as its output"}
    )
    bottleneck: int = field(default=512, metadata={"min": 1, "help": "hidden width of the reparameterisation MLP"})
    shift_positions: bool = field(
        default=True,
        metadata={"help": "real tokens take positions L.., as if the prefix held 0..L-1 (as PEFT); false keeps 0.."},
    )


class PrefixStore(nn.Module):
    """All layers' prefixes: either the reparameterisation MLP or the plain [L, width] tensor."""

    def __init__(
        self, num_tokens: int, num_layers: int, kv_heads: int, head_dim: int, hidden: int,
        reparameterize: bool, bottleneck: int, device: torch.device, dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_tokens
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.width = num_layers * 2 * kv_heads * head_dim
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        if reparameterize:
            self.embedding = nn.Embedding(num_tokens, hidden, **kw)
            self.transform = nn.Sequential(
                nn.Linear(hidden, bottleneck, **kw), nn.Tanh(), nn.Linear(bottleneck, self.width, **kw)
            )
        else:
            self.prompt_embeddings = nn.Parameter(torch.empty(num_tokens, self.width, **kw))
            if device.type != "meta":
                nn.init.normal_(self.prompt_embeddings)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "transform")

    def table(self) -> torch.Tensor:
        """[L, layers * 2 * kv_heads * head_dim], PEFT's layout."""
        if not self.reparameterized:
            return self.prompt_embeddings
        if torch.is_grad_enabled():
            return self.transform(self.embedding.weight)
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.transform(self.embedding.weight))
        return self._cache[1]

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's prefix keys and values, each [kv_heads, L, head_dim]."""
        w = 2 * self.kv_heads * self.head_dim
        rows = slice(i * w, (i + 1) * w)
        if self.reparameterized and torch.is_grad_enabled():
            # Training: only this layer's rows of the last projection, no full table per layer.
            # The weights are about to change, and a fused optimizer step (torch's fused AdamW)
            # updates them in place without bumping their version counters: the cached table must
            # not outlive this forward (every optimizer step follows one).
            self._cache = None
            lin1, lin2 = self.transform[0], self.transform[2]
            h = torch.tanh(lin1(self.embedding.weight))
            t = F.linear(h, lin2.weight[rows], lin2.bias[rows])
        else:
            t = self.table()[:, rows]
        t = t.reshape(self.num_virtual_tokens, 2, self.kv_heads, self.head_dim)
        return t[:, 0].transpose(0, 1), t[:, 1].transpose(0, 1)

    def eject(self, table: torch.Tensor) -> None:
        """Replace the MLP by a plain tensor (trainable, so training can go on from it)."""
        for name in ("embedding", "transform", "prompt_embeddings"):
            if hasattr(self, name):
                delattr(self, name)
        self.prompt_embeddings = nn.Parameter(table.detach().clone(), requires_grad=True)
        self._cache = None


class LayerPrefix(AdapterModule):
    """Lives inside one attention module; tells the attention function what to prepend."""

    def __init__(self, store: PrefixStore, index: int, inner: Any, additive_mask: bool) -> None:
        super().__init__()
        self.index = index
        self.inner = inner  # the model's own attention function (sdpa or its eager one)
        self.additive_mask = additive_mask  # eager masks are float and added to the scores
        self._store = (store,)  # a tuple, so the store is not registered twice

    def kv(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._store[0].layer_kv(self.index)
        shape = (batch, *k.shape)
        return (k.to(like.dtype).unsqueeze(0).expand(shape), v.to(like.dtype).unsqueeze(0).expand(shape))


def _extend_mask(
    mask: torch.Tensor | None, n: int, q_len: int, kv_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Put n always-visible columns in front of a mask that covers only the real keys."""
    if mask is None:
        if not (causal and q_len > 1):
            return None  # every key is visible already, the prefix included
        # The model left causality to SDPA's is_causal, which cannot be shifted; spell it out.
        q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
    if mask.dtype == torch.bool:
        front = mask.new_ones((*mask.shape[:-1], n))
    else:
        front = mask.new_zeros((*mask.shape[:-1], n))
    return torch.cat([front, mask], dim=-1)


def prefix_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    lp = getattr(module, ATTR, None)
    if not isinstance(lp, LayerPrefix):
        raise RuntimeError(f"{type(module).__name__} runs under prefix attention but has no prefix attached")
    if not lp.adapter_enabled:
        return lp.inner(module, query, key, value, attention_mask, *args, **kwargs)
    pk, pv = lp.kv(key.shape[0], key)
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    mask = _extend_mask(attention_mask, pk.shape[2], query.shape[2], key.shape[2], causal, key.device)
    if mask is not None and mask.dtype == torch.bool and lp.additive_mask:
        mask = torch.zeros(mask.shape, device=mask.device, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
    key = torch.cat([pk, key], dim=2)
    value = torch.cat([pv, value], dim=2)
    return lp.inner(module, query, key, value, mask, *args, **kwargs)


def _register_impl(base: str) -> str:
    """One name per wrapped implementation, so the model builds the mask its inner function expects."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = f"{ATTR}_{base}"
    AttentionInterface.register(name, prefix_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _inner_function(base: str, attn_module: nn.Module):
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # Eager attention is the modeling file's own function (each family has its quirks).
    fn = getattr(inspect.getmodule(type(attn_module)), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"prefix tuning: no eager attention function found for {type(attn_module).__name__}; use sdpa")
    return fn


def find_store(model: nn.Module) -> PrefixStore:
    store = getattr(model, ATTR, None)
    if not isinstance(store, PrefixStore):
        raise ValueError("this model has no prefix-tuning prefix attached")
    return store


def attach(model: nn.Module, arch: Arch, cfg: PrefixConfig) -> PrefixStore:
    if hasattr(model, ATTR):
        raise ValueError("prefix tuning is already attached to this model")
    base = model.config._attn_implementation or "eager"
    base = base.removeprefix(f"{ATTR}_")
    if base not in SUPPORTED:
        raise ValueError(f"prefix tuning works with attn_implementation sdpa or eager, not {base!r}")
    q = arch.get(0, "q")
    store = PrefixStore(
        cfg.num_virtual_tokens, arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size,
        cfg.reparameterize, cfg.bottleneck, q.weight.device, float_dtype(q),
    )
    setattr(model, ATTR, store)
    for i in range(arch.num_layers):
        attn = arch.get(i, "attn")
        setattr(attn, ATTR, LayerPrefix(store, i, _inner_function(base, attn), additive_mask=base == "eager"))
    model.config._attn_implementation = _register_impl(base)
    if cfg.shift_positions:
        bb = backbone(model)
        if not accepts(bb, "position_ids"):
            raise ValueError(f"prefix tuning: {type(bb).__name__}.forward takes no position_ids; set method.shift_positions: false")
        L = cfg.num_virtual_tokens

        def shift(module: nn.Module, args: tuple, kwargs: dict):
            call = BackboneCall(module, args, kwargs)
            pos = call.get("position_ids")
            if pos is None:
                start = call.past_len()
                pos = torch.arange(start, start + call.seq_len(), device=call.device()).unsqueeze(0)
            call.set("position_ids", pos + L)
            return call.call_args()

        store._hook = bb.register_forward_pre_hook(shift, with_kwargs=True)
    return store


# ------------------------------------------------------------------ saving and loading


def _own_names(model: nn.Module) -> set[str]:
    return {f"{ATTR}.{n}" for n, _ in find_store(model).named_parameters()}


def export_state(model: nn.Module, arch: Arch, cfg: PrefixConfig) -> dict[str, torch.Tensor]:
    store = find_store(model)
    sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if store.reparameterized:
        with torch.no_grad():
            sd[PROMPT_KEY] = store.table().detach()
    return sd


def load_state(model: nn.Module, arch: Arch, cfg: PrefixConfig, sd: dict[str, torch.Tensor]) -> None:
    from peftcli.core.adapter import copy_into_params
    from peftcli.core.errors import CheckpointError

    store = find_store(model)
    mlp_keys = _own_names(model) - {PROMPT_KEY}
    expected = None
    if PROMPT_KEY not in sd and not (store.reparameterized and mlp_keys <= set(sd)):
        raise CheckpointError(f"adapter has no {PROMPT_KEY}; was it trained with prefix tuning?")
    if not store.reparameterized:
        # The tensor is the parameter: copied in place, so an optimizer keeps it. A file trained
        # with the MLP loads here too; its MLP weights are not needed.
        rest = {k: v for k, v in sd.items() if k == PROMPT_KEY or not k.startswith(ATTR + ".")}
    elif mlp_keys <= set(sd):
        rest = {k: v for k, v in sd.items() if k != PROMPT_KEY}
        expected = sd.get(PROMPT_KEY)
    else:
        t = sd[PROMPT_KEY]
        if tuple(t.shape) != (store.num_virtual_tokens, store.width):
            raise CheckpointError(
                f"{PROMPT_KEY}: shape {tuple(t.shape)} in the file, ({store.num_virtual_tokens}, {store.width}) "
                "expected (num_virtual_tokens, layers * 2 * kv_heads * head_dim)"
            )
        ref = next(store.parameters())
        store.eject(t.to(ref.device, ref.dtype))
        rest = {k: v for k, v in sd.items() if k != PROMPT_KEY and k not in mlp_keys}
    params = dict(model.named_parameters())
    unknown = [k for k in rest if k not in params]
    if unknown:
        raise CheckpointError(f"adapter has {len(unknown)} tensors this model lacks (e.g. {unknown[0]})")
    missing = [n for n, p in params.items() if p.requires_grad and not n.startswith(ATTR + ".") and n not in sd]
    if missing:
        raise CheckpointError(f"adapter is missing {len(missing)} trained tensors (e.g. {missing[0]})")
    copy_into_params(params, rest)
    with torch.no_grad():
        if expected is not None:
            got = store.table().float().cpu()
            err = float((got - expected.float()).abs().max())
            if err > 1e-3 * max(1.0, float(expected.float().abs().max())):
                raise CheckpointError(f"prefix MLP weights do not reproduce the saved {PROMPT_KEY} (max diff {err:.2e})")


# ------------------------------------------------------------------ HF PEFT's PREFIX_TUNING type


def peft_layout(model: nn.Module, arch: Arch, cfg: PrefixConfig, lay: fmt.Layout) -> None:
    """PEFT's `prompt_embeddings` is our saved MLP output; the MLP itself has no place there."""
    dims = fmt.prompt_learning_config(arch, cfg.num_virtual_tokens, kv_heads=True)
    lay.config.update(dims)
    if not cfg.shift_positions:
        raise fmt.PeftFormatError(
            "cannot export prefix tuning with method.shift_positions: false; PEFT always places real "
            "tokens after the prefix's positions (retrain with method.shift_positions: true)"
        )
    lay.config.update({"encoder_hidden_size": dims["token_dim"], "prefix_projection": False, "init_weights": None})
    lay.to_peft[PROMPT_KEY] = "prompt_embeddings"
    lay.ignored = {f"{ATTR}.{n}" for n, _ in find_store(model).named_parameters()} - {PROMPT_KEY}


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    return {"num_virtual_tokens": config.get("num_virtual_tokens", 20)}


def peft_settings(config: dict[str, Any], cfg: PrefixConfig) -> tuple[list[tuple[str, str, Any, Any]], list[str]]:
    return [("num_virtual_tokens", "num_virtual_tokens", config.get("num_virtual_tokens"), cfg.num_virtual_tokens)], []


register(
    "prefix",
    PrefixConfig,
    summary="prefix tuning: L trainable keys/values per layer (reparameterised by an MLP, saved as a tensor)",
    merge_refusal="prefix tuning adds keys and values to attention, not a weight change; load the run instead",
    as_lora_refusal="prefix tuning adds trained keys and values to attention; no weight matrix changes, so no LoRA "
                    "computes it (`peftcli export --to peft` writes it as PEFT's own prefix tuning)",
    export_state=export_state,
    combine_refusal=("prefixes of different runs are attended to, not added: position i of one has no reason to "
                     "mean what position i of another does, so averaging them is not defined"),
    load_state=load_state,
    positionwise=True,
    peft=PeftTwin(
        peft_type="PREFIX_TUNING",
        layout=peft_layout,
        import_config=from_peft_config,
        settings=peft_settings,
        prompt_learning=True,
    ),
)(attach)

__all__ = ["PROMPT_KEY", "LayerPrefix", "PrefixConfig", "PrefixStore", "attach", "find_store", "prefix_attention"]
