"""`peftcli export --to peft --as-lora`: a run folder to a plain HF PEFT LoRA folder, end to end.

The exact cases (a LoRA re-exported at a rank >= its own, a KronA delta of rank <= R) give the run's
logits to 1e-5 in HF PEFT, and the folder goes through `import-peft` into the loader `peftcli serve`
uses; a method whose effect is not a weight delta is refused with its reason (exit 2)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from helpers.adapter_runs import make_run_on_data, run_logits, text_batch
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.commands.peft import as_lora_options, export_as_lora, import_peft
from peftcli.core.errors import UsageError

peft = pytest.importorskip("peft")
runner = CliRunner()


def peft_logits(base, folder, b: dict) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return pm(**b).logits


def printed_diff(output: str) -> float:
    return float(re.search(r"sample batch: ([0-9.e+-]+)", output).group(1))


@pytest.mark.slow
def test_krona_run_as_lora_is_exact_in_peft_and_serves_after_import_peft(tiny_gpt2_dir, tiny_csv, tmp_path):
    from transformers import GPT2LMHeadModel

    from peftcli.inference.multi import load_runs

    # A (2 x 16) ⊗ B (48 x 2) on GPT-2's fused c_attn (96 x 32): rank <= 2 · 2 = 4
    run = make_run_on_data(tmp_path, tiny_gpt2_dir, {"name": "krona", "a1": 2, "a2": 16, "targets": ["q"]},
                           tiny_csv, task="causal_lm")
    out = tmp_path / "as-lora"
    res = runner.invoke(app, ["export", str(run), "--to", "peft", "--as-lora", "--rank", "4", "--no-eval", str(out)])
    assert res.exit_code == 0, res.output
    assert printed_diff(res.output) < 1e-5 and "perplexity" not in res.output  # --no-eval
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["fan_in_fan_out"]) == ("LORA", 4, 4, True)
    b = text_batch(tiny_gpt2_dir)
    ours = run_logits(run, b)
    theirs = peft_logits(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), out, b)
    assert (ours - theirs).abs().max() < 1e-5
    # `peftcli serve` serves run folders: import-peft makes one, and serve's loader stacks it as a LoRA
    imported = import_peft(out, tmp_path / "imported")
    multi = load_runs([f"orig={run}", f"lora={imported}"], torch.device("cpu"))
    assert multi.adapters["lora"].stacked
    with torch.no_grad(), multi.rows(["lora", "lora"]):
        served = multi.model(**b).logits
    assert (ours - served).abs().max() < 1e-5


@pytest.mark.slow
def test_lora_run_reexported_is_exact_with_the_head_and_scores_alike(tiny_bert_dir, tiny_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = make_run_on_data(tmp_path, tiny_bert_dir, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
                           tiny_csv)
    rep = export_as_lora(run, tmp_path / "out", rank=6)  # above the run's rank: nothing is lost
    assert rep.max_logit_diff < 1e-5 and max(f.error for f in rep.layers) < 1e-5
    assert {f.rank for f in rep.layers} == {6} and rep.config["modules_to_save"] == ["classifier"]
    assert rep.split == "val" and rep.before["examples"] > 0
    assert rep.before["accuracy"] == rep.after["accuracy"]
    assert abs(rep.before["loss"] - rep.after["loss"]) < 1e-5
    b = text_batch(tiny_bert_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert (run_logits(run, b) - peft_logits(base, tmp_path / "out", b)).abs().max() < 1e-5


def test_energy_prints_each_layer_and_the_metric_change(tiny_bert_dir, tiny_csv, tmp_path):
    run = make_run_on_data(tmp_path, tiny_bert_dir, {"name": "ia3", "targets": ["k", "v"], "feedforward": []},
                           tiny_csv)
    res = runner.invoke(app, ["export", str(run), "--to", "peft", "--as-lora", "--energy", "0.5", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "bert.encoder.layer.1.attention.self.value" in res.output.replace("\n", "")
    assert re.search(r"val accuracy \(\d+ examples\): adapter [0-9.]+ → LoRA [0-9.]+", res.output)
    assert "lora_bias" in res.output  # IA³ on k and v scales their biases too
    assert printed_diff(res.output) > 0  # half the energy: an approximation, and it says so


def test_refused_method_exits_2_with_its_reason_and_writes_nothing(tiny_bert_dir, tiny_csv, tmp_path):
    run = make_run_on_data(tmp_path, tiny_bert_dir, {"name": "houlsby"}, tiny_csv)
    res = runner.invoke(app, ["export", str(run), "--to", "peft", "--as-lora", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "cannot export method 'houlsby' as a LoRA" in res.output and "non-linear" in res.output
    assert not (tmp_path / "o").exists()


def test_options_go_together(tmp_path):
    assert as_lora_options(None, None) == (16, None)
    assert as_lora_options(None, 0.9) == (None, 0.9)
    for rank, energy, msg in ((4, 0.9, "choose one"), (None, 1.5, "0 < E <= 1"), (None, 0.0, "0 < E <= 1"),
                              (0, None, "at least 1")):
        with pytest.raises(UsageError, match=msg):
            as_lora_options(rank, energy)
    res = runner.invoke(app, ["export", str(tmp_path), "--to", "peft", "--rank", "4", str(tmp_path / "o")])
    assert res.exit_code == 2 and "go with --as-lora" in res.output


@pytest.mark.slow
def test_an_energy_export_with_per_layer_ranks_imports_and_serves_like_peft(tiny_bert_dir, tiny_csv, tmp_path):
    """`--energy` gives each layer its own rank (PEFT's rank_pattern): import-peft reads that into a
    LoRA run with per-module ranks, which computes what PeftModel computes from the folder."""
    from transformers import AutoModelForSequenceClassification

    from peftcli.inference.multi import load_runs

    run = make_run_on_data(tmp_path, tiny_bert_dir, {"name": "krona", "targets": ["q", "v"]}, tiny_csv)
    rep = export_as_lora(run, tmp_path / "out", energy=0.9, evaluate=False)
    assert len({f.rank for f in rep.layers}) > 1
    imported = import_peft(tmp_path / "out", tmp_path / "imported")
    b = text_batch(tiny_bert_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    theirs = peft_logits(base, tmp_path / "out", b)
    assert (run_logits(imported, b) - theirs).abs().max() < 1e-5
    multi = load_runs([f"lora={imported}"], torch.device("cpu"))
    with torch.no_grad(), multi.rows(["lora", "lora"]):
        assert (multi.model(**b).logits - theirs).abs().max() < 1e-5
