"""End to end through the `peftcli` command: train -> eval -> merge, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(
        d / "r.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "lora", "r": 4, "targets": ["q", "v", "ffn_out"]},
        train={"epochs": 3, "batch_size": 8, "lr": 5e-3, "progress": False, "log_every": 1},
        output={"dir": str(d / "run")},
    )
    res = invoke("train", recipe)
    assert res.exit_code == 0, res.output
    return d, recipe, d / "run"


@pytest.mark.slow
def test_train_writes_run(trained_run):
    _, _, run = trained_run
    for f in ("recipe.yaml", "metrics.jsonl", "summary.json", "curves.png", "adapter/adapter.safetensors",
              "adapter/meta.json", "last/trainer_state.json", "last/trainer_state.safetensors"):
        assert (run / f).exists(), f
    meta = json.loads((run / "adapter" / "meta.json").read_text())
    assert meta["method"] == "lora" and meta["label_names"] == ["negative", "positive"]
    assert meta["trainable"] < meta["total"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val" in x for x in lines) and any("samples_per_s" in x for x in lines)
    assert sum("test" in x for x in lines) == 1  # the test rows are scored once, at the end
    # only adapter tensors saved (LoRA + head), never the frozen base
    from safetensors.torch import load_file

    keys = load_file(str(run / "adapter" / "adapter.safetensors")).keys()
    assert all("lora_" in k or "classifier" in k for k in keys)


def test_eval_matches_training_metrics(trained_run):
    _, _, run = trained_run
    res = invoke("eval", run)
    assert res.exit_code == 0, res.output
    m = json.loads((run / "eval_test.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert m["examples"] == 12
    assert abs(m["accuracy"] - summary["test"]["accuracy"]) < 1e-9
    res = invoke("eval", run, "--split", "val")
    assert res.exit_code == 0, res.output
    v = json.loads((run / "eval_val.json").read_text())
    assert abs(v["accuracy"] - summary["val"]["accuracy"]) < 1e-9 and v["examples"] == summary["rows"]["val"]


def test_eval_says_when_it_scores_the_last_checkpoint(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[2], run)
    res = invoke("eval", run)
    assert res.exit_code == 0 and "no kept adapter" not in res.output, res.output
    shutil.rmtree(run / "adapter")
    res = invoke("eval", run)
    assert res.exit_code == 0, res.output
    assert "has no kept adapter (adapter/): using its last checkpoint (last/)" in " ".join(res.output.split())


@pytest.mark.parametrize(("device", "words"), [("foo", "--device 'foo' is not a device"),
                                                ("meta", "peftcli runs on cpu, cuda or mps")])
def test_a_device_this_machine_lacks_is_bad_input(trained_run, device, words):
    res = invoke("eval", trained_run[2], "--device", device)
    assert res.exit_code == 2 and words in " ".join(res.output.split()), res.output


def test_eval_names_what_the_user_wrote(trained_run, tmp_path):
    res = invoke("eval", trained_run[2], "--split", "nosuch")
    assert res.exit_code == 2 and "--split nosuch: 'nosuch' not in" in " ".join(res.output.split()), res.output
    res = invoke("eval", tmp_path / "nowhere")
    assert res.exit_code == 2 and "no such folder" in res.output, res.output


def test_eval_keeps_its_scores_on_screen_when_the_run_cannot_be_written(trained_run, monkeypatch, tmp_path):
    """A read-only or full run folder: the scores are shown and the failed save said (it was exit 1
    with errno text, the scores lost), for one run and for several scored together."""
    import peftcli.commands.eval as ev

    def refuse(path, data):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(ev, "atomic_file_write", refuse)
    res = invoke("eval", trained_run[2])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "could not save" in res.output and "Operation not permitted" in res.output
    shutil.copytree(trained_run[2], tmp_path / "twin")
    res = invoke("eval", trained_run[2], tmp_path / "twin")
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and " ".join(res.output.split()).count("could not save") == 2, res.output


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_the_cpu_does_not_autocast_is_said(trained_run, tmp_path, precision):
    _, recipe, _ = trained_run
    res = invoke("train", recipe, f"train.precision={precision}", "train.max_steps=1", "output.plot=false",
                 f"output.dir={tmp_path / 'run'}")
    assert res.exit_code == 0, res.output
    assert f"train.precision {precision} autocasts on CUDA only; training in fp32 here" in " ".join(res.output.split())


def test_merge_exact_and_loadable(trained_run, tmp_path):
    _, _, run = trained_run
    res = invoke("merge", run, tmp_path / "merged")
    assert res.exit_code == 0, res.output
    diff = float(res.output.split("sample batch:")[1].split()[0])
    assert diff < 1e-5
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in m.named_parameters())
    assert (tmp_path / "merged" / "tokenizer.json").exists()


@pytest.mark.slow
def test_resume_continues(trained_run, tmp_path):
    d, recipe, run = trained_run
    res = invoke("train", recipe, "train.epochs=4", f"output.dir={run}", "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming at step" in res.output
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s) > 18


def test_existing_run_refused(trained_run):
    _, recipe, _ = trained_run
    res = invoke("train", recipe)
    assert res.exit_code == 2
    assert "already holds a run" in res.output


def test_dry_run_prints_budget(trained_run):
    _, recipe, _ = trained_run
    res = invoke("train", recipe, "--dry-run", "method.r=2")
    assert res.exit_code == 0, res.output
    assert "trainable parameters:" in res.output and "r: 2" in res.output


def test_bad_recipe_exit_2(tmp_path):
    rec = write_recipe(tmp_path / "bad.yaml", train={"lrr": 1, "batch_size": -1}, method={"name": "lora", "r": "x"})
    res = invoke("train", rec)
    assert res.exit_code == 2
    assert "bad.yaml: 3 problems" in res.output
    assert "did you mean 'lr'" in res.output
    assert "Traceback" not in res.output


def test_bad_override_exit_2(trained_run):
    _, recipe, _ = trained_run
    res = invoke("validate", recipe, "method.rank=4")
    assert res.exit_code == 2 and "method.rank: unknown key" in res.output


def test_missing_model_exit_2(tmp_path, tiny_csv):
    rec = write_recipe(tmp_path / "r.yaml", model={"name": "no-such-org/no-such-model"},
                       data={"source": str(tiny_csv), "text_column": "sentence"}, output={"dir": str(tmp_path / "o")})
    res = invoke("train", rec)
    assert res.exit_code == 2
    assert "could not load model 'no-such-org/no-such-model'" in res.output
    assert "Traceback" not in res.output


def test_offline_hub_dataset_clear_message(tmp_path, tiny_bert_dir):
    rec = write_recipe(tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
                       data={"source": "glue", "config_name": "sst2"}, output={"dir": str(tmp_path / "o")})
    res = invoke("train", rec)
    assert res.exit_code == 2
    assert "data.source: could not load 'glue'" in res.output


def test_count_params_from_recipe(trained_run):
    _, recipe, _ = trained_run
    res = invoke("count-params", recipe)
    assert res.exit_code == 0, res.output
    assert "trainable %" in res.output
    # Flags for a model and method without a recipe would be outvoted by it without a word.
    res = invoke("count-params", recipe, "--method", "bitfit", "--task", "classification")
    assert res.exit_code == 2, res.output
    assert "override its keys: method.name=bitfit model.task=classification" in " ".join(res.output.split())


def test_recipes_list_and_copy(tmp_path):
    res = invoke("recipes")
    assert res.exit_code == 0 and "tweets_lora" in res.output
    res = invoke("recipes", "copy", "tweets_lora", tmp_path / "mine.yaml")
    assert res.exit_code == 0 and (tmp_path / "mine.yaml").exists()
    res = invoke("recipes", "copy", "tweets_lroa", tmp_path / "x.yaml")
    assert res.exit_code == 2 and "did you mean 'tweets_lora'" in res.output
    (tmp_path / "mine.yaml").write_text("edited")
    res = invoke("recipes", "copy", "tweets_lora", tmp_path / "mine.yaml")  # never replaces a file
    assert res.exit_code == 2 and "exists" in res.output and (tmp_path / "mine.yaml").read_text() == "edited"
    (tmp_path / "link.yaml").symlink_to(tmp_path / "elsewhere.yaml")  # dangling: never written through
    res = invoke("recipes", "copy", "tweets_lora", tmp_path / "link.yaml")
    assert res.exit_code == 2 and not (tmp_path / "elsewhere.yaml").exists()
    for dest, words in ((tmp_path / "mine.yaml" / "x.yaml", "is not a folder"), (tmp_path / "no" / "x.yaml", "does not exist")):
        res = invoke("recipes", "copy", "tweets_lora", dest)
        assert res.exit_code == 2 and words in " ".join(res.output.split()) and "Errno" not in res.output, res.output


def test_plot_several_runs(trained_run, tmp_path):
    _, _, run = trained_run
    res = invoke("plot", run, run, "--out", tmp_path / "c.png")
    assert res.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 1000
    assert invoke("plot", run, "--out", tmp_path / "c.png").exit_code == 0  # its own figure: replaced


def test_plot_never_replaces_a_file_it_did_not_draw(trained_run, tmp_path):
    _, _, run = trained_run
    notes, png = tmp_path / "notes.txt", tmp_path / "photo.png"
    notes.write_text("mine")
    png.write_bytes(b"\x89PNG\r\n\x1a\n not drawn by peftcli")
    for dest, needle in [(notes, "name a file ending in .png"), (png, "not a figure peftcli plot drew"),
                         (tmp_path / "no" / "c.png", "does not exist")]:
        res = invoke("plot", run, "--out", dest)
        assert res.exit_code == 2 and needle in res.output, res.output
    assert notes.read_text() == "mine" and png.read_bytes().endswith(b"not drawn by peftcli")
    assert invoke("plot", run, "--out", png, "--force").exit_code == 0
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_checkpoint(tiny_bert_dir, tiny_csv, tmp_path):
    rec = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12},
        method={"name": "lora"}, train={"epochs": 30, "batch_size": 8, "lr": 1e12, "max_grad_norm": None,
                                         "eval_every": 1, "progress": False},
        output={"dir": str(tmp_path / "run")},
    )
    res = invoke("train", rec)
    assert res.exit_code == 1
    assert "NaN or infinite" in res.output
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()


@pytest.mark.slow
def test_train_pooler_trains_saves_and_reloads(tiny_bert_dir, tiny_csv, tmp_path):
    from safetensors import safe_open

    rec = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir), "train_pooler": True},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "pfeiffer", "reduction_factor": 4},
        train={"max_steps": 2, "batch_size": 8, "progress": False},
        output={"dir": str(tmp_path / "run")},
    )
    res = invoke("train", rec)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # hidden 32, 2 layers: Pfeiffer 2*(2*8*32 + 8 + 32) + pooler 32*32 + 32 + classifier 32*2 + 2
    assert summary["trainable"] == 2 * (2 * 8 * 32 + 8 + 32) + 32 * 32 + 32 + 32 * 2 + 2
    with safe_open(tmp_path / "run" / "adapter" / "adapter.safetensors", "pt") as f:
        assert "bert.pooler.dense.weight" in set(f.keys())
    res = invoke("eval", tmp_path / "run")
    assert res.exit_code == 0, res.output


def test_train_pooler_refused_without_pooler(tiny_gpt2_dir, tiny_csv, tmp_path):
    rec = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_gpt2_dir), "train_pooler": True},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12},
        method={"name": "lora"}, output={"dir": str(tmp_path / "run")},
    )
    res = invoke("train", rec, "--dry-run")
    assert res.exit_code == 2, res.output
    assert "model.train_pooler" in res.output and "set model.train_pooler: false" in res.output
