"""Rows to token ids and labels; labels are IGNORE wherever the loss must not reach.

A causal-LM example whose trained tokens all fall past data.max_length would train on nothing and
score a perfect loss of 0 over no tokens; such examples are left out and counted (`Untrained`),
and a split left with none is refused (`check_trained`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from peftcli.config.recipe import DataConfig
from peftcli.core.errors import DataError
from peftcli.data.chat import ChatRenderError, chat_segments, chat_template_of, format_prompt
from peftcli.models.losses import IGNORE


@dataclass(frozen=True)
class Untrained:
    """An example left out because truncation kept none of its trained tokens."""

    row: int  # data row number from 1 (0: unknown)
    prompt_tokens: int | None  # tokens before its first trained one; None: nothing to train at any length
    tokens: int  # its length before truncation


def _first_trained(labels: list[int]) -> int | None:
    """Position of the first token the loss covers; position 0 never counts, as nothing predicts it."""
    return next((i for i in range(1, len(labels)) if labels[i] != IGNORE), None)


def _keep_trained(examples: list[dict], full_labels: list[list[int]], rows: list[dict], max_length: int,
                  untrained: list[Untrained] | None) -> list[dict]:
    """The examples that keep a trained token after truncation; the others go to `untrained`
    (when it is None, every example is kept as it is)."""
    if untrained is None:
        return examples
    kept = []
    for e, labels, r in zip(examples, full_labels, rows, strict=True):
        first = _first_trained(labels)
        if first is not None and first < max_length:
            kept.append(e)
        else:
            untrained.append(Untrained(row=r.get("row", 0), prompt_tokens=first, tokens=len(labels)))
    return kept


def _tokenize_chats(rows: list[dict], tokenizer, cfg: DataConfig, split: str,
                    malformed: list[tuple[str, int, str]] | None,
                    untrained: list[Untrained] | None) -> list[dict[str, Any]]:
    """Token ids and labels of conversations; labels are IGNORE outside assistant turns.

    Pieces are tokenized separately (one batched call), as a prompt and a reply are at inference.
    `prompt_len` / `response` describe the first exchange, for generated samples and accuracy.
    """
    template = chat_template_of(tokenizer, cfg)
    kept, all_pieces = [], []
    for r in rows:
        try:
            pieces = chat_segments(tokenizer, r["messages"], template)
        except ChatRenderError as e:
            if malformed is None:
                raise DataError(f"{cfg.source}: {split} row {r.get('row', '?')}: {e}") from None
            malformed.append((split, r.get("row", 0), str(e)))
            continue
        kept.append(r)
        all_pieces.append(pieces)
    flat = [t for pieces in all_pieces for t, _ in pieces]
    ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, full, k = [], [], 0
    for r, pieces in zip(kept, all_pieces, strict=True):
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = None
        for _, trained in pieces:
            piece = ids_flat[k]
            k += 1
            if trained and prompt_len is None:
                prompt_len = len(ids)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        first_reply = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        out.append({"input_ids": ids[: cfg.max_length], "labels": labels[: cfg.max_length],
                    "prompt_len": min(len(ids) if prompt_len is None else prompt_len, cfg.max_length),
                    "response": first_reply})
        full.append(labels)
    return _keep_trained(out, full, kept, cfg.max_length, untrained)


def tokenize(rows: list[dict], tokenizer, task: str, cfg: DataConfig, *, split: str = "train",
             malformed: list[tuple[str, int, str]] | None = None,
             untrained: list[Untrained] | None = None) -> list[dict[str, Any]]:
    """Token ids and labels per row. Conversations the chat template cannot render are appended to
    `malformed` (or, when it is None, refused); causal-LM examples left with no trained token after
    truncation to `untrained` (when it is None, they are kept)."""
    if not rows:  # e.g. a held-out split whose rows were all malformed
        return []
    if task == "classification":
        texts = [r["text"] or "" for r in rows]
        pairs = [r.get("text_pair") or "" for r in rows] if cfg.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        return [{"input_ids": ids, "labels": r["label"]} for ids, r in zip(enc["input_ids"], rows, strict=True)]
    out = []
    eos = tokenizer.eos_token or ""
    if rows and "messages" in rows[0]:
        return _tokenize_chats(rows, tokenizer, cfg, split, malformed, untrained)
    if rows and "prompt" in rows[0]:
        prompts = [format_prompt(tokenizer, r["prompt"], cfg.chat_template) for r in rows]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer([r["response"] + eos for r in rows], add_special_tokens=False)["input_ids"]
        full = [[IGNORE] * len(p) + rr for p, rr in zip(p_ids, r_ids, strict=True)]
        for p, rr, labels, row in zip(p_ids, r_ids, full, rows, strict=True):
            out.append({"input_ids": (p + rr)[: cfg.max_length], "labels": labels[: cfg.max_length],
                        "prompt_len": len(p), "response": row["response"]})
    else:
        enc = tokenizer([r["text"] + eos for r in rows], truncation=True, max_length=cfg.max_length)
        for ids in enc["input_ids"]:
            out.append({"input_ids": ids, "labels": list(ids)})
        full = [e["labels"] for e in out]
    return _keep_trained(out, full, rows, cfg.max_length, untrained)


def check_trained(role: str, kept: list[dict], untrained: list[Untrained], cfg: DataConfig) -> str | None:
    """Refuse a split whose examples all lost their trained tokens; else the line saying how many
    were left out (None when none was).

    `role` is what the split is for: training, validation or test.
    """
    if not untrained:
        return None
    n, total = len(untrained), len(untrained) + len(kept)
    lost = ("training" if role == "training" else "scoring")
    if kept:
        return (f"data.max_length {cfg.max_length}: {n} of {total} {role} examples keep no trained token after "
                f"truncation; left out of {lost} ({_fix(untrained, cfg)})")
    raise DataError(f"data.max_length: no {role} example of {cfg.source} keeps a trained token after truncation "
                    f"to {cfg.max_length} tokens ({total} examples; {_numbers(untrained)}); {_fix(untrained, cfg)}")


def _numbers(untrained: list[Untrained]) -> str:
    """How far past the cut the trained tokens start: the numbers a user needs to choose data.max_length."""
    starts = sorted(u.prompt_tokens for u in untrained if u.prompt_tokens is not None)
    empty = len(untrained) - len(starts)
    parts = []
    if starts:
        parts.append(f"their first trained token comes after {starts[0]} to {starts[-1]} tokens, "
                     f"median {int(statistics.median(starts))}")
    if empty:
        parts.append(f"{empty} with nothing to train at any length")
    return "; ".join(parts)


def _fix(untrained: list[Untrained], cfg: DataConfig) -> str:
    starts = sorted(u.prompt_tokens for u in untrained if u.prompt_tokens is not None)
    if not starts:
        return "fix: give those rows a response / assistant turn to train on"
    template = ", or set data.chat_template: false if the tokenizer's template adds a long system prompt" \
        if cfg.chat_template else ""
    need = f"{starts[0] + 1}" if starts[0] == starts[-1] else f"{starts[0] + 1} (keeps some), {starts[-1] + 1} (keeps all)"
    return (f"fix: raise data.max_length to at least {need}, "
            f"shorten the prompts{template}")
