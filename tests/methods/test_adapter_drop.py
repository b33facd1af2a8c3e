"""AdapterDrop: switching layers off means "as if those adapters were absent", robust training with
`train.drop_layers` end to end, and `peftcli drop` writing a run that reloads dropped."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import batch, tiny_model, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.core import switch as drop_lib
from peftcli.methods import get_method
from peftcli.methods.attach import attach_method, pick_device

runner = CliRunner()


def adapted(kind: str, name: str, **kw):
    model = tiny_model(kind)
    cfg = get_method(name).config_cls(**kw)
    arch, spec = attach_method(model, name, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith(("classifier.", "score.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, arch


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("name,kw", [("pfeiffer", {}), ("houlsby", {}), ("lora", {"targets": ["q", "v", "ffn_out"]})])
def test_dropped_layer_is_as_if_it_had_no_adapter(name, kw):
    """Dropping layer 0 equals the same adapters attached to layer 1 only (same tensors)."""
    b = batch()
    model, arch = adapted("bert", name, **kw)
    only_top = tiny_model("bert")
    top_kw = {"layers": "1"} if name == "lora" else {"leave_out": [0]}
    attach_method(only_top, name, get_method(name).config_cls(**kw, **top_kw))
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in only_top.named_parameters():
            if p.requires_grad:
                p.copy_(sd[n])
    assert drop_lib.set_dropped_layers(model, arch, {0}) > 0
    torch.testing.assert_close(logits(model, b), logits(only_top, b), rtol=0, atol=1e-6)
    drop_lib.set_dropped_layers(model, arch, {0, 1})
    torch.testing.assert_close(logits(model, b), logits(tiny_model("bert"), b), rtol=0, atol=1e-6)


def test_random_drop_draws_lowest_layers():
    model, arch = adapted("llama", "pfeiffer")
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        n = drop_lib.random_drop(model, arch, 2, rng)
        seen.add(n)
        assert drop_lib.dropped_layers(model, arch) == list(range(n))
    assert seen == {0, 1, 2}


def test_disable_layers_keeps_other_flags_and_recording_round_trips():
    model, arch = adapted("bert", "houlsby")
    some = next(n for n, m in model.named_modules() if hasattr(m, "adapter_enabled") and ".1." in n)
    model.get_submodule(some).adapter_enabled = False
    drop_lib.disable_layers(model, arch, [0])
    off = drop_lib.disabled_modules(model)
    assert some in off and all(".0." in n or n == some for n in off)
    fresh, _ = adapted("bert", "houlsby")
    assert drop_lib.apply_recorded(fresh, {"disabled_modules": off}) == len(off)
    assert drop_lib.flags(fresh) == drop_lib.flags(model)
    from peftcli.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not have"):
        drop_lib.apply_recorded(fresh, {"disabled_modules": ["bert.encoder.layer.7.nope"]})


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def robust_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    """Pfeiffer trained with train.drop_layers: 2 (both layers of the tiny model)."""
    d = tmp_path_factory.mktemp("drop")
    recipe = write_recipe(
        d / "r.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "pfeiffer", "reduction_factor": 4},
        train={"epochs": 2, "batch_size": 8, "lr": 5e-3, "progress": False, "drop_layers": 2, "seed": 1},
        output={"dir": str(d / "run")},
    )
    drawn = []
    import peftcli.training.loop as train_mod

    with pytest.MonkeyPatch.context() as mp:
        real = train_mod.random_drop
        mp.setattr(train_mod, "random_drop", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
        res = runner.invoke(app, ["train", recipe])
    assert res.exit_code == 0, res.output
    return d, d / "run", drawn


@pytest.mark.slow
def test_robust_training_drops_each_step_and_evaluates_the_whole_model(robust_run):
    _, run, drawn = robust_run
    assert len(drawn) == 12 and set(drawn) == {0, 1, 2}
    # the eval inside training ran with every adapter on: a fresh reload (all on) reproduces it
    summary = json.loads((run / "summary.json").read_text())
    for split in ("val", "test"):
        res = runner.invoke(app, ["eval", str(run), "--split", split])
        assert res.exit_code == 0, res.output
        got = json.loads((run / f"eval_{split}.json").read_text())
        assert abs(got["loss"] - summary[split]["loss"]) < 1e-6


@pytest.mark.slow
def test_drop_command_writes_a_run_that_reloads_dropped(robust_run, tmp_path):
    _, run, _ = robust_run
    out = tmp_path / "dropped"
    res = runner.invoke(app, ["drop", str(run), "--lowest", "1", "--out", str(out), "--repeats", "2"])
    assert res.exit_code == 0, res.output
    assert "examples_per_s" in res.output and "speed ×" in res.output
    rep = json.loads((out / "drop.json").read_text())
    assert rep["layers_dropped"] == [0] and rep["before"]["examples_per_s"] > 0
    assert rep["disabled_modules"] == ["bert.encoder.layer.0.pfeiffer_ffn"]
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "recipe.yaml").exists()
    from peftcli.runs.load import load_run

    built, meta = load_run(out, pick_device("cpu"))
    assert drop_lib.dropped_layers(built.model, built.arch) == [0]
    assert meta["drop"]["from"] == str(run)
    assert rep["split"] == "val"  # what to drop is a choice: measured on validation rows
    res = runner.invoke(app, ["eval", str(out), "--split", "val"])
    assert res.exit_code == 0, res.output
    assert abs(json.loads((out / "eval_val.json").read_text())["loss"] - rep["after"]["loss"]) < 1e-6
    # dropping again from the dropped run accumulates
    res = runner.invoke(app, ["drop", str(out), "--layers", "1", "--out", str(tmp_path / "both")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "both" / "drop.json").read_text())["layers_dropped"] == [0, 1]


@pytest.mark.parametrize("args,msg", [
    ([], "say what to drop"),
    (["--lowest", "9"], "give 1 to 2"),
    (["--lowest", "0"], "give 1 to 2"),
    (["--layers", "1-0"], "names no layer"),
    (["--layers", ""], "names no layer"),
    (["--layers", "5"], "out of range"),
    (["--lowest", "1", "--layers", "0"], "give one"),
    (["--prune-fusion", "1"], "not a fused one"),
])
def test_drop_bad_input_exit_2(robust_run, args, msg):
    _, run, _ = robust_run
    res = runner.invoke(app, ["drop", str(run), *args])
    assert res.exit_code == 2 and msg in res.output, res.output
    assert not list(run.parent.glob(f"{run.name}-drop-*"))


def test_drop_of_the_current_folder_names_the_sibling_after_it(robust_run, monkeypatch, tmp_path):
    import shutil

    run = tmp_path / "mine"
    shutil.copytree(robust_run[1], run)
    monkeypatch.chdir(run)
    res = runner.invoke(app, ["drop", ".", "--lowest", "1", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert (run.parent / f"{run.name}-drop-layers0").is_dir()
