"""LoRA's options: starts (method.init), LoRA-FA (freeze_a), per-module ranks (rank_pattern /
alpha_pattern) and LoRA+ (train.lora_plus_ratio), on tiny models built from config."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, tiny_model
from helpers.adapter_runs import randomize, spread

from peftcli.config.recipe import RecipeError, recipe_from_dict
from peftcli.core.adapter_merging import CombineRequest
from peftcli.methods.attach import attach_method
from peftcli.methods.lora import (
    LoraConfig,
    LoraLinear,
    budget,
    combine,
    export_state,
    load_state,
    lora_modules,
    merge,
    site_scalings,
    take_starts,
)
from peftcli.methods.lora_init import start_factors
from peftcli.training.optim import OptimizerUnavailable, build_optimizer, lora_plus_groups


def logits(model, b):
    with torch.no_grad():
        return model.eval()(**b).logits


# ------------------------------------------------------------------------------ recipe keys


@pytest.mark.parametrize("override,key", [
    ("method.init=pissa_niter_x", "method.init"),
    ("method.init=loftq", "method.init"),
    ("method.rank_pattern={q: 0}", "method.rank_pattern"),
    ("method.rank_pattern={q: 2.5}", "method.rank_pattern"),
    ("method.rank_pattern=[q]", "method.rank_pattern"),
    ("method.alpha_pattern={'(': 3}", "method.alpha_pattern"),
    ("method.alpha_pattern={v: -1}", "method.alpha_pattern"),
    ("train.lora_plus_ratio=0", "train.lora_plus_ratio"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"method": {"name": "lora"}}, "r.yaml", [override])
    assert key in str(e.value)


def test_options_that_do_not_fit_are_refused_with_the_reason():
    with pytest.raises(RecipeError, match="use_dora"):
        recipe_from_dict({"method": {"name": "lora", "init": "pissa", "use_dora": True}}, "r.yaml")
    with pytest.raises(RecipeError, match="brings its own optimizer"):
        recipe_from_dict({"method": {"name": "galore"}, "train": {"lora_plus_ratio": 16}}, "r.yaml")
    r = recipe_from_dict({"method": {"name": "lora", "init": "pissa_niter_4", "rank_pattern": {"v": 4}}}, "r.yaml")
    assert r.method.init == "pissa_niter_4" and r.method.rank_pattern == {"v": 4}


# ------------------------------------------------------------------------------ rank and alpha patterns


def test_patterns_by_role_and_by_peft_regex_first_key_wins():
    model = tiny_model("bert")
    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v"], rank_pattern={r"layer\.1\..*query": 2, "q": 6},
                     alpha_pattern={"v": 3})
    attach_method(model, "lora", cfg)
    got = {n: (m.r, m.alpha) for n, m in lora_modules(model)}
    p = "bert.encoder.layer.{}.attention.self.{}"
    assert got == {p.format(0, "query"): (6, 8.0), p.format(0, "value"): (4, 3.0),
                   p.format(1, "query"): (2, 8.0), p.format(1, "value"): (4, 3.0)}
    assert model.get_submodule(p.format(1, "value")).scaling == 3.0 / 4
    # the stacked rows of a mixed batch take each site's own scaling
    plain = tiny_model("bert")
    assert site_scalings(plain, cfg, list(got)) == {k: a / r for k, (r, a) in got.items()}


def test_a_pattern_key_that_adapts_nothing_is_refused():
    with pytest.raises(ValueError, match="rank_pattern: 'ffn_in' matches none"):
        attach_method(tiny_model("llama"), "lora", LoraConfig(targets=["q", "v"], rank_pattern={"ffn_in": 2}))


def test_closed_form_count_follows_patterns_frozen_a_and_dora():
    for cfg in (LoraConfig(r=4, targets=["q", "v", "ffn_out"], rank_pattern={"ffn_out": 2}),
                LoraConfig(r=4, targets=["q", "v"], freeze_a=True, use_dora=True, rank_pattern={"v": 8})):
        model = tiny_model("llama")
        arch, _ = attach_method(model, "lora", cfg)
        head = sum(p.numel() for _, h in arch.head_modules() for p in h.parameters())
        assert budget(model, arch, cfg) == sum(p.numel() for p in model.parameters() if p.requires_grad) - head


# ------------------------------------------------------------------------------ LoRA-FA


def test_frozen_a_gets_no_gradient_in_the_fast_kernel_and_no_optimizer_state_but_is_saved():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    fa = LoraLinear(copy.deepcopy(base), r=2, alpha=4, dropout=0.0, rslora=False, freeze_a=True)
    ref = LoraLinear(copy.deepcopy(base), r=2, alpha=4, dropout=0.0, rslora=False)
    for m in (fa, ref):
        m.base.requires_grad_(False)
    with torch.no_grad():
        ref.lora_A.weight.copy_(fa.lora_A.weight)
        fa.lora_B.weight.normal_()
        ref.lora_B.weight.copy_(fa.lora_B.weight)
    ref.fast_path = False
    x = torch.randn(3, 4, 6)
    fa(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert fa.lora_A.weight.grad is None and not fa.lora_A.weight.requires_grad
    torch.testing.assert_close(fa.lora_B.weight.grad, ref.lora_B.weight.grad)

    model = tiny_model("bert")
    cfg = LoraConfig(r=4, targets=["q", "v"], freeze_a=True)
    arch, spec = attach_method(model, "lora", cfg)
    tcfg = recipe_from_dict({"method": {"name": "lora"}}).train
    opt = build_optimizer(model, model, spec, arch, cfg, tcfg, torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    a = [m.lora_A.weight for _, m in lora_modules(model)]
    assert a and not any(id(p) in in_opt for p in a)
    sd = export_state(model, arch, cfg)
    assert sum(k.endswith("lora_A.weight") for k in sd) == 4
    fresh = tiny_model("bert")
    attach_method(fresh, "lora", cfg)
    load_state(fresh, arch, cfg, {k: v.clone() for k, v in sd.items()})
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(sorted(export_state(fresh, arch, cfg).items()),
                                                            sorted(sd.items()), strict=True))


# ------------------------------------------------------------------------------ PiSSA / OLoRA


@pytest.mark.parametrize("kind,init", [("bert", "pissa"), ("gpt2", "olora"), ("llama", "pissa_niter_2")])
def test_start_keeps_the_model_and_a_saved_run_rebuilds_its_residual_exactly(kind, init):
    model = tiny_model(kind)
    spread(model)
    b = batch()
    before = logits(model, b)
    original = copy.deepcopy(model)
    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], init=init)
    arch, _ = attach_method(model, "lora", cfg)
    take_starts(model, arch, cfg)
    torch.testing.assert_close(logits(model, b), before, atol=1e-5, rtol=0)
    randomize(model)
    trained = logits(model, b)
    sd = {k: v.clone() for k, v in export_state(model, arch, cfg).items()}
    assert any(k.endswith(".lora_A0") for k in sd)

    again = copy.deepcopy(original)
    arch2, _ = attach_method(again, "lora", cfg)
    load_state(again, arch2, cfg, sd)
    for (n, m), (_, m2) in zip(lora_modules(model), lora_modules(again), strict=True):
        assert torch.equal(m.base.weight, m2.base.weight), n  # the residual, bit for bit
    assert torch.equal(logits(again, b), trained)

    # switched off (AdapterDrop), a moved layer is the original layer again (under the trained head)
    head = {n: p for n, p in again.named_parameters() if p.requires_grad and "lora_" not in n}
    with torch.no_grad():
        for n, p in original.named_parameters():
            if n in head:
                p.copy_(head[n])
    for _, m in lora_modules(again):
        m.adapter_enabled = False
    torch.testing.assert_close(logits(again, b), logits(original, b), atol=1e-5, rtol=0)
    for _, m in lora_modules(again):
        m.adapter_enabled = True

    # merged: residual + s·B A = original + s·(B A − B0 A0)
    merge(again, arch2, cfg)
    assert not any(isinstance(m, LoraLinear) for m in again.modules())
    assert (logits(again, b) - trained).abs().max() <= 1e-5


def test_random_start_is_the_same_for_the_same_seed_whatever_was_drawn_before():
    starts = []
    for draws in (0, 5):
        model = tiny_model("llama")
        spread(model)
        cfg = LoraConfig(r=3, targets=["q"], init="pissa_niter_1")
        arch, _ = attach_method(model, "lora", cfg)
        torch.manual_seed(11)
        torch.randn(draws)
        take_starts(model, arch, cfg)
        starts.append([m.lora_A0.clone() for _, m in lora_modules(model)])
    assert all(torch.equal(x, y) for x, y in zip(*starts, strict=True))


def test_a_file_without_the_start_gets_it_decomposed_from_this_base():
    """An HF PEFT folder saved with init_lora_weights pissa: PEFT's from_pretrained decomposes the
    base it loads on; load_state does the same."""
    model = tiny_model("bert")
    spread(model)
    original = copy.deepcopy(model)
    cfg = LoraConfig(r=4, targets=["q", "v"], init="olora")
    arch, _ = attach_method(model, "lora", cfg)
    take_starts(model, arch, cfg)
    randomize(model)
    sd = {k: v.clone() for k, v in export_state(model, arch, cfg).items() if not k.endswith(("A0", "B0"))}
    arch2, _ = attach_method(original, "lora", cfg)
    load_state(original, arch2, cfg, sd)
    assert torch.equal(logits(original, batch()), logits(model, batch()))
    with pytest.raises(Exception, match="method.init"):
        load_state(tiny_model("bert"), arch2, LoraConfig(r=4, targets=["q", "v"]),
                   export_state(model, arch, cfg))


def test_start_factors_reconstruct_the_top_rank_part():
    w = torch.randn(12, 9)
    a, b = start_factors(w, 3, 0.5, "pissa")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(0.5 * b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    a, b = start_factors(w, 9, 1.0, "olora")
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ combine


def test_cat_combines_pissa_runs_and_per_module_ranks_exactly():
    """`cat` is exact: the combined update equals sum_i w_i ΔW_i, ΔW of a PiSSA run being
    s·(B A − B0 A0) relative to the original base."""
    states, cfgs, deltas = [], [], []
    cfg_a = LoraConfig(r=2, alpha=4, targets=["q", "v"], init="pissa", rank_pattern={"v": 3})
    cfg_b = LoraConfig(r=4, alpha=4, targets=["q", "v"], alpha_pattern={"q": 2})
    for seed, cfg in ((1, cfg_a), (2, cfg_b)):
        model = tiny_model("bert")
        spread(model)
        arch, _ = attach_method(model, "lora", cfg)
        take_starts(model, arch, cfg)
        randomize(model, seed, 0.2)
        states.append({k: v for k, v in export_state(model, arch, cfg).items() if "classifier" not in k})
        cfgs.append(cfg)
        deltas.append({n: m.scaling * (m.lora_B.weight @ m.lora_A.weight - (m.lora_B0 @ m.lora_A0 if m.init == "pissa"
                                                                              else 0)) for n, m in lora_modules(model)})
    req = CombineRequest(states=states, weights=[0.7, -0.4], how="cat", cfgs=cfgs, runs=["a", "b"], method="lora",
                         arch=arch)
    out = combine(req)
    new = out.config
    assert new.init == "default" and any("PiSSA" in n for n in out.notes)
    model = tiny_model("bert")
    attach_method(model, "lora", new)
    for n, m in lora_modules(model):
        a, b = out.state[f"{n}.lora_A.weight"], out.state[f"{n}.lora_B.weight"]
        assert m.r == a.shape[0] and m.scaling == 1.0
        torch.testing.assert_close(b @ a, 0.7 * deltas[0][n] - 0.4 * deltas[1][n], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ LoRA+


def test_lora_plus_groups_b_and_vectors_at_ratio_times_lr():
    model = tiny_model("bert")
    attach_method(model, "lora", LoraConfig(targets=["q", "v"]))
    groups = lora_plus_groups(model, 1e-3, 16.0, 0.1, "lora")
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert all("lora_A" in n or n == "classifier.weight" for n in by_lr[(1e-3, 0.1)])
    assert all("lora_B" in n for n in by_lr[(16e-3, 0.1)])
    assert by_lr[(16e-3, 0.0)] == ["classifier.bias"]
    other = tiny_model("bert")
    attach_method(other, "ia3", recipe_from_dict({"method": {"name": "ia3"}}).method)
    with pytest.raises(OptimizerUnavailable, match="train.lora_plus_ratio"):
        lora_plus_groups(other, 1e-3, 16.0, 0.0, "ia3")


def test_memory_estimate_has_no_qlora_row_for_a_start_that_needs_a_dense_weight():
    from peftcli.training.budget import memory_estimate

    def rows(cfg):
        return [r["precision"] for r in memory_estimate(10, 100, 50, method="lora", method_cfg=cfg)]

    assert "nf4 QLoRA" in rows(LoraConfig(init="gaussian", freeze_a=True))
    assert "nf4 QLoRA" not in rows(LoraConfig(init="olora"))
