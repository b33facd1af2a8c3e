"""Evaluation: metrics of a model on a list of tokenized examples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.core.arch import Arch
from peftcli.core.errors import DataError
from peftcli.core.precision import autocast_ctx, forward_inputs
from peftcli.data.batching import Collator, batches
from peftcli.inference.decode import generate_texts
from peftcli.models.losses import causal_lm_loss_from_logits


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


@dataclass
class Scores:
    """Sums and counts over examples, so neither batch order nor batch company changes the
    metrics: `evaluate` adds whole batches, `multi.evaluate_runs` one row at a time per run."""

    task: str
    loss: float = 0.0  # summed over examples (classification) or target tokens (causal LM)
    n: int = 0
    preds: list[int] = field(default_factory=list)
    golds: list[int] = field(default_factory=list)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One forward pass's float logits and its labels."""
        if self.task == "classification":
            self.loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            self.n += len(labels)
            self.preds += logits.argmax(-1).tolist()
            self.golds += labels.tolist()
        else:
            loss, n = causal_lm_loss_from_logits(logits, labels)
            self.loss += float(loss) * n
            self.n += n

    def metrics(self, examples: int, num_labels: int | None = None) -> dict[str, Any]:
        """Loss and accuracy / macro-F1 (classification) or perplexity (causal LM). Refuses to
        score nothing: a loss of 0 and a perplexity of 1 over zero tokens would read as a perfect
        score (and a sweep would rank it first)."""
        if self.n == 0:
            raise DataError("nothing to score: no examples" if not examples else
                            f"nothing to score: none of the {examples} examples keeps a trained token (every label "
                            "is ignored); raise data.max_length so that the responses fit, or score another split")
        metrics: dict[str, Any] = {"loss": self.loss / self.n, "examples": examples}
        if self.task == "classification":
            preds, golds = self.preds, self.golds
            metrics["accuracy"] = sum(1 for p, g in zip(preds, golds, strict=True) if p == g) / max(len(golds), 1)
            metrics["f1"] = _macro_f1(preds, golds, num_labels or (max(golds + preds) + 1 if golds else 1))
        else:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        return metrics


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
    scores = Scores(task)
    # Every metric is a sum or count over examples, so their order is free: batches of similar
    # length carry little padding (tweets: about half the tokens of batches in file order).
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    for batch in batches(by_length, batch_size, collate, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = forward_inputs(batch, task)
        with autocast_ctx(device, precision):
            out = model(**inputs)
        scores.add(out.logits.float(), batch["labels"])
    model.train(was_training)
    return scores.metrics(len(examples), num_labels)


def _words(text: str) -> list[str]:
    return text.strip().lower().replace(".", " ").replace(",", " ").split()


def label_match(generated: str, reference: str) -> bool:
    """A generated answer counts when it opens with the reference's words (case, full stops and
    commas aside): a label word ("positive.") for a classifier-like task, the whole reference for a
    longer answer, and whatever the model adds after it is let be."""
    ref = _words(reference)
    return bool(ref) and _words(generated)[: len(ref)] == ref


def generation_eval(
    model: nn.Module, arch: Arch, tokenizer, examples: list[dict], *, device, max_new_tokens: int, limit: int | None
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Accuracy of generated answers for prompt/response examples, plus the samples."""
    ex = examples if limit is None else examples[:limit]
    prompts = [tokenizer.decode(e["input_ids"][: e["prompt_len"]]) for e in ex]
    gens = generate_texts(model, tokenizer, prompts, device=device, max_new_tokens=max_new_tokens)
    # A row without a reference (a KTO row whose completion is the undesirable one) is shown, not scored.
    hits = [label_match(g, e["response"]) for g, e in zip(gens, ex, strict=True) if e.get("response") is not None]
    samples = [{"prompt": p, "generated": g, "reference": e.get("response") or ""}
               for p, g, e in zip(prompts, gens, ex, strict=True)]
    return {"generate_accuracy": sum(hits) / max(len(hits), 1), "generated": len(hits)}, samples
