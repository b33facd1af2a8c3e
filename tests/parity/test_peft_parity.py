"""Same weights, same logits: ours against HF PEFT 0.21 for LoRA, DoRA, IA³, prefix and prompt tuning.

Each case builds one tiny model, deep-copies it, attaches our method to one copy and PEFT's to
the other, moves our adapter away from its initialisation, copies every adapter tensor (and the
task head, which PEFT keeps under `modules_to_save`) into PEFT's model, and compares logits on a
right-padded batch. Tolerance: 1e-5 in float32.

Prompt learning returns PEFT's logits for the virtual positions too; ours keep one row per real
token, so causal-LM logits are compared on PEFT's last `seq_len` rows.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import batch, cache_named_for_peft, tiny_model

from peftcli.methods.attach import attach_method
from peftcli.methods.ia3 import IA3Config
from peftcli.methods.lora import LoraConfig
from peftcli.methods.prefix import PrefixConfig
from peftcli.methods.prefix import find_store as prefix_store
from peftcli.methods.prompt import PromptConfig
from peftcli.methods.prompt import find_store as prompt_store

peft = pytest.importorskip("peft")

ATOL = RTOL = 1e-5
L = 5
CASES = [("bert", "classification"), ("llama", "classification"), ("llama", "causal_lm"),
         ("gpt2", "classification"), ("gpt2", "causal_lm")]
TASK_TYPE = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}

# HF module names, only here: they are what PEFT users write in its configs.
PEFT_TARGETS = {
    "bert": {"qv": ["query", "value"], "ia3": (["key", "value", "output.dense"], ["output.dense"])},
    "llama": {"qv": ["q_proj", "v_proj"], "ia3": (["k_proj", "v_proj", "down_proj"], ["down_proj"])},
    "gpt2": {"qv": ["c_attn"], "ia3": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])},
}
# The same layers as architecture roles. PEFT's "output.dense" suffix also catches BERT's
# attention output projection, as an input-scaled target; GPT-2's c_attn is q, k and v at once.
OUR_IA3 = {
    "bert": IA3Config(targets=["k", "v", "o", "ffn_out"], feedforward=["o", "ffn_out"]),
    "llama": IA3Config(targets=["k", "v", "ffn_out"], feedforward=["ffn_out"]),
    "gpt2": IA3Config(targets=["q", "k", "v", "ffn_out"], feedforward=["ffn_out"]),
}


def peft_name(name: str) -> str:
    """PEFT's parameter name -> ours: no wrapper prefix, no adapter name, no modules_to_save."""
    for pre in ("base_model.model.", "base_model."):
        if name.startswith(pre):
            name = name[len(pre):]
            break
    name = name.replace(".modules_to_save.default", "").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def jiggle(model, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def copy_adapter(ours, theirs) -> int:
    """Copy our trainable tensors into PEFT's same-named ones; returns how many were copied."""
    src = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    n = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            key = peft_name(name)
            if key in src and "original_module" not in name:
                p.copy_(src[key].view(p.shape))
                n += 1
    return n


BASES: dict[tuple[str, str], torch.nn.Module] = {}


def pair(kind: str, task: str):
    """Ours and PEFT's copy of one model. Weights are redrawn at std 1/sqrt(fan-in): at HF's
    std 0.02 a tiny model's attention is so flat that a wrong query or key would go unseen."""
    m = tiny_model(kind, task)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    BASES[(kind, task)] = copy.deepcopy(m)
    return m, copy.deepcopy(m)


def logits(model, bt):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.eval()(**bt).logits


def compare(ours, theirs, kind: str, task: str, pad: int = 2) -> None:
    bt = batch(pad_last=pad)
    bt["input_ids"][bt["attention_mask"] == 0] = 0  # pad id, so decoder classifiers pool the same token
    a, b, base = logits(ours, bt), logits(theirs, bt), logits(BASES[(kind, task)], bt)
    if task == "causal_lm":
        b = b[:, -a.shape[1]:]
        keep = bt["attention_mask"].bool()
        a, b, base = a[keep], b[keep], base[keep]
    assert (a - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def head_count(model) -> int:
    return sum(1 for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in ("classifier", "score"))


@pytest.mark.slow
@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora(kind, task, dora):
    ours, ref = pair(kind, task)
    attach_method(ours, "lora", LoraConfig(r=4, alpha=8, targets=["q", "v"] if kind != "gpt2" else ["q"], use_dora=dora))
    jiggle(ours)
    theirs = peft.get_peft_model(ref, peft.LoraConfig(
        task_type=TASK_TYPE[task], r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=PEFT_TARGETS[kind]["qv"], use_dora=dora, fan_in_fan_out=kind == "gpt2",
    ))
    per_layer = 3 if dora else 2
    n_mod = 2 if kind != "gpt2" else 1
    assert copy_adapter(ours, theirs) == 2 * n_mod * per_layer + head_count(ours)
    compare(ours, theirs, kind, task)


@pytest.mark.parametrize("kind,task", CASES)
def test_ia3(kind, task):
    ours, ref = pair(kind, task)
    attach_method(ours, "ia3", OUR_IA3[kind])
    jiggle(ours)
    targets, ff = PEFT_TARGETS[kind]["ia3"]
    theirs = peft.get_peft_model(ref, peft.IA3Config(task_type=TASK_TYPE[task], target_modules=targets,
                                                     feedforward_modules=ff))
    n_ia3 = sum(1 for n, _ in ours.named_parameters() if n.endswith("ia3_l"))
    assert copy_adapter(ours, theirs) == n_ia3 + head_count(ours)
    compare(ours, theirs, kind, task)


@pytest.mark.parametrize("kind,task", CASES)
def test_prefix(kind, task):
    ours, ref = pair(kind, task)
    cache_named_for_peft(ref, task)
    attach_method(ours, "prefix", PrefixConfig(num_virtual_tokens=L))  # reparameterised: compare its output
    jiggle(ours, scale=0.1)
    theirs = peft.get_peft_model(ref, peft.PrefixTuningConfig(task_type=TASK_TYPE[task], num_virtual_tokens=L))
    copy_adapter(ours, theirs)  # the head
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prefix_store(ours).table())
    compare(ours, theirs, kind, task)


@pytest.mark.parametrize("kind,task", CASES)
def test_prompt(kind, task):
    ours, ref = pair(kind, task)
    attach_method(ours, "prompt", PromptConfig(num_virtual_tokens=L))
    jiggle(ours)
    theirs = peft.get_peft_model(ref, peft.PromptTuningConfig(task_type=TASK_TYPE[task], num_virtual_tokens=L))
    copy_adapter(ours, theirs)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompt_store(ours).prompt_embeddings)
    if kind != "bert" and task == "classification":
        # PEFT hands the model embeddings only, so decoder classifiers pool the last position,
        # a pad token in padded rows; ours pool the last real token. Unpadded rows must agree.
        compare(ours, theirs, kind, task, pad=0)
        return
    compare(ours, theirs, kind, task)
