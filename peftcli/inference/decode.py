"""Greedy decoding, the one path every generated token takes: `peftcli generate`, the scored
answers of evaluation, mixed-adapter batches and the server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList


class _StepStreamer:
    """generate()'s streamer interface: reports each decode step's new token of every row."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def pad_id(tokenizer) -> int:
    """The id left padding uses; any id does (the mask hides it), 0 where the tokenizer has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def greedy_ids(
    model: nn.Module,
    prompts: list[list[int]],
    max_new: list[int],
    *,
    pad_id: int,
    eos: set[int],
    device: torch.device,
    on_step: Callable[[list[int]], None] | None = None,
    stop_row: Callable[[int], bool] | None = None,
    logits: list[list[torch.Tensor]] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, left-padded into one batch (KV cache on).

    Row i stops after max_new[i] tokens, at an end-of-sequence token, or once `stop_row(i)` says
    so (a client that went away); the batch stops when every row has. Returned ids end before
    the end-of-sequence token. `logits`, when given, receives each row's per-step logits.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    limits = torch.tensor(max_new)

    class _PerRow(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = (input_ids.shape[1] - width) >= limits
            if stop_row is not None:
                done = done | torch.tensor([stop_row(i) for i in range(len(prompts))])
            return done.to(input_ids.device)

    was_training = model.training
    model.eval()
    try:
        # Only ids and mask: word-piece tokenizers also emit token_type_ids, which Llama-like
        # models' generate() rejects.
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(max_new), do_sample=False,
            pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([_PerRow()]),
            streamer=_StepStreamer(on_step) if on_step else None,
            return_dict_in_generate=True, output_logits=logits is not None,
        )
    finally:
        model.train(was_training)
    out = []
    for i, row in enumerate(gen.sequences[:, width:].tolist()):
        row = row[: max_new[i]]
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
        if logits is not None:
            logits.append([step[i].float().cpu() for step in gen.logits[: len(row)]])
    return out


def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    device: torch.device,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    add_special_tokens: bool = False,
) -> list[str]:
    """Greedy continuations of already-formatted prompts, `batch_size` prompts a batch."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    pad, eos = pad_id(tokenizer), eos_ids(model, tokenizer)
    outs: list[list[int]] = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i: i + batch_size]
        outs += greedy_ids(model, chunk, [max_new_tokens] * len(chunk), pad_id=pad, eos=eos, device=device)
    return [t.strip() for t in tokenizer.batch_decode(outs, skip_special_tokens=True)]


def context_length(model: Any) -> int | None:
    """The most tokens (prompt plus max_tokens) a request may hold. A model with sliding-window
    attention is held to its window: the engine's KV cache keeps every token, which equals the
    sliding window's attention only while a sequence fits in the window."""
    cfg = model.config
    ctx = next((v for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
                if isinstance(v := getattr(cfg, key, None), int) and v > 0), None)
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(cfg, "use_sliding_window", True) is not False:
        ctx = window if ctx is None else min(ctx, window)
    return ctx


def is_unicode(text: str) -> bool:
    """Text a tokenizer can read: no lone surrogate (JSON's "\\ud800", or a command-line argument
    that was not UTF-8, which Python keeps as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
