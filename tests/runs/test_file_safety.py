"""Trust in files: nothing peftcli reads can run code, and nothing it replaces is a user's.

A planted pickle (one that creates a marker file when unpickled) sits in every place the CLI
reads adapter weights from; each command must exit 2 naming the file, and the marker must never
appear. Destinations that are, hold or lie inside what a command reads, or that hold a user's
file, are refused and left byte-identical; a failure while writing leaves the old folder as it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.core.adapter_files import load_tensors
from peftcli.core.errors import CheckpointError
from peftcli.runs import folder as runfolder
from peftcli.runs.folder import (
    MARKER,
    UnsafePathError,
    check_destination,
    discard_aside,
    is_ours,
    move_aside,
    recover_stale,
    replacing,
    restore_aside,
    write_marker,
)

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class Plant:
    """Unpickling this calls Path.touch(marker): proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(path: Path, marker: Path) -> Path:
    """A torch.save archive (what PEFT's adapter_model.bin is) whose unpickling touches `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"base_model.model.x.lora_A.weight": Plant(marker)}, path)
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders): equal snapshots, untouched tree."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def error_line(res, path: Path) -> str:
    """The one line that names `path`; the message must not spread over several lines."""
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert str(path) in lines[0], res.output
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".peftcli-" in p.name or ".tmp-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tiny_csv, tmp_path_factory):
    """One tiny LoRA run, trained through the CLI once per module; tests work on copies."""
    d = tmp_path_factory.mktemp("trust")
    recipe = write_recipe(
        d / "r.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 8, "max_length": 32},
        method={"name": "lora", "r": 2, "targets": ["q", "v"]},
        train={"epochs": 1, "batch_size": 16, "lr": 5e-3, "progress": False},
        output={"dir": str(d / "run"), "plot": False},
    )
    res = invoke("train", recipe)
    assert res.exit_code == 0, res.output
    res = invoke("export", d / "run", d / "peft")
    assert res.exit_code == 0, res.output
    return d / "run", d / "peft"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(trained[0], dest)
    return dest


@pytest.fixture
def peft_dir(trained, tmp_path) -> Path:
    dest = tmp_path / "peft"
    shutil.copytree(trained[1], dest)
    return dest


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


# ------------------------------------------------------------------------------ item 1: no code from files


def test_the_planted_pickle_is_live(tmp_path):
    """The plant does run code under a plain unpickler, so the refusals below mean something."""
    m = tmp_path / "ran"
    f = plant(tmp_path / "x.bin", m)
    torch.load(f, weights_only=False)
    assert m.exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter.safetensors"])
def test_load_tensors_refuses_a_planted_pickle(tmp_path, marker, name):
    f = plant(tmp_path / name, marker)
    with pytest.raises(CheckpointError) as e:
        load_tensors(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_load_tensors_reads_plain_tensors_and_refuses_other_objects(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.bin")
    assert torch.equal(load_tensors(tmp_path / "ok.bin")["a"], torch.ones(2))
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="not a mapping of names to tensors"):
        load_tensors(tmp_path / "list.bin")


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ["eval", "export", "merge", "drop"])
def test_planted_adapter_in_a_run_is_refused(run, tmp_path, marker, cmd):
    f = run / "adapter" / "adapter.safetensors"
    f.unlink()
    plant(f, marker)
    args = {"eval": ["eval", run], "export": ["export", run, tmp_path / "out"],
            "merge": ["merge", run, tmp_path / "out"], "drop": ["drop", run, "--lowest", "1", "--out", tmp_path / "out"]}
    res = invoke(*args[cmd])
    assert res.exit_code == 2, res.output
    line = error_line(res, f)
    assert "safetensors" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _bin_peft(peft_dir: Path, marker: Path) -> Path:
    (peft_dir / "adapter_model.safetensors").unlink()
    return plant(peft_dir / "adapter_model.bin", marker)


def test_planted_bin_refused_by_import_peft(peft_dir, tmp_path, marker):
    f = _bin_peft(peft_dir, marker)
    res = invoke("import-peft", peft_dir, tmp_path / "imported")
    assert res.exit_code == 2, res.output
    assert "refused to read" in error_line(res, f)
    assert not marker.exists() and not (tmp_path / "imported").exists()


def test_planted_bin_refused_by_merge_of_a_peft_folder(peft_dir, tmp_path, marker):
    f = _bin_peft(peft_dir, marker)
    res = invoke("merge", peft_dir, tmp_path / "merged")
    assert res.exit_code == 2, res.output
    error_line(res, f)
    assert not marker.exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("source", ["peft_bin", "peftcli_run"])
def test_planted_init_from_refused_by_train(run, peft_dir, tiny_bert_dir, tiny_csv, tmp_path, marker, source):
    if source == "peft_bin":
        src, f = peft_dir, _bin_peft(peft_dir, marker)
    else:
        src, f = run, run / "adapter" / "adapter.safetensors"
        f.unlink()
        plant(f, marker)
    rec = write_recipe(tmp_path / "cont.yaml", model={"name": str(tiny_bert_dir)},
                       data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 8, "max_length": 32},
                       method={"name": "lora", "r": 2, "targets": ["q", "v"]},
                       train={"max_steps": 1, "batch_size": 4, "progress": False},
                       output={"dir": str(tmp_path / "cont")}, init_from=str(src))
    res = invoke("train", rec)
    assert res.exit_code == 2, res.output
    error_line(res, f)
    assert not marker.exists()


def _fusion_sources(tmp_path: Path, n: int = 2) -> list[Path]:
    """Finished pfeiffer runs (recipe.yaml + adapter/) on the in-memory tiny BERT, untrained."""
    from peftcli.config.recipe import recipe_from_dict, recipe_yaml
    from peftcli.methods import get_method
    from peftcli.methods.attach import attach_method
    from peftcli.runs.checkpoint import save_adapter

    runs = []
    for i in range(n):
        folder = tmp_path / f"src{i}"
        model = tiny_model("bert")
        cfg = get_method("pfeiffer").config_cls(reduction_factor=4)
        arch, spec = attach_method(model, "pfeiffer", cfg)
        folder.mkdir()
        rec = recipe_from_dict({"model": {"name": "tiny"}, "method": {"name": "pfeiffer", "reduction_factor": 4}})
        (folder / "recipe.yaml").write_text(recipe_yaml(rec))
        save_adapter(folder / "adapter", model, spec, arch, cfg, meta={})
        runs.append(folder)
    return runs


def test_planted_fusion_source_is_an_error_not_skipped(tmp_path, marker):
    """A fusion source whose adapter file is unreadable must fail, not silently load nothing."""
    from peftcli.methods.attach import attach_method
    from peftcli.methods.fusion import FusionConfig

    runs = _fusion_sources(tmp_path)
    f = runs[1] / "adapter" / "adapter.safetensors"
    f.unlink()
    plant(f, marker)
    with pytest.raises(CheckpointError, match=str(f)):
        attach_method(tiny_model("bert"), "fusion", FusionConfig(adapters=[str(r) for r in runs]))
    assert not marker.exists()


def test_fused_run_folder_may_not_overlap_a_source(tmp_path):
    """output.overwrite on a fused run inside (or around) a source would delete the adapters it fuses."""
    from peftcli.commands.fuse import prepare
    from peftcli.config.recipe import recipe_from_dict

    runs = _fusion_sources(tmp_path)
    before = snapshot(tmp_path)
    for out in (runs[0] / "fused", tmp_path, runs[1]):
        r = recipe_from_dict({"model": {"name": "tiny"}, "method": {"name": "fusion", "adapters": [str(x) for x in runs]},
                              "output": {"dir": str(out), "overwrite": True}})
        with pytest.raises(UnsafePathError, match="which this command reads"):
            prepare(r)
    assert snapshot(tmp_path) == before


def test_truncated_safetensors_named(run, peft_dir, tmp_path):
    f = run / "adapter" / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    res = invoke("eval", run)
    assert res.exit_code == 2, res.output
    assert "not a readable safetensors file" in error_line(res, f)

    g = peft_dir / "adapter_model.safetensors"
    g.write_bytes(b"\x00" * 5)
    res = invoke("import-peft", peft_dir, tmp_path / "imported")
    assert res.exit_code == 2, res.output
    error_line(res, g)


def test_corrupt_meta_json_named(run):
    f = run / "adapter" / "meta.json"
    f.write_text("{not json")
    res = invoke("eval", run)
    assert res.exit_code == 2, res.output
    error_line(res, f)


@pytest.mark.parametrize("content", [b"method: {name: lora\n", b"- a list\n", b"method: lora\n", b"\xff\xfe\x00"],
                         ids=["yaml", "list", "section", "binary"])
@pytest.mark.parametrize("cmd", ["eval", "merge", "resume"])
def test_damaged_recipe_of_a_run_is_named_with_exit_2(run, tmp_path, content, cmd):
    """Each command that reads a run's recipe.yaml refuses a damaged one by name (merge and eval
    peeked at it first and stopped with exit 1 and PyYAML's or Python's own words)."""
    recipe = run / "recipe.yaml"
    own = tmp_path / "own.yaml"
    own.write_bytes(recipe.read_bytes())
    recipe.write_bytes(content)
    args = {"eval": ["eval", run], "merge": ["merge", run, tmp_path / "m"],
            "resume": ["train", own, f"output.dir={run}", "--resume"]}[cmd]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert str(recipe) in res.output.replace("\n", "") and "Traceback" not in res.output


# ------------------------------------------------------------------------------ item 2: destinations


def test_export_or_merge_into_the_source_run_is_refused(run):
    before = snapshot(run)
    for args in (["export", run, run, "--force"], ["export", run, run / "peft"], ["merge", run, run / "x"],
                 ["merge", run, run, "--force"], ["merge", run, run.parent, "--force"],
                 ["drop", run, "--lowest", "1", "--out", run / "d"], ["import-peft", run, run / "i"]):
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert snapshot(run) == before, args
    assert not (run / "x").exists() and not (run / "peft").exists()


def test_dangerous_destinations_refused(run, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("years of work")
    work = home / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("mine")
    before = snapshot(home)
    for dest in ("", ".", "..", str(home), str(home / "work"), "~", "~/x"):
        res = invoke("export", run, dest, "--force")
        assert res.exit_code == 2, (dest, res.output)
        assert "name a new folder" in res.output or "'~'" in res.output, res.output
    res = invoke("export", run, "/")
    assert res.exit_code == 2 and "root of the file system" in res.output, res.output
    assert snapshot(home) == before
    res = invoke("export", run, "out")  # a new folder under the current one is fine
    assert res.exit_code == 0, res.output
    assert (work / "out" / MARKER).exists()


def test_force_refuses_a_folder_holding_a_user_file(run, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "important.txt").write_text("do not delete")
    before = snapshot(dest)
    for args in (["export", run, dest, "--force"], ["merge", run, dest, "--force"],
                 ["import-peft", tmp_path / "nowhere", dest, "--force"]):
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert snapshot(dest) == before
    res = invoke("export", run, dest, "--force")
    assert "is not a folder peftcli wrote" in res.output and "important.txt" in res.output
    # a previous export with a user's file added is no longer only ours either
    res = invoke("export", run, tmp_path / "e")
    assert res.exit_code == 0, res.output
    (tmp_path / "e" / "README.md").write_text("my notes")
    before = snapshot(tmp_path / "e")
    res = invoke("export", run, tmp_path / "e", "--force")
    assert res.exit_code == 2 and "README.md" in res.output, res.output
    assert snapshot(tmp_path / "e") == before


def test_force_replaces_a_previous_export_and_marks_it(run, tmp_path):
    dest = tmp_path / "e"
    res = invoke("export", run, dest)
    assert res.exit_code == 0, res.output
    good = (dest / "adapter_config.json").read_bytes()
    (dest / "adapter_config.json").write_text("stale")
    res = invoke("export", run, dest)
    assert res.exit_code == 2 and "--force" in res.output
    res = invoke("export", run, dest, "--force")
    assert res.exit_code == 0, res.output
    assert (dest / "adapter_config.json").read_bytes() == good
    m = json.loads((dest / MARKER).read_text())
    assert m["kind"] == "export" and sorted(m["entries"]) == sorted(p for p in os.listdir(dest) if p != MARKER)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_every_output_folder_is_marked(run, peft_dir, tmp_path):
    res = invoke("merge", run, tmp_path / "merged")
    assert res.exit_code == 0, res.output
    res = invoke("import-peft", peft_dir, tmp_path / "imported")
    assert res.exit_code == 0, res.output
    res = invoke("drop", run, "--lowest", "1", "--out", tmp_path / "dropped")
    assert res.exit_code == 0, res.output
    for name, kind in (("merged", "merge"), ("imported", "import"), ("dropped", "drop")):
        m = json.loads((tmp_path / name / MARKER).read_text())
        assert m["kind"] == kind
        assert sorted(m["entries"]) == sorted(p for p in os.listdir(tmp_path / name) if p != MARKER)
        assert is_ours(tmp_path / name)
    # eval adds eval_*.json to a run folder: still ours, so --force may replace it
    res = invoke("eval", tmp_path / "dropped")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "dropped" / "eval_test.json").exists() and is_ours(tmp_path / "dropped")
    res = invoke("import-peft", peft_dir, tmp_path / "dropped", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "dropped" / MARKER).read_text())["kind"] == "import"
    # a legacy run folder (no marker, only names a run writes) may be replaced too
    res = invoke("import-peft", peft_dir, run, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((run / MARKER).read_text())["kind"] == "import"
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_the_old_folder(run, peft_dir, tmp_path, monkeypatch):
    import peftcli.commands.peft
    import peftcli.runs.checkpoint

    dest = tmp_path / "e"
    assert invoke("export", run, dest).exit_code == 0
    before = snapshot(dest)

    def broken_export(model, arch, spec, recipe, sd, out):
        (Path(out) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(peftcli.commands.peft, "export_model", broken_export)
    res = invoke("export", run, dest, "--force")
    assert res.exit_code == 1 and "disk full" in res.output, res.output
    assert snapshot(dest) == before and leftovers(tmp_path) == []

    imported = tmp_path / "imported"
    assert invoke("import-peft", peft_dir, imported).exit_code == 0
    before = snapshot(imported)

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(peftcli.runs.checkpoint, "save_adapter", broken_save)
    res = invoke("import-peft", peft_dir, imported, "--force")
    assert res.exit_code == 1, res.output
    assert snapshot(imported) == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ runfolder units


def _ours(folder: Path, kind: str = "export", files: tuple[str, ...] = ("a.json",)) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_text("x")
    write_marker(folder, kind)
    return folder


def test_is_ours(tmp_path):
    assert is_ours(_ours(tmp_path / "m"))
    (tmp_path / "m" / "user.txt").write_text("u")
    assert not is_ours(tmp_path / "m")
    run = _ours(tmp_path / "r", "import", ("recipe.yaml",))
    (run / "eval_test.json").write_text("{}")
    (run / ".summary.json.peftcli-tmp-123").write_text("")
    assert is_ours(run)  # eval output and a killed atomic write are a run's own
    exp = _ours(tmp_path / "x")
    (exp / "eval_test.json").write_text("{}")
    assert not is_ours(exp)  # ...but not in an export folder
    legacy = tmp_path / "legacy"
    for d in ("adapter", "last"):
        (legacy / d).mkdir(parents=True)
    for f in ("metrics.jsonl", "summary.json", "curves.png", "eval_train.json"):
        (legacy / f).write_text("")
    (legacy / "recipe.yaml").write_text("model:\n  name: gpt2\nmethod:\n  name: lora\n")
    (legacy / "adapter" / "meta.json").write_text('{"method": "lora"}')
    assert is_ours(legacy)  # without a marker: run names, a recipe that parses, a registered method
    (legacy / "data.csv").write_text("")
    assert not is_ours(legacy)
    (legacy / "data.csv").unlink()
    (legacy / "adapter" / "meta.json").write_text('{"method": "not-a-method"}')
    assert not is_ours(legacy)
    plain = tmp_path / "plain"
    (plain / "adapter").mkdir(parents=True)
    assert not is_ours(plain)  # a run's names without its recipe.yaml prove nothing
    broken = _ours(tmp_path / "b")
    (broken / MARKER).write_text("{")
    assert not is_ours(broken)
    (tmp_path / "link").symlink_to(tmp_path / "m")
    assert not is_ours(tmp_path / "link")
    assert not is_ours(tmp_path / "nowhere")


def test_check_destination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "run"
    src.mkdir()
    (src / "recipe.yaml").write_text("x")
    check_destination(tmp_path / "new", what="out", sources=[src])  # absent: fine
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", what="out")  # empty: fine
    for dest, msg in ((src, "is "), (src / "sub", "is inside"), (tmp_path, "current folder"),
                      (tmp_path.parent, "parent of the current folder"), (Path(""), "current folder"),
                      (Path("/"), "root")):
        with pytest.raises(UnsafePathError, match=msg):
            check_destination(dest, what="out", sources=[src], replace=True)
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(UnsafePathError, match="contains"):
        check_destination(tmp_path / "a", what="out", sources=[tmp_path / "a" / "b" / "data.csv"], replace=True)
    ours = _ours(tmp_path / "ours")
    with pytest.raises(UnsafePathError, match="--force"):
        check_destination(ours, what="out")
    check_destination(ours, what="out", replace=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafePathError, match="not a folder"):
        check_destination(tmp_path / "file", what="out", replace=True)
    (tmp_path / "link").symlink_to(ours)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        check_destination(tmp_path / "link", what="out", replace=True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    with pytest.raises(UnsafePathError, match="refusing to delete it") as e:
        check_destination(user, what="out", replace=True)
    assert "thesis.tex" in str(e.value)


def test_replacing_swaps_in_and_cleans_up(tmp_path):
    dest = _ours(tmp_path / "d", files=("old.txt",))
    with replacing(dest, kind="merge") as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(".d.peftcli-tmp-")
        (tmp / "new.txt").write_text("n")
        assert (dest / "old.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(os.listdir(dest)) == [MARKER, "new.txt"]
    assert json.loads((dest / MARKER).read_text())["entries"] == ["new.txt"]
    assert os.listdir(tmp_path) == ["d"]
    with replacing(tmp_path / "fresh" / "nested", kind="export") as tmp:
        (tmp / "f").write_text("")
    assert is_ours(tmp_path / "fresh" / "nested")


def test_replacing_and_move_aside_never_take_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    with pytest.raises(UnsafePathError), replacing(Path("."), kind="export"):
        pass
    with pytest.raises(UnsafePathError):
        move_aside(tmp_path)
    assert Path.cwd() == tmp_path / "w" and sorted(os.listdir(tmp_path)) == ["w"]


def test_replacing_failure_leaves_dest(tmp_path):
    dest = _ours(tmp_path / "d", files=("old.txt",))
    before = snapshot(dest)
    with pytest.raises(RuntimeError), replacing(dest, kind="export") as tmp:
        (tmp / "half").write_text("h")
        raise RuntimeError("boom")
    assert snapshot(dest) == before and os.listdir(tmp_path) == ["d"]
    # a user's file appearing while the new folder was being written stops the swap
    with pytest.raises(UnsafePathError), replacing(dest, kind="export") as tmp:
        (tmp / "new").write_text("n")
        (dest / "user.txt").write_text("u")
    assert (dest / "user.txt").read_text() == "u" and (dest / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_aside_round_trip_and_stale_recovery(tmp_path):
    dest = _ours(tmp_path / "run", "run", ("recipe.yaml",))
    aside = move_aside(dest)
    assert aside is not None and not dest.exists() and is_ours(aside)
    _ours(dest, "run", ("recipe.yaml", "metrics.jsonl"))  # a new run that failed early
    restore_aside(aside, dest)
    assert sorted(os.listdir(dest)) == [MARKER, "recipe.yaml"] and not aside.exists()
    assert move_aside(tmp_path / "absent") is None
    # restore never deletes a user's folder in the way
    aside = move_aside(dest)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("m")
    with pytest.raises(UnsafePathError):
        restore_aside(aside, dest)
    assert (dest / "mine.txt").exists() and aside.exists()
    shutil.rmtree(dest)
    restore_aside(aside, dest)
    user = tmp_path / "user"
    user.mkdir()
    (user / "x").write_text("x")
    with pytest.raises(UnsafePathError):
        discard_aside(user)
    assert (user / "x").exists()
    # leftovers of a killed process: its temp folder goes, its aside folder comes back
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    aside = move_aside(dest)
    stale_old = aside.with_name(f".run.peftcli-old-{dead}")
    aside.rename(stale_old)
    stale_tmp = tmp_path / f".run.peftcli-tmp-{dead}"
    stale_tmp.mkdir()
    (stale_tmp / "half").write_text("h")
    live_tmp = tmp_path / f".run.peftcli-tmp-{os.getpid()}"
    live_tmp.mkdir()
    assert sorted(p.name for p in recover_stale(dest)) == sorted([stale_old.name, stale_tmp.name])
    assert is_ours(dest) and not stale_tmp.exists() and live_tmp.exists()
    live_tmp.rmdir()


def test_a_user_folder_with_run_names_is_never_replaced(tmp_path):
    """Names alone prove nothing: a user's folder holding a plain-text recipe.yaml, a
    metrics.jsonl and tensorboard/ (all names a run writes) is refused, byte for byte kept."""
    user = tmp_path / "experiments"
    (user / "tensorboard").mkdir(parents=True)
    (user / "tensorboard" / "events.out").write_text("mine")
    (user / "recipe.yaml").write_text("my notes on what to try next, not YAML for peftcli\n")
    (user / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = snapshot(user)
    assert not is_ours(user)
    with pytest.raises(UnsafePathError, match="not a folder peftcli wrote"):
        check_destination(user, what="output.dir", replace=True)
    (user / "adapter").mkdir()
    (user / "adapter" / "meta.json").write_text('{"method": "lora"}')  # the recipe still does not parse
    assert not is_ours(user)
    (user / "adapter" / "meta.json").unlink()
    (user / "adapter").rmdir()
    assert snapshot(user) == before


def test_temp_names_are_peftcli_tagged():
    """Only names with peftcli's tag and a pid are peftcli's temporaries; a user's dot-backups are not."""
    from peftcli.core.files import is_temp_name, parse_temp_name, temp_sibling

    for user_name in (".zshrc.old-1", ".photos.old-2019", ".notes.tmp-3", ".x.peftcli-tmp-", "x.peftcli-tmp-1"):
        assert not is_temp_name(user_name), user_name
    t = temp_sibling(Path("/a/run"), "old", pid=42)
    assert t == Path("/a/.run.peftcli-old-42") and parse_temp_name(t.name) == ("run", "old", 42)


def test_unsafe_path_error_is_bad_input():
    from peftcli.core.errors import BadInput

    assert issubclass(UnsafePathError, BadInput)
    assert runfolder.MARKER == ".peftcli.json"
