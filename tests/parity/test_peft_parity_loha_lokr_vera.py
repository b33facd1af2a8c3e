"""Same weights, same logits: ours against HF PEFT 0.21 for LoHa, LoKr and VeRA.

As tests/parity/test_peft_parity.py: one tiny model, two copies, our method on one and PEFT's on the
other, our adapter moved off its start and copied into PEFT's, logits compared on a right-padded
batch (float32, 1e-5). PEFT's LoHa and LoKr refuse transformers' Conv1D, so on GPT-2 their copy has
every Conv1D replaced by the nn.Linear computing the same map (weight transposed): the oracle is
still PEFT's own layer code. VeRA's shared random matrices are not copied: PEFT draws its own from
the same key, and they must come out equal.

Train mode too: with rank and module dropout on, the same seed before each forward gives the same
logits, because the random draws happen in PEFT's order.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batch
from test_peft_parity import BASES, CASES, TASK_TYPE, compare, copy_adapter, head_count, jiggle, pair

from peftcli.core.arch import is_conv1d, set_module
from peftcli.methods import get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.vera import find_store

peft = pytest.importorskip("peft")

# Ours as roles, PEFT's as the module names its users write: three shapes of layer in each model.
OUR_TARGETS = {"bert": ["q", "v", "ffn_in"], "llama": ["q", "v", "ffn_out"], "gpt2": ["q", "ffn_out"]}
PEFT_TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"],
                "gpt2": ["c_attn", "mlp.c_proj"]}

# (our method, our options, PEFT's config class, its options)
METHODS = {
    "loha": ("loha", {"r": 4, "alpha": 6}, "LoHaConfig", {"r": 4, "alpha": 6}),
    "lokr": ("lokr", {"r": 2, "alpha": 3}, "LoKrConfig", {"r": 2, "alpha": 3}),  # W1 full, W2 = W2a W2b
    "lokr_both": ("lokr", {"r": 2, "alpha": 4, "decompose_both": True, "decompose_factor": 16}, "LoKrConfig",
                  {"r": 2, "alpha": 4, "decompose_both": True, "decompose_factor": 16}),  # W1 = W1a W1b, W2 full
    "lokr_full": ("lokr", {"r": 8, "alpha": 8}, "LoKrConfig", {"r": 8, "alpha": 8}),  # both full
    "vera": ("vera", {"r": 16, "projection_prng_key": 3}, "VeraConfig", {"r": 16, "projection_prng_key": 3}),
}


def linear_twin(model: torch.nn.Module) -> torch.nn.Module:
    """Every GPT-2 Conv1D replaced in place by an nn.Linear with the same map."""
    for name, m in list(model.named_modules()):
        if is_conv1d(m):
            nx, nf = m.weight.shape
            lin = torch.nn.Linear(nx, nf)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                lin.bias.copy_(m.bias)
            set_module(model, name, lin)
    return model


def build(kind: str, task: str, case: str, extra: dict | None = None):
    """(ours, PEFT's) with the same adapter weights; `extra` options go to both configs."""
    name, ours_kw, cls, theirs_kw = METHODS[case]
    ours_kw, theirs_kw = {**ours_kw, **(extra or {})}, {**theirs_kw, **(extra or {})}
    ours, ref = pair(kind, task)
    cfg = get_method(name).config_cls(targets=OUR_TARGETS[kind], **ours_kw)
    attach_method(ours, name, cfg)
    jiggle(ours, scale=0.2)
    if kind == "gpt2" and name != "vera":
        linear_twin(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(ref, getattr(peft, cls)(task_type=TASK_TYPE[task],
                                                              target_modules=PEFT_TARGETS[kind], **theirs_kw))
    n_tensors = sum(1 for n, p in ours.named_parameters() if p.requires_grad)
    assert copy_adapter(ours, theirs) == n_tensors
    assert n_tensors > head_count(ours)
    return ours, theirs


# Each case in the fast lane on one setting (GPT-2's Conv1D among them); every setting in the full run.
FAST = {("gpt2", "causal_lm", "loha"), ("llama", "classification", "lokr"), ("bert", "classification", "lokr_both"),
        ("gpt2", "classification", "lokr_full"), ("llama", "causal_lm", "vera"), ("gpt2", "classification", "vera")}
PARITY = [pytest.param(kind, task, case, marks=() if (kind, task, case) in FAST else pytest.mark.slow)
          for kind, task in CASES for case in METHODS]


@pytest.mark.parametrize("kind,task,case", PARITY)
def test_same_weights_same_logits(kind, task, case):
    ours, theirs = build(kind, task, case)
    if METHODS[case][0] == "vera":
        store = find_store(ours)
        assert torch.equal(store.vera_A, theirs.base_model.vera_A["default"])
        assert torch.equal(store.vera_B, theirs.base_model.vera_B["default"])
    compare(ours, theirs, kind, task)


@pytest.mark.parametrize("case,drop", [("loha", {"rank_dropout": 0.4, "module_dropout": 0.3}),
                                       ("lokr", {"rank_dropout": 0.4, "module_dropout": 0.3}),
                                       ("lokr", {"rank_dropout": 0.4, "rank_dropout_scale": True}),
                                       ("vera", {"vera_dropout": 0.3})])
def test_train_mode_dropouts_draw_as_peft(case, drop):
    kind, task = "llama", "classification"
    ours, theirs = build(kind, task, case, drop)
    bt = batch(pad_last=0)
    ours.train()
    theirs.train()
    outs = []
    for seed in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            a = ours(**bt).logits
            torch.manual_seed(seed)
            b = theirs(**bt).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        outs.append(a)
    assert any((o - outs[0]).abs().max() > 1e-4 for o in outs[1:])  # the draws change what comes out
    with torch.no_grad():
        base = BASES[(kind, task)].eval()(**bt).logits
    ours.eval()
    with torch.no_grad():
        assert (ours(**bt).logits - base).abs().max() > 1e-3
