"""IA³ and DoRA against their formulas, GPT-2's fused projection, merging, AdapterDrop."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_model
from torch import nn

from peftcli.methods import get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.ia3 import IA3Config, IA3Linear
from peftcli.methods.lora import DoraLinear, LoraConfig
from peftcli.methods.targets import TargetError

CASES = [("bert", "classification"), ("gpt2", "classification"), ("gpt2", "causal_lm"),
         ("llama", "classification"), ("llama", "causal_lm")]


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every adapter tensor away from its identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("ia3_l" in n or "lora_" in n):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def conv1d(n_in: int, n_out: int):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    c = Conv1D(n_out, n_in)
    nn.init.normal_(c.weight, std=0.2)
    nn.init.normal_(c.bias, std=0.2)
    return c


# ------------------------------------------------------------------ IA³


@pytest.mark.parametrize("arch_kind,task", CASES)
def test_ia3_starts_at_base(arch_kind, task):
    m = tiny_model(arch_kind, task)
    ref = m(**batch()).logits
    attach_method(m, "ia3", IA3Config())
    assert torch.equal(m(**batch()).logits, ref)


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_ia3_formula(base_kind):
    base = nn.Linear(6, 5) if base_kind == "linear" else conv1d(6, 5)
    w = base.weight if base_kind == "linear" else base.weight.t()
    x = torch.randn(4, 6)
    out_mod = IA3Linear(base, scale_input=False)
    in_mod = IA3Linear(base, scale_input=True)
    assert out_mod.ia3_l.shape == (5, 1) and in_mod.ia3_l.shape == (1, 6)  # PEFT's shapes
    with torch.no_grad():
        out_mod.ia3_l.copy_(torch.randn(5, 1))
        in_mod.ia3_l.copy_(torch.randn(1, 6))
    torch.testing.assert_close(out_mod(x), (x @ w.T + base.bias) * out_mod.ia3_l.view(-1))
    torch.testing.assert_close(in_mod(x), (x * in_mod.ia3_l.view(-1)) @ w.T + base.bias)


def test_ia3_gpt2_fused_scales_only_k_and_v():
    m = tiny_model("gpt2", "causal_lm")
    arch, _ = attach_method(m, "ia3", IA3Config(targets=["k", "v"], feedforward=[]))
    mod = arch.get(0, "q")
    assert isinstance(mod, IA3Linear)
    h = arch.hidden_size
    assert mod.ia3_l.shape == (2 * h, 1)  # q's third is not a parameter at all
    with torch.no_grad():
        mod.ia3_l.copy_(torch.rand(2 * h, 1) + 0.5)
    x = torch.randn(2, 3, h)
    plain = mod.base(x)
    y = mod(x)
    torch.testing.assert_close(y[..., :h], plain[..., :h])
    torch.testing.assert_close(y[..., h:], plain[..., h:] * mod.ia3_l.view(-1))


def test_ia3_gpt2_single_role_rows():
    m = tiny_model("gpt2", "causal_lm")
    arch, _ = attach_method(m, "ia3", IA3Config(targets=["v"], feedforward=[]))
    mod = arch.get(1, "v")
    assert mod.ia3_l.shape == (arch.hidden_size, 1)
    assert mod.ia3_rows.tolist() == list(range(2 * arch.hidden_size, 3 * arch.hidden_size))


def test_ia3_defaults_target_k_v_and_ffn_input():
    m = tiny_model("llama", "causal_lm")
    arch, _ = attach_method(m, "ia3", IA3Config())
    for i in range(arch.num_layers):
        assert not arch.get(i, "k").scale_input and not arch.get(i, "v").scale_input
        assert arch.get(i, "ffn_out").scale_input
        assert not isinstance(arch.get(i, "q"), IA3Linear)


def test_ia3_feedforward_must_be_a_target():
    m = tiny_model("bert")
    with pytest.raises(TargetError, match="is not one of method.targets"):  # a recipe problem: exit 2
        attach_method(m, "ia3", IA3Config(targets=["k", "v"], feedforward=["ffn_out"]))


@pytest.mark.parametrize("arch_kind,task", CASES)
def test_ia3_merge_exact(arch_kind, task):
    m = tiny_model(arch_kind, task)
    cfg = IA3Config(targets=["k", "v", "o", "ffn_out"], feedforward=["ffn_out"])
    arch, spec = attach_method(m, "ia3", cfg)
    randomize(m)
    before = m(**batch()).logits
    spec.merge(m, arch, cfg)
    assert not [n for n, mod in m.named_modules() if hasattr(mod, "adapter_enabled")]
    torch.testing.assert_close(m(**batch()).logits, before, atol=1e-5, rtol=1e-5)


def test_ia3_adapter_drop():
    m = tiny_model("llama")
    ref = m(**batch()).logits
    attach_method(m, "ia3", IA3Config())
    randomize(m)
    assert not torch.allclose(m(**batch()).logits, ref)
    for mod in m.modules():
        if isinstance(mod, IA3Linear):
            mod.adapter_enabled = False
    assert torch.equal(m(**batch()).logits, ref)


# ------------------------------------------------------------------ DoRA


def dora_reference(layer: DoraLinear, x: torch.Tensor) -> torch.Tensor:
    """W' = m (W + sBA) / ||W + sBA||_row, then the layer's bias."""
    from peftcli.core.arch import dense_weight

    w = dense_weight(layer.base) + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    w_prime = (layer.lora_magnitude_vector / w.norm(dim=1)).view(-1, 1) * w
    return x @ w_prime.T + layer.base.bias


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_dora_init_and_formula(base_kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if base_kind == "linear" else conv1d(6, 5)
    layer = DoraLinear(base, r=2, alpha=4, dropout=0.0, rslora=False)
    x = torch.randn(3, 6)
    from peftcli.core.arch import dense_weight

    torch.testing.assert_close(layer.lora_magnitude_vector, dense_weight(base).norm(dim=1))
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the base layer
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(5) + 0.5)
    torch.testing.assert_close(layer(x), dora_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_dora_norm_follows_training_steps():
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(6, 5), r=2, alpha=4, dropout=0.0, rslora=False)
    opt = torch.optim.SGD([p for n, p in layer.named_parameters() if "lora" in n], lr=0.5)
    x = torch.randn(3, 6)
    for _ in range(3):
        layer(x).square().sum().backward()
        assert layer.lora_magnitude_vector.grad is not None and layer.lora_B.weight.grad is not None
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(layer(x), dora_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_dora_dropout_in_training():
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(6, 5), r=2, alpha=4, dropout=0.5, rslora=False).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = layer.lora_dropout(x)
    # PEFT: the base output plus the DoRA correction computed on the dropped-out input
    expect = layer.base(x) - layer.base(xd) + dora_reference(layer, xd)
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch_kind,task", CASES)
def test_dora_merge_exact(arch_kind, task):
    m = tiny_model(arch_kind, task)
    cfg = LoraConfig(use_dora=True, targets=["q", "v", "ffn_out"], r=4, alpha=8)
    ref = m(**batch()).logits
    arch, spec = attach_method(m, "lora", cfg)
    assert isinstance(arch.get(0, "ffn_out"), DoraLinear)
    torch.testing.assert_close(m(**batch()).logits, ref, atol=1e-6, rtol=1e-6)
    randomize(m, scale=0.2)
    before = m(**batch()).logits
    get_method("lora").merge(m, arch, cfg)
    assert not [n for n, mod in m.named_modules() if hasattr(mod, "adapter_enabled")]
    assert type(arch.get(0, "ffn_out")).__name__ in ("Linear", "Conv1D")
    torch.testing.assert_close(m(**batch()).logits, before, atol=1e-5, rtol=1e-5)


def test_dora_adapter_drop_and_trainables():
    m = tiny_model("bert")
    ref = m(**batch()).logits
    attach_method(m, "lora", LoraConfig(use_dora=True))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any(n.endswith("query.lora_magnitude_vector") for n in names)
    randomize(m)
    for mod in m.modules():
        if isinstance(mod, DoraLinear):
            mod.adapter_enabled = False
    assert torch.equal(m(**batch()).logits, ref)


@pytest.mark.parametrize("name", ["ia3", "dora"])
def test_meta_device_attach(arch_kind, name):
    from conftest import tiny_config

    from peftcli.models.loading import model_from_config

    with torch.device("meta"):
        m = model_from_config(tiny_config(arch_kind), "classification")
    cfg = IA3Config() if name == "ia3" else LoraConfig(use_dora=True)
    attach_method(m, "ia3" if name == "ia3" else "lora", cfg)
    new = [p for n, p in m.named_parameters() if p.requires_grad and ("ia3_l" in n or "lora_" in n)]
    assert new and all(p.device.type == "meta" for p in new)
