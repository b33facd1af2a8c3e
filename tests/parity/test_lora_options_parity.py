"""LoRA's options against HF PEFT 0.21: PiSSA / OLoRA starts tensor for tensor, same weights ->
same logits with rank / alpha patterns, LoRA-FA and PiSSA, PEFT folders both ways (PiSSA written
as PEFT's converted LoRA and loaded on the untouched base), and one LoRA+ optimizer step."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import batch, tiny_model
from helpers.adapter_runs import randomize, spread

from peftcli.config.recipe import recipe_from_dict
from peftcli.core.peft_layout import PeftFormatError
from peftcli.methods.attach import attach_method
from peftcli.methods.lora import LoraConfig, export_state, lora_modules, take_starts
from peftcli.runs.peft_format import export_model, load_peft_weights, method_from_peft
from peftcli.training.optim import lora_plus_groups

peft = pytest.importorskip("peft")

KINDS = ["bert", "gpt2", "llama"]
# HF module names, only here: what a PEFT user writes. Ours are roles q, v, ffn_out.
NAMES = {"bert": dict(q="query", v="value", f="output.dense"),
         "gpt2": dict(q="c_attn", v="c_attn", f="mlp.c_proj"),
         "llama": dict(q="q_proj", v="v_proj", f="down_proj")}
# A module pattern both sides read the same way: layer 1's query (GPT-2: its fused c_attn).
LAYER1_Q = {"bert": r"layer\.1\.attention\.self\.query", "gpt2": r"h\.1\.attn\.c_attn",
            "llama": r"layers\.1\.self_attn\.q_proj"}


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def base(kind: str, task: str = "classification"):
    m = tiny_model(kind, task)
    spread(m)
    return m


def peft_config(kind: str, ours: LoraConfig, task: str = "classification", **extra):
    """PEFT's config for our LoRA on targets q, v and ffn_out (GPT-2: c_attn and mlp.c_proj)."""
    n = NAMES[kind]
    targets = sorted({n["q"], n["v"], n["f"]})
    if kind == "bert":  # PEFT's suffix "output.dense" would also take the attention output (o)
        targets = r".*\.(query|value)|.*layer\.\d+\.output\.dense"
    ranks = {_peft_key(kind, k): v for k, v in ours.rank_pattern.items()}
    alphas = {_peft_key(kind, k): v for k, v in ours.alpha_pattern.items()}
    init = {"default": True}.get(ours.init, ours.init)
    return peft.LoraConfig(task_type={"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}[task], r=ours.r,
                           lora_alpha=ours.alpha, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                           init_lora_weights=init, use_rslora=ours.rslora, fan_in_fan_out=kind == "gpt2", **extra)


def _peft_key(kind: str, key: str) -> str:
    if kind == "bert" and key == "ffn_out":
        return r"layer\.\d+\.output\.dense"
    return {"q": NAMES[kind]["q"], "v": NAMES[kind]["v"], "ffn_out": NAMES[kind]["f"]}.get(key, key)


def ours_and_peft(kind: str, cfg: LoraConfig, task: str = "classification"):
    m = base(kind, task)
    ref = copy.deepcopy(m)
    arch, spec = attach_method(m, "lora", cfg)
    take_starts(m, arch, cfg)
    pm = quiet(peft.get_peft_model, ref, peft_config(kind, cfg, task))
    return m, arch, spec, pm


def pairs(ours, pm):
    """(our tensor, PEFT's) for every adapter tensor, head and base weight of one name."""
    mine = dict(ours.named_parameters())
    for name, p in pm.named_parameters():
        key = name.replace("base_model.model.", "").replace(".modules_to_save.default", "").replace(".default", "")
        key = key.replace(".base_layer.", ".base.")
        if key in mine and "original_module" not in name:
            yield key, mine[key], p


def copy_into_peft(ours, pm) -> None:
    with torch.no_grad():
        for _, mine, theirs in pairs(ours, pm):
            theirs.copy_(mine)


def logits(model, b):
    with torch.no_grad():
        return quiet(model.eval(), **b).logits


def padded():
    b = batch(pad_last=2)
    b["input_ids"][b["attention_mask"] == 0] = 0
    return b


# ------------------------------------------------------------------------------ the starts


@pytest.mark.parametrize("kind,init", [("bert", "pissa"), ("bert", "olora"), ("llama", "pissa"), ("llama", "olora"),
                                       ("gpt2", "pissa")])
def test_starts_equal_peft_tensor_for_tensor_base_residual_included(kind, init):
    ours, _, _, pm = ours_and_peft(kind, LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], init=init))
    seen = [k for k, mine, theirs in pairs(ours, pm) if torch.equal(mine, theirs) or pytest.fail(k)]
    assert sum(k.endswith(("lora_A.weight", "lora_B.weight")) for k in seen) == 2 * len(lora_modules(ours))
    assert sum(k.endswith("base.weight") for k in seen) == len(lora_modules(ours))


def test_randomized_pissa_start_equals_peft_from_the_same_random_state():
    cfg = LoraConfig(r=3, alpha=6, targets=["q", "v"], init="pissa_niter_2")
    ours = base("llama")
    pm = quiet(peft.get_peft_model, copy.deepcopy(ours), peft_config("llama", LoraConfig(r=3, alpha=6)))
    attach_method(ours, "lora", cfg)
    layers = {n.replace("base_model.model.", ""): m for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    for n, m in lora_modules(ours):
        torch.manual_seed(5)
        m.take_start()
        torch.manual_seed(5)
        layers[n].pissa_init("default", "pissa_niter_2")
        assert torch.equal(m.lora_A.weight, layers[n].lora_A["default"].weight)
        assert torch.equal(m.lora_B.weight, layers[n].lora_B["default"].weight)
        assert torch.equal(m.base.weight, layers[n].base_layer.weight)


def test_peft_olora_on_gpt2_conv1d_decomposes_the_stored_transpose_ours_keeps_the_model():
    """PEFT's olora_init ignores fan_in_fan_out: on GPT-2's c_attn ((in, out) = (32, 96)) its A and B
    come out (4, 96) and (32, 4), and the model no longer runs. Ours decomposes the dense (out, in) weight."""
    m = base("gpt2")
    b = padded()
    before = logits(m, b)
    pm = quiet(peft.get_peft_model, copy.deepcopy(m), peft_config("gpt2", LoraConfig(r=4, init="olora")))
    with pytest.raises(RuntimeError):
        logits(pm, b)
    cfg = LoraConfig(r=4, targets=["q", "v", "ffn_out"], init="olora")
    arch, _ = attach_method(m, "lora", cfg)
    take_starts(m, arch, cfg)
    torch.testing.assert_close(logits(m, b), before, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ same weights, same logits


OPTIONS = {
    "patterns": LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], rank_pattern={"ffn_out": 2, "LAYER1_Q": 6},
                           alpha_pattern={"v": 3, "LAYER1_Q": 20}),
    "freeze_a": LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], freeze_a=True, init="gaussian"),
    "pissa": LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], init="pissa", rank_pattern={"v": 2}),
    "olora": LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], init="olora", rslora=True),
}


def option(name: str, kind: str) -> LoraConfig:
    cfg = copy.deepcopy(OPTIONS[name])
    fix = {"LAYER1_Q": LAYER1_Q[kind]}
    cfg.rank_pattern = {fix.get(k, k): v for k, v in cfg.rank_pattern.items()}
    cfg.alpha_pattern = {fix.get(k, k): v for k, v in cfg.alpha_pattern.items()}
    if kind == "gpt2":  # c_attn is q and v at once: a pattern on v alone would name it twice
        cfg.rank_pattern.pop("v", None)
        cfg.alpha_pattern.pop("v", None)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind,name", [(k, n) for k in KINDS for n in OPTIONS
                                       if (k, n) != ("gpt2", "olora")])  # PEFT's OLoRA fails there (above)
def test_same_weights_same_logits(kind, name):
    cfg = option(name, kind)
    ours, _, _, pm = ours_and_peft(kind, cfg)
    randomize(ours)
    copy_into_peft(ours, pm)
    b = padded()
    torch.testing.assert_close(logits(ours, b), logits(pm, b), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ PEFT folders both ways


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("kind,task", [("bert", "classification"),
                                       pytest.param("gpt2", "causal_lm", marks=pytest.mark.slow),
                                       ("llama", "causal_lm")])
def test_export_loads_in_peft_on_the_untouched_base(kind, task, name, tmp_path):
    cfg = option(name, kind)
    model = base(kind, task)
    untouched = copy.deepcopy(model)
    r = recipe_from_dict({"model": {"name": "tiny/model", "task": task}, "method": {"name": "lora", **vars(cfg)}})
    arch, spec = attach_method(model, "lora", r.method)
    take_starts(model, arch, r.method)
    randomize(model)
    export_model(model, arch, spec, r, export_state(model, arch, r.method), tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] in (True, "gaussian")
    if name == "pissa":  # PEFT's conversion: rank 2r, alpha 2·alpha, the v pattern doubled too
        assert written["r"] == 8 and written["lora_alpha"] == 16
        assert list(written["rank_pattern"].values()) == ([] if kind == "gpt2" else [4])
    pm = quiet(peft.PeftModel.from_pretrained, untouched, str(tmp_path))
    b = padded()
    torch.testing.assert_close(logits(model, b), logits(pm, b), atol=1e-5, rtol=1e-5)


def _peft_made(kind: str, cfg: LoraConfig, folder, *, convert: bool = False, task: str = "classification"):
    """A PEFT adapter with `cfg`'s options and trained-looking weights; returns its model's logits
    and the folder."""
    m = base(kind, task)
    untouched = copy.deepcopy(m)
    pm = quiet(peft.get_peft_model, m, peft_config(kind, cfg, task))
    if convert:
        pm.peft_config["default"].init_lora_weights = True
        quiet(pm.save_pretrained, str(folder / "initial"))
        pm.peft_config["default"].init_lora_weights = cfg.init
    randomize(pm, 3, 0.2)
    want = logits(pm, padded())
    kw = {"path_initial_model_for_weight_conversion": str(folder / "initial")} if convert else {}
    quiet(pm.save_pretrained, str(folder / "out"), **kw)
    if convert:  # the converted folder is a plain LoRA on the original base
        again = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(untouched), str(folder / "out"))
        torch.testing.assert_close(logits(again, padded()), want, atol=1e-5, rtol=1e-5)
    return want, folder / "out"


@pytest.mark.parametrize("name,convert", [("patterns", False), ("pissa", False), ("pissa", True), ("olora", False)])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_made_adapters_load_with_init_from(kind, name, convert, tmp_path):
    # PEFT 0.21's conversion fails on a model with modules_to_save (a classifier head): causal LM there
    task = "causal_lm" if convert else "classification"
    want, folder = _peft_made(kind, option(name, kind), tmp_path, convert=convert, task=task)
    block = method_from_peft(json.loads((folder / "adapter_config.json").read_text()))
    assert block.get("init", "default") == ("default" if convert else option(name, kind).init)
    r = recipe_from_dict({"model": {"name": "tiny/model", "task": task}, "method": block})
    model = base(kind, task)
    arch, spec = attach_method(model, "lora", r.method)
    load_peft_weights(model, arch, spec, r, folder)
    torch.testing.assert_close(logits(model, padded()), want, atol=1e-5, rtol=1e-5)


def test_randomized_pissa_folder_is_refused_with_the_conversion_to_ask_for(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"], init="pissa_niter_2")
    _, folder = _peft_made("bert", cfg, tmp_path)
    r = recipe_from_dict({"model": {"name": "tiny/model"}, "method": {"name": "lora", **vars(cfg)}})
    model = base("bert")
    arch, spec = attach_method(model, "lora", r.method)
    with pytest.raises(PeftFormatError, match="path_initial_model_for_weight_conversion"):
        load_peft_weights(model, arch, spec, r, folder)


# ------------------------------------------------------------------------------ LoRA+


def test_lora_plus_step_equals_peft_create_loraplus_optimizer():
    from peft.optimizers import create_loraplus_optimizer

    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"])
    ours, _, _, pm = ours_and_peft("bert", cfg)
    randomize(ours)
    copy_into_peft(ours, pm)
    opt_ours = torch.optim.AdamW(lora_plus_groups(ours, 1e-2, 16.0, 0.1, "lora"), lr=1e-2)
    opt_peft = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0,
                                         loraplus_weight_decay=0.1)
    b = padded()
    for model, opt in ((ours, opt_ours), (pm, opt_peft)):
        model.train()
        for _ in range(2):
            opt.zero_grad()
            quiet(model, **b).logits.square().mean().backward()
            opt.step()
    moved = 0
    for key, mine, theirs in pairs(ours, pm):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=key)
        moved += mine.requires_grad
    assert moved == 2 * len(lora_modules(ours)) + 2


# ------------------------------------------------------------------------------ the commands end to end


@pytest.mark.slow
@pytest.mark.parametrize("init,freeze_a", [("pissa", False), ("olora", True)])
def test_cli_train_merge_export_import_a_moved_base_run(init, freeze_a, tmp_path, tiny_bert_dir, tiny_csv):
    """train (the start taken before step 1) -> merge prints <= 1e-5 -> export loads in PEFT on the
    untouched base with the run's logits -> import-peft of that folder gives the same logits."""
    import re

    from conftest import write_recipe
    from helpers.adapter_runs import run_logits, text_batch
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from peftcli.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir), "task": "classification"},
        data={"source": str(tiny_csv), "text_column": "sentence", "max_length": 32},
        method={"name": "lora", "r": 4, "alpha": 8, "init": init, "targets": ["q", "v"], "rank_pattern": {"v": 2},
                "freeze_a": freeze_a},
        train={"max_steps": 3, "batch_size": 8, "lr": 1e-2, "lora_plus_ratio": 4, "progress": False},
        output={"dir": str(run), "plot": False})
    res = runner.invoke(app, ["train", recipe])
    assert res.exit_code == 0, res.output
    from peftcli.core.adapter_files import read_adapter

    saved, _ = read_adapter(run / "adapter")
    starts = [v for k, v in saved.items() if k.endswith(".lora_A0")]
    assert len(starts) == 4 and all(bool(v.abs().sum() > 0) for v in starts)  # the start was taken
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    diff = float(re.search(r"merged\)\|.*?: ([0-9.e+-]+)", res.output).group(1))
    assert diff <= 1e-5
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    b = text_batch(tiny_bert_dir)
    ours = run_logits(run, b)
    untouched = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    theirs = logits(quiet(peft.PeftModel.from_pretrained, untouched, str(tmp_path / "peft")), b)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    res = runner.invoke(app, ["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported")])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(run_logits(tmp_path / "imported", b), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_cli_import_peft_of_an_unconverted_pissa_folder_stores_the_start(tmp_path, tiny_bert_dir):
    """PEFT saved a PiSSA adapter as trained (init_lora_weights: pissa): import-peft decomposes the
    named base as PEFT's from_pretrained does, keeps that start in the run, and eval-style loading
    then rebuilds the same model."""
    from helpers.adapter_runs import run_logits, text_batch
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from peftcli.cli import app
    from peftcli.core.adapter_files import read_adapter

    base_model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    pm = quiet(peft.get_peft_model, base_model, peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa"))
    randomize(pm, 3, 0.2)
    quiet(pm.save_pretrained, str(tmp_path / "peft"))
    b = text_batch(tiny_bert_dir)
    want = logits(pm, b)
    res = CliRunner().invoke(app, ["import-peft", str(tmp_path / "peft"), str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    saved, _ = read_adapter(tmp_path / "run" / "adapter")
    assert sum(k.endswith(".lora_A0") for k in saved) == 4
    torch.testing.assert_close(run_logits(tmp_path / "run", b), want, atol=1e-5, rtol=1e-5)
