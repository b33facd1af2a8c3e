"""`peftcli drop` copies adapters, never a checkpoint's trainer state, whichever folder it reads."""

from __future__ import annotations

import shutil

import torch
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.runs.state import is_trainer_state, write_trainer_state

runner = CliRunner()


def test_every_file_the_trainer_state_writes_is_named_trainer_state(tmp_path):
    write_trainer_state(tmp_path, {"format": 2}, {"opt/x": torch.zeros(2)})
    written = [f.name for f in tmp_path.iterdir()]
    assert written and all(is_trainer_state(n) for n in written), written
    assert not is_trainer_state("adapter.safetensors") and not is_trainer_state("meta.json")


def test_drop_of_a_run_with_only_last_leaves_its_trainer_state_behind(tiny_bert_dir, tiny_csv, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "pfeiffer", "reduction_factor": 4},
        train={"epochs": 1, "batch_size": 16, "progress": False},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    res = runner.invoke(app, ["train", recipe])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")  # as a run killed before its first evaluation leaves it
    assert any(is_trainer_state(f.name) for f in (run / "last").iterdir())
    out = tmp_path / "dropped"
    res = runner.invoke(app, ["drop", str(run), "--lowest", "1", "--out", str(out), "--repeats", "1"])
    assert res.exit_code == 0, res.output
    copied = sorted(f.name for f in (out / "adapter").iterdir())
    assert "adapter.safetensors" in copied and "meta.json" in copied
    assert not [n for n in copied if is_trainer_state(n)], copied
    assert not (out / "last").exists()


def test_merge_and_export_refuse_a_run_whose_adapters_are_switched_off(tiny_bert_dir, tiny_csv, tmp_path):
    """They merged and exported the adapters drop had switched off, with exit 0."""
    recipe = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "lora", "r": 2}, train={"max_steps": 2, "batch_size": 16, "progress": False},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    assert runner.invoke(app, ["train", recipe]).exit_code == 0
    dropped = tmp_path / "dropped"
    res = runner.invoke(app, ["drop", str(tmp_path / "run"), "--lowest", "1", "--out", str(dropped), "--repeats", "1"])
    assert res.exit_code == 0, res.output
    for args in (["merge", str(dropped), str(tmp_path / "m")], ["export", str(dropped), "--to", "peft", str(tmp_path / "e")],
                 ["export", str(dropped), "--as-lora", str(tmp_path / "l")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "lists switched-off adapters" in " ".join(res.output.split()), (args, res.output)
        assert not (tmp_path / args[-1]).exists()
