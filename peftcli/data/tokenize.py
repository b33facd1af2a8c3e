"""Rows to token ids and labels; labels are IGNORE wherever the loss must not reach."""

from __future__ import annotations

from typing import Any

from peftcli.config.recipe import DataConfig
from peftcli.data.chat import ChatRenderError, chat_segments, chat_template_of, format_prompt
from peftcli.data.errors import DataError

IGNORE = -100


def _tokenize_chats(rows: list[dict], tokenizer, cfg: DataConfig, split: str,
                    malformed: list[tuple[str, int, str]] | None) -> list[dict[str, Any]]:
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
    out, k = [], 0
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
    return out


def tokenize(rows: list[dict], tokenizer, task: str, cfg: DataConfig, *, split: str = "train",
             malformed: list[tuple[str, int, str]] | None = None) -> list[dict[str, Any]]:
    """Token ids and labels per row. Conversations the chat template cannot render are appended to
    `malformed` (or, when it is None, refused)."""
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
        return _tokenize_chats(rows, tokenizer, cfg, split, malformed)
    if rows and "prompt" in rows[0]:
        prompts = [format_prompt(tokenizer, r["prompt"], cfg.chat_template) for r in rows]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer([r["response"] + eos for r in rows], add_special_tokens=False)["input_ids"]
        for p, rr, row in zip(p_ids, r_ids, rows, strict=True):
            ids = (p + rr)[: cfg.max_length]
            labels = ([IGNORE] * len(p) + rr)[: cfg.max_length]
            out.append({"input_ids": ids, "labels": labels, "prompt_len": len(p), "response": row["response"]})
    else:
        enc = tokenizer([r["text"] + eos for r in rows], truncation=True, max_length=cfg.max_length)
        for ids in enc["input_ids"]:
            out.append({"input_ids": ids, "labels": list(ids)})
    return out
