"""Preference objectives in the training loop: the reference switch, the statistics, every
objective and several methods training, and `--resume` bit-identical with a cached reference."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, write_recipe
from rich.console import Console
from safetensors.torch import load_file

from peftcli.config.recipe import load_recipe, recipe_from_dict
from peftcli.core import signals
from peftcli.core.switch import flags
from peftcli.methods.attach import attach_method
from peftcli.methods.bitfit import BitFitConfig
from peftcli.methods.lora import LoraConfig
from peftcli.training.loop import train
from peftcli.training.preference import CACHE_FILE, PairOut, PrefStats, Reference, pair_loss

TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")


def _recipe(objective: str = "dpo", init_from: str | None = None, **train):
    raw = {"model": {"task": "causal_lm"}, "method": {"name": "lora"}, "train": {"objective": objective, **train}}
    return recipe_from_dict({**raw, **({"init_from": init_from} if init_from else {})})


def _lora_model():
    m = tiny_model("llama", "causal_lm")
    base = copy.deepcopy(m)
    attach_method(m, "lora", LoraConfig(r=4, targets=["q", "v"]))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.5)
    return m, base


def test_reference_off_is_the_base_model_and_switches_back():
    m, base = _lora_model()
    ids = torch.tensor([[1, 5, 9, 3]])
    ref = Reference(_recipe(), m)
    assert ref.mode == "off" and not ref.initial  # no copy of anything
    m.train()
    before = flags(m)
    with ref.active(m):
        assert not m.training
        torch.testing.assert_close(m(input_ids=ids).logits, base(input_ids=ids).logits)
    assert flags(m) == before and m.training
    assert (m(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3


def test_reference_initial_swaps_the_starting_weights_in_and_out():
    m, _ = _lora_model()
    ref = Reference(_recipe(init_from="runs/sft"), m)
    assert ref.mode == "initial"
    start = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params.values():
            p.mul_(3.0)
    trained = {n: p.detach().clone() for n, p in params.items()}
    with ref.active(m):
        assert all(torch.equal(params[n], start[n]) for n in start)
    assert all(torch.equal(params[n], trained[n]) for n in trained)  # bit for bit, the same Parameter objects
    assert all(p is q for p, q in zip(params.values(), (p for p in m.parameters() if p.requires_grad), strict=True))
    orpo = Reference(_recipe("orpo", init_from="runs/sft"), m)
    assert orpo.mode == "none" and not orpo.initial


def test_a_method_without_an_off_switch_keeps_its_starting_weights():
    m = tiny_model("gpt2", "causal_lm")
    attach_method(m, "bitfit", BitFitConfig())
    assert Reference(recipe_from_dict({"model": {"task": "causal_lm"}, "method": {"name": "bitfit"},
                                       "train": {"objective": "kto"}}), m).mode == "initial"


def test_statistics_add_up_over_batches():
    t = _recipe(beta=0.5).train
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -2.0, -1.0, -3.5, -4.5])
    tokens = torch.tensor([2, 3, 1, 4, 2, 3, 1, 4])
    ref = torch.full((8,), -2.5)
    whole = PrefStats()
    whole.add_pairs(pair_loss(t, logps, tokens, ref))
    halves = PrefStats()
    for idx in ([0, 1, 4, 5], [2, 3, 6, 7]):
        halves.add_pairs(pair_loss(t, logps[idx], tokens[idx], ref[idx]))
    for k, v in whole.metrics().items():
        assert halves.metrics()[k] == pytest.approx(v)
    out: PairOut = pair_loss(t, torch.zeros(4), torch.ones(4), torch.zeros(4))
    assert float(out.loss) == pytest.approx(0.6931471805599453)  # DPO at the reference: log 2


def _write(tmp_path: Path, model_dir, name: str, objective: str = "dpo", method: dict | None = None, **train) -> str:
    t = {"objective": objective, "max_steps": 4, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1,
         "eval_every": 2, "warmup_ratio": 0.0, **train}
    return write_recipe(tmp_path / f"{name}.yaml", model={"name": str(model_dir), "task": "causal_lm"},
                        data={"source": "tweets_kto" if objective == "kto" else "tweets_preference", "train_size": 32,
                              "val_size": 8, "eval_size": 8, "max_length": 96},
                        method=method or {"name": "lora", "r": 4}, train=t,
                        output={"dir": str(tmp_path / name), "plot": False})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


QUIET = Console(quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "ipo", "hinge", "orpo", "simpo", "kto"])
def test_every_objective_trains_and_logs_trl_names(objective, tiny_llama_chat_dir, tmp_path):
    rec = load_recipe(_write(tmp_path, tiny_llama_chat_dir, "run", objective, max_steps=2))
    summary = train(rec, console=QUIET)
    steps = [r for r in _metrics(tmp_path / "run") if "lr" in r]
    names = ("rewards/chosen", "rewards/rejected", "logps/chosen", "kl") if objective == "kto" else TRL_NAMES
    assert all(k in steps[-1] and torch.isfinite(torch.tensor(steps[-1][k])) for k in names)
    assert 0.0 <= summary["val"]["accuracy"] <= 1.0 and summary["best"]["accuracy"] == summary["val"]["accuracy"]
    assert set(TRL_NAMES) - {"rewards/margins"} <= set(summary["test"]) | ({"rewards/accuracies"} if objective == "kto" else set())


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "ia3"}, {"name": "houlsby", "bottleneck_size": 4},
                                    {"name": "prefix", "num_virtual_tokens": 4}, {"name": "prompt", "num_virtual_tokens": 4},
                                    {"name": "full"}])
def test_dpo_trains_any_method(method, tiny_llama_chat_dir, tmp_path):
    rec = load_recipe(_write(tmp_path, tiny_llama_chat_dir, "run", "dpo", method=method, max_steps=2))
    train(rec, console=QUIET)
    steps = [r for r in _metrics(tmp_path / "run") if "lr" in r]
    assert steps[-1]["rewards/chosen"] != 0.0 or steps[-1]["rewards/rejected"] != 0.0  # the policy moved
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()


def _stop_at(monkeypatch, call: int) -> None:
    calls = {"n": 0}

    def requested():
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == call else None

    monkeypatch.setattr(signals, "requested", requested)


@pytest.mark.slow
def test_resume_with_a_cached_reference_from_an_sft_run_is_bit_identical(tiny_llama_chat_dir, tmp_path, monkeypatch):
    sft = write_recipe(tmp_path / "sft.yaml", model={"name": str(tiny_llama_chat_dir), "task": "causal_lm"},
                       data={"source": "tweets_instruct", "train_size": 16, "val_size": 8, "eval_size": 8,
                             "max_length": 96},
                       method={"name": "lora", "r": 4}, train={"max_steps": 2, "batch_size": 4, "lr": 1e-2,
                                                               "progress": False},
                       output={"dir": str(tmp_path / "sft"), "plot": False})
    train(load_recipe(sft), console=QUIET)
    paths = {}
    for name in ("whole", "stopped"):
        paths[name] = _write(tmp_path, tiny_llama_chat_dir, name, precompute_reference=True, lr=3e-2)
        raw = (tmp_path / f"{name}.yaml").read_text() + f"init_from: {tmp_path / 'sft'}\n"
        (tmp_path / f"{name}.yaml").write_text(raw)
    train(load_recipe(paths["whole"]), console=QUIET)
    _stop_at(monkeypatch, 3)
    with pytest.raises(signals.Stopped):
        train(load_recipe(paths["stopped"]), console=QUIET)
    monkeypatch.undo()
    cached = load_file(str(tmp_path / "stopped" / CACHE_FILE))
    train(load_recipe(paths["stopped"]), resume=True, console=QUIET)
    assert all(torch.equal(cached[k], v) for k, v in load_file(str(tmp_path / "stopped" / CACHE_FILE)).items())
    for folder in ("adapter", "last"):
        a = load_file(str(tmp_path / "whole" / folder / "adapter.safetensors"))
        b = load_file(str(tmp_path / "stopped" / folder / "adapter.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("elapsed_s", "samples_per_s", "tokens_per_s")
    clean = [[{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / n)] for n in ("whole", "stopped")]
    assert clean[0] == clean[1]
    assert any(r.get("rewards/margins") for r in clean[0])
