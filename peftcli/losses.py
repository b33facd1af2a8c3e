"""Losses that keep memory flat on big vocabularies."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


class _Passthrough(nn.Module):
    """Stands in for the LM head so the model returns hidden states instead of logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextmanager
def hidden_states_out(model: nn.Module, head_path: str):
    """Temporarily swap the LM head for a pass-through; yields the real head.

    HF causal LMs compute full-vocabulary logits for every position before the loss. On a 128k
    vocabulary at 8k tokens that alone is several GiB of float32; we compute the loss from hidden
    states in chunks instead, and only at positions that carry a label.
    """
    parent_path, _, name = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = getattr(parent, name)
    setattr(parent, name, _Passthrough())
    try:
        yield head
    finally:
        setattr(parent, name, head)


def _chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """(mean next-token loss over labelled positions, number of labelled positions).

    Each chunk's logits are recomputed in backward (checkpoint) rather than stored.
    """
    if hidden.shape[1] > labels.shape[1]:  # virtual tokens prepended (prompt tuning)
        hidden = hidden[:, -labels.shape[1] :]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        hs, ys = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss, head, hs, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hs, ys)
    return total / n, n


def causal_lm_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    if logits.shape[1] > labels.shape[1]:
        logits = logits[:, -labels.shape[1] :]
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    y = labels[:, 1:].reshape(-1)
    n = int((y != IGNORE).sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(lg, y, ignore_index=IGNORE, reduction="sum") / n, n
