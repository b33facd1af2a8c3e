"""LoRA against its formula, merge exactness, targeting, and the architecture map."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, tiny_model

from peftcli.core.arch import resolve
from peftcli.core.errors import BadInput
from peftcli.methods.attach import attach_method
from peftcli.methods.lora import LoraConfig, LoraLinear
from peftcli.methods.targets import TargetError, parse_layers, select_linears


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_starts_at_base(arch_kind):
    base = tiny_model(arch_kind)
    ref = base(**batch()).logits
    attach_method(base, "lora", LoraConfig(targets=["q", "k", "v", "o", "ffn_in", "ffn_out"]))
    assert torch.equal(base(**batch()).logits, ref)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_formula(rslora):
    lin = torch.nn.Linear(12, 10)
    w = LoraLinear(lin, r=4, alpha=8, dropout=0.0, rslora=rslora)
    torch.nn.init.normal_(w.lora_B.weight)
    x = torch.randn(5, 12)
    s = 8 / math.sqrt(4) if rslora else 8 / 4
    expect = x @ lin.weight.T + lin.bias + s * (x @ w.lora_A.weight.T) @ w.lora_B.weight.T
    torch.testing.assert_close(w(x), expect, atol=1e-5, rtol=1e-5)


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    w = LoraLinear(lin, r=2, alpha=2, dropout=0.5, rslora=False).train()
    x = torch.randn(4, 8)
    # B = 0: whatever the dropout does, the output is the base output exactly.
    torch.testing.assert_close(w(x), lin(x))


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_merge_exact(arch_kind, task):
    from peftcli.methods import get_method

    m = tiny_model(arch_kind, task)
    cfg = LoraConfig(targets=["q", "v", "o", "ffn_out"], r=4, alpha=16)
    arch, spec = attach_method(m, "lora", cfg)
    randomize_lora(m)
    before = m(**batch()).logits
    spec.merge(m, arch, cfg)
    assert not any(isinstance(x, LoraLinear) for x in m.modules())
    torch.testing.assert_close(m(**batch()).logits, before, atol=1e-5, rtol=1e-5)
    assert get_method("lora").merge is not None


def test_targets_roles_patterns_layers():
    m = tiny_model("llama")
    arch = resolve(m)
    assert sorted(select_linears(m, arch, ["q", "v"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert len(select_linears(m, arch, ["all-linear"])) == 14
    assert select_linears(m, arch, ["ffn_in"], layers=[1]) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert select_linears(m, arch, [r".*\.1\.self_attn\.(k|o)_proj"]) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]
    assert select_linears(m, arch, ["down_proj"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_gpt2_fused_qkv_targets_c_attn_once():
    m = tiny_model("gpt2")
    arch = resolve(m)
    assert select_linears(m, arch, ["q", "k", "v"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_parse_layers():
    assert parse_layers("0-2,5", 12) == [0, 1, 2, 5]
    assert parse_layers([-1], 12) == [11]
    assert parse_layers(None, 12) is None
    assert parse_layers("-12", 12) == [0] and parse_layers("top:2,bottom:1", 12) == [0, 10, 11]
    # Each refusal is the recipe's to fix (exit 2) and names the option it came from.
    for spec, needle in [("0-12", "layer 12 is out of range"), ([-13], "layer -13 is out of range"),
                         ("1-x", "cannot read '1-x'"), ("top:13", "k must be 1 to 12")]:
        with pytest.raises(TargetError, match=needle) as e:
            parse_layers(spec, 12, "method.leave_out")
        assert isinstance(e.value, BadInput) and str(e.value).startswith("method.leave_out ")


@pytest.mark.parametrize("name,key", [
    ("lora", "targets"), ("ia3", "targets"), ("loha", "targets"), ("lokr", "targets"), ("vera", "targets"),
    ("krona", "targets"), ("sparse", "targets"), ("galore", "targets"), ("unipelt", "lora_targets"),
])
def test_targets_matching_nothing_are_refused_by_every_method(name, key):
    from peftcli.methods import get_method
    from peftcli.methods.attach import attach_method

    cfg = get_method(name).config_cls(**{key: ["nope"]})
    with pytest.raises(TargetError, match=rf"method.{key} \['nope'\] matches no linear layer") as e:
        attach_method(tiny_model("llama"), name, cfg)
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)  # the names it could have used


def test_arch_map_facts(arch_kind):
    m = tiny_model(arch_kind)
    a = resolve(m)
    assert a.num_layers == 2 and a.hidden_size == 32 and a.num_heads == 4 and a.head_dim == 8
    assert a.num_kv_heads == (2 if arch_kind == "llama" else 4)
    assert a.post_norm == (arch_kind == "bert")
    for i in range(2):
        for role in ("q", "k", "v", "o", "ffn_out", "attn", "ffn", "attn_norm", "ffn_norm"):
            assert a.get(i, role) is not None, role
    assert [n for n, _ in a.head_modules()] == (["classifier"] if arch_kind == "bert" else ["score"])


def test_head_trainable_base_frozen():
    m = tiny_model("bert")
    attach_method(m, "lora", LoraConfig())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("classifier") for n in trainable)
    assert any(n.startswith("classifier") for n in trainable)


def test_bitfit_and_full():
    m = tiny_model("bert")
    attach_method(m, "bitfit", __import__("peftcli.methods.bitfit", fromlist=["x"]).BitFitConfig())
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("bias") or n.startswith("classifier") for n in trainable)
    m2 = tiny_model("bert")
    attach_method(m2, "full", __import__("peftcli.methods.full", fromlist=["x"]).FullConfig())
    assert all(p.requires_grad for p in m2.parameters())


def test_llama_bitfit_refused():
    from peftcli.methods.bitfit import BitFitConfig

    with pytest.raises(ValueError, match="no bias terms"):
        attach_method(tiny_model("llama"), "bitfit", BitFitConfig())


def test_meta_device_count_is_fast_and_exact():
    from transformers import LlamaConfig

    from peftcli.models.loading import model_from_config

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000)
    with torch.device("meta"):
        m = model_from_config(cfg, "causal_lm")
    attach_method(m, "lora", LoraConfig(r=8, targets=["q", "v"]))
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    # q: 256->256, v: 256->64 (2 kv heads of 32): r*(in+out) each, 3 layers
    assert trainable == 3 * 8 * ((256 + 256) + (256 + 64))
