"""MAM adapter and UniPELT: built from prefix tuning, parallel / Pfeiffer adapters and LoRA.

What holds at step 0: the parallel adapter, LoRA and the Pfeiffer adapter start at exactly zero,
the prefix does not (its keys and values come from a random MLP). So a fresh model equals the
base exactly with every layer's prefix switched off, and differs from it with the prefix on.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, tiny_model

from peftcli.core.hf_call import SequenceMask
from peftcli.core.switch import set_dropped_layers
from peftcli.methods import get_method, mam, unipelt
from peftcli.methods.attach import attach_method
from peftcli.methods.prefix import LayerPrefix, PrefixConfig, find_store
from peftcli.methods.unipelt import GatedBottleneck, GatedLayerPrefix, GatedLoraLinear
from peftcli.runs.checkpoint import adapter_state, load_adapter_state

KINDS = ["bert", "gpt2", "llama"]


def build(kind: str, name: str, seed: int = 0, **kw):
    model = tiny_model(kind, seed=seed)
    defaults = {"mam": {"bottleneck_size": 16}, "unipelt": {"adapter_size": 8}}.get(name, {})
    cfg = get_method(name).config_cls(**{**defaults, **kw})
    torch.manual_seed(123)
    arch, spec = attach_method(model, name, cfg)
    return model, arch, spec, cfg


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def prefix_on(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, LayerPrefix):
            m.adapter_enabled = on


def randomize(model, arch, seed: int = 7, skip: tuple[str, ...] = ()) -> None:
    g = torch.Generator().manual_seed(seed)
    heads = tuple(f"{n}." for n, _ in arch.head_modules())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith(heads) and not any(s in n for s in skip):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def adapter_count(model, arch) -> int:
    heads = tuple(f"{n}." for n, _ in arch.head_modules())
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith(heads))


# --------------------------------------------------------------------------------------- MAM


def test_mam_defaults_are_the_paper():
    c = mam.MamConfig()
    assert (c.num_virtual_tokens, c.prefix_bottleneck, c.bottleneck_size, c.scale) == (30, 512, 512, 4.0)
    assert not c.shift_positions


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_mam_step0(kind):
    b = batch()
    want = logits(tiny_model(kind), b)
    model, *_ = build(kind, "mam")
    assert (logits(model, b) - want).abs().max() > 1e-4  # the prefix changes attention from step 0
    prefix_on(model, False)
    torch.testing.assert_close(logits(model, b), want, rtol=0, atol=1e-6)  # the adapter adds exactly 0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mam_is_prefix_plus_scaled_parallel(kind):
    """With trained (random) weights: switching the prefix off leaves the scaled parallel adapter
    model, switching the adapters off leaves the prefix-tuning model, both with the same tensors."""
    b = batch()
    model, arch, *_ = build(kind, "mam")
    randomize(model, arch, skip=("peftcli_prefix",))
    sd = dict(model.named_parameters())

    par, _, _, _ = build(kind, "scaled_parallel", bottleneck_size=16, scale=4.0)
    pre, _, _, _ = build(kind, "prefix", num_virtual_tokens=30, bottleneck=512, shift_positions=False)
    for ref in (par, pre):
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(sd[n])
    prefix_on(model, False)
    torch.testing.assert_close(logits(model, b), logits(par, b), rtol=0, atol=1e-6)
    prefix_on(model, True)
    for m in model.modules():
        if type(m).__name__ == "Bottleneck":
            m.adapter_enabled = False
    torch.testing.assert_close(logits(model, b), logits(pre, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mam_parameter_count(kind):
    model, arch, _, cfg = build(kind, "mam")
    got = adapter_count(model, arch)
    assert got == mam.closed_form(arch.hidden_size, arch.num_layers, cfg, arch.num_kv_heads * arch.head_dim)
    model, arch, _, cfg = build(kind, "mam", reparameterize=False, learned_scale=True)
    assert adapter_count(model, arch) == mam.closed_form(arch.hidden_size, arch.num_layers, cfg,
                                                          arch.num_kv_heads * arch.head_dim)


def test_mam_on_minilm_shape_counts():
    """all-MiniLM-L6-v2 shape (6 layers, hidden 384): the closed form gives the figure in the recipe."""
    cfg = mam.MamConfig()
    prefix = 30 * 384 + 384 * 512 + 512 + 512 * 4608 + 4608
    adapters = 6 * (2 * 512 * 384 + 512 + 384)
    assert mam.closed_form(384, 6, cfg) == prefix + adapters == 4_937_216


def test_mam_save_load_roundtrip():
    b = batch()
    model, arch, spec, cfg = build("bert", "mam")
    randomize(model, arch)
    sd = adapter_state(model, spec, arch, cfg)
    assert "peftcli_prefix.prompt_embeddings" in sd and any("scaled_parallel_ffn.up.weight" in k for k in sd)
    fresh, farch, fspec, _ = build("bert", "mam", seed=0)
    load_adapter_state(fresh, fspec, farch, cfg, sd)
    torch.testing.assert_close(logits(fresh, b), logits(model, b), rtol=0, atol=1e-6)
    # a file with the prefix table only (MLP ejected) loads too
    table_only = {k: v for k, v in sd.items() if not k.startswith("peftcli_prefix.") or k.endswith("prompt_embeddings")}
    fresh2, farch2, fspec2, _ = build("bert", "mam", seed=0)
    load_adapter_state(fresh2, fspec2, farch2, cfg, table_only)
    torch.testing.assert_close(logits(fresh2, b), logits(model, b), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- UniPELT


def test_unipelt_defaults():
    c = unipelt.UniPeltConfig()
    assert (c.lora_r, c.lora_targets, c.num_virtual_tokens, c.adapter_size) == (8, ["q", "v"], 10, 48)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_unipelt_step0_and_drop(kind):
    b = batch()
    want = logits(tiny_model(kind), b)
    model, arch, *_ = build(kind, "unipelt")
    assert (logits(model, b) - want).abs().max() > 1e-5
    prefix_on(model, False)
    torch.testing.assert_close(logits(model, b), want, rtol=0, atol=1e-6)
    prefix_on(model, True)
    randomize(model, arch)
    assert (logits(model, b) - want).abs().max() > 1e-3
    set_dropped_layers(model, arch, range(arch.num_layers))  # every part honours adapter_enabled
    torch.testing.assert_close(logits(model, b), want, rtol=0, atol=1e-6)


def test_gated_lora_is_the_formula():
    torch.manual_seed(0)
    mask = SequenceMask()
    lin = torch.nn.Linear(6, 4)
    m = GatedLoraLinear(lin, r=2, alpha=4.0, dropout=0.0, mask=mask)
    torch.nn.init.normal_(m.lora_B.weight)
    torch.nn.init.normal_(m.gate.proj.weight)
    torch.nn.init.normal_(m.gate.proj.bias)
    x = torch.randn(2, 5, 6)
    mask.mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    s = torch.sigmoid(x @ m.gate.proj.weight.T + m.gate.proj.bias)  # [2, 5, 1]
    w = mask.mask.float().unsqueeze(-1)
    g = (s * w).sum(1) / w.sum(1)  # mean over real tokens only
    want = lin(x) + g.unsqueeze(1) * 2.0 * (x @ m.lora_A.weight.T @ m.lora_B.weight.T)
    torch.testing.assert_close(m(x), want)
    assert ((g > 0) & (g < 1)).all()


@pytest.mark.parametrize("gate_input", ["sublayer", "adapter"])
def test_adapter_gate_reads_what_it_says(gate_input):
    b = batch(pad_last=0)
    model, arch, *_ = build("bert", "unipelt", adapter_gate_input=gate_input)
    randomize(model, arch)
    seen = {}
    ffn = arch.get(0, "ffn")
    norm = arch.get(0, "ffn_norm")
    ffn.register_forward_pre_hook(lambda m, a: seen.setdefault("ffn_in", a[0]))
    logits(model, b)  # norm's hooked output is the adapted one; recompute the adapter input below
    ga = next(m for m in arch.layer(0).modules() if isinstance(m, GatedBottleneck))
    gate = ga.gate.proj
    if gate_input == "sublayer":
        src = seen["ffn_in"]
    else:
        with torch.no_grad():  # Pfeiffer on post-LN: the adapter reads LN(h + r), the norm's own output
            h = arch.get(0, "ffn_out")(arch.get(0, "ffn")(seen["ffn_in"]))
            src = torch.nn.functional.layer_norm(h + seen["ffn_in"], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    with torch.no_grad():
        want = torch.sigmoid(src @ gate.weight.T + gate.bias).mean(1)
    torch.testing.assert_close(ga.gate.last, want)


def test_prefix_gate_scales_prefix_keys_and_values():
    """Gate weights 0 and biases logit(0.3), logit(0.7): the gated prefix equals plain prefix tuning
    with P_K × 0.3 and P_V × 0.7 (LoRA and adapter switched off)."""
    b = batch()
    model, arch, *_ = build("bert", "unipelt")
    for m in model.modules():
        if isinstance(m, (GatedLoraLinear, GatedBottleneck)):
            m.adapter_enabled = False
        if isinstance(m, GatedLayerPrefix):
            with torch.no_grad():
                m.gate.proj.weight.zero_()
                m.gate.proj.bias.copy_(torch.tensor([math.log(0.3 / 0.7), math.log(0.7 / 0.3)]))
    store = find_store(model)
    with torch.no_grad():
        t = store.table().detach().clone()
    L, kv, hd = 10, arch.num_kv_heads, arch.head_dim
    t = t.reshape(L, arch.num_layers, 2, kv, hd)
    t[:, :, 0] *= 0.3
    t[:, :, 1] *= 0.7
    ref = tiny_model("bert")
    rarch, _ = attach_method(ref, "prefix", PrefixConfig(num_virtual_tokens=10, reparameterize=False, shift_positions=False))
    with torch.no_grad():
        find_store(ref).prompt_embeddings.copy_(t.reshape(L, -1))
        for n, p in ref.named_parameters():
            if n.startswith("classifier."):
                p.copy_(dict(model.named_parameters())[n])
    torch.testing.assert_close(logits(model, b), logits(ref, b), rtol=0, atol=1e-5)


def test_unipelt_output_ignores_padding():
    """Gates average over real tokens only: an example's logits do not depend on its batch's padding."""
    model, arch, *_ = build("bert", "unipelt")
    randomize(model, arch)
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    alone = logits(model, {"input_ids": ids, "attention_mask": torch.ones(1, 5, dtype=torch.long)})
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1).long()
    padded = logits(model, {"input_ids": padded_ids, "attention_mask": mask})
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_unipelt_parameter_count(kind):
    model, arch, _, cfg = build(kind, "unipelt")
    from peftcli.core.arch import linear_dims

    dims = [linear_dims(m.base) for m in model.modules() if isinstance(m, GatedLoraLinear)]
    if kind != "llama":  # closed_form assumes kv_heads · head_dim = hidden
        assert adapter_count(model, arch) == unipelt.closed_form(arch.hidden_size, arch.num_layers, cfg, dims)
    assert len(dims) == (arch.num_layers if kind == "gpt2" else 2 * arch.num_layers)


def test_unipelt_on_minilm_shape_counts():
    cfg = unipelt.UniPeltConfig()
    n = unipelt.closed_form(384, 6, cfg, [(384, 384)] * 12)
    prefix = 10 * 384 + 384 * 512 + 512 + 512 * 4608 + 4608
    lora = 12 * (8 * 768 + 385)
    adapters = 6 * (2 * 48 * 384 + 48 + 384 + 385)
    assert n == prefix + lora + adapters + 6 * 770 == 2_873_918


def test_unipelt_save_load_roundtrip():
    b = batch()
    model, arch, spec, cfg = build("bert", "unipelt")
    randomize(model, arch)
    sd = adapter_state(model, spec, arch, cfg)
    assert any(".gate.proj.weight" in k for k in sd)
    fresh, farch, fspec, _ = build("bert", "unipelt", seed=0)
    load_adapter_state(fresh, fspec, farch, cfg, sd)
    torch.testing.assert_close(logits(fresh, b), logits(model, b), rtol=0, atol=1e-6)
