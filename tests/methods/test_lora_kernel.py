"""The fused LoRA path (peftcli.methods.lora_kernel) against the plain formula, HF PEFT, and its own fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny_model

from peftcli.methods import get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.lora import DoraLinear, LoraConfig, LoraLinear
from peftcli.models.trim import trim_unread_positions

TOL = dict(atol=1e-5, rtol=1e-5)


def _conv1d(in_f: int, out_f: int):
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(out_f, in_f)
    torch.nn.init.normal_(c.weight, std=0.2)
    torch.nn.init.normal_(c.bias, std=0.2)
    return c


def _wrapped(kind: str, p: float, bias: bool = True, seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10, bias=bias) if kind == "linear" else _conv1d(12, 10)
    base.requires_grad_(False)
    w = LoraLinear(base, r=4, alpha=8, dropout=p, rslora=False).train()
    torch.nn.init.normal_(w.lora_B.weight)
    return w


def _formula(w: LoraLinear, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ, with W as (out, in) whatever the storage."""
    wt = w.base.weight if isinstance(w.base, torch.nn.Linear) else w.base.weight.t()
    xd = x if keep is None else x * keep / (1 - p)
    y = x @ wt.t() + _bias(w)
    return y + w.scaling * (xd @ w.lora_A.weight.t()) @ w.lora_B.weight.t()


def _bias(w: LoraLinear):
    return w.base.bias if w.base.bias is not None else 0.0


def _grads(y: torch.Tensor, g: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, ts, g))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_forward_backward_match_formula(kind, p):
    w = _wrapped(kind, p)
    x = torch.randn(3, 5, 12, requires_grad=True)
    g = torch.randn(3, 5, 10)
    a, b = w.lora_A.weight, w.lora_B.weight
    torch.manual_seed(7)
    y = w(x)
    got = _grads(y, g, x, a, b)
    # The same mask nn.Dropout would draw from the same seed.
    torch.manual_seed(7)
    keep = (F.dropout(torch.ones_like(x), p, True) != 0).to(x.dtype) if p else None
    ref = _formula(w, x, keep, p)
    torch.testing.assert_close(y, ref, **TOL)
    for got_g, ref_g in zip(got, _grads(ref, g, x, a, b), strict=True):
        torch.testing.assert_close(got_g, ref_g, **TOL)


def test_rank_one_backward_leaves_b_alone():
    """At r = 1, Bᵀ is already contiguous: the backward's scaled copy of it must still be a copy."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).requires_grad_(False)
    w = LoraLinear(base, r=1, alpha=3, dropout=0.0, rslora=False).train()
    torch.nn.init.normal_(w.lora_B.weight)
    b0 = w.lora_B.weight.detach().clone()
    x = torch.randn(4, 12, requires_grad=True)
    g = torch.randn(4, 10)
    y = w(x)
    got = _grads(y, g, x, w.lora_A.weight, w.lora_B.weight)
    assert torch.equal(w.lora_B.weight.detach(), b0)
    ref = _formula(w, x, None, 0.0)
    for got_g, ref_g in zip(got, _grads(ref, g, x, w.lora_A.weight, w.lora_B.weight), strict=True):
        torch.testing.assert_close(got_g, ref_g, **TOL)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fast_equals_plain_module_path(p):
    """Same seed, same mask: the fused path and the term-by-term path agree (values and grads)."""
    w = _wrapped("linear", p)
    x = torch.randn(4, 6, 12, requires_grad=True)
    g = torch.randn(4, 6, 10)
    outs = []
    for fast in (True, False):
        w.fast_path = fast
        torch.manual_seed(3)
        y = w(x)
        outs.append((y, _grads(y, g, x, w.lora_A.weight, w.lora_B.weight)))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("training", [True, False])
def test_dora_fast_equals_plain(kind, training):
    """DoRA without dropout goes through the fused linear (bias left out, added after the scale):
    the same output and gradients (x, A, B, magnitude) as its term-by-term formula."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10) if kind == "linear" else _conv1d(12, 10)
    base.requires_grad_(False)
    w = DoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False).train(training)
    torch.nn.init.normal_(w.lora_B.weight)
    x = torch.randn(3, 5, 12, requires_grad=True)
    g = torch.randn(3, 5, 10)
    outs = []
    for fast in (True, False):
        w.fast_path = fast
        y = w(x)
        outs.append((y, _grads(y, g, x, w.lora_A.weight, w.lora_B.weight, w.lora_magnitude_vector)))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_no_input_grad_and_trainable_base():
    # x without grad (first layer of a frozen model): only A and B get gradients.
    w = _wrapped("linear", 0.0)
    x = torch.randn(2, 3, 12)
    w(x).sum().backward()
    assert w.lora_A.weight.grad is not None and w.lora_B.weight.grad is not None
    # A base that does train (LoRA stacked with full fine-tuning of that layer): W and b grads too.
    w2 = _wrapped("conv1d", 0.0)
    w2.base.requires_grad_(True)
    x = torch.randn(2, 3, 12, requires_grad=True)
    g = torch.randn(2, 3, 10)
    got = _grads(w2(x), g, x, w2.base.weight, w2.base.bias)
    ref = _grads(_formula(w2, x, None, 0.0), g, x, w2.base.weight, w2.base.bias)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_no_bias_2d_input_and_no_grad():
    w = _wrapped("linear", 0.0, bias=False)
    x = torch.randn(7, 12, requires_grad=True)
    ref = _formula(w, x, None, 0.0)
    torch.testing.assert_close(w(x), ref, **TOL)
    with torch.no_grad():  # evaluation skips the autograd Function, not the arithmetic
        y = w(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ref, **TOL)


def test_disabled_and_fallbacks():
    w = _wrapped("linear", 0.0)
    x = torch.randn(2, 12)
    w.adapter_enabled = False
    torch.testing.assert_close(w(x), w.base(x))
    w.adapter_enabled = True
    # A hooked base must run its own forward: the fused path steps aside.
    calls = []
    h = w.base.register_forward_hook(lambda m, i, o: calls.append(1))
    torch.testing.assert_close(w(x), _formula(w, x, None, 0.0), **TOL)
    assert calls == [1]
    h.remove()
    # A Linear subclass (quantized layers are) is not assumed to compute x Wᵀ + b.
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    base = Scaled(12, 10).requires_grad_(False)
    w3 = LoraLinear(base, r=2, alpha=2, dropout=0.0, rslora=False)
    torch.nn.init.normal_(w3.lora_B.weight)
    expect = base(x) + (x @ w3.lora_A.weight.t()) @ w3.lora_B.weight.t()
    torch.testing.assert_close(w3(x), expect, **TOL)


def test_autocast_bf16_matches_plain():
    """Under autocast the fused path casts like F.linear does and returns the same dtype."""
    w = _wrapped("linear", 0.0)
    x = torch.randn(4, 5, 12, requires_grad=True)
    res = []
    for fast in (True, False):
        w.fast_path = fast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = w(x)
        res.append((y, _grads(y.float().sum(), None, x, w.lora_A.weight, w.lora_B.weight)))
    assert res[0][0].dtype == res[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(res[0][0].float(), res[1][0].float(), atol=0.05, rtol=0.02)
    for a, b in zip(res[0][1], res[1][1], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.02)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_whole_model_fast_equals_plain(arch_kind, task):
    m = tiny_model(arch_kind, task)
    attach_method(m, "lora", LoraConfig(r=4, alpha=8, targets=["all-linear"]))
    _randomize(m)
    m.train()
    b = batch()
    res = []
    for fast in (True, False):
        LoraLinear.fast_path = fast
        try:
            logits = m(**b).logits
            loss = logits.float().square().mean()
            params = [p for p in m.parameters() if p.requires_grad]
            res.append((logits, torch.autograd.grad(loss, params)))
        finally:
            LoraLinear.fast_path = True
    torch.testing.assert_close(res[0][0], res[1][0], **TOL)
    for a, b_ in zip(res[0][1], res[1][1], strict=True):
        torch.testing.assert_close(a, b_, **TOL)


def test_saves_less_for_backward_with_dropout():
    """Fused: x (shared with the base) + a 1-byte mask. Plain: the dropped-out copy and a float mask."""
    w = _wrapped("linear", 0.5)
    x = torch.randn(64, 12, requires_grad=True)

    def saved(fast: bool) -> int:
        w.fast_path = fast
        seen: dict[int, int] = {}
        params = {p.data_ptr() for p in w.parameters()}

        def pack(t):
            if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            w(x)
        return sum(seen.values())

    assert saved(True) < saved(False) / 3


TRIM_CASES = [
    ("lora", "sdpa", {"r": 4, "alpha": 8, "targets": ["all-linear"]}),
    ("lora", "eager", {"r": 4, "alpha": 8, "targets": ["all-linear"]}),
    ("lora", "sdpa", {"use_dora": True, "targets": ["all-linear"]}),
    ("full", "sdpa", {}),
    ("bitfit", "sdpa", {}),
    ("ia3", "sdpa", {}),
    ("krona", "sdpa", {"targets": ["all-linear"]}),
    ("loha", "sdpa", {"r": 2, "targets": ["all-linear"]}),
    ("lokr", "sdpa", {"r": 2, "targets": ["all-linear"]}),
    ("vera", "eager", {"r": 8, "targets": ["all-linear"]}),
    ("prefix", "sdpa", {}),
    ("prefix", "eager", {"reparameterize": False}),
    ("houlsby", "sdpa", {}),
    ("pfeiffer", "eager", {}),
    ("parallel", "sdpa", {"attn": True}),
    ("scaled_parallel", "sdpa", {}),
    ("compacter", "sdpa", {"bottleneck_size": 8}),
    ("compacter++", "sdpa", {"bottleneck_size": 8}),
    ("mam", "sdpa", {}),
    ("galore", "sdpa", {"rank": 2}),
    ("sparse", "sdpa", {"density": 0.1}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,attn,kw", TRIM_CASES, ids=[f"{m}-{a}-{i}" for i, (m, a, _) in enumerate(TRIM_CASES)])
def test_trim_unread_positions_exact(method, attn, kw):
    m = tiny_model("bert", attn=attn)
    arch, _ = attach_method(m, method, get_method(method).config_cls(**kw))
    # Move every trainable tensor off its (often identity) initialisation, so that each adapter
    # changes what the head sees.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    b = batch()
    m.train()  # the tiny config has no dropout: train mode is deterministic

    def run():
        loss = m(**b).logits.float().square().mean()
        params = [p for p in m.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params)

    ref = run()
    handles = trim_unread_positions(m, arch, get_method(method).positionwise, "classification")
    assert len(handles) == 3  # last block's inputs, and its query projection (pre + post)
    seen = []
    q = arch.get(arch.num_layers - 1, "q")
    handles.append(q.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[1], out.shape[1]))))
    got = run()
    assert seen == [(1, b["input_ids"].shape[1])]  # one position projected, the full length handed on
    for h in handles:
        h.remove()
    torch.testing.assert_close(got[0], ref[0], **TOL)
    for a, b_ in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b_, **TOL)


def test_trim_refuses_what_it_cannot_prove():
    llama = tiny_model("llama")
    arch, _ = attach_method(llama, "lora", LoraConfig())
    assert trim_unread_positions(llama, arch, get_method("lora").positionwise, "classification") == []
    bert = tiny_model("bert")
    arch, _ = attach_method(bert, "lora", LoraConfig())
    assert trim_unread_positions(bert, arch, get_method("unipelt").positionwise, "classification") == []  # gates read every position
    assert trim_unread_positions(bert, arch, get_method("prompt").positionwise, "classification") == []
    assert trim_unread_positions(bert, arch, get_method("lora").positionwise, "causal_lm") == []


@pytest.mark.parametrize("opts", [
    dict(targets=["q", "v", "ffn_out"]),
    dict(targets=["all-linear"]),
    dict(targets=["all-linear"], rslora=True),
    dict(targets=["all-linear"], use_dora=True),
])
def test_forward_matches_hf_peft(opts):
    """Same A and B (and DoRA's magnitude) in both libraries: same logits, the same loss from the
    model's own `labels=` (what bench_train's sides compare to 4 decimals) and the same adapter
    gradients, fp32, to 1e-5."""
    peft = pytest.importorskip("peft")
    from peftcli.methods.targets import select_linears

    targets = opts["targets"]
    ours = tiny_model("llama", "causal_lm")
    arch, _ = attach_method(ours, "lora", LoraConfig(r=4, alpha=8, **opts))
    _randomize(ours)
    theirs = tiny_model("llama", "causal_lm")
    paths = select_linears(theirs, arch, targets)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=paths, task_type="CAUSAL_LM",
        use_rslora=opts.get("rslora", False), use_dora=opts.get("use_dora", False)))
    ours_sd = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    theirs_sd = {_our_name(n): p for n, p in theirs.named_parameters() if "lora_" in n}
    assert theirs_sd.keys() == ours_sd.keys()
    with torch.no_grad():
        for n, p in theirs_sd.items():
            p.copy_(ours_sd[n])
    b = batch()
    b["labels"] = b["input_ids"].clone()
    ours.train()
    theirs.train()
    out_o, out_t = ours(**b, use_cache=False), theirs(**b, use_cache=False)
    torch.testing.assert_close(out_o.logits, out_t.logits, **TOL)
    torch.testing.assert_close(out_o.loss, out_t.loss, **TOL)
    out_o.loss.backward()
    out_t.loss.backward()
    for n, p in ours_sd.items():
        torch.testing.assert_close(p.grad, theirs_sd[n].grad, **TOL)


def _our_name(peft_name: str) -> str:
    """PEFT's parameter name in peftcli's naming (no wrapper prefix, no adapter name; DoRA's
    magnitude is a parameter of its own, not a module's weight)."""
    n = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return n.removesuffix(".weight") if "lora_magnitude_vector" in n else n


def test_idle_cpu_threads(monkeypatch):
    import os

    from peftcli.core.threads import idle_cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    assert idle_cpu_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert idle_cpu_threads() == 2
