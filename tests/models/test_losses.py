"""The causal-LM losses against the plain formula: values and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftcli.models.losses import (
    IGNORE,
    causal_lm_loss_from_logits,
    chunked_causal_lm_loss,
    linear_cross_entropy_sum,
)


@pytest.mark.parametrize("chunk", [4, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_plain(chunk, bias):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).double()
    h = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (23,))
    ref = F.cross_entropy(head(h), y, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.3, [h, *head.parameters()])
    got = linear_cross_entropy_sum(head, h, y, chunk=chunk)
    got_grads = torch.autograd.grad(got * 0.3, [h, *head.parameters()])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_frozen_head_gets_no_grad():
    torch.manual_seed(0)
    head = nn.Linear(8, 30, bias=False).requires_grad_(False)
    h = torch.randn(10, 8, requires_grad=True)
    y = torch.randint(0, 30, (10,))
    linear_cross_entropy_sum(head, h, y, chunk=3).backward()
    assert head.weight.grad is None and h.grad is not None
    with torch.no_grad():  # evaluation: no gradient work, same value
        v = linear_cross_entropy_sum(head, h, y, chunk=3)
    torch.testing.assert_close(v, F.cross_entropy(head(h), y, reduction="sum"))


def test_chunked_loss_equals_full_logits_loss_and_falls_back_for_other_heads():
    torch.manual_seed(0)
    head = nn.Linear(12, 40, bias=False)
    hidden = torch.randn(3, 9, 12, requires_grad=True)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :4] = IGNORE  # prompt positions carry no loss
    ref, n_ref = causal_lm_loss_from_logits(head(hidden), labels)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    for h in (head, nn.Sequential(head)):  # a plain linear (fused path) and a wrapped one (checkpoint path)
        got, n = chunked_causal_lm_loss(hidden, h, labels, chunk=5)
        (g,) = torch.autograd.grad(got, hidden)
        assert n == n_ref
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_formula():
    torch.manual_seed(0)
    head = nn.Linear(16, 64, bias=False)
    h = torch.randn(20, 16, requires_grad=True)
    y = torch.randint(0, 64, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(h).float(), y, reduction="sum")
        got = linear_cross_entropy_sum(head, h, y, chunk=8)
    (g_ref,) = torch.autograd.grad(ref, h)
    (g,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-3)
