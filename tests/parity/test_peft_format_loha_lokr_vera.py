"""HF PEFT's LOHA, LOKR and VERA folders both ways, with PEFT itself as the oracle.

As tests/parity/test_peft_format.py: our export loads in PeftModel.from_pretrained on a fresh base
with the same logits, and a folder PEFT made (get_peft_model + random weights + save_pretrained)
loads through `load_peft_weights` (what `init_from:` and `import-peft` call) with the same logits.
GPT-2's Conv1D layers are refused by PEFT's LoHa and LoKr, so such an export is refused with that
reason; VeRA takes them.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import batch, tiny_model
from helpers.adapter_runs import make_run_on_data, randomize, run_logits, text_batch
from test_peft_format import compare, peft_load, recipe_for
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.core.peft_layout import PeftFormatError
from peftcli.methods.attach import attach_method
from peftcli.runs.checkpoint import adapter_state
from peftcli.runs.peft_format import export_model, load_peft_weights, read_peft_folder

peft = pytest.importorskip("peft")
runner = CliRunner()

METHODS = {
    "loha": {"name": "loha", "r": 4, "alpha": 6, "targets": ["q", "v", "ffn_out"]},
    "lokr": {"name": "lokr", "r": 2, "alpha": 4, "targets": ["q", "k", "v", "o"]},
    "lokr_both": {"name": "lokr", "r": 2, "decompose_both": True, "decompose_factor": 16, "targets": ["all-linear"]},
    "vera": {"name": "vera", "r": 16, "projection_prng_key": 5, "targets": ["q", "v", "ffn_in"]},
    "vera_regenerated": {"name": "vera", "r": 8, "save_projection": False, "targets": ["q", "v"]},
}
SETTINGS = [("bert", "classification"), ("llama", "classification"), ("llama", "causal_lm"),
            ("gpt2", "classification"), ("gpt2", "causal_lm")]
LINEAR_ONLY = ("loha", "lokr")  # PEFT's LyCORIS types: nn.Linear, not GPT-2's Conv1D


def adapted(kind: str, task: str, method: str):
    r = recipe_for(task, METHODS[method])
    model = tiny_model(kind, task)
    arch, spec = attach_method(model, r.method_name, r.method)
    randomize(model)
    return r, model.eval(), arch, spec


FAST = {("bert", "classification", "loha"), ("gpt2", "classification", "loha"), ("llama", "causal_lm", "lokr"),
        ("llama", "classification", "lokr_both"), ("gpt2", "causal_lm", "vera"), ("bert", "classification", "vera_regenerated")}
EXPORTS = [pytest.param(kind, task, method, marks=() if (kind, task, method) in FAST else pytest.mark.slow)
           for kind, task in SETTINGS for method in METHODS]


@pytest.mark.parametrize("kind,task,method", EXPORTS)
def test_export_loads_in_peft_with_same_logits(kind, task, method, tmp_path):
    r, model, arch, spec = adapted(kind, task, method)
    sd = adapter_state(model, spec, arch, r.method)
    if kind == "gpt2" and r.method_name in LINEAR_ONLY:
        with pytest.raises(PeftFormatError, match="nn.Linear layers only.*Conv1D"):
            export_model(model, arch, spec, r, sd, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    b = batch()
    with torch.no_grad():
        ours = model(**b).logits
        plain = tiny_model(kind, task)(**b).logits
    assert (ours - plain).abs().max() > 1e-3
    export_model(model, arch, spec, r, sd, tmp_path)
    cfg, peft_sd = read_peft_folder(tmp_path)
    assert cfg["peft_type"] == r.method_name.upper()
    assert ("base_model.vera_A" in peft_sd) == (method == "vera")
    with torch.no_grad():
        theirs = peft_load(tiny_model(kind, task), tmp_path)(**b).logits
    assert compare(ours, theirs, b, task) < 1e-5


def _peft_config(kind: str, task: str, method: str):
    """PEFT's config for the adapter METHODS[method] describes (module names as PEFT users write them)."""
    tt = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    names = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "up_proj"],
             "gpt2": ["c_attn", "c_fc"]}[kind]
    ours = {"bert": ["q", "v", "ffn_in"], "llama": ["q", "v", "up_proj"], "gpt2": ["q", "ffn_in"]}[kind]
    if method == "loha":
        return peft.LoHaConfig(task_type=tt, r=4, alpha=6, target_modules=names), {"name": "loha", "r": 4, "alpha": 6.0}, ours
    if method == "lokr":
        return (peft.LoKrConfig(task_type=tt, r=2, alpha=4, decompose_both=True, decompose_factor=16,
                                target_modules=names),
                {"name": "lokr", "r": 2, "alpha": 4.0, "decompose_both": True, "decompose_factor": 16}, ours)
    save = method == "vera"
    return (peft.VeraConfig(task_type=tt, r=8, projection_prng_key=9, save_projection=save, target_modules=names),
            {"name": "vera", "r": 8, "projection_prng_key": 9, "save_projection": save}, ours)


def make_peft_folder(kind: str, task: str, method: str, folder):
    pc, block, targets = _peft_config(kind, task, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_model(kind, task), pc)
    randomize(pm, seed=5)
    pm.eval().save_pretrained(str(folder))
    return pm, {**block, "targets": targets}


# PEFT's LoHa and LoKr refuse GPT-2's Conv1D, so PEFT makes no such folder on GPT-2.
IMPORTS = [pytest.param(kind, task, method, marks=() if (kind, method) in {("bert", "loha"), ("llama", "lokr"),
                                                                            ("gpt2", "vera")} else pytest.mark.slow)
           for kind, task in [("bert", "classification"), ("llama", "causal_lm"), ("gpt2", "causal_lm")]
           for method in ("loha", "lokr", "vera", "vera_regenerated") if kind != "gpt2" or method not in LINEAR_ONLY]


@pytest.mark.filterwarnings("ignore:Specified to not save vera_A")
@pytest.mark.parametrize("kind,task,method", IMPORTS)
def test_peft_adapter_loads_with_same_logits(kind, task, method, tmp_path):
    pm, block = make_peft_folder(kind, task, method, tmp_path)
    b = batch()
    with torch.no_grad():
        theirs = pm(**b).logits
    r = recipe_for(task, block)
    model = tiny_model(kind, task)
    arch, spec = attach_method(model, r.method_name, r.method)
    load_peft_weights(model, arch, spec, r, tmp_path)
    with torch.no_grad():
        ours = model.eval()(**b).logits
    assert compare(ours, theirs, b, task) < 1e-5


def test_vera_projection_in_the_folder_is_the_one_used(tmp_path):
    """A folder's saved A and B win over the key: PEFT loads them rather than regenerating."""
    from safetensors.torch import save_file

    pm, block = make_peft_folder("bert", "classification", "vera", tmp_path)
    cfg, sd = read_peft_folder(tmp_path)
    sd["base_model.vera_A"] = sd["base_model.vera_A"] * 1.5
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    b = batch()
    with torch.no_grad():
        theirs = peft_load(tiny_model("bert", "classification"), tmp_path)(**b).logits
    r = recipe_for("classification", block)
    model = tiny_model("bert", "classification")
    arch, spec = attach_method(model, r.method_name, r.method)
    load_peft_weights(model, arch, spec, r, tmp_path)
    with torch.no_grad():
        assert compare(model.eval()(**b).logits, theirs, b, "classification") < 1e-5


@pytest.mark.parametrize("method,recipe_change,message", [
    ("lokr", {"decompose_both": False}, "decompose_both: true but the recipe has method.decompose_both: false"),
    ("lokr", {"r": 4}, "set method.r: 2"),
    ("vera", {"projection_prng_key": 0}, "set method.projection_prng_key: 9"),
    ("vera", {"save_projection": False}, "set method.save_projection: true"),
])
def test_settings_mismatch_names_the_key(method, recipe_change, message, tmp_path):
    _, block = make_peft_folder("bert", "classification", method, tmp_path)
    r = recipe_for("classification", {**block, **recipe_change})
    model = tiny_model("bert", "classification")
    arch, spec = attach_method(model, r.method_name, r.method)
    with pytest.raises(PeftFormatError, match=message):
        load_peft_weights(model, arch, spec, r, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_cli_export_import_round_trip(method, tmp_path, tiny_bert_dir, tiny_csv):
    """A run -> `export --to peft` -> PeftModel (same logits) -> `import-peft` -> a run (same logits),
    its recipe made from adapter_config.json alone."""
    from transformers import AutoModelForSequenceClassification

    run = make_run_on_data(tmp_path, tiny_bert_dir, METHODS[method], tiny_csv)
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == method.upper()
    b = text_batch(tiny_bert_dir)
    ours = run_logits(run, b)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    with torch.no_grad():
        theirs = peft_load(base, tmp_path / "peft")(**b).logits
    assert compare(ours, theirs, b, "classification") < 1e-5
    res = runner.invoke(app, ["import-peft", str(tmp_path / "peft"), str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    assert compare(run_logits(tmp_path / "back", b), theirs, b, "classification") < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_cli_peft_folder_merges_and_trains_on(method, tmp_path, tiny_bert_dir, tiny_csv):
    """A PEFT-made folder -> `peftcli merge` (same logits as PEFT's model) and `init_from:` in a
    recipe (one step at lr 0 keeps PEFT's weights)."""
    from test_peft_format import _peft_folder_on, merges_and_trains_on

    pc, block, targets = _peft_config("bert", "classification", method)
    pm = _peft_folder_on(tiny_bert_dir, tmp_path / "peft", pc)
    b = text_batch(tiny_bert_dir)
    with torch.no_grad():
        theirs = pm(**b).logits
    merges_and_trains_on(tmp_path, tiny_bert_dir, tiny_csv, {**block, "targets": targets}, b, theirs)


@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_exported_config_is_pefts_own(method, tmp_path):
    """Every adapter_config.json key is a field of PEFT's config class (PEFT warns about others)."""
    import dataclasses

    r, model, arch, spec = adapted("bert", "classification", method)
    export_model(model, arch, spec, r, adapter_state(model, spec, arch, r.method), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cls = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "vera": peft.VeraConfig}[method]
    assert set(cfg) <= {f.name for f in dataclasses.fields(cls)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.PeftConfig.from_pretrained(str(tmp_path))
