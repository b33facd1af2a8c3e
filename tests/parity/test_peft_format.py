"""HF PEFT's adapter format both ways, with PEFT itself as the oracle.

Export: random non-zero adapter weights on a tiny model -> our PEFT folder -> PeftModel.from_pretrained
on a fresh copy of the base -> the same logits. Import: PEFT's get_peft_model + random weights +
save_pretrained -> `load_peft_weights` (what `init_from:` calls) -> the same logits. Then the
refusals: methods PEFT lacks, and recipes that describe a different adapter than the folder holds.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import batch, cache_named_for_peft, tiny_model, write_recipe
from helpers.adapter_runs import make_run_on_data, randomize, run_logits, text_batch
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import recipe_from_dict
from peftcli.core.peft_layout import PeftFormatError, shortest_suffixes
from peftcli.methods import all_methods
from peftcli.methods.attach import attach_method
from peftcli.runs.checkpoint import adapter_state
from peftcli.runs.peft_format import (
    export_model,
    export_refusal,
    load_peft_weights,
    read_peft_folder,
)

peft = pytest.importorskip("peft")
runner = CliRunner()

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v", "ffn_out"]},
    "rslora": {"name": "lora", "r": 4, "alpha": 8, "rslora": True, "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]},
    "dora": {"name": "lora", "r": 4, "alpha": 8, "use_dora": True, "targets": ["q", "v", "ffn_in"]},
    "ia3": {"name": "ia3"},
    "prefix": {"name": "prefix", "num_virtual_tokens": 3},
    "prompt": {"name": "prompt", "num_virtual_tokens": 3},
}
SETTINGS = [("bert", "classification"), ("gpt2", "classification"), ("llama", "classification"),
            ("gpt2", "causal_lm"), ("llama", "causal_lm")]


def recipe_for(task: str, method: dict, name: str = "tiny/model"):
    return recipe_from_dict({"model": {"name": name, "task": task}, "method": dict(method)})


def sample(kind: str, task: str, method: str) -> dict:
    # Decoder classifiers under prompt tuning pool differently from PEFT on right-padded rows
    # (PEFT pools a pad position there), so that one case is compared on unpadded rows.
    unpadded = method == "prompt" and kind != "bert" and task == "classification"
    return batch(pad_last=0 if unpadded else 2)


def compare(ours: torch.Tensor, theirs: torch.Tensor, b: dict, task: str) -> float:
    if task == "causal_lm":
        theirs = theirs[:, -ours.shape[1]:]  # PEFT's prompt learning returns logits for the virtual tokens too
        mask = b["attention_mask"].bool()
        ours, theirs = ours[mask], theirs[mask]
    return float((ours - theirs).abs().max() / max(1.0, float(theirs.abs().max())))


def peft_load(base: torch.nn.Module, folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


# ------------------------------------------------------------------------------ export


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind,task", SETTINGS)
def test_export_loads_in_peft_with_same_logits(kind, task, method, tmp_path):
    r = recipe_for(task, METHODS[method])
    model = tiny_model(kind, task)
    b = sample(kind, task, method)
    with torch.no_grad():
        plain = model(**b).logits
    arch, spec = attach_method(model, r.method_name, r.method)
    randomize(model)
    model.eval()
    with torch.no_grad():
        ours = model(**b).logits
    assert (ours[..., :] - plain).abs().max() > 1e-3  # the adapter does something
    export_model(model, arch, spec, r, adapter_state(model, spec, arch, r.method), tmp_path)
    pm = peft_load(cache_named_for_peft(tiny_model(kind, task), task), tmp_path)
    with torch.no_grad():
        theirs = pm(**b).logits
    assert compare(ours, theirs, b, task) < 1e-5


def test_export_ia3_fused_qkv_subset(tmp_path):
    """GPT-2 with IA³ on v only: PEFT scales all of c_attn, so q and k rows are written as 1."""
    r = recipe_for("causal_lm", {"name": "ia3", "targets": ["v", "ffn_out"]})
    model = tiny_model("gpt2", "causal_lm")
    arch, spec = attach_method(model, r.method_name, r.method)
    randomize(model)
    b = batch()
    with torch.no_grad():
        ours = model(**b).logits
    export_model(model, arch, spec, r, adapter_state(model, spec, arch, r.method), tmp_path)
    _, sd = read_peft_folder(tmp_path)
    v = sd["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    assert v.shape == (96, 1) and torch.all(v[:64] == 1) and not torch.all(v[64:] == 1)
    with torch.no_grad():
        theirs = peft_load(tiny_model("gpt2", "causal_lm"), tmp_path)(**b).logits
    assert compare(ours, theirs, b, "causal_lm") < 1e-5


def test_export_config_fields(tmp_path):
    r = recipe_for("classification", {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"], "layers": "1"},
                   name="org/base-model")
    model = tiny_model("bert")
    arch, spec = attach_method(model, r.method_name, r.method)
    export_model(model, arch, spec, r, adapter_state(model, spec, arch, r.method), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert cfg["base_model_name_or_path"] == "org/base-model"
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False and cfg["use_dora"] is False
    # only layer 1 is adapted, so the suffixes carry the layer index
    assert cfg["target_modules"] == ["1.attention.self.query", "1.attention.self.value"]
    _, sd = read_peft_folder(tmp_path)
    assert "base_model.model.classifier.weight" in sd
    assert "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight" in sd
    assert not any(".default." in k for k in sd)
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_shortest_suffixes_respect_peft_matching():
    universe = ["enc.0.attention.output.dense", "enc.0.output.dense", "enc.0.attention.self.query",
                "enc.1.attention.output.dense", "enc.1.output.dense", "enc.1.attention.self.query"]
    chosen = ["enc.0.output.dense", "enc.1.output.dense"]
    got = shortest_suffixes(chosen, universe)
    assert set(got.values()) == {"0.output.dense", "1.output.dense"}
    # IA³'s feed-forward names are matched with a plain endswith over the targets
    targets = ["enc.0.attention.self.query", "enc.0.output.dense"]
    got = shortest_suffixes(targets, universe, feedforward=["enc.0.output.dense"])
    assert got["enc.0.output.dense"] == "0.output.dense"


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_export_refusals_name_a_reason(name):
    reason = export_refusal(name)
    if name in ("lora", "ia3", "prefix", "prompt", "loha", "lokr", "vera"):
        assert reason is None
    else:
        assert reason and "HF PEFT" in reason and name in reason and len(reason) > 60


def test_prefix_without_position_shift_is_refused(tmp_path):
    r = recipe_for("causal_lm", {"name": "prefix", "num_virtual_tokens": 2, "shift_positions": False})
    model = tiny_model("llama", "causal_lm")
    arch, spec = attach_method(model, r.method_name, r.method)
    with pytest.raises(PeftFormatError, match="shift_positions"):
        export_model(model, arch, spec, r, adapter_state(model, spec, arch, r.method), tmp_path)


# ------------------------------------------------------------------------------ import


def _peft_configs(kind: str, tt: str) -> dict:
    names = {
        "bert": dict(qv=["query", "value"], all=r".*encoder.*\.(query|key|value|dense)", kvf=["key", "value", "output.dense"],
                     ff=["output.dense"]),
        "gpt2": dict(qv=["c_attn"], all=["c_attn", "c_proj", "c_fc"], kvf=["c_attn", "mlp.c_proj"], ff=["mlp.c_proj"]),
        "llama": dict(qv=["q_proj", "v_proj"], all=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"], kvf=["k_proj", "v_proj", "down_proj"], ff=["down_proj"]),
    }[kind]
    ia3_targets = {"bert": ["k", "v", "ffn_out", "attention.output.dense"], "gpt2": ["q", "k", "v", "ffn_out"],
                   "llama": ["k", "v", "ffn_out"]}[kind]
    ia3_ff = {"bert": ["ffn_out", "attention.output.dense"]}.get(kind, ["ffn_out"])
    return {
        "lora": (peft.LoraConfig(task_type=tt, r=4, lora_alpha=8, target_modules=names["qv"]),
                 {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}),
        "rslora": (peft.LoraConfig(task_type=tt, r=4, lora_alpha=8, use_rslora=True, target_modules=names["all"]),
                   {"name": "lora", "r": 4, "alpha": 8, "rslora": True, "targets": ["all-linear"]}),
        "dora": (peft.LoraConfig(task_type=tt, r=4, lora_alpha=8, use_dora=True, target_modules=names["qv"]),
                 {"name": "lora", "r": 4, "alpha": 8, "use_dora": True, "targets": ["q", "v"]}),
        "ia3": (peft.IA3Config(task_type=tt, target_modules=names["kvf"], feedforward_modules=names["ff"]),
                {"name": "ia3", "targets": ia3_targets, "feedforward": ia3_ff}),
        "prefix": (peft.PrefixTuningConfig(task_type=tt, num_virtual_tokens=3), {"name": "prefix", "num_virtual_tokens": 3}),
        "prompt": (peft.PromptTuningConfig(task_type=tt, num_virtual_tokens=3), {"name": "prompt", "num_virtual_tokens": 3}),
    }


def make_peft_folder(kind: str, task: str, method: str, folder: Path):
    """A PEFT-made adapter with random non-zero weights; returns (PEFT model, our method block)."""
    tt = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    pc, ours = _peft_configs(kind, tt)[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(cache_named_for_peft(tiny_model(kind, task), task), pc)
    randomize(pm, seed=5)
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm, ours


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind,task", SETTINGS)
def test_peft_adapter_loads_with_same_logits(kind, task, method, tmp_path):
    pm, block = make_peft_folder(kind, task, method, tmp_path)
    b = sample(kind, task, method)
    with torch.no_grad():
        theirs = pm(**b).logits
    r = recipe_for(task, block)
    model = tiny_model(kind, task)
    arch, spec = attach_method(model, r.method_name, r.method)
    load_peft_weights(model, arch, spec, r, tmp_path)
    model.eval()
    with torch.no_grad():
        ours = model(**b).logits
    assert compare(ours, theirs, b, task) < 1e-5


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft-lora")
    make_peft_folder("bert", "classification", "lora", d)
    return d


def _load(folder: Path, method: dict, task: str = "classification", kind: str = "bert", num_labels: int = 3):
    r = recipe_for(task, method)
    model = tiny_model(kind, task, num_labels=num_labels)
    arch, spec = attach_method(model, r.method_name, r.method)
    load_peft_weights(model, arch, spec, r, folder)


def test_method_mismatch_names_method_name(lora_folder):
    with pytest.raises(PeftFormatError) as e:
        _load(lora_folder, {"name": "ia3"})
    msg = str(e.value)
    assert "PEFT LORA adapter" in msg and "method.name is 'ia3'" in msg and "set method.name: lora" in msg
    assert "r: 4" in msg and "targets: [query, value]" in msg


def test_settings_mismatch_names_each_key(lora_folder):
    with pytest.raises(PeftFormatError) as e:
        _load(lora_folder, {"name": "lora", "r": 8, "alpha": 16, "use_dora": True, "targets": ["q", "v"]})
    msg = str(e.value)
    assert "r: 4 but the recipe has method.r: 8; set method.r: 4" in msg
    assert "lora_alpha: 8.0 but the recipe has method.alpha: 16.0" in msg
    assert "method.use_dora" in msg


def test_target_mismatch_says_which_layers(lora_folder):
    with pytest.raises(PeftFormatError) as e:
        _load(lora_folder, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "k", "v"]})
    msg = str(e.value)
    assert "adapt different layers" in msg and "attention.self.key" in msg and "method.targets" in msg


def test_task_and_head_mismatch(lora_folder):
    with pytest.raises(PeftFormatError, match="model.task"):
        _load(lora_folder, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}, task="causal_lm")
    with pytest.raises(PeftFormatError, match="model.num_labels: 3"):
        _load(lora_folder, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}, num_labels=2)


def test_ia3_feedforward_mismatch(tmp_path):
    make_peft_folder("llama", "causal_lm", "ia3", tmp_path)
    with pytest.raises(PeftFormatError, match="scales its input in the adapter.*set method.feedforward"):
        _load(tmp_path, {"name": "ia3", "targets": ["k", "v", "ffn_out"], "feedforward": []}, task="causal_lm",
              kind="llama")


def test_unsupported_peft_type(tmp_path, lora_folder):
    import shutil

    shutil.copytree(lora_folder, tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    cfg["peft_type"] = "BOFT"
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftFormatError, match="'BOFT' has no peftcli counterpart"):
        _load(tmp_path / "x", {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]})


# ------------------------------------------------------------------------------ CLI, run folders


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt"])
def test_cli_export_then_peft_loads(method, tmp_path, tiny_bert_dir, tiny_csv):
    from transformers import AutoModelForSequenceClassification

    run = make_run_on_data(tmp_path, tiny_bert_dir, METHODS[method], tiny_csv)
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_bert_dir) and cfg["task_type"] == "SEQ_CLS"
    assert cfg["modules_to_save"] == ["classifier"]
    b = text_batch(tiny_bert_dir)
    base = cache_named_for_peft(AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2),
                                "classification")
    with torch.no_grad():
        theirs = peft_load(base, tmp_path / "peft")(**b).logits
    assert compare(run_logits(run, b), theirs, b, "classification") < 1e-5
    # a second export into the same folder needs --force
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "peft")])
    assert res.exit_code == 2 and "--force" in res.output


def test_cli_export_and_combine_size_the_head_by_the_runs_class_names(tmp_path, tiny_bert_dir, tiny_csv):
    """A run whose recipe.yaml says model.num_labels 3 but which has two class names (written before
    the data check refused that) has a head of 2, as transformers sized it: export and combine
    rebuild the model with 2 (combine once took the recipe's 3 and refused the run as edited)."""
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    runs = [make_run_on_data(tmp_path / n, tiny_bert_dir, METHODS["lora"], tiny_csv, seed=s, model={"num_labels": 3})
            for n, s in (("a", 1), ("b", 2))]
    res = runner.invoke(app, ["export", str(runs[0]), "--to", "peft", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    head = [v for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items() if "classifier" in k]
    assert head and all(t.shape[0] == 2 for t in head)
    res = runner.invoke(app, ["combine", str(runs[0]), str(runs[1]), str(tmp_path / "both"), "--how", "linear"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("method", [{"name": "houlsby"}, {"name": "krona"}, {"name": "bitfit"}])
def test_cli_export_refuses_methods_peft_lacks(method, tmp_path, tiny_bert_dir, tiny_csv):
    run = make_run_on_data(tmp_path, tiny_bert_dir, method, tiny_csv)
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "peft")])
    assert res.exit_code == 2
    assert f"cannot export method '{method['name']}' to HF PEFT" in res.output
    assert not (tmp_path / "peft").exists()


def test_cli_export_bad_format(tmp_path):
    res = runner.invoke(app, ["export", str(tmp_path), "--to", "onnx", str(tmp_path / "x")])
    assert res.exit_code == 2 and "only export format is 'peft'" in res.output


def _peft_folder_on(model_dir: Path, dest: Path, cfg, task: str = "classification"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kw = {"num_labels": 2} if task == "classification" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(cls.from_pretrained(str(model_dir), **kw), cfg)
    randomize(pm, seed=7, scale=0.1)
    pm.eval()
    pm.save_pretrained(str(dest))
    cfgj = json.loads((dest / "adapter_config.json").read_text())
    assert cfgj["base_model_name_or_path"] == str(model_dir)
    return pm


def merges_and_trains_on(tmp_path: Path, model_dir: Path, csv: Path, method: dict, b: dict,
                         theirs: torch.Tensor) -> str:
    """The PEFT folder at tmp_path/peft, made on `model_dir` and giving `theirs` on batch `b`: `peftcli
    merge` straight from it gives the same logits, and `init_from:` it in a recipe (one step at lr 0)
    keeps them. Returns that recipe."""
    from transformers import AutoModelForSequenceClassification

    res = runner.invoke(app, ["merge", str(tmp_path / "peft"), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert float(res.output.split("sample batch:")[1].split()[0]) < 1e-5
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert compare(merged(**b).logits, theirs, b, "classification") < 1e-5
    rec = write_recipe(tmp_path / "cont.yaml", model={"name": str(model_dir)},
                       data={"source": str(csv), "text_column": "sentence", "eval_size": 8, "max_length": 32},
                       method=method, train={"max_steps": 1, "batch_size": 4, "lr": 0.0, "progress": False},
                       output={"dir": str(tmp_path / "cont")}, init_from=str(tmp_path / "peft"))
    res = runner.invoke(app, ["train", rec])
    assert res.exit_code == 0, res.output
    assert compare(run_logits(tmp_path / "cont", b), theirs, b, "classification") < 1e-5
    return rec


@pytest.mark.slow
def test_cli_import_then_merge_and_continue_training(tmp_path, tiny_bert_dir, tiny_csv):
    """A PEFT folder -> run folder (no recipe needed) -> eval-ready; merge straight from the folder;
    init_from in a recipe trains on from the PEFT weights."""
    pm = _peft_folder_on(tiny_bert_dir, tmp_path / "peft",
                         peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    b = text_batch(tiny_bert_dir)
    with torch.no_grad():
        theirs = pm(**b).logits

    res = runner.invoke(app, ["import-peft", str(tmp_path / "peft"), str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert compare(run_logits(tmp_path / "run", b), theirs, b, "classification") < 1e-5

    rec = merges_and_trains_on(tmp_path, tiny_bert_dir, tiny_csv,
                               {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}, b, theirs)

    # the same recipe with another rank says which key differs
    res = runner.invoke(app, ["train", rec, "method.r=8", f"output.dir={tmp_path / 'cont2'}"])
    assert res.exit_code == 2
    assert "set method.r: 4" in res.output

    # a value of the wrong type in adapter_config.json is named (it was exit 1 with Python's words)
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    for key, bad in (("lora_alpha", None), ("lora_dropout", "x"), ("rank_pattern", [1])):
        cfg = json.loads(cfg_file.read_text())
        good = cfg.get(key)
        cfg_file.write_text(json.dumps({**cfg, key: bad}))
        res = runner.invoke(app, ["import-peft", str(tmp_path / "peft"), str(tmp_path / f"bad-{key}")])
        assert res.exit_code == 2 and f"{cfg_file}: a LORA setting has a value of the wrong type" in " ".join(
            res.output.split()), (key, res.output)
        cfg_file.write_text(json.dumps({**cfg, key: good}))


def test_cli_import_causal_lm_prefix(tmp_path, tiny_gpt2_dir):
    pm = _peft_folder_on(tiny_gpt2_dir, tmp_path / "peft", peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                         num_virtual_tokens=4), task="causal_lm")
    res = runner.invoke(app, ["import-peft", str(tmp_path / "peft"), str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    b = text_batch(tiny_gpt2_dir)
    with torch.no_grad():
        theirs = pm(**b).logits
    assert compare(run_logits(tmp_path / "run", b), theirs, b, "causal_lm") < 1e-5
    # prefix tuning is not a weight change: merging it is refused with the reason
    res = runner.invoke(app, ["merge", str(tmp_path / "peft"), str(tmp_path / "merged")])
    assert res.exit_code == 2 and "cannot be merged" in res.output and "keys and values" in res.output


def test_export_needs_no_weights_so_qlora_runs_export_anywhere(tmp_path, tiny_bert_dir, tiny_csv):
    """Export builds the model on the meta device: a QLoRA run exports on a machine without CUDA."""
    import yaml
    from safetensors.torch import load_file

    run = make_run_on_data(tmp_path, tiny_bert_dir, METHODS["lora"], tiny_csv)
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    rec = yaml.safe_load((run / "recipe.yaml").read_text())
    rec["model"]["quantization"] = "nf4"
    (run / "recipe.yaml").write_text(yaml.safe_dump(rec))
    res = runner.invoke(app, ["export", str(run), "--to", "peft", str(tmp_path / "nf4")])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(tmp_path / "plain" / "adapter_model.safetensors")), load_file(str(tmp_path / "nf4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_with_trained_pooler_loads_in_peft(tmp_path):
    r = recipe_for("classification", {"name": "lora", "r": 4, "targets": ["q", "v"]})
    r.model.train_pooler = True
    model = tiny_model("bert", "classification")
    arch, spec = attach_method(model, r.method_name, r.method, train_pooler=True)
    randomize(model)
    with torch.no_grad():
        arch.pooler()[1].dense.weight.add_(0.3)  # a trained pooler that differs from the base's
    model.eval()
    b = batch()
    with torch.no_grad():
        ours = model(**b).logits
    export_model(model, arch, spec, r, adapter_state(model, spec, arch, r.method), tmp_path)
    assert "bert.pooler" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    pm = peft_load(tiny_model("bert", "classification"), tmp_path)
    with torch.no_grad():
        theirs = pm(**b).logits
    assert compare(ours, theirs, b, "classification") < 1e-5
