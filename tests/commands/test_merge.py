"""Merging every mergeable method, and refusing the others with a reason.

A merged model must be the base model and nothing else (same parameter names and shapes, same
module classes, no hooks), compute the adapted model's logits, and survive save_pretrained /
from_pretrained. Adapter weights are random and non-zero so that a wrong merge cannot hide.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_model
from helpers.adapter_runs import make_run_on_data, randomize, run_logits, text_batch
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.commands.merge import check_plain
from peftcli.config.recipe import recipe_from_dict
from peftcli.methods import all_methods
from peftcli.methods.attach import attach_method
from peftcli.models.loading import auto_class

runner = CliRunner()

MERGEABLE = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]},
    "rslora": {"name": "lora", "r": 4, "alpha": 8, "rslora": True, "targets": ["q", "v"]},
    "dora": {"name": "lora", "r": 4, "alpha": 8, "use_dora": True, "targets": ["q", "v", "o", "ffn_out"]},
    "ia3": {"name": "ia3"},
    "ia3_v_only": {"name": "ia3", "targets": ["v", "ffn_in"], "feedforward": []},  # fused-qkv row subset on GPT-2
    "krona": {"name": "krona", "targets": ["q", "v", "ffn_in"]},
    "loha": {"name": "loha", "r": 4, "alpha": 6, "targets": ["q", "v", "ffn_in"]},
    "lokr": {"name": "lokr", "r": 2, "alpha": 4, "targets": ["q", "k", "ffn_out"]},
    "vera": {"name": "vera", "r": 16, "targets": ["q", "v", "ffn_in", "ffn_out"]},
}


def structure(model: torch.nn.Module) -> tuple[list, list]:
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    return params, modules


@pytest.mark.slow
@pytest.mark.parametrize("method", list(MERGEABLE))
@pytest.mark.parametrize("kind,task", [("bert", "classification"), ("gpt2", "classification"),
                                       ("llama", "classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm")])
def test_merge_equals_adapted_and_is_the_plain_base(kind, task, method, tmp_path):
    r = recipe_from_dict({"model": {"name": "tiny", "task": task}, "method": dict(MERGEABLE[method])})
    plain = tiny_model(kind, task)
    model = tiny_model(kind, task)
    b = batch()
    with torch.no_grad():
        base_logits = model(**b).logits
    arch, spec = attach_method(model, r.method_name, r.method)
    assert spec.merge is not None
    randomize(model, scale=0.15)
    model.eval()
    with torch.no_grad():
        adapted = model(**b).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    with torch.no_grad():
        spec.merge(model, arch, r.method)
    check_plain(model)
    assert structure(model) == structure(plain)
    with torch.no_grad():
        merged = model(**b).logits
    assert (merged - adapted).abs().max() < 1e-5

    model.save_pretrained(tmp_path)
    reloaded = auto_class(task).from_pretrained(str(tmp_path)).eval()
    assert structure(reloaded) == structure(plain)
    with torch.no_grad():
        assert (reloaded(**b).logits - adapted).abs().max() < 1e-5


def test_every_non_mergeable_method_says_why():
    lacking = []
    for name, spec in sorted(all_methods().items()):
        if spec.merge is None:
            text = spec.merge_refusal or ""
            if len(text) < 30:
                lacking.append(name)
    assert not lacking, f"methods without a merge refusal text: {lacking}"


def _safetensors_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "krona", "loha", "lokr", "vera"])
def test_cli_merge_run_folder(method, tmp_path, tiny_bert_dir, tiny_csv):
    from transformers import AutoModelForSequenceClassification

    run = make_run_on_data(tmp_path, tiny_bert_dir, MERGEABLE[method], tiny_csv)
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    diff = float(res.output.split("sample batch:")[1].split()[0])
    assert diff < 1e-5
    # same tensors as the plain base checkpoint: nothing added, nothing missing
    assert _safetensors_keys(tmp_path / "merged") == _safetensors_keys(tiny_bert_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    assert structure(merged) == structure(base)
    b = text_batch(tiny_bert_dir)

    with torch.no_grad():
        assert (merged(**b).logits - run_logits(run, b)).abs().max() < 1e-5
    # an existing destination is refused without --force, replaced with it
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged"), "--force"])
    assert res.exit_code == 0, res.output
    # --recipe is for HF PEFT folders: a run folder's own recipe.yaml would outvote it unread.
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "m2"), "--recipe", str(tmp_path / "recipe.yaml")])
    assert res.exit_code == 2 and "only for an HF PEFT adapter folder" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "m2").exists()


def test_cli_merge_causal_lm(tmp_path, tiny_gpt2_dir, tiny_csv):
    run = make_run_on_data(tmp_path, tiny_gpt2_dir, MERGEABLE["dora"], tiny_csv, task="causal_lm")
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert float(res.output.split("sample batch:")[1].split()[0]) < 1e-5
    assert _safetensors_keys(tmp_path / "merged") == _safetensors_keys(tiny_gpt2_dir)


@pytest.mark.parametrize("method", [
    {"name": "houlsby"}, {"name": "pfeiffer"}, {"name": "parallel"}, {"name": "compacter", "bottleneck_size": 4},
    {"name": "prefix", "num_virtual_tokens": 2}, {"name": "prompt", "num_virtual_tokens": 2},
])
def test_cli_merge_refuses_with_reason(method, tmp_path, tiny_bert_dir, tiny_csv):
    run = make_run_on_data(tmp_path, tiny_bert_dir, method, tiny_csv)
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 2
    reason = all_methods()[method["name"]].merge_refusal
    assert f"method '{method['name']}' cannot be merged" in res.output
    assert " ".join(reason.split()[:4]) in " ".join(res.output.split())
    assert not (tmp_path / "merged").exists()
