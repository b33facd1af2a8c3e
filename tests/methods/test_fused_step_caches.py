"""Caches keyed on a tensor's version counter must not survive a fused optimizer step, which updates
weights in place without bumping it (torch's fused AdamW, the training loop's default)."""

from __future__ import annotations

import torch
from conftest import batch, tiny_model

from peftcli.methods import get_method
from peftcli.methods.attach import attach_method


def test_fused_adamw_does_not_bump_versions_so_caches_cannot_rely_on_them():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    before = p._version
    torch.optim.AdamW([p], fused=True).step()
    assert p._version == before  # why DoRA's norm and the prefix table drop their cache on training forwards


def test_dora_uses_the_norm_of_the_stepped_weights():
    m = tiny_model("llama")
    arch, _ = attach_method(m, "lora", get_method("lora").config_cls(r=4, use_dora=True, targets=["q"]))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, fused=True)
    m.train()
    for _ in range(2):
        m(**batch()).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    with torch.no_grad():
        got = m(**batch()).logits
        for mod in m.modules():
            if hasattr(mod, "_norm_cache"):
                mod._norm_cache = None
        fresh = m(**batch()).logits
    torch.testing.assert_close(got, fresh, rtol=0, atol=0)
