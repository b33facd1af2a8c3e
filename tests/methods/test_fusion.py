"""AdapterFusion: the fusion attention against its formula, placement against plain Pfeiffer models,
frozen sources, the V regulariser in the training loop, self-contained saving, pruning, and
`peftcli fuse` / `eval` / `drop` end to end on a tiny BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import batch, tiny_model, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import recipe_from_dict, recipe_yaml
from peftcli.methods import fusion, get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.fusion import FusionConfig, FusionSite, read_sources
from peftcli.runs.checkpoint import adapter_state, save_adapter

runner = CliRunner()


def randomize_adapters(model, arch, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    heads = tuple(f"{n}." for n, _ in arch.head_modules())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith(heads):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def make_source(folder: Path, model, seed: int, method: str = "pfeiffer", model_name: str = "tiny", **opts):
    """A finished stage-1 run folder (recipe.yaml + adapter/) with random, non-zero adapter weights."""
    cfg = get_method(method).config_cls(**opts)
    arch, spec = attach_method(model, method, cfg)
    randomize_adapters(model, arch, seed)
    folder.mkdir(parents=True)
    rec = recipe_from_dict({"model": {"name": model_name}, "method": {"name": method, **opts}})
    (folder / "recipe.yaml").write_text(recipe_yaml(rec))
    save_adapter(folder / "adapter", model, spec, arch, cfg, meta={})
    return model, arch


def fused(kind: str, runs: list[Path], **kw):
    model = tiny_model(kind)
    cfg = FusionConfig(adapters=[str(r) for r in runs], **kw)
    arch, spec = attach_method(model, "fusion", cfg)
    return model, arch, spec, cfg


def sites(model) -> list[FusionSite]:
    return [s for _, s in fusion.fusion_sites(model)]


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def exact_identity(model) -> None:
    with torch.no_grad():
        for s in sites(model):
            s.value.weight.copy_(torch.eye(s.value.weight.shape[0]))


# ------------------------------------------------------------------------------------ the formula


def test_fusion_site_is_the_formula():
    torch.manual_seed(0)
    from peftcli.core.hf_call import SequenceMask
    from peftcli.methods.bottleneck import Bottleneck

    adapters = {str(i): Bottleneck(12, 3, init="bert") for i in range(3)}
    site = FusionSite(12, adapters, FusionConfig(temperature=2.0), SequenceMask(), torch.device("cpu"), torch.float32)
    site.ready = True
    with torch.no_grad():
        site.value.weight.add_(0.1 * torch.randn(12, 12))
    x = torch.randn(2, 5, 12)
    ups = [a(x) for a in adapters.values()]
    q = x @ site.query.weight.T + site.query.bias
    scores = torch.stack([(q * (u @ site.key.weight.T + site.key.bias)).sum(-1) for u in ups], -1) / 2.0
    p = torch.softmax(scores, -1)
    want = sum(p[..., i : i + 1] * (u @ site.value.weight.T) for i, u in enumerate(ups))
    torch.testing.assert_close(site(x), want)


def test_init_and_what_trains(tmp_path):
    a, _ = make_source(tmp_path / "a", tiny_model("bert"), 1)
    make_source(tmp_path / "b", tiny_model("bert"), 2)
    model, arch, _, _ = fused("bert", [tmp_path / "a", tmp_path / "b"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".query." in n or ".key." in n or ".value." in n or n.startswith("classifier.") for n in names)
    frozen = [n for n, p in model.named_parameters() if ".adapters." in n]
    assert frozen and not any(dict(model.named_parameters())[n].requires_grad for n in frozen)
    s = sites(model)[0]
    w = s.value.weight
    assert s.value.bias is None
    torch.testing.assert_close(w.diagonal(), torch.ones(w.shape[0]))
    off = w[~torch.eye(w.shape[0], dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, 1e-6))
    assert 0.01 < float(s.query.weight.detach().std()) < 0.03 and float(s.query.bias.detach().abs().max()) == 0.0
    # the sources' weights were copied from their runs
    src = dict(a.named_parameters())
    torch.testing.assert_close(s.adapters["0"].down.weight, src[f"{arch.layers_path}.0.pfeiffer_ffn.down.weight"])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_one_source_with_identity_value_is_that_adapter(tmp_path, kind):
    b = batch()
    src, _ = make_source(tmp_path / "a", tiny_model(kind), 1)
    model, *_ = fused(kind, [tmp_path / "a"])
    exact_identity(model)
    torch.testing.assert_close(logits(model, b), logits(src, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_uniform_attention_is_the_mean_of_the_sources(tmp_path, kind):
    """Q = 0 gives p = 1/2 for each source: the fused site must equal one Pfeiffer adapter of width
    m1 + m2 whose up-projection is half of both (relu acts per unit, so the halves add)."""
    b = batch()
    a, arch = make_source(tmp_path / "a", tiny_model(kind), 1)
    c, _ = make_source(tmp_path / "b", tiny_model(kind), 2)
    model, *_ = fused(kind, [tmp_path / "a", tmp_path / "b"])
    exact_identity(model)
    with torch.no_grad():
        for s in sites(model):
            s.query.weight.zero_()
            s.query.bias.zero_()
    ref = tiny_model(kind)
    rarch, _ = attach_method(ref, "pfeiffer", get_method("pfeiffer").config_cls(bottleneck_size=4))
    pa, pc, pr = dict(a.named_parameters()), dict(c.named_parameters()), dict(ref.named_parameters())
    with torch.no_grad():
        for i in range(arch.num_layers):
            k = f"{arch.layers_path}.{i}.pfeiffer_ffn."
            pr[k + "down.weight"].copy_(torch.cat([pa[k + "down.weight"], pc[k + "down.weight"]], 0))
            pr[k + "down.bias"].copy_(torch.cat([pa[k + "down.bias"], pc[k + "down.bias"]], 0))
            pr[k + "up.weight"].copy_(0.5 * torch.cat([pa[k + "up.weight"], pc[k + "up.weight"]], 1))
            pr[k + "up.bias"].copy_(0.5 * (pa[k + "up.bias"] + pc[k + "up.bias"]))
    torch.testing.assert_close(logits(model, b), logits(ref, b), rtol=0, atol=1e-5)


def test_houlsby_sources_fuse_at_both_sites_and_bad_sources_are_refused(tmp_path):
    make_source(tmp_path / "h1", tiny_model("bert"), 1, method="houlsby")
    make_source(tmp_path / "h2", tiny_model("bert"), 2, method="houlsby")
    model, *_ = fused("bert", [tmp_path / "h1", tmp_path / "h2"])
    names = {n.rsplit(".", 1)[1] for n, _ in fusion.fusion_sites(model)}
    assert names == {"fusion_attn", "fusion_ffn"}
    logits(model, batch())
    make_source(tmp_path / "p", tiny_model("bert"), 3)
    with pytest.raises(fusion.FusionError, match="share one placement"):
        fused("bert", [tmp_path / "h1", tmp_path / "p"])
    make_source(tmp_path / "l", tiny_model("bert"), 4, method="lora")
    with pytest.raises(fusion.FusionError, match="cannot be fused"):
        fused("bert", [tmp_path / "p", tmp_path / "l"])
    with pytest.raises(fusion.FusionError, match=r"method.adapters\[1\]: .*nowhere: no such folder"):
        fused("bert", [tmp_path / "p", tmp_path / "nowhere"])
    with pytest.raises(fusion.FusionError, match=r"method.adapters\[0\] and method.adapters\[1\] name the same run"):
        fused("bert", [tmp_path / "p", tmp_path / "p" / "."])
    same_name = [fusion.Source(0, "runs/a", "pfeiffer", {}), fusion.Source(1, "other/a", "pfeiffer", {}),
                 fusion.Source(2, "runs/b", "pfeiffer", {})]
    assert fusion.source_names(same_name) == ["0:a", "1:a", "b"]  # one's attention was reported under the other's
    (tmp_path / "empty").mkdir()
    with pytest.raises(fusion.FusionError, match=r"empty: not a run folder \(no recipe.yaml\)"):
        fused("bert", [tmp_path / "p", tmp_path / "empty"])
    (tmp_path / "empty" / "recipe.yaml").write_bytes(b"method: \xff\n")
    with pytest.raises(fusion.FusionError, match="not a readable recipe"):
        fused("bert", [tmp_path / "p", tmp_path / "empty"])


# ------------------------------------------------------------------------------------ regulariser


def test_value_regulariser(tmp_path):
    make_source(tmp_path / "a", tiny_model("bert"), 1)
    make_source(tmp_path / "b", tiny_model("bert"), 2)
    model, *_ = fused("bert", [tmp_path / "a", tmp_path / "b"])
    with torch.no_grad():
        for s in sites(model):
            s.value.weight.add_(0.05 * torch.randn_like(s.value.weight))
    want = 0.01 * sum(((torch.eye(32) - s.value.weight) ** 2).sum() for s in sites(model))
    got = model.peftcli_aux_loss()
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(s.value.weight.grad is not None for s in sites(model))
    off, *_ = fused("bert", [tmp_path / "a", tmp_path / "b"], value_regularization=0.0)
    assert not hasattr(off, "peftcli_aux_loss")


# ------------------------------------------------------------------------------------ saving


def test_fused_state_reloads_without_the_source_runs(tmp_path):
    b = batch()
    make_source(tmp_path / "a", tiny_model("bert"), 1)
    make_source(tmp_path / "b", tiny_model("bert"), 2)
    model, arch, spec, cfg = fused("bert", [tmp_path / "a", tmp_path / "b"])
    randomize_adapters(model, arch, 9)  # trained fusion weights
    sd = adapter_state(model, spec, arch, cfg)
    assert any(".adapters.1.up.weight" in k for k in sd) and any(".value.weight" in k for k in sd)
    want = logits(model, b)
    recorded = FusionConfig(adapters=cfg.adapters, sources=[s.to_json() for s in read_sources(cfg)])
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    fresh = tiny_model("bert")
    farch, fspec = attach_method(fresh, "fusion", recorded)
    with pytest.raises(RuntimeError, match="never loaded"):
        logits(fresh, b)
    fspec.load_state(fresh, farch, recorded, sd)
    torch.testing.assert_close(logits(fresh, b), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ pruning


def test_attention_recording_skips_padding_and_prune_keeps_the_top_source(tmp_path):
    make_source(tmp_path / "a", tiny_model("bert"), 1)
    make_source(tmp_path / "b", tiny_model("bert"), 2)
    make_source(tmp_path / "c", tiny_model("bert"), 3)
    model, *_ = fused("bert", [tmp_path / p for p in "abc"])
    b = batch(pad_last=3)
    fusion.record_attention(model, True)
    logits(model, b)
    fusion.record_attention(model, False)
    for s in sites(model):
        assert s.attention_tokens == float(b["attention_mask"].sum())
        assert abs(sum(s.mean_attention().values()) - 1.0) < 1e-6
    table = fusion.attention_table(model, ["a", "b", "c"])
    off = fusion.prune(model, 1)
    assert len(off) == 2 * len(sites(model))
    for (_, s), row in zip(fusion.fusion_sites(model), table.values(), strict=True):
        kept = s.active()
        assert kept == [str("abc".index(max(row, key=row.get)))]
    # with one source left p = 1: the site is V(up) of that source
    s = sites(model)[0]
    x = torch.randn(2, 3, 32)
    k = s.active()[0]
    torch.testing.assert_close(s(x), s.adapters[k](x) @ s.value.weight.T)


# ------------------------------------------------------------------------------------ end to end


def source_run(folder: Path, model_dir: Path, seed: int, **opts) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(model_dir)
    make_source(folder, m, seed, model_name=str(model_dir), **opts)
    return folder


@pytest.fixture(scope="module")
def fused_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    d = tmp_path_factory.mktemp("fusion")
    runs = [source_run(d / f"src{i}", tiny_bert_dir, i, reduction_factor=4) for i in range(3)]
    recipe = write_recipe(
        d / "fusion.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "fusion", "adapters": [str(r) for r in runs]},
        train={"epochs": 2, "batch_size": 8, "lr": 5e-3, "progress": False},
        output={"dir": str(d / "run")},
    )
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = fusion.FusionRegularizer.__call__
        mp.setattr(fusion.FusionRegularizer, "__call__", lambda self: calls.append(1) or real(self))
        res = runner.invoke(app, ["fuse", recipe])
    assert res.exit_code == 0, res.output
    return d, recipe, d / "run", runs, len(calls)


@pytest.mark.slow
def test_fuse_trains_with_the_regulariser_and_saves_a_self_contained_run(fused_run):
    d, _, run, runs, calls = fused_run
    assert calls == 12  # 48 rows / batch 8 × 2 epochs: the loop added the V term at every step
    rec = yaml.safe_load((run / "recipe.yaml").read_text())
    assert len(rec["method"]["sources"]) == 3 and json.loads(rec["method"]["sources"][0])["method"] == "pfeiffer"
    from safetensors.torch import load_file

    keys = load_file(str(run / "adapter" / "adapter.safetensors")).keys()
    assert any(".adapters.2.down.weight" in k for k in keys) and any(k.startswith("classifier.") for k in keys)


def test_eval_on_a_fused_run_without_its_sources(fused_run, tmp_path):
    d, _, run, runs, _ = fused_run
    summary = json.loads((run / "summary.json").read_text())
    moved = [shutil.move(str(r), str(tmp_path / r.name)) for r in runs]
    try:
        res = runner.invoke(app, ["eval", str(run)])
    finally:
        for m, r in zip(moved, runs, strict=True):
            shutil.move(m, str(r))
    assert res.exit_code == 0, res.output
    m = json.loads((run / "eval_test.json").read_text())
    assert abs(m["accuracy"] - summary["test"]["accuracy"]) < 1e-9


@pytest.mark.slow
def test_drop_prune_fusion_writes_a_run_that_eval_reloads(fused_run, tmp_path):
    _, _, run, _, _ = fused_run
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["drop", str(run), "--prune-fusion", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "drop.json").read_text())
    assert rep["attention"] and len(rep["disabled_modules"]) == 2 * 2  # 2 of 3 sources off in each of 2 layers
    assert {"accuracy", "examples_per_s"} <= set(rep["after"])
    res = runner.invoke(app, ["eval", str(out), "--split", rep["split"]])
    assert res.exit_code == 0, res.output
    assert abs(json.loads((out / f"eval_{rep['split']}.json").read_text())["loss"] - rep["after"]["loss"]) < 1e-6


def test_fuse_refuses_sources_of_another_base_model(fused_run, tmp_path, tiny_bert_dir):
    d, recipe, _, runs, _ = fused_run
    other = source_run(tmp_path / "other", tiny_bert_dir, 5, reduction_factor=4)
    text = (other / "recipe.yaml").read_text().replace(str(tiny_bert_dir), "another/model")
    (other / "recipe.yaml").write_text(text)
    res = runner.invoke(app, ["fuse", recipe, f"method.adapters=[{runs[0]},{other}]", f"output.dir={tmp_path / 'x'}"])
    assert res.exit_code == 2 and "same base model" in res.output
    res = runner.invoke(app, ["fuse", recipe, f"method.adapters=[{runs[0]}]", f"output.dir={tmp_path / 'y'}"])
    assert res.exit_code == 2 and "two or more" in res.output
