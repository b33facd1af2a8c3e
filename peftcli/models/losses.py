"""Losses that keep memory flat on big vocabularies."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftcli.core.precision import autocast_dtype

IGNORE = -100  # the label of a position no loss is taken on (prompt, padding): torch's ignore_index


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


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i Wᵀ + b, y_i), chunk by chunk, with the gradients worked out in the same pass.

    Each chunk's float32 logits exist once: the loss and dL/dlogits = softmax - onehot come from
    them, are multiplied into dL/dh (and dL/dW, dL/db when the head trains) and dropped. Backward
    only scales what forward stored, so the head's matmul runs twice per chunk (logits, dL/dh)
    where recomputing logits under a checkpoint runs it three times and the softmax twice.
    """

    @staticmethod
    def forward(ctx, h, w, bias, y, chunk: int):  # noqa: ANN001, ANN205
        need_h, need_w = h.requires_grad, w.requires_grad
        need_b = bias is not None and bias.requires_grad
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=w.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hs, ys = h[i : i + chunk], y[i : i + chunk]
            logits = F.linear(hs, w, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, ys[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.shape[0], device=g.device), ys] -= 1.0
            if need_b:
                gb += g.sum(0)
            g = g.to(h.dtype)
            if need_h:
                torch.mm(g, w, out=gh[i : i + chunk])
            if need_w:
                gw.addmm_(g.t().float(), hs.float())
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (w.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, g_total):  # noqa: ANN001, ANN205
        gh, gw, gb = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        return (
            gh * g_total.to(gh.dtype) if gh is not None else None,
            (gw * g_total).to(wdt) if gw is not None else None,
            (gb * g_total).to(bdt) if gb is not None else None,
            None,
            None,
        )


def _plain_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)


def linear_cross_entropy_sum(head: nn.Linear, h: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """sum_i CE(head(h_i), y_i) in float32, without keeping any logits for backward.

    Operands are cast as autocast would cast the head's matmul, and the Function runs with
    autocast off, so forward and backward see one dtype.
    """
    w, b = head.weight, head.bias
    if not torch.is_grad_enabled():  # inputs may still require grad; nothing will ask for it
        h, w, b = h.detach(), w.detach(), b.detach() if b is not None else None
    dev = h.device.type
    dt = autocast_dtype(dev)
    if dt is not None:
        h, w = h.to(dt), w.to(dt)
        b = b.to(dt) if b is not None else None
    elif w.dtype != h.dtype:
        h = h.to(w.dtype)
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, w, b, y, chunk)


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """(mean next-token loss over labelled positions, number of labelled positions).

    A plain linear head goes through `linear_cross_entropy_sum`; any other head (wrapped,
    quantized, hooked) has each chunk's logits recomputed in backward (checkpoint) instead.
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
    if _plain_linear(head):
        return linear_cross_entropy_sum(head, h, y, chunk) / n, n
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


def _chunk_token_logps(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    out: torch.Tensor, labels: torch.Tensor, head: nn.Module | None = None, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each row's labelled tokens, (rows,) float32; labelled tokens per row).

    `out` is the logits, or with `head` the hidden states: then the head's float32 logits exist
    one chunk of labelled positions at a time and are recomputed in backward (a checkpoint), so a
    preference step's memory does not grow with the vocabulary. Positions follow the causal-LM
    loss: the token at t+1 is scored from position t; virtual tokens in front are skipped.
    """
    if out.shape[1] > labels.shape[1]:  # virtual tokens prepended (prompt tuning)
        out = out[:, -labels.shape[1] :]
    y = labels[:, 1:]
    keep = y != IGNORE
    rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)[keep]
    tokens = keep.sum(1)
    total = torch.zeros(y.shape[0], dtype=torch.float32, device=out.device)
    if head is None:
        logits = out[:, :-1][keep].float()
        per = logits.gather(1, y[keep][:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return total.index_add(0, rows, per), tokens
    h, yk = out[:, :-1][keep], y[keep]
    parts = []
    for i in range(0, int(yk.numel()), chunk):
        hs, ys = h[i : i + chunk], yk[i : i + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            parts.append(checkpoint(_chunk_token_logps, head, hs, ys, use_reentrant=False))
        else:
            parts.append(_chunk_token_logps(head, hs, ys))
    if not parts:
        return total + out.sum() * 0.0, tokens
    return total.index_add(0, rows, torch.cat(parts)), tokens
