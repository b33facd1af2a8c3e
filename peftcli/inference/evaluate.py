"""Evaluation: metrics of a model on a list of tokenized examples."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftcli.core.arch import Arch
from peftcli.core.precision import autocast_ctx, forward_inputs
from peftcli.data.batching import Collator, batches
from peftcli.data.errors import DataError
from peftcli.models.losses import causal_lm_loss_from_logits

# autocast_ctx and forward_inputs live in core.precision; importing them from here keeps working
# until every caller (train.py) imports them from there.
__all__ = ["autocast_ctx", "evaluate", "forward_inputs", "generate_texts", "generation_eval", "label_match"]


def _macro_f1(preds: list[int], golds: list[int], n: int) -> float:
    f1s = []
    for c in range(n):
        tp = sum(1 for p, g in zip(preds, golds, strict=True) if p == c and g == c)
        fp = sum(1 for p, g in zip(preds, golds, strict=True) if p == c and g != c)
        fn = sum(1 for p, g in zip(preds, golds, strict=True) if p != c and g == c)
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[dict],
    collate: Collator,
    *,
    task: str,
    device: torch.device,
    batch_size: int = 64,
    precision: str = "auto",
    num_labels: int | None = None,
) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    total_loss, total_n = 0.0, 0
    preds: list[int] = []
    golds: list[int] = []
    # Every metric is a sum or count over examples, so their order is free: batches of similar
    # length carry little padding (tweets: about half the tokens of batches in file order).
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    for batch in batches(by_length, batch_size, collate, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = forward_inputs(batch, task)
        with autocast_ctx(device, precision):
            out = model(**inputs)
        logits = out.logits.float()
        if task == "classification":
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
            total_loss += float(loss)
            total_n += len(batch["labels"])
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:
            loss, n = causal_lm_loss_from_logits(logits, batch["labels"])
            total_loss += float(loss) * n
            total_n += n
    model.train(was_training)
    if total_n == 0:  # a loss of 0 and a perplexity of 1 over nothing would read as a perfect score
        raise DataError("nothing to score: no examples" if not examples else
                        f"nothing to score: none of the {len(examples)} examples keeps a trained token (every label "
                        "is ignored); raise data.max_length so that the responses fit, or score another split")
    metrics: dict[str, Any] = {"loss": total_loss / total_n, "examples": len(examples)}
    if task == "classification":
        metrics["accuracy"] = sum(1 for p, g in zip(preds, golds, strict=True) if p == g) / max(len(golds), 1)
        metrics["f1"] = _macro_f1(preds, golds, num_labels or (max(golds + preds) + 1 if golds else 1))
    else:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


@torch.no_grad()
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
    """Greedy continuations of already-formatted prompts (left-padded batches, KV cache on)."""
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(device)
            # Only ids and mask: word-piece tokenizers also emit token_type_ids, which Llama-like
            # models' generate() rejects.
            gen = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outs


def label_match(generated: str, reference: str) -> bool:
    """A generated label counts when its first word is the reference label word."""
    words = generated.strip().lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == reference.strip().lower()


def generation_eval(
    model: nn.Module, arch: Arch, tokenizer, examples: list[dict], *, device, max_new_tokens: int, limit: int | None
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Accuracy of generated answers for prompt/response examples, plus the samples."""
    ex = examples if limit is None else examples[:limit]
    prompts = [tokenizer.decode(e["input_ids"][: e["prompt_len"]]) for e in ex]
    gens = generate_texts(model, tokenizer, prompts, device=device, max_new_tokens=max_new_tokens)
    hits = [label_match(g, e["response"]) for g, e in zip(gens, ex, strict=True)]
    samples = [{"prompt": p, "generated": g, "reference": e["response"]} for p, g, e in zip(prompts, gens, ex, strict=True)]
    return {"generate_accuracy": sum(hits) / max(len(hits), 1), "generated": len(hits)}, samples
