"""LoHa, LoKr and VeRA on their own: the start is the base model, ΔW is what the forward adds, the
hand-written LoHa backward is autograd's, the dropouts act only in training, VeRA's shared matrices
travel as PEFT's do, and combine refuses them with the reason. Their agreement with HF PEFT is in
tests/parity/test_peft_parity_loha_lokr_vera.py and test_peft_format_loha_lokr_vera.py; merging in
tests/commands/test_merge.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny_model, write_recipe
from helpers.adapter_runs import make_run_on_data, randomize
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import recipe_from_dict
from peftcli.core.errors import BadInput
from peftcli.methods import get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.loha import LohaLinear, _Hadamard
from peftcli.methods.lokr import LokrLinear, lokr_shapes
from peftcli.methods.vera import PROJECTIONS, VeraLinear, find_store, projections
from peftcli.runs.checkpoint import adapter_state, load_adapter_state

runner = CliRunner()
KINDS = {"loha": LohaLinear, "lokr": LokrLinear, "vera": VeraLinear}
OPTIONS = {"loha": {"r": 2}, "lokr": {"r": 2}, "vera": {"r": 8}}


def attached(kind: str, method: str, **kw):
    m = tiny_model(kind)
    cfg = get_method(method).config_cls(targets=["all-linear"], **{**OPTIONS[method], **kw})
    arch, spec = attach_method(m, method, cfg)
    return m, arch, spec, cfg


@pytest.mark.parametrize("method", list(KINDS))
@pytest.mark.parametrize("arch_kind", ["bert", "gpt2", "llama"])
def test_starts_at_the_base_model_and_adds_delta_weight(arch_kind, method):
    base = tiny_model(arch_kind)
    b = batch()
    with torch.no_grad():
        plain = base(**b).logits
    m, *_ = attached(arch_kind, method)
    layers = [x for x in m.modules() if isinstance(x, KINDS[method])]
    assert layers
    with torch.no_grad():
        assert torch.equal(m(**b).logits, plain)  # ΔW = 0 exactly at the start
    randomize(m)
    for layer in layers:
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            dw = layer.delta_weight()
            assert dw.shape == (layer.out_features, layer.in_features) and dw.abs().max() > 0
            torch.testing.assert_close(layer(x) - layer.base(x), F.linear(x, dw), atol=1e-5, rtol=1e-5)


def test_loha_backward_is_autograds():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((6, 3), (3, 5), (6, 3), (3, 5))]
    assert torch.autograd.gradcheck(lambda *w: _Hadamard.apply(*w, 0.7), ws)


@pytest.mark.parametrize("dims,kw,names", [
    ((384, 384), {"r": 8}, {"lokr_w1": (16, 16), "lokr_w2_a": (24, 8), "lokr_w2_b": (8, 24)}),
    ((384, 1536), {"r": 8}, {"lokr_w1": (32, 16), "lokr_w2_a": (48, 8), "lokr_w2_b": (8, 24)}),  # in 384, out 1536
    ((32, 32), {"r": 8}, {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}),
    ((32, 32), {"r": 2, "decompose_both": True, "decompose_factor": 16}, {"lokr_w1_a": (16, 2), "lokr_w1_b": (2, 16),
                                                                         "lokr_w2": (2, 2)}),
])
def test_lokr_factor_shapes(dims, kw, names):
    kw = {"decompose_both": False, "decompose_factor": -1, **kw}
    assert lokr_shapes(*dims, kw["r"], kw["decompose_both"], kw["decompose_factor"]) == names


@pytest.mark.parametrize("method,kw", [("loha", {"module_dropout": 1.0}), ("lokr", {"module_dropout": 1.0}),
                                       ("lokr", {"rank_dropout": 1.0 - 1e-9})])  # every row dropped (unscaled)
def test_dropouts_act_in_training_only(method, kw):
    m, *_ = attached("llama", method, **kw)
    randomize(m)
    b = batch()
    layers = [x for x in m.modules() if isinstance(x, KINDS[method])]
    with torch.no_grad():
        evaluated = m.eval()(**b).logits
        trained = m.train()(**b).logits
        for x in layers:
            x.adapter_enabled = False
        plain = m.eval()(**b).logits  # the trained head on the plain base
    assert (evaluated - plain).abs().max() > 1e-3
    torch.testing.assert_close(trained, plain, atol=1e-6, rtol=0)  # every update skipped or every row dropped


def test_lokr_decompose_factor_zero_is_refused():
    with pytest.raises(BadInput, match="decompose_factor: 0 is no factor"):
        recipe_from_dict({"model": {"name": "x", "task": "classification"},
                          "method": {"name": "lokr", "decompose_factor": 0}}, "r.yaml")


def test_vera_projections_are_shared_and_travel_with_save_projection():
    m, arch, spec, cfg = attached("llama", "vera")
    store = find_store(m)
    layers = [x for x in m.modules() if isinstance(x, VeraLinear)]
    assert store.vera_A.shape == (8, 64) and store.vera_B.shape == (64, 8)  # largest in (down_proj), out (up_proj)
    assert all(x._shared[0] is store for x in layers)
    a, b = projections(0, 8, 64, 64)
    assert torch.equal(store.vera_A, a) and torch.equal(store.vera_B, b)
    assert not any("vera_A" in k for k in m.state_dict())  # not part of the model's own state
    sd = adapter_state(m, spec, arch, cfg)
    assert set(PROJECTIONS) <= set(sd)
    randomize(m)
    # a file's A and B are the ones used
    other, arch2, spec2, _ = attached("llama", "vera")
    sd = {**adapter_state(m, spec, arch, cfg), PROJECTIONS[0]: a * 2}
    load_adapter_state(other, spec2, arch2, cfg, sd)
    assert torch.equal(find_store(other).vera_A, a * 2)
    # without save_projection, the file has no A and B: they come from the key
    m3, arch3, spec3, cfg3 = attached("llama", "vera", save_projection=False)
    assert not set(PROJECTIONS) & set(adapter_state(m3, spec3, arch3, cfg3))


def test_vera_merge_leaves_no_shared_module():
    from peftcli.commands.merge import check_plain

    m, arch, spec, cfg = attached("gpt2", "vera")
    randomize(m)
    b = batch()
    with torch.no_grad():
        before = m.eval()(**b).logits
        spec.merge(m, arch, cfg)
        after = m(**b).logits
    check_plain(m)
    assert (before - after).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "loha", "r": 2}, {"name": "lokr"}, {"name": "vera", "r": 8}])
def test_combine_refuses_with_the_reason(method, tmp_path, tiny_bert_dir, tiny_csv):
    run = make_run_on_data(tmp_path, tiny_bert_dir, method, tiny_csv)
    res = runner.invoke(app, ["combine", str(run), str(run), "--weights", "0.5,0.5", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"method '{method['name']}' cannot be combined" in text and "add_weighted_adapter" in text
    assert not (tmp_path / "out").exists()


def test_recipes_validate(tmp_path):
    from peftcli.config.recipe import load_recipe

    for name in KINDS:
        r = load_recipe(f"recipes/tweets_{name}.yaml")
        assert r.method_name == name
    bad = write_recipe(tmp_path / "bad.yaml", model={"name": "x"}, method={"name": "vera", "rank": 4})
    res = runner.invoke(app, ["validate", bad])
    assert res.exit_code == 2 and "method.rank: unknown key" in " ".join(res.output.split())
