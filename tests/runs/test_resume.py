"""--resume continues the same run or refuses; no recipe can make the loop spin; a replaced run
comes back when the new one fails before its first checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _recipe(tmp_path: Path, tiny_bert_dir, tiny_csv, **train) -> str:
    t = {"epochs": 2, "batch_size": 8, "lr": 5e-3, "progress": False, "log_every": 1, "eval_every": 2, **train}
    return write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "lora", "r": 4}, train=t, output={"dir": str(tmp_path / "run"), "plot": False},
    )


@pytest.fixture(scope="module")
def finished(tiny_bert_dir, tiny_csv, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    rec = _recipe(d, tiny_bert_dir, tiny_csv)
    res = invoke("train", rec)
    assert res.exit_code == 0, res.output
    return d, rec


def _copy(finished, tmp_path: Path) -> tuple[str, Path]:
    d, _ = finished
    run = tmp_path / "run"
    shutil.copytree(d / "run", run)
    text = (d / "r.yaml").read_text().replace(str(d / "run"), str(run))
    (tmp_path / "r.yaml").write_text(text)
    return str(tmp_path / "r.yaml"), run


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [("train.lr=1e-2", "train.lr"), ("method.r=8", "method.r"),
                                          ("train.seed=3", "train.seed"), ("data.max_length=16", "data.max_length")])
def test_resume_with_another_recipe_is_refused_and_touches_nothing(finished, tmp_path, override, key):
    rec, run = _copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = invoke("train", rec, override, "train.epochs=3", "--resume")
    assert res.exit_code == 2, res.output
    assert key in res.output and "recipe.yaml" in res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_into_a_read_only_folder_is_refused_before_training(finished, tmp_path, monkeypatch):
    """A read-only mount (root ignores chmod, so the test says the folder is read-only): the first
    write stopped the resumed run with errno's words and exit 1."""
    import peftcli.training.loop as loop

    rec, run = _copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    real = os.access
    monkeypatch.setattr(loop.os, "access", lambda p, mode: False if Path(p) == run else real(p, mode))
    res = invoke("train", rec, "train.epochs=3", "--resume")
    assert res.exit_code == 2 and f"--resume: {run} is read-only here" in " ".join(res.output.split()), res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_resume_extends_epochs_and_keeps_one_curve(finished, tmp_path):
    rec, run = _copy(finished, tmp_path)
    res = invoke("train", rec, "train.epochs=3", "--resume")
    assert res.exit_code == 0, res.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == 18  # 3 epochs of 6 steps, no second curve
    assert "epochs: 3.0" in (run / "recipe.yaml").read_text()


def test_resume_of_a_finished_run_leaves_it_alone(finished, tmp_path):
    rec, run = _copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = invoke("train", rec, "--resume")
    assert res.exit_code == 0, res.output
    assert "already finished" in res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


class _Plant:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_trainer_state_is_never_unpickled(finished, tmp_path):
    rec, run = _copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    for f in ("trainer_state.json", "trainer_state.safetensors"):
        (run / "last" / f).unlink()
    with open(run / "last" / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": _Plant(marker)}, f)
    res = invoke("train", rec, "train.epochs=3", "--resume")
    assert res.exit_code == 2, res.output
    assert "trainer_state.pt" in res.output and not marker.exists()


def test_damaged_trainer_state_names_the_file(finished, tmp_path):
    rec, run = _copy(finished, tmp_path)
    f = run / "last" / "trainer_state.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    res = invoke("train", rec, "train.epochs=3", "--resume")
    assert res.exit_code == 2, res.output
    assert "trainer_state.safetensors" in res.output


@pytest.mark.slow
def test_interrupted_checkpoint_swap_is_recovered(finished, tmp_path):
    # A kill between the two renames of a checkpoint swap: no last/, the new one whole in its
    # temp name and the old one moved aside. --resume finishes the swap.
    rec, run = _copy(finished, tmp_path)
    (run / "last").rename(run / ".last.peftcli-tmp-99999")
    shutil.copytree(run / ".last.peftcli-tmp-99999", run / ".last.peftcli-old-99999")
    res = invoke("train", rec, "train.epochs=3", "--resume")
    assert res.exit_code == 0, res.output
    assert "interrupted swap" in res.output
    assert not list(run.glob(".last.*"))


def test_grad_accum_larger_than_an_epoch_is_refused_with_the_numbers(tiny_bert_dir, tiny_csv, tmp_path):
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, grad_accum=50)
    res = invoke("train", rec)
    assert res.exit_code == 2, res.output
    assert "grad_accum 50" in res.output and "44 training rows" in res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_epoch_end_group_is_its_own_step(tiny_bert_dir, tiny_csv, tmp_path):
    # 44 rows / batch 8 = 6 micro-batches; grad_accum 4 -> steps of 4 and 2 micro-batches.
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, grad_accum=4, epochs=2, eval_every=100)
    res = invoke("train", rec)
    assert res.exit_code == 0, res.output
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in steps if "loss" in r] == [0, 0, 1, 1]


def test_failed_overwrite_gives_the_old_run_back(finished, tmp_path):
    rec, run = _copy(finished, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = invoke("train", rec, "output.overwrite=true", "train.lr=1e12", "train.max_grad_norm=null")
    assert res.exit_code == 1, res.output
    assert "NaN or infinite" in res.output
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_non_finite_eval_loss_stops_the_run(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    import peftcli.training.loop as train_mod

    real = train_mod.evaluate

    def nan_eval(*a, **k):
        m = real(*a, **k)
        m["loss"] = float("nan")
        return m

    monkeypatch.setattr(train_mod, "evaluate", nan_eval)
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv)
    res = invoke("train", rec)
    assert res.exit_code == 1, res.output
    assert "validation loss became NaN" in res.output
    assert not (tmp_path / "run" / "last").exists()  # never kept as a good checkpoint


@pytest.mark.slow
def test_resume_before_any_checkpoint_restarts_with_one_curve(finished, tmp_path):
    d, _ = finished
    rec, run = _copy(finished, tmp_path)
    for sub in ("last", "adapter"):
        shutil.rmtree(run / sub)
    (run / "summary.json").unlink()
    res = invoke("train", rec, "--resume")
    assert res.exit_code == 0, res.output
    ref = load_file(str(d / "run" / "last" / "adapter.safetensors"))
    got = load_file(str(run / "last" / "adapter.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    ref_lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(ref_lines)


@pytest.mark.parametrize("where", ["user_folder", "cwd", "parent_of_cwd", "init_from", "data_parent"])
def test_overwrite_never_deletes_what_is_not_a_run(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, where,
                                                   finished):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    monkeypatch.chdir(user)
    extra = []
    dest = {"user_folder": user, "cwd": Path("."), "parent_of_cwd": tmp_path, "init_from": finished[0] / "run",
            "data_parent": tiny_csv.parent}[where]
    if where == "init_from":
        extra = [f"init_from={finished[0] / 'run'}"]
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv)
    before = {p: p.read_bytes() for p in Path(dest).rglob("*") if p.is_file()}
    res = invoke("train", rec, f"output.dir={dest}", "output.overwrite=true", *extra)
    assert res.exit_code == 2, res.output
    assert (user / "notes.txt").read_text() == "keep me"
    assert {p: p.read_bytes() for p in Path(dest).rglob("*") if p.is_file()} == before


def test_export_and_merge_check_shapes_against_the_recipe(finished, tmp_path):
    rec, run = _copy(finished, tmp_path)
    text = (run / "recipe.yaml").read_text()
    assert "  r: 4\n" in text
    (run / "recipe.yaml").write_text(text.replace("  r: 4\n", "  r: 8\n"))
    for cmd in (["export", run, tmp_path / "exp"], ["merge", run, tmp_path / "merged"]):
        res = invoke(*cmd)
        assert res.exit_code == 2, res.output
        assert "shape" in res.output and not Path(cmd[2]).exists()


@pytest.mark.slow
def test_training_steps_run_in_training_mode(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    # Models load in evaluation mode; a loop that forgot train() would silently train without dropout.
    import peftcli.training.loop as train_mod

    modes = []
    real = train_mod.compute_loss

    def spy(s, batch, *rest):
        modes.append(s.train_model.training)
        return real(s, batch, *rest)

    monkeypatch.setattr(train_mod, "compute_loss", spy)
    res = invoke("train", _recipe(tmp_path, tiny_bert_dir, tiny_csv))
    assert res.exit_code == 0, res.output
    assert modes and all(modes)  # before and after every evaluation
