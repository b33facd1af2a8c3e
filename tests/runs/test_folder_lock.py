"""One writer per folder (peftcli.runs.lock): a second writer is refused naming the holder's PID,
the kernel releases the lock when the holder dies (even by SIGKILL), the lock file is peftcli's
own (never foreign, never a temp leftover, never in a marker), and every command that writes a
folder takes it on its destination before anything else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.core.errors import BadInput
from peftcli.runs import folder as runfolder
from peftcli.runs.lock import FolderBusyError, folder_lock, hold, writes_folders

HOLDER = """
import sys, time
from peftcli.runs.lock import folder_lock
with folder_lock(sys.argv[1], what="output.dir"):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds: (folder, that process)."""
    dest = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield dest, p
    finally:
        p.kill()
        p.wait()


def test_a_second_writer_is_refused_naming_the_holder(held):
    dest, p = held
    with pytest.raises(FolderBusyError) as e:
        with folder_lock(dest, what="output.dir"):
            pass
    assert isinstance(e.value, BadInput)  # exit 2
    assert f"PID {p.pid}" in str(e.value) and f"output.dir {dest}" in str(e.value)
    with pytest.raises(FolderBusyError, match=f"PID {p.pid}"):  # another spelling of the same folder
        with folder_lock(dest.parent / "x" / ".." / "run"):
            pass


def test_the_lock_dies_with_its_holder(held):
    dest, p = held
    lock = runfolder.lock_path(dest)
    os.kill(p.pid, signal.SIGKILL)  # no clean-up runs
    p.wait()
    assert lock.read_text().strip() == str(p.pid)  # the file stays, but its lock went with the process
    with folder_lock(dest):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_re_entrant_in_one_process_and_removed_on_release(tmp_path):
    dest = tmp_path / "out"
    with folder_lock(dest) as lock:
        with folder_lock(dest):  # merge of a PEFT folder calls merge again on the same destination
            assert lock.exists()
        assert lock.exists()
    assert not lock.exists() and not dest.exists()  # locking creates nothing at the destination


def test_folders_made_for_the_lock_go_with_it_when_nothing_went_in_them(tmp_path):
    """A command refused after taking its lock left the destination's new parents behind, empty;
    a file in the way was "cannot create its lock file (File exists)"."""
    with pytest.raises(ValueError, match="refused"), folder_lock(tmp_path / "new" / "deep" / "dest"):
        raise ValueError("refused")
    assert not (tmp_path / "new").exists()
    with folder_lock(tmp_path / "kept" / "dest"):
        (tmp_path / "kept" / "dest").mkdir()  # what the command wrote
    assert (tmp_path / "kept" / "dest").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match=r"afile is a file, not a folder"), folder_lock(tmp_path / "afile" / "sub"):
        pass


def test_hold_is_released_when_the_command_ends(tmp_path):
    dest = tmp_path / "out"

    @writes_folders
    def command(fail: bool) -> Path:
        hold(dest, what="merge destination")
        assert runfolder.lock_path(dest).exists()
        if fail:
            raise ValueError("boom")
        return dest

    assert command(False) == dest and not runfolder.lock_path(dest).exists()
    with pytest.raises(ValueError):
        command(True)
    assert not runfolder.lock_path(dest).exists()
    with pytest.raises(RuntimeError, match="writes_folders"):
        hold(dest, what="x")


def test_a_refused_path_gets_no_lock_file(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    with pytest.raises(runfolder.UnsafePathError, match="which this command reads"):
        with folder_lock(data / "out", what="--out", sources=[data]):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


def test_the_lock_file_is_ours_and_never_a_leftover(tmp_path):
    """A lock beside a trial inside a sweep folder, or beside anything in a run folder, must not
    make the folder foreign (refused for --force) nor be deleted as a temp file by --resume."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {name: x}\n")
    (run / "adapter").mkdir()
    runfolder.write_marker(run, "run")  # without a marker only a folder that reads as a run is ours
    (run / ".adapter.peftcli-lock").write_text("123\n")
    assert runfolder.is_lock_name(".adapter.peftcli-lock") and not runfolder.is_temp_name(".adapter.peftcli-lock")
    assert not runfolder.is_lock_name(".peftcli-lock") and not runfolder.is_lock_name("notes.peftcli-lock")
    assert runfolder.is_ours(run) and runfolder.foreign_entries(run) == []
    runfolder.write_marker(run, "run")
    assert ".adapter.peftcli-lock" not in runfolder.read_marker(run)["entries"]
    assert runfolder.is_ours(run)


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tiny_csv, tmp_path_factory):
    d = tmp_path_factory.mktemp("lock-run")
    rec = d / "r.yaml"
    rec.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_bert_dir)},
        "data": {"source": str(tiny_csv), "text_column": "sentence", "eval_size": 8, "max_length": 32},
        "method": {"name": "lora", "r": 2}, "train": {"max_steps": 2, "batch_size": 8, "progress": False},
        "output": {"dir": str(d / "run"), "plot": False},
    }))
    res = CliRunner().invoke(app, ["train", str(rec)])
    assert res.exit_code == 0, res.output
    return d / "run"


@pytest.mark.parametrize("argv", [
    ["merge", "{run}", "{dest}"],
    ["export", "{run}", "--to", "peft", "{dest}"],
    ["import-peft", "{run}", "{dest}"],
    ["combine", "{run}", "{dest}", "--weights", "1", "--how", "cat"],
    ["drop", "{run}", "--layers", "0", "--out", "{dest}"],
], ids=lambda a: a[0])
def test_every_folder_writing_command_refuses_a_destination_being_written(trained, held, argv):
    dest, p = held
    res = CliRunner().invoke(app, [a.format(run=trained, dest=dest) for a in argv])
    assert res.exit_code == 2, res.output
    assert f"PID {p.pid}" in res.output
    assert not dest.exists()
