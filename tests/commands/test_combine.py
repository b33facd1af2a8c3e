"""`peftcli combine`: HF PEFT 0.21.2's `add_weighted_adapter` as the oracle, then the command.

1. The oracle. Two adapters live in one PEFT model (different alpha, one of them rsLoRA, a
   negative weight); PEFT combines them with each `combination_type`, and our method hook combines
   the same tensors. Every tensor must be bit-identical, DARE's random masks included: PEFT
   draws them from torch's global generator after initialising the new adapter (which also
   draws), so the oracle reseeds the global generator at that point, and ours gets a generator
   with the same seed. Where we deliberately differ from PEFT (the combined config of rsLoRA
   adapters, DoRA's magnitude), the test shows what PEFT does and that ours keeps the function.
2. The command: ordinary run folders out (eval, merge, export take them), refusals with reasons
   (exit 2), and nothing written or deleted that peftcli did not write.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.core.adapter_merging import CombineRequest
from peftcli.methods import all_methods, get_method

peft = pytest.importorskip("peft")

runner = CliRunner()
HOWS = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
        "magnitude_prune", "magnitude_prune_svd"]
WEIGHTS = [0.7, -0.4]
SEED = 11


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------- 1. the oracle

PEFT_QV = {"bert": ["query", "value"], "gpt2": ["c_attn"]}


def two_lora(kind: str, *, dora: bool = False, ranks=(4, 4)):
    """A PEFT model holding adapters `a` (r0, alpha 8) and `b` (r1, alpha 6, rsLoRA), filled with
    random values, and our configs for them."""
    from peftcli.methods.lora import LoraConfig

    base = tiny_model(kind)
    common = dict(target_modules=PEFT_QV[kind], fan_in_fan_out=kind == "gpt2", use_dora=dora, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.get_peft_model(base, peft.LoraConfig(r=ranks[0], lora_alpha=8, **common), adapter_name="a")
        m.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=6, use_rslora=True, **common))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * (0.1 if "magnitude" in n else 1.0))
    cfgs = [LoraConfig(r=ranks[0], alpha=8, use_dora=dora), LoraConfig(r=ranks[1], alpha=6, rslora=True, use_dora=dora)]
    return m, cfgs


def adapter_tensors(m, name: str) -> dict[str, torch.Tensor]:
    """One PEFT adapter's tensors under our names, in the model's order."""
    out = {}
    for n, p in m.named_parameters():
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            tag = f".{part}.{name}."
            if tag in n:
                key = n.removeprefix("base_model.model.").replace(tag, f".{part}.")
                out[key.removesuffix(".weight") if part == "lora_magnitude_vector" else key] = p.detach().clone()
    return out


def peft_combine(m, name: str, how: str, **kw) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter, the global generator reseeded once the new adapter is initialised."""
    cls = type(m.base_model)
    inject = cls.inject_adapter

    def inject_then_seed(self, *a, **k):
        inject(self, *a, **k)
        torch.manual_seed(SEED)

    cls.inject_adapter = inject_then_seed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=how, **kw)
    finally:
        cls.inject_adapter = inject
    return adapter_tensors(m, name)


def ours(m, cfgs, how: str, base_weight=None, **kw):
    req = CombineRequest(states=[adapter_tensors(m, "a"), adapter_tensors(m, "b")], weights=WEIGHTS, how=how,
                         cfgs=cfgs, runs=["a", "b"], method="lora", generator=torch.Generator().manual_seed(SEED),
                         base_weight=base_weight, **kw)
    return get_method("lora").combine(req)


def options(how: str, sign: str) -> tuple[dict, dict]:
    """(PEFT's keyword arguments, ours) for one rule."""
    from peftcli.core.adapter_merging import elects_sign, needs_density

    theirs, mine = {}, {}
    if needs_density(how):
        theirs["density"] = mine["density"] = 0.5
    if elects_sign(how):
        theirs["majority_sign_method"] = mine["majority_sign"] = sign
    return theirs, mine


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_every_shared_rule_gives_peft_tensors_bit_for_bit(kind):
    """GPT-2's Conv1D layers store weights as (in, out), and PEFT draws the masks of dare_*_svd
    over its update in that layout, so one seed drops other entries than ours (drawn over the
    (out, in) update every other layer type has): there, the rule is compared at density 1 (no
    draw). Every other rule and layer matches with the random masks in place."""
    m, cfgs = two_lora(kind)
    checked = 0
    for how in HOWS:
        for sign in (("total", "frequency") if "ties" in how else ("total",)):
            theirs_kw, mine_kw = options(how, sign)
            if kind == "gpt2" and how.startswith("dare") and how.endswith("_svd"):
                theirs_kw["density"] = mine_kw["density"] = 1.0
            theirs = peft_combine(m, f"{how}_{sign}", how, **theirs_kw)
            got = ours(m, cfgs, how, **mine_kw)
            assert list(got.state) == list(theirs), how
            for k, t in theirs.items():
                assert torch.equal(got.state[k], t), f"{how}/{sign}: {k} differs by {(got.state[k] - t).abs().max()}"
            assert got.config.r == (8 if how == "cat" else 4) and got.config.alpha == got.config.r
            checked += 1
    assert checked == 15


def test_ranks_may_differ_for_cat_and_svd_only():
    m, cfgs = two_lora("bert", ranks=(4, 2))
    for how, kw in (("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3})):
        theirs = peft_combine(m, f"{how}{kw}", how, **kw)
        got = ours(m, cfgs, how, rank=kw.get("svd_rank"))
        assert all(torch.equal(got.state[k], t) for k, t in theirs.items()), how
        assert got.config.r == {"cat": 6, "svd": kw.get("svd_rank", 4)}[how]
    from peftcli.core.adapter_merging import CombineError

    with pytest.raises(CombineError, match="needs one rank.*use --how cat or --how svd"):
        ours(m, cfgs, "linear")


def _delta(sd: dict, module: str, scaling: float) -> torch.Tensor:
    return scaling * (sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"])


def test_cat_is_the_exact_weighted_sum_of_updates_and_rslora_keeps_its_scale():
    """cat adds the updates exactly. The result loads with scaling 1 (alpha = r, rslora off); PEFT
    0.21 keeps use_rslora from the first adapter and so scales its result by a further sqrt(r)."""
    from peftcli.methods.lora import lora_scaling

    m, cfgs = two_lora("bert")
    cfgs = [cfgs[1], cfgs[0]]  # the rsLoRA adapter first, as PEFT's config is copied from the first
    sa, sb = adapter_tensors(m, "a"), adapter_tensors(m, "b")
    req = CombineRequest(states=[sb, sa], weights=WEIGHTS, how="cat", cfgs=cfgs, runs=["b", "a"], method="lora")
    got = get_method("lora").combine(req)
    mod = "bert.encoder.layer.0.attention.self.query"
    want = WEIGHTS[0] * _delta(sb, mod, lora_scaling(6, 4, True)) + WEIGHTS[1] * _delta(sa, mod, lora_scaling(8, 4, False))
    c = got.config
    torch.testing.assert_close(_delta(got.state, mod, lora_scaling(c.alpha, c.r, c.rslora)), want, atol=1e-5, rtol=1e-5)
    assert not c.rslora and any("rsLoRA" in n for n in got.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.add_weighted_adapter(["b", "a"], WEIGHTS, "peft_cat", combination_type="cat")
    assert m.peft_config["peft_cat"].use_rslora  # PEFT's combined adapter: scaling sqrt(8), not 1
    layer = m.base_model.model.bert.encoder.layer[0].attention.self.query
    assert math.isclose(layer.scaling["peft_cat"], math.sqrt(8))


def test_dora_factors_match_peft_and_magnitudes_combine_around_the_base_norm():
    m, cfgs = two_lora("bert", dora=True)
    base = m.base_model.model
    weight = {n: mod.get_base_layer().weight.detach().float() for n, mod in base.named_modules()
              if hasattr(mod, "lora_A") and hasattr(mod, "get_base_layer")}
    for how in ("linear", "cat", "svd"):
        theirs = peft_combine(m, f"dora_{how}", how)
        got = ours(m, cfgs, how, base_weight=weight.__getitem__)
        sa, sb = adapter_tensors(m, "a"), adapter_tensors(m, "b")
        for k, t in theirs.items():
            if k.endswith("lora_magnitude_vector"):
                norm = weight[k.removesuffix(".lora_magnitude_vector")].norm(dim=1)
                # PEFT gives the combined DoRA adapter the magnitude of an untrained one ...
                torch.testing.assert_close(t, norm)
                # ... ours is task arithmetic around it: ‖W‖ + sum_i w_i (m_i - ‖W‖)
                want = norm + WEIGHTS[0] * (sa[k] - norm) + WEIGHTS[1] * (sb[k] - norm)
                torch.testing.assert_close(got.state[k], want, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(got.state[k], t), f"{how}: {k}"


@pytest.mark.slow
def test_one_adapter_with_weight_one_gives_the_same_model_back():
    """The identity combination reproduces the adapter's logits: LoRA, rsLoRA and DoRA alike."""
    from conftest import batch

    from peftcli.methods.attach import attach_method
    from peftcli.methods.lora import LoraConfig
    from peftcli.runs.checkpoint import adapter_state, load_adapter_state

    for cfg in (LoraConfig(r=4, alpha=8), LoraConfig(r=4, alpha=6, rslora=True), LoraConfig(r=4, use_dora=True)):
        model = tiny_model("bert")
        arch, spec = attach_method(model, "lora", cfg)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        ref = model(**batch()).logits
        sd = adapter_state(model, spec, arch, cfg)
        body = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        got = spec.combine(CombineRequest(states=[body], weights=[1.0], how="linear", cfgs=[cfg], runs=["a"],
                                          method="lora"))
        fresh = tiny_model("bert")
        arch2, _ = attach_method(fresh, "lora", got.config)
        load_adapter_state(fresh, spec, arch2, got.config, {**got.state, **{k: v for k, v in sd.items() if k not in body}})
        torch.testing.assert_close(fresh(**batch()).logits, ref, atol=1e-5, rtol=1e-5)


def test_ia3_weighted_matches_peft():
    from peftcli.methods.ia3 import IA3Config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
        m = peft.get_peft_model(tiny_model("bert"), peft.IA3Config(**cfg), adapter_name="a")
        m.add_adapter("b", peft.IA3Config(**cfg))
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "ia3_l" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        m.add_weighted_adapter(["a", "b"], [0.3, 0.7], "ab")

    def tensors(name):
        return {n.removeprefix("base_model.model.").replace(f".ia3_l.{name}", ".ia3_l"): p.detach().clone()
                for n, p in m.named_parameters() if n.endswith(f".ia3_l.{name}")}

    ours_cfg = IA3Config(targets=["k", "v", "o", "ffn_out"], feedforward=["o", "ffn_out"])
    got = get_method("ia3").combine(CombineRequest(states=[tensors("a"), tensors("b")], weights=[0.3, 0.7],
                                                   how="weighted", cfgs=[ours_cfg, ours_cfg], runs=["a", "b"],
                                                   method="ia3"))
    theirs = tensors("ab")
    assert len(theirs) == 8 and all(torch.equal(got.state[k], t) for k, t in theirs.items())


def test_every_method_can_combine_or_says_why_not():
    for name, spec in all_methods().items():
        assert (spec.combine is None) == (not spec.combine_hows), name
        assert spec.combine is not None or spec.combine_refusal, f"{name}: no combine hook and no reason"


# ------------------------------------------------------------------------------- 2. the command


def train_run(root: Path, name: str, model_dir, data, method: dict, seed: int = 0, **data_kw) -> Path:
    recipe = write_recipe(
        root / f"{name}.yaml",
        model={"name": str(model_dir)},
        data={"source": str(data), "text_column": "sentence", "eval_size": 12, "max_length": 32, **data_kw},
        method=method,
        train={"epochs": 1, "batch_size": 16, "lr": 5e-3, "progress": False, "seed": seed, "num_threads": 1},
        output={"dir": str(root / name), "plot": False},
    )
    res = invoke("train", recipe)
    assert res.exit_code == 0, res.output
    return root / name


def sibling(run: Path, dest: Path, seed: int) -> Path:
    """A copy of `run` with every adapter tensor moved: a second "trained" run, without training."""
    shutil.copytree(run, dest)
    f = dest / "adapter" / "adapter.safetensors"
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in load_file(str(f)).items()}
    save_file(sd, str(f), metadata={"format": "pt"})
    rec = yaml.safe_load((dest / "recipe.yaml").read_text())
    rec["output"]["dir"] = str(dest)
    (dest / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def lora_runs(tiny_bert_dir, tiny_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    a = train_run(root, "a", tiny_bert_dir, tiny_csv, {"name": "lora", "r": 4, "targets": ["q", "v"]})
    return root, a, sibling(a, root / "b", 1)


@pytest.mark.slow
def test_combined_run_is_an_ordinary_run(lora_runs, tmp_path):
    root, a, b = lora_runs
    dest = tmp_path / "ab"
    res = invoke("combine", a, b, "--weights", "0.5,0.5", "--how", "cat", dest)
    assert res.exit_code == 0, res.output
    assert "method.r: 4 → 8" in res.output and "task head, labels and data section from" in res.output
    rec = yaml.safe_load((dest / "recipe.yaml").read_text())
    assert rec["method"]["r"] == 8 and rec["method"]["alpha"] == 8 and rec["output"]["dir"] == str(dest)
    meta = json.loads((dest / "adapter" / "meta.json").read_text())
    assert meta["combine"]["how"] == "cat" and meta["combine"]["runs"] == [str(a), str(b)]
    assert json.loads((dest / ".peftcli.json").read_text())["kind"] == "combine"
    # the head is run a's, untouched
    head = {k: v for k, v in load_file(str(a / "adapter" / "adapter.safetensors")).items() if k.startswith("classifier")}
    got = load_file(str(dest / "adapter" / "adapter.safetensors"))
    assert head and all(torch.equal(got[k], v) for k, v in head.items())
    for args in (("eval", dest), ("merge", dest, tmp_path / "merged"), ("export", dest, tmp_path / "peft")):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("how", ["cat", "svd", "linear"])
def test_weights_that_overflow_are_refused_and_nothing_is_written(lora_runs, tmp_path, how):
    """1e308 is a finite float64 but not a float32: the scaled adapter would be inf. Exit 2 naming
    the weights, for every rule (svd included: no raw linalg error), and no DEST."""
    root, a, b = lora_runs
    dest = tmp_path / "overflow"
    res = invoke("combine", a, b, "--weights", "1e308,1e308", "--how", how, dest)
    assert res.exit_code == 2, res.output
    assert "--weights 1e+308,1e+308" in res.output and "not a finite number" in res.output
    assert "linalg" not in res.output and "Traceback" not in res.output
    assert not dest.exists() and not list(tmp_path.glob(".overflow*"))


def test_a_non_finite_combined_tensor_is_never_written():
    from peftcli.commands.combine import CombineError, _check_finite_result

    _check_finite_result({"a": torch.ones(2), "labels": torch.tensor([1, 2])}, [0.5, 0.5])
    with pytest.raises(CombineError, match="--weights 3e\\+38,3e\\+38: the combined adapter's a is not finite"):
        _check_finite_result({"a": torch.tensor([1.0, float("inf")])}, [3e38, 3e38])


def test_head_from_picks_the_head_and_the_task(lora_runs, tmp_path):
    root, a, b = lora_runs
    res = invoke("combine", a, b, "--how", "ties", "--density", "0.5", "--majority-sign", "frequency",
                 "--head-from", b, tmp_path / "ab")
    assert res.exit_code == 0, res.output
    head_b = {k: v for k, v in load_file(str(b / "adapter" / "adapter.safetensors")).items() if k.startswith("classifier")}
    got = load_file(str(tmp_path / "ab" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in head_b.items())
    meta = json.loads((tmp_path / "ab" / "adapter" / "meta.json").read_text())
    assert meta["combine"]["weights"] == [0.5, 0.5] and meta["combine"]["head_from"] == str(b)


def test_a_head_with_more_classes_than_the_default(tiny_gpt2_dir, tmp_path):
    """Runs whose recipe leaves model.num_labels to the data (3 classes here) keep their head."""
    import csv

    data = tmp_path / "three.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for i in range(48):
            w.writerow([f"the film was {['great', 'bad', 'fine'][i % 3]} {i}", ["pos", "neg", "neu"][i % 3]])
    a = train_run(tmp_path, "a", tiny_gpt2_dir, data, {"name": "lora", "r": 4})
    b = sibling(a, tmp_path / "b", 8)
    assert invoke("combine", a, b, "--how", "linear", tmp_path / "ab").exit_code == 0
    got = load_file(str(tmp_path / "ab" / "adapter" / "adapter.safetensors"))
    assert got["score.weight"].shape[0] == 3
    assert json.loads((tmp_path / "ab" / "adapter" / "meta.json").read_text())["label_names"] == ["neg", "neu", "pos"]
    assert invoke("eval", tmp_path / "ab").exit_code == 0


def test_dare_is_reproducible_with_its_seed(lora_runs, tmp_path):
    _, a, b = lora_runs
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        res = invoke("combine", a, b, "--weights", "1,-1", "--how", "dare_linear", "--density", "0.5",
                     "--seed", seed, tmp_path / f"d{i}")
        assert res.exit_code == 0, res.output
        outs.append(load_file(str(tmp_path / f"d{i}" / "adapter" / "adapter.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0] if "lora_" in k)


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    {"name": "ia3"}, {"name": "pfeiffer", "reduction_factor": 8}, {"name": "krona"},
    {"name": "compacter", "bottleneck_size": 8},
])
def test_weighted_averaging_methods(method, tiny_bert_dir, tiny_csv, tmp_path):
    a = train_run(tmp_path, "a", tiny_bert_dir, tiny_csv, method)
    b = sibling(a, tmp_path / "b", 2)
    res = invoke("combine", a, b, "--weights", "0.25,0.75", "--how", "weighted", tmp_path / "ab")
    assert res.exit_code == 0, res.output
    sa, sb = (load_file(str(r / "adapter" / "adapter.safetensors")) for r in (a, b))
    got = load_file(str(tmp_path / "ab" / "adapter" / "adapter.safetensors"))
    for k, v in got.items():
        want = sa[k] if k.startswith("classifier") else 0.25 * sa[k] + 0.75 * sb[k]
        torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-6)
    assert invoke("eval", tmp_path / "ab").exit_code == 0
    res = invoke("combine", a, b, "--how", "linear", tmp_path / "x")
    assert res.exit_code == 2 and f"{method['name']} adapters combine by weighted" in res.output


def test_one_run_negated(lora_runs, tmp_path):
    """Task negation: weight -1 on one LoRA run gives the update -s·B A (linear puts the sign on A)."""
    _, a, _ = lora_runs
    res = invoke("combine", a, "--weights", "-1", "--how", "linear", tmp_path / "neg")
    assert res.exit_code == 0 and "−1 × " in res.output, res.output
    src = load_file(str(a / "adapter" / "adapter.safetensors"))
    got = load_file(str(tmp_path / "neg" / "adapter" / "adapter.safetensors"))
    mod = "bert.encoder.layer.1.attention.self.value"
    torch.testing.assert_close(_delta(got, mod, 1.0), -_delta(src, mod, 16 / 4), atol=1e-5, rtol=1e-5)


def test_dora_runs_read_the_base_norms_when_weights_do_not_sum_to_one(tiny_bert_dir, tiny_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    a = train_run(tmp_path, "a", tiny_bert_dir, tiny_csv, {"name": "lora", "r": 4, "use_dora": True})
    b = sibling(a, tmp_path / "b", 6)
    res = invoke("combine", a, b, "--weights", "1,-0.5", "--how", "cat", tmp_path / "ab")
    assert res.exit_code == 0, res.output
    mod = "bert.encoder.layer.0.attention.self.query"
    norm = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).get_submodule(mod).weight.norm(dim=1)
    key = f"{mod}.lora_magnitude_vector"
    ma, mb = (load_file(str(r / "adapter" / "adapter.safetensors"))[key] for r in (a, b))
    got = load_file(str(tmp_path / "ab" / "adapter" / "adapter.safetensors"))[key]
    torch.testing.assert_close(got, ma - 0.5 * mb + 0.5 * norm, atol=1e-6, rtol=1e-6)
    assert invoke("eval", tmp_path / "ab").exit_code == 0


def test_causal_lm_runs_combine_and_generate(tiny_gpt2_dir, tiny_csv, tmp_path):
    """No task head on a causal LM: the combined run is all adapter, and `generate` takes it."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name": str(tiny_gpt2_dir), "task": "causal_lm"},
        data={"source": str(tiny_csv), "prompt_column": "prompt", "response_column": "response",
              "train_size": 16, "eval_size": 8, "max_length": 32},
        method={"name": "lora", "r": 4, "targets": ["q", "v", "ffn_out"]},
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False, "device": "cpu"},
        output={"dir": str(tmp_path / "a"), "plot": False},
    )
    assert invoke("train", recipe).exit_code == 0
    a = tmp_path / "a"
    b = sibling(a, tmp_path / "b", 7)
    res = invoke("combine", a, b, "--weights", "0.6,0.4", "--how", "svd", "--rank", "3", tmp_path / "ab")
    assert res.exit_code == 0 and "task head" not in res.output, res.output
    res = invoke("generate", tmp_path / "ab", "review: the film was great", "--max-new-tokens", "3", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert invoke("export", tmp_path / "ab", tmp_path / "peft").exit_code == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_qlora_runs_combine_without_cuda(lora_runs, tmp_path):
    """A 4-bit base loads only on CUDA; the combined tensors are then checked on the meta device."""
    _, a, b = lora_runs
    runs = []
    for r in (a, b):
        q = shutil.copytree(r, tmp_path / f"q{r.name}")
        rec = yaml.safe_load((q / "recipe.yaml").read_text())
        rec["model"]["quantization"] = "nf4"
        (q / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
        runs.append(q)
    res = invoke("combine", *runs, "--how", "svd", "--rank", "2", tmp_path / "q")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "q" / "recipe.yaml").read_text())["model"]["quantization"] == "nf4"


def _edit_recipe(run: Path, **method) -> None:
    rec = yaml.safe_load((run / "recipe.yaml").read_text())
    rec["method"].update(method)
    (run / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))


@pytest.mark.slow
def test_refusals_name_the_problem_and_write_nothing(lora_runs, tiny_bert_dir, tiny_csv, tmp_path):
    root, a, b = lora_runs
    dest = tmp_path / "out"

    def refused(*args, match: str) -> None:
        res = invoke("combine", *args)
        assert res.exit_code == 2, res.output
        assert match in " ".join(res.output.split()), res.output
        assert not dest.exists()

    refused(a, b, "--how", "ties", dest, match="give --density")
    refused(a, b, "--how", "linear", "--density", "0.5", dest, match="--density applies to ties")
    refused(a, b, "--how", "cat", "--rank", "2", dest, match="--rank applies to svd")
    refused(a, b, "--how", "svd", "--rank", "99", dest, match="--rank 99 exceeds")
    refused(a, b, "--how", "nonsense", dest, match="lora adapters combine by linear, cat, svd")
    refused(a, b, "--weights", "1", "--how", "linear", dest, match="gives 1 weight(s) for 2 run(s)")
    refused(a, b, "--weights", "0,0", "--how", "linear", dest, match="all zero")
    refused(a, b, "--how", "cat", "--head-from", tmp_path, dest, match="--head-from")
    refused(a, dest, match="no --how")

    r8 = sibling(a, tmp_path / "r8", 3)
    sd = load_file(str(r8 / "adapter" / "adapter.safetensors"))
    sd = {k: (torch.cat([v, v]) if "lora_A" in k else torch.cat([v, v], 1) if "lora_B" in k else v) for k, v in sd.items()}
    save_file(sd, str(r8 / "adapter" / "adapter.safetensors"))
    _edit_recipe(r8, r=8)
    refused(a, r8, "--how", "linear", dest, match="needs one rank")
    assert invoke("combine", a, r8, "--how", "cat", tmp_path / "cat").exit_code == 0
    # A recipe edited after training (r 8 -> 4) no longer describes its tensors: refused, as export refuses it.
    edited = sibling(a, tmp_path / "edited", 5)
    _edit_recipe(edited, r=8)
    refused(a, edited, "--how", "cat", dest, match="the recipe was changed after training")

    k_run = train_run(tmp_path, "k", tiny_bert_dir, tiny_csv, {"name": "lora", "r": 4, "targets": ["q", "k"]})
    refused(a, k_run, "--how", "linear", dest, match="the runs adapt different modules")
    ia3 = train_run(tmp_path, "ia3", tiny_bert_dir, tiny_csv, {"name": "ia3"})
    refused(a, ia3, "--how", "linear", dest, match="only adapters of one method combine")

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_bert_dir, other_base)
    moved = sibling(a, tmp_path / "moved", 4)
    rec = yaml.safe_load((moved / "recipe.yaml").read_text())
    rec["model"]["name"] = str(other_base)
    (moved / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    meta = json.loads((moved / "adapter" / "meta.json").read_text())
    meta["base_model"] = str(other_base)
    (moved / "adapter" / "meta.json").write_text(json.dumps(meta))
    refused(a, moved, "--how", "linear", dest, match="adapters of different base models do not combine")

    dora = sibling(a, tmp_path / "dora", 5)
    _edit_recipe(dora, use_dora=True)
    refused(a, dora, "--how", "linear", dest, match="magnitude vector has no counterpart in plain LoRA")

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    rec = yaml.safe_load((a / "recipe.yaml").read_text())
    rec["method"] = {"name": "prefix"}
    (prefix / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    refused(a, prefix, "--how", "linear", dest, match="method 'prefix' cannot be combined: prefixes of different runs")


def test_dest_that_peftcli_did_not_write_is_never_replaced(lora_runs, tmp_path):
    _, a, b = lora_runs
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    res = invoke("combine", a, b, "--how", "linear", dest, "--force")
    assert res.exit_code == 2 and "not a folder peftcli wrote" in " ".join(res.output.split())
    assert (dest / "notes.txt").read_text() == "keep me" and len(list(dest.iterdir())) == 1
    res = invoke("combine", a, b, "--how", "linear", a / "inside")
    assert res.exit_code == 2 and "inside" in res.output
    ok = tmp_path / "ok"
    assert invoke("combine", a, b, "--how", "linear", ok).exit_code == 0
    assert invoke("combine", a, b, "--how", "linear", ok).exit_code == 2  # exists: needs --force
    assert invoke("combine", a, b, "--how", "svd", ok, "--force").exit_code == 0
    assert json.loads((ok / "adapter" / "meta.json").read_text())["combine"]["how"] == "svd"


def test_copy_of_a_run_is_no_different_run(lora_runs, tmp_path):
    """The same run twice with weights summing to 1 (linear on one rank) is that run: a sanity
    check of the whole path, head and tensors through load_run."""
    from peftcli.runs.load import load_run

    _, a, _ = lora_runs
    assert invoke("combine", a, a, "--weights", "0.5,0.5", "--how", "cat", tmp_path / "aa").exit_code == 0
    x, _ = load_run(a, torch.device("cpu"))
    y, _ = load_run(tmp_path / "aa", torch.device("cpu"))
    ids = x.tokenizer(["the film was great today"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(x.model.eval()(**ids).logits, y.model.eval()(**ids).logits, atol=1e-5, rtol=1e-5)
