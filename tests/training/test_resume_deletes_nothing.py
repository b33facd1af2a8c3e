"""`--resume` deletes nothing before every path check has passed, and then only peftcli's own
temporary entries inside a folder that is provably peftcli's (issue 28 item 5).

Names like `.zshrc.old-1` or `.photos.old-2019/` once matched peftcli's temp-name pattern and were
deleted by `--resume`; peftcli's temporaries now carry its tag and a pid (`core/files`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _recipe(tmp_path: Path, model: Path, data: Path, out: Path) -> str:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": str(model)},
        "data": {"source": str(data), "text_column": "sentence", "eval_size": 8, "max_length": 24},
        "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 2, "batch_size": 8, "progress": False, "eval_every": 2},
        "output": {"dir": str(out), "plot": False},
    }))
    return str(path)


def _user_lookalikes(folder: Path) -> None:
    """A user's dot-backups whose names look like a temp file of another tool."""
    (folder / ".photos.old-2019").mkdir(parents=True)
    (folder / ".photos.old-2019" / "beach.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / ".zshrc.old-1").write_text("export PATH=~/bin:$PATH\n")


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.parametrize("with_other_file", [False, True])
def test_resume_on_a_user_folder_refuses_and_deletes_nothing(tiny_bert_dir, tiny_csv, tmp_path, with_other_file):
    out = tmp_path / "home-ish"
    _user_lookalikes(out)
    if with_other_file:
        (out / "notes.txt").write_text("mine")
    (tmp_path / ".home-ish.old-3").write_text("a sibling that looks like a temp name")
    before, sibling = _snapshot(out), (tmp_path / ".home-ish.old-3").read_text()
    res = runner.invoke(app, ["train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, out), "--resume"])
    assert res.exit_code == 2, res.output
    assert "not a peftcli run folder" in res.output
    assert _snapshot(out) == before
    assert (tmp_path / ".home-ish.old-3").read_text() == sibling


def test_resume_tidies_only_peftcli_temporaries(tiny_bert_dir, tiny_csv, tmp_path):
    """A run killed before recipe.yaml was in place: its own temporary file goes, the run starts;
    in a finished run, entries that merely look like temporaries survive a resume's recovery."""
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / f".recipe.yaml.peftcli-tmp-{dead}").write_text("half a recipe")
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, out)
    res = runner.invoke(app, ["train", rec, "--resume"])
    assert res.exit_code == 0, res.output
    assert not (out / f".recipe.yaml.peftcli-tmp-{dead}").exists() and (out / "summary.json").exists()

    _user_lookalikes(out / "adapter")
    (out / ".last.old-2019").mkdir()
    (out / ".last.old-2019" / "keep.txt").write_text("mine")
    (out / ".adapter.tmp-7").write_text("mine too")
    (out / f".last.peftcli-tmp-{dead}").mkdir()  # a checkpoint half-written by a killed peftcli
    res = runner.invoke(app, ["train", rec, "--resume"])
    assert res.exit_code == 0, res.output
    assert (out / ".last.old-2019" / "keep.txt").read_text() == "mine"
    assert (out / ".adapter.tmp-7").read_text() == "mine too"
    assert (out / "adapter" / ".zshrc.old-1").exists() and (out / "adapter" / ".photos.old-2019" / "beach.jpg").exists()
    assert not (out / f".last.peftcli-tmp-{dead}").exists()


def test_overwrite_refuses_a_user_folder_that_only_looks_like_a_run(tiny_bert_dir, tiny_csv, tmp_path):
    """output.overwrite: true used to replace a folder on names alone (recipe.yaml, metrics.jsonl,
    tensorboard/); now its recipe.yaml must parse as a peftcli recipe and adapter/meta.json name a method."""
    out = tmp_path / "experiments"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out").write_text("my curves")
    (out / "recipe.yaml").write_text("things to try: a bigger batch, then a smaller lr\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = _snapshot(out)
    res = runner.invoke(app, ["train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, out), "output.overwrite=true"])
    assert res.exit_code == 2, res.output
    assert "not a folder peftcli wrote" in res.output and str(out) in res.output.replace("\n", "")
    assert _snapshot(out) == before


def test_resume_never_trains_into_a_user_folder_that_holds_a_recipe(tiny_bert_dir, tiny_csv, tmp_path):
    """A user's folder with their copy of the recipe, notes and a metrics file: --resume used to
    train into it, list every file in the run's marker, and a later overwrite deleted them."""
    out = tmp_path / "mine"
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, out)
    out.mkdir()
    (out / "recipe.yaml").write_text(Path(rec).read_text())
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text("my own line\n")
    before = _snapshot(out)
    res = runner.invoke(app, ["train", rec, "--resume"])
    assert res.exit_code == 2, res.output
    assert "is not a run folder peftcli wrote" in " ".join(res.output.split())
    res = runner.invoke(app, ["train", rec])  # and a fresh run is refused too, naming what is there
    assert res.exit_code == 2 and "is not a folder peftcli wrote" in " ".join(res.output.split()), res.output
    assert _snapshot(out) == before


def test_a_file_added_to_a_run_is_never_the_runs(tiny_bert_dir, tiny_csv, tmp_path):
    """--resume may go on beside a user's file, but never lists it as the run's: an overwrite then
    refuses the folder instead of deleting the file."""
    import json

    out = tmp_path / "run"
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, out)
    assert runner.invoke(app, ["train", rec]).exit_code == 0
    (out / "NOTES.md").write_text("mine")
    res = runner.invoke(app, ["train", rec, "train.max_steps=3", "--resume"])
    assert res.exit_code == 0, res.output
    assert "NOTES.md" not in json.loads((out / ".peftcli.json").read_text())["entries"]
    res = runner.invoke(app, ["train", rec, "output.overwrite=true"])
    assert res.exit_code == 2 and "NOTES.md" in res.output, res.output
    assert (out / "NOTES.md").read_text() == "mine"


def test_resume_refuses_folders_with_nothing_to_resume(tiny_bert_dir, tiny_csv, tmp_path):
    """A finished run whose last/ is gone, and a folder another command wrote (here import-peft's
    kind), would be retrained from step 0 over their adapter."""
    import json
    import shutil

    out = tmp_path / "run"
    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, out)
    assert runner.invoke(app, ["train", rec]).exit_code == 0
    shutil.rmtree(out / "last")
    adapter = _snapshot(out / "adapter")
    res = runner.invoke(app, ["train", rec, "--resume"])
    assert res.exit_code == 2 and "finished and has no checkpoint (last/)" in " ".join(res.output.split()), res.output
    marker = json.loads((out / ".peftcli.json").read_text())
    (out / ".peftcli.json").write_text(json.dumps({**marker, "kind": "combine"}))
    res = runner.invoke(app, ["train", rec, "--resume"])
    assert res.exit_code == 2 and "written by `peftcli combine`" in " ".join(res.output.split()), res.output
    assert _snapshot(out / "adapter") == adapter
