"""A DPO run through the `peftcli` command, and every command that reads a run working on it:
eval, generate, merge, export --to peft, count-params, sweep, combine and serve."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def dpo_run(tiny_llama_chat_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    recipe = write_recipe(
        d / "dpo.yaml", model={"name": str(tiny_llama_chat_dir), "task": "causal_lm"},
        data={"source": "tweets_preference", "train_size": 32, "val_size": 8, "eval_size": 8, "max_length": 96},
        method={"name": "lora", "r": 4},
        train={"objective": "dpo", "beta": 0.2, "max_steps": 4, "batch_size": 4, "lr": 2e-2, "progress": False,
               "log_every": 1, "eval_every": 2},
        eval={"generate_accuracy": True, "max_new_tokens": 2},
        output={"dir": str(d / "run"), "plot": False},
    )
    res = invoke("train", recipe, "--smoke")  # 4 steps, as asked; and the written run must reload to the same scores
    assert res.exit_code == 0, res.output
    assert "smoke ok" in res.output
    return d, recipe, d / "run-smoke"


@pytest.mark.slow
def test_train_with_objective_dpo(dpo_run):
    _, _, run = dpo_run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "lr" in x]
    assert len(steps) == 4 and all({"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"} <= set(x)
                                   for x in steps)
    vals = [x["val"] for x in lines if "val" in x]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["accuracy"] == max(v["accuracy"] for v in vals)  # kept on validation preference accuracy
    assert {"accuracy", "rewards/margins", "generate_accuracy"} <= set(summary["test"])
    assert "objective: dpo" in (run / "recipe.yaml").read_text()


@pytest.mark.slow
def test_eval_and_generate_read_a_dpo_run(dpo_run):
    _, _, run = dpo_run
    res = invoke("eval", run)
    assert res.exit_code == 0, res.output
    m = json.loads((run / "eval_test.json").read_text())
    test = json.loads((run / "summary.json").read_text())["test"]
    for k in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert m[k] == pytest.approx(test[k], abs=1e-6)
    res = invoke("eval", run, run)
    assert res.exit_code == 2 and "one run at a time" in res.output
    res = invoke("generate", run, "Tweet: what a lovely day")
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_merge_and_export_a_dpo_run(dpo_run, tmp_path):
    _, _, run = dpo_run
    res = invoke("merge", run, tmp_path / "merged")
    assert res.exit_code == 0, res.output
    assert float(res.output.split("sample batch:")[1].split()[0]) < 1e-4
    res = invoke("export", run, "--to", "peft", tmp_path / "peft")
    assert res.exit_code == 0, res.output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "adapter" / "meta.json").read_text())["base_model"])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 50, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_count_params_counts_the_reference(dpo_run):
    _, recipe, _ = dpo_run
    res = invoke("count-params", recipe)
    assert res.exit_code == 0, res.output
    assert "objective dpo: activations for 2 sequence(s) per example" in res.output
    assert "adds no weights" in res.output
    res = invoke("count-params", recipe, "init_from=runs/sft")  # the SFT adapter, frozen, is the reference
    assert "reference's copy" in res.output


@pytest.mark.slow
def test_sweep_ranks_dpo_trials_on_validation_preference_accuracy(dpo_run, tmp_path):
    _, recipe, _ = dpo_run
    res = invoke("sweep", recipe, "train.beta=0.1,0.5", "train.max_steps=2", "--out", tmp_path / "sweep")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    done = [r for r in rows if r.get("status") == "done"]
    assert len(done) == 2 and all(r["metric"] == "accuracy" and 0 <= r["value"] <= 1 for r in done)


@pytest.mark.slow
def test_combine_and_serve_a_dpo_run(dpo_run, tmp_path):
    """A DPO run is a LoRA run like any other: it combines with an SFT run, and `serve` answers with
    it (and with the combination) by name, greedy text equal to `peftcli generate`'s."""
    pytest.importorskip("starlette")
    from helpers.asgi import call, run_with

    from peftcli.commands.serve import ServeOptions
    from peftcli.inference.multi import load_runs

    _, recipe, run = dpo_run
    sft = tmp_path / "sft"
    res = invoke("train", recipe, "train.objective=sft", "data.source=tweets_instruct", "train.max_steps=2",
                 "eval.generate_accuracy=false", f"output.dir={sft}")
    assert res.exit_code == 0, res.output
    both = tmp_path / "both"
    res = invoke("combine", run, sft, "--weights", "0.5,0.5", "--how", "cat", both)
    assert res.exit_code == 0, res.output
    res = invoke("eval", both, "--limit", "4")
    assert res.exit_code == 0, res.output

    prompt = "Tweet: what a lovely day"
    alone = {name: invoke("generate", path, prompt, "--max-new-tokens", "3") for name, path in
             (("dpo", run), ("both", both))}
    multi = load_runs([f"dpo={run}", f"both={both}"], torch.device("cpu"))

    # `generate` formats a prompt as the run's data was: through the chat template here, as the chat
    # endpoint does
    assert multi.recipe_of("dpo").data.chat_template

    async def work(app, _):
        out = {}
        for name in alone:
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 3})
            out[name] = await call(app, "POST", "/v1/chat/completions", body.encode())
        return out

    served = run_with(multi, ServeOptions(), work)
    for name, res in alone.items():
        status, got = served[name]
        assert status == 200, got
        text = json.loads(got)["choices"][0]["message"]["content"]
        assert res.exit_code == 0 and text.strip() and text.strip() in res.output, (name, text, res.output)
