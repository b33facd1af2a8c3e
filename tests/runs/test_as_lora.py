"""runs/as_lora.py: adapters whose effect is a weight delta, as a plain HF PEFT LoRA.

The exact cases (a delta of rank <= the rank kept) must give the adapted model's logits to 1e-5,
both merged here (`apply_lora`) and loaded by HF PEFT itself (`PeftModel.from_pretrained`), and
the truncated SVD must be the best approximation its error says it is."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import batch, tiny_model
from helpers.adapter_runs import randomize

from peftcli.config.recipe import recipe_from_dict
from peftcli.core.peft_layout import PeftFormatError
from peftcli.methods import all_methods
from peftcli.methods.attach import attach_method
from peftcli.runs.as_lora import apply_lora, as_lora_refusal, choose_rank, low_rank, to_lora
from peftcli.runs.peft_format import write_peft_folder

peft = pytest.importorskip("peft")

# method block, and the rank that makes its delta exact on the tiny models (hidden 32, FFN 64)
EXACT = {
    "lora": ({"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v", "ffn_out"]}, {"rank": 4}),
    "dora": ({"name": "lora", "r": 4, "alpha": 8, "use_dora": True, "targets": ["q", "v"]}, {"energy": 1.0}),
    "ia3": ({"name": "ia3"}, {"energy": 1.0}),
    # A (2 x 16) ⊗ B (16 x 2): rank(A ⊗ B) = rank A · rank B <= 4
    "krona": ({"name": "krona", "a1": 2, "a2": 16, "targets": ["q", "v"]}, {"rank": 4}),
    # (w1a w1b) ⊙ (w2a w2b) with r = 2: rank <= r · r = 4
    "loha": ({"name": "loha", "r": 2, "alpha": 2, "targets": ["q", "v"]}, {"rank": 4}),
    "lokr": ({"name": "lokr", "r": 2, "alpha": 2, "targets": ["q", "v"]}, {"energy": 1.0}),
    # diag(λ_b) B diag(λ_d) A with r = 4: rank <= 4
    "vera": ({"name": "vera", "r": 4, "targets": ["q", "v"]}, {"rank": 4}),
}


def recipe_for(task: str, method: dict):
    return recipe_from_dict({"model": {"name": "tiny/model", "task": task}, "method": dict(method)})


def adapted(kind: str, task: str, method: dict):
    """(adapted model with random adapter weights, untouched copy of its base, arch, spec, recipe)."""
    r = recipe_for(task, method)
    model = tiny_model(kind, task)
    base = copy.deepcopy(model)
    arch, spec = attach_method(model, r.method_name, r.method)
    randomize(model)
    model.eval()
    return model, base, arch, spec, r


def peft_logits(kind: str, task: str, folder, b: dict) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_model(kind, task), str(folder)).eval()
    with torch.no_grad():
        return pm(**b).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("method", list(EXACT))
@pytest.mark.parametrize("kind,task", [("bert", "classification"), ("llama", "causal_lm"),
                                       pytest.param("gpt2", "causal_lm", marks=pytest.mark.slow)])
def test_exact_delta_gives_the_same_logits_merged_and_in_peft(kind, task, method, tmp_path):
    block, how = EXACT[method]
    model, base, arch, spec, r = adapted(kind, task, block)
    b = batch()
    with torch.no_grad():
        ours = model(**b).logits
        plain = base(**b).logits
    assert rel(ours, plain) > 1e-3  # the adapter does something
    exp = to_lora(model, base, arch, spec, r, **how)
    assert exp.config["peft_type"] == "LORA" and exp.config["lora_alpha"] == exp.config["r"]
    assert max(f.error for f in exp.layers) < 1e-5
    write_peft_folder(tmp_path, exp.tensors, exp.config)
    assert rel(ours, peft_logits(kind, task, tmp_path, b)) < 1e-5
    apply_lora(base, exp)
    with torch.no_grad():
        assert rel(ours, base(**b).logits) < 1e-5


def test_ia3_output_scaling_changes_the_bias_and_exports_it_as_lora_bias(tmp_path):
    """IA³ scaling k and v's output scales their bias too: carried as lora_B.bias."""
    model, base, arch, spec, r = adapted("bert", "classification", EXACT["ia3"][0])
    exp = to_lora(model, base, arch, spec, r, energy=1.0)
    assert exp.config["lora_bias"] is True
    fits = {f.path.rsplit(".", 1)[-1]: f for f in exp.layers}
    assert fits["key"].bias and fits["value"].bias and not fits["dense"].bias  # ffn_out scales its input
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.lora_B.bias" in exp.tensors


def test_bitfit_biases_become_lora_bias_and_norms_modules_to_save(tmp_path):
    model, base, arch, spec, r = adapted("bert", "classification", {"name": "bitfit"})
    b = batch()
    with torch.no_grad():
        ours = model(**b).logits
    exp = to_lora(model, base, arch, spec, r, rank=2)
    cfg = exp.config
    assert cfg["lora_bias"] is True and cfg["r"] == 1  # no weight changes: a zero rank-1 part
    assert "classifier" in cfg["modules_to_save"]
    assert "bert.embeddings.LayerNorm" in cfg["modules_to_save"]
    assert all(f.rank == 1 and f.error == 0.0 and f.bias for f in exp.layers)
    write_peft_folder(tmp_path, exp.tensors, cfg)
    assert rel(ours, peft_logits("bert", "classification", tmp_path, b)) < 1e-5


def test_lower_rank_approximates_with_the_error_it_reports():
    model, base, arch, spec, r = adapted("llama", "causal_lm", {"name": "lora", "r": 8, "targets": ["q"]})
    errs = {k: max(f.error for f in to_lora(model, base, arch, spec, r, rank=k).layers) for k in (1, 4, 8)}
    assert errs[1] > errs[4] > 1e-3 and errs[8] < 1e-5
    delta = model.model.layers[0].self_attn.q_proj.delta_weight().detach().float()
    a, b, err = low_rank(delta, 4, None)
    assert abs(float(torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta)) - err) < 1e-6


def test_energy_keeps_the_smallest_rank_reaching_the_fraction():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: total 14
    assert choose_rank(s, None, 9 / 14) == 1
    assert choose_rank(s, None, 9 / 14 + 1e-3) == 2
    assert choose_rank(s, None, 1.0) == 3  # null directions are never kept
    assert choose_rank(s, 10, None) == 4  # no more than the matrix has
    assert choose_rank(torch.zeros(3), None, 0.5) == 1


def test_per_layer_ranks_go_to_rank_pattern_with_alpha_equal_to_rank(tmp_path):
    model, base, arch, spec, r = adapted("llama", "causal_lm",
                                         {"name": "lora", "r": 4, "targets": ["q", "ffn_in"]})
    b = batch()
    with torch.no_grad():  # one layer's update of rank 2 only
        model.model.layers[1].mlp.gate_proj.lora_A.weight[2:] = 0
        ours = model(**b).logits
    exp = to_lora(model, base, arch, spec, r, energy=1.0)
    cfg = exp.config
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"model.layers.1.mlp.gate_proj": 2}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    write_peft_folder(tmp_path, exp.tensors, cfg)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert rel(ours, peft_logits("llama", "causal_lm", tmp_path, b)) < 1e-5


def test_every_method_either_exports_as_lora_or_says_why():
    for name, spec in all_methods().items():
        refusal = as_lora_refusal(spec, name)
        if refusal is not None:
            assert len(spec.as_lora_refusal) > 30 and name in refusal
    for name in ("houlsby", "pfeiffer", "parallel", "compacter", "prefix", "prompt", "mam", "unipelt"):
        assert as_lora_refusal(all_methods()[name], name)
    for name in ("lora", "ia3", "krona", "bitfit"):
        assert as_lora_refusal(all_methods()[name], name) is None


def test_a_refused_method_raises_its_reason():
    model, base, arch, spec, r = adapted("bert", "classification", {"name": "houlsby"})
    with pytest.raises(PeftFormatError, match="non-linear"):
        to_lora(model, base, arch, spec, r, rank=4)


def test_adapters_switched_off_are_left_out(tmp_path):
    """A run `peftcli drop` wrote switches some adapters off: their layers change nothing."""
    model, base, arch, spec, r = adapted("llama", "causal_lm", {"name": "lora", "r": 2, "targets": ["q", "v"]})
    model.model.layers[0].self_attn.q_proj.adapter_enabled = False
    b = batch()
    with torch.no_grad():
        ours = model(**b).logits
    exp = to_lora(model, base, arch, spec, r, rank=2)
    assert "model.layers.0.self_attn.q_proj" not in {f.path for f in exp.layers} and len(exp.layers) == 3
    apply_lora(base, exp)
    with torch.no_grad():
        assert rel(ours, base(**b).logits) < 1e-5
