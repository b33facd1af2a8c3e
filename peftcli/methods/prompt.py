"""Prompt tuning (Lester et al. 2021): L trainable vectors prepended to the input embeddings.

The prompt enters at the backbone (`model.base_model`, the module that turns token ids into
hidden states): a forward pre-hook looks the ids up itself, prepends the prompt and extends the
attention mask, position ids and token type ids; a forward hook removes the L virtual positions
from the backbone's hidden states again. So every head and every caller sees one position per real
token:

- causal-LM logits line up with `input_ids` and labels (no label padding, as PEFT needs);
- decoder classifiers pool the last real token of right-padded batches (PEFT hands the base model
  `inputs_embeds` only, so it pools the last position, a pad token in padded rows);
- BERT-like classifiers are unchanged from PEFT: their pooler reads position 0 inside the
  backbone, which is the first virtual token there as here.

With a KV cache (`generate`) only the first forward injects the prompt; later steps find it in
the cache and only need the mask and the position ids that `generate` keeps for the real tokens
moved by L. Numerically the forward equals PEFT's `PromptTuningConfig` for the same embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.arch import Arch
from peftcli.core.hf_call import BackboneCall, accepts, backbone
from peftcli.methods.registry import PeftTwin, register

ATTR = "peftcli_prompt"
PROMPT_KEY = f"{ATTR}.prompt_embeddings"  # HF PEFT's `prompt_embeddings`, shape [L, hidden]


@dataclass
class PromptConfig:
    num_virtual_tokens: int = field(default=20, metadata={"min": 1, "help": "number of trainable prompt vectors"})
    init: Literal["vocab", "random", "text"] = field(
        default="vocab",
        metadata={"help": "vocab: copies of randomly sampled token embeddings; random: normal with the "
                          "embeddings' own std; text: the embeddings of init_text, repeated/truncated"},
    )
    init_text: str | None = field(default=None, metadata={"help": "text whose token embeddings start the prompt (init: text)"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer for init_text; null = the base model's own"}
    )

    def __post_init__(self) -> None:
        if self.init == "text" and not self.init_text:
            raise ValueError("method.init is 'text' but method.init_text is empty")


# ------------------------------------------------------------------ the prompt


class PromptEmbedding(nn.Module):
    """The trainable prompt plus the hooks that put it in front of every input."""

    def __init__(self, num_tokens: int, hidden: int, embeddings: nn.Embedding) -> None:
        super().__init__()
        w = embeddings.weight
        self.num_virtual_tokens = num_tokens
        self.prompt_embeddings = nn.Parameter(torch.empty(num_tokens, hidden, device=w.device, dtype=w.dtype))
        # Not a submodule: the embedding table belongs to the base model.
        self._embeddings = (embeddings,)
        self._pending: list[int] = []
        self._handles: list[Any] = []

    @property
    def embeddings(self) -> nn.Embedding:
        return self._embeddings[0]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        call = BackboneCall(module, args, kwargs)
        L = self.num_virtual_tokens
        b, dev = call.batch_size(), call.device()
        past_len = call.past_len()
        mask = call.get("attention_mask")
        pos = call.get("position_ids")
        if past_len > 0:
            # Decoding with a cache that already holds the prompt: only the bookkeeping that the
            # caller keeps for the real tokens needs moving by L.
            self._pending.append(0)
            if mask is not None and mask.dim() == 2 and mask.shape[1] == past_len + call.seq_len() - L:
                call.set("attention_mask", torch.cat([mask.new_ones(b, L), mask], dim=1))
            if pos is not None:
                call.set("position_ids", pos + L)
            return call.call_args()
        embeds = call.get("inputs_embeds")
        if embeds is None:
            embeds = self.embeddings(call.get("input_ids"))
            call.set("input_ids", None)
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        call.set("inputs_embeds", torch.cat([prompt, embeds], dim=1))
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("prompt tuning needs a 2-D attention mask (batch, tokens)")
            call.set("attention_mask", torch.cat([mask.new_ones(b, L), mask], dim=1))
        tt = call.get("token_type_ids")
        if tt is not None:
            call.set("token_type_ids", torch.cat([tt.new_zeros(b, L), tt], dim=1))
        if pos is not None:
            pos = pos.expand(b, -1) if pos.shape[0] == 1 else pos
            head = torch.arange(L, device=dev, dtype=pos.dtype).unsqueeze(0).expand(b, -1)
            call.set("position_ids", torch.cat([head, pos + L], dim=1))
        self._pending.append(L)
        return call.call_args()

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        L = self._pending.pop() if self._pending else 0
        if L == 0:
            return output
        if isinstance(output, tuple):
            return (output[0][:, L:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, L:]
        hs = getattr(output, "hidden_states", None)
        if hs is not None:
            output.hidden_states = tuple(h[:, L:] for h in hs)
        return output

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _text_ids(model: nn.Module, cfg: PromptConfig, n: int, vocab: int) -> torch.Tensor:
    from peftcli.models.loading import load_tokenizer

    name = cfg.tokenizer or getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", "")
    if not name:
        raise ValueError("prompt init 'text' needs a tokenizer; set method.tokenizer")
    ids = load_tokenizer(str(name))(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"method.init_text {cfg.init_text!r} tokenizes to nothing")
    if max(ids) >= vocab:
        raise ValueError(f"the tokenizer for init_text gives ids up to {max(ids)}, beyond this model's vocabulary ({vocab})")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def init_prompt(store: PromptEmbedding, model: nn.Module, cfg: PromptConfig) -> None:
    table = store.embeddings.weight
    n, vocab = store.num_virtual_tokens, table.shape[0]
    if cfg.init == "random":
        store.prompt_embeddings.normal_(0.0, float(table.float().std()))
        return
    if cfg.init == "vocab":
        ids = torch.randint(0, vocab, (n,))
    else:
        ids = _text_ids(model, cfg, n, vocab)
    store.prompt_embeddings.copy_(table[ids.to(table.device)].to(store.prompt_embeddings.dtype))


def find_store(model: nn.Module) -> PromptEmbedding:
    store = getattr(model, ATTR, None)
    if not isinstance(store, PromptEmbedding):
        raise ValueError("this model has no prompt-tuning prompt attached")
    return store


def attach(model: nn.Module, arch: Arch, cfg: PromptConfig) -> None:
    if hasattr(model, ATTR):
        raise ValueError("prompt tuning is already attached to this model")
    emb = arch.embeddings()
    bb = backbone(model)
    for name in ("inputs_embeds", "attention_mask"):
        if not accepts(bb, name):
            raise ValueError(f"prompt tuning: {type(bb).__name__}.forward takes no {name}")
    store = PromptEmbedding(cfg.num_virtual_tokens, emb.embedding_dim, emb)
    if emb.weight.device.type != "meta":
        init_prompt(store, model, cfg)
    setattr(model, ATTR, store)
    store._handles = [
        bb.register_forward_pre_hook(store.pre_hook, with_kwargs=True),
        bb.register_forward_hook(store.post_hook),
    ]


# ------------------------------------------------------------------ HF PEFT's PROMPT_TUNING type


def peft_layout(model: nn.Module, arch: Arch, cfg: PromptConfig, lay: fmt.Layout) -> None:
    lay.config.update(fmt.prompt_learning_config(arch, cfg.num_virtual_tokens, kv_heads=False))
    lay.config.update({
        "prompt_tuning_init": "RANDOM",  # the weights are in the file; TEXT would make PEFT load a tokenizer
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    })
    lay.to_peft[PROMPT_KEY] = "prompt_embeddings"
    if lay.task == "classification" and arch.spec.lm_head:
        lay.notes.append(
            "PEFT's prompt tuning makes a decoder classifier pool the last position of each row, a pad token "
            "in right-padded rows; give PEFT unpadded or left-padded batches to get peftcli's predictions"
        )


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    return {"num_virtual_tokens": config.get("num_virtual_tokens", 20), "init": "random"}


def peft_settings(config: dict[str, Any], cfg: PromptConfig) -> tuple[list[tuple[str, str, Any, Any]], list[str]]:
    return [("num_virtual_tokens", "num_virtual_tokens", config.get("num_virtual_tokens"), cfg.num_virtual_tokens)], []


register(
    "prompt",
    PromptConfig,
    summary="prompt tuning: L trainable embeddings prepended to the input (init vocab, random or text)",
    merge_refusal="prompt tuning adds virtual input tokens, not a weight change; load the run instead",
    as_lora_refusal="prompt tuning prepends trained input vectors; no weight matrix changes, so no LoRA computes it "
                    "(`peftcli export --to peft` writes it as PEFT's own prompt tuning)",
    combine_refusal=("virtual tokens of different runs are read by attention, not added: token i of one has no "
                     "reason to mean what token i of another does, so averaging them is not defined"),
    # Not positionwise: it strips the virtual positions from the backbone's output, which a head
    # reading the trimmed last layer would then find empty.
    peft=PeftTwin(
        peft_type="PROMPT_TUNING",
        layout=peft_layout,
        import_config=from_peft_config,
        settings=peft_settings,
        prompt_learning=True,
    ),
)(attach)

__all__ = ["PROMPT_KEY", "PromptConfig", "PromptEmbedding", "attach", "find_store"]
