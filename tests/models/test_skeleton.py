"""The closed-form skeleton of count-params against transformers' own model on the meta device.

For each family the skeleton covers, the skeleton's parameter names, shapes and order must be
those of transformers' model built from the same config.json, and count-params' whole budget
(trainable, total, the per-module table, the NF4-quantizable count, the method's closed form,
optimizer state and memory rows) must come out the same for every registered method: either both
paths agree, or both refuse with the same message. Methods that need transformers' own modules
(prefix and prompt tuning) are counted on those, and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftcli.config.recipe import recipe_from_dict
from peftcli.methods import all_methods
from peftcli.models.skeleton import skeleton_model, skip_meta_fills
from peftcli.training import budget as budget_mod

REPO = Path(__file__).resolve().parents[2]
KEYS = ("trainable", "total", "percent", "table", "quantizable", "closed_form", "memory", "trained_at_once", "optimizer")


def _configs() -> dict[str, object]:
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig

    return {
        "bert": BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64),
        "gpt2": GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                           bos_token_id=0, eos_token_id=0),
        "llama": LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
        "mistral": MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64,
                                 head_dim=16),
        "llama-tied-bias": LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=40, tie_word_embeddings=True, attention_bias=True,
                                       mlp_bias=True),
    }


TASKS = {"bert": ["classification"], "gpt2": ["classification", "causal_lm"], "llama": ["classification", "causal_lm"],
         "mistral": ["causal_lm"], "llama-tied-bias": ["causal_lm", "classification"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skeleton")
    out = {}
    for kind, cfg in _configs().items():
        cfg.save_pretrained(root / kind)
        out[kind] = root / kind
    # A hand-written config.json with the size fields only: every switch takes its default.
    minimal = root / "llama-minimal"
    minimal.mkdir()
    (minimal / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
        "intermediate_size": 56, "num_attention_heads": 4}))
    out["llama-minimal"] = minimal
    return out


def _recipe(folder: Path, task: str, method: str, overrides: list[str] | None = None):
    raw = {"model": {"name": str(folder), "task": task, "num_labels": 3 if task == "classification" else None},
           "method": {"name": method}}
    return recipe_from_dict(raw, "test", overrides or [])


def _meta_budget(recipe) -> dict:
    orig = budget_mod.count_model
    budget_mod.count_model = lambda r: (budget_mod._transformers_meta(r), budget_mod.META)
    try:
        return budget_mod.budget(recipe)
    finally:
        budget_mod.count_model = orig


@pytest.mark.parametrize("kind", [*TASKS, "llama-minimal"])
def test_skeleton_has_the_names_and_shapes_of_the_meta_model(folders, kind):
    for task in TASKS.get(kind, ["causal_lm", "classification"]):
        r = _recipe(folders[kind], task, "lora")
        with skip_meta_fills():
            skel = skeleton_model(str(folders[kind]), task, 3)
        real = budget_mod._transformers_meta(r)
        assert skel is not None
        got = [(n, tuple(p.shape)) for n, p in skel.named_parameters()]
        want = [(n, tuple(p.shape)) for n, p in real.named_parameters()]
        assert got == want, (kind, task, [x for x in got if x not in want], [x for x in want if x not in got])
        assert all(p.is_meta for p in skel.parameters())


def test_a_head_sized_by_the_data_is_counted_from_the_config_and_said(folders, tmp_path):
    """num_labels null with a data file: training takes the classes from the data, which counting
    does not read. Both counting paths then count two classes, whatever config.json says, and the
    budget says so; data.label_names sizes the head exactly."""
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(folders["bert"], id2label={i: f"c{i}" for i in range(5)})
    cfg.save_pretrained(tmp_path)
    raw = {"model": {"name": str(tmp_path), "task": "classification"}, "method": {"name": "lora"},
           "data": {"source": "train.csv"}}
    r = recipe_from_dict(raw, "test", [], check_files=False)
    fast, slow = budget_mod.budget(r), _meta_budget(r)
    assert fast["built_from"] == budget_mod.SKELETON and fast["total"] == slow["total"]
    assert ("classifier", 32 * 2 + 2, 32 * 2 + 2) in [(n.split(".")[-1], tr, tot) for n, tr, tot in fast["table"]]
    assert fast["head_note"] == slow["head_note"] and "counted with 2 classes" in fast["head_note"]
    assert "train.csv" in fast["head_note"]
    r = recipe_from_dict({**raw, "data": {"source": "train.csv", "label_names": ["a", "b", "c"]}}, "test", [],
                         check_files=False)
    named = budget_mod.budget(r)
    assert named["head_note"] is None and named["total"] == fast["total"] + 33


def _same_or_same_refusal(recipe) -> dict | None:
    try:
        fast = budget_mod.budget(recipe)
    except Exception as e:  # noqa: BLE001  (the meta path must refuse alike)
        with pytest.raises(type(e)) as slow:
            _meta_budget(recipe)
        assert str(slow.value) == str(e)
        return None
    slow_b = _meta_budget(recipe)
    for k in KEYS:
        assert fast[k] == slow_b[k], (recipe.method_name, k, fast[k], slow_b[k])
    return fast


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_every_method_counts_the_same_on_the_skeleton(folders, kind):
    counted = {}
    for task in TASKS[kind]:
        for method in sorted(all_methods()):
            b = _same_or_same_refusal(_recipe(folders[kind], task, method))
            if b is not None:
                counted[(task, method)] = b["built_from"]
    for method in ("lora", "ia3", "full", "houlsby", "krona", "galore", "sparse"):
        assert counted[(TASKS[kind][0], method)] == budget_mod.SKELETON, (kind, method)
    if kind != "llama":  # Llama has no biases for BitFit to train
        assert counted[(TASKS[kind][0], "bitfit")] == budget_mod.SKELETON
    # Prefix tuning needs transformers' attention functions: counted on the real model.
    assert counted[(TASKS[kind][0], "prefix")] == budget_mod.META


@pytest.mark.parametrize("overrides", [
    ["method.targets=[q,k,v,o,ffn_in,ffn_out]", "method.r=16"],
    ["method.targets=[v]", "method.layers=0"],
    ["method.use_dora=true"],
    ["train.optimizer=adamw_8bit"],
    ["train.optimizer=adafactor", "method.targets=[q,v,ffn_out]"],
    ["train.lisa_layers=1"],
])
def test_options_count_the_same_on_the_skeleton(folders, overrides):
    for kind in ("gpt2", "llama-tied-bias", "mistral"):
        method = "full" if "train.lisa_layers=1" in overrides else "lora"
        b = _same_or_same_refusal(_recipe(folders[kind], "causal_lm", method, overrides))
        assert b is not None and b["built_from"] == budget_mod.SKELETON, (kind, overrides)


def test_what_the_skeleton_does_not_cover_is_built_by_transformers(folders, tmp_path):
    assert skeleton_model(str(folders["bert"]), "causal_lm") is None  # BERT's LM head: not in closed form
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 10}))
    assert skeleton_model(str(tmp_path), "causal_lm") is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    assert skeleton_model(str(tmp_path), "causal_lm") is None  # size fields missing: no guessing
    assert skeleton_model("some/hub-id", "causal_lm") is None


@pytest.mark.slow
def test_count_params_on_a_70b_config_imports_no_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256,
        "tie_word_embeddings": False}))
    code = ("import sys; from peftcli.cli import main; sys.argv = ['peftcli', 'count-params', '--model', sys.argv[1], "
            "'--method', 'lora']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # Llama-3-70B: 70,553,706,496 base parameters; LoRA r8 on q and v of 80 layers adds 16,384,000.
    assert "total: 70,570,090,496" in res.stdout and "trainable: 16,384,000" in res.stdout, res.stdout
    assert "counted from config.json in closed form" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_the_shipped_quickstart_recipe_counts_on_the_skeleton():
    from peftcli.config.recipe import load_recipe
    from peftcli.models.loading import resolve_source

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [], check_files=False)
    if not resolve_source(recipe.model.name).embedded:
        pytest.skip(f"{recipe.model.name} is not installed as an embedded package here")
    b = _same_or_same_refusal(recipe)
    assert b is not None and b["built_from"] == budget_mod.SKELETON


def test_skipped_fills_leave_real_tensors_alone():
    with skip_meta_fills():
        t = torch.zeros(3)
        torch.nn.init.ones_(t)
        m = torch.empty(2, device="meta")
        torch.nn.init.normal_(m)
    assert t.tolist() == [1.0, 1.0, 1.0] and m.is_meta
