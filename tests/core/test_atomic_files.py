"""core/files: the one atomic writer, folder swap, recovery and temp-name scheme."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftcli.core.files import (
    atomic_file_write,
    atomic_write,
    is_temp_name,
    parse_temp_name,
    recover_dir,
    temp_sibling,
    temp_siblings,
    write_dir,
)


@pytest.fixture(scope="module")
def dead() -> int:
    """The pid of a process that has exited."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def _folder(path: Path, text: str, complete: bool = True) -> Path:
    path.mkdir()
    (path / "data").write_text(text)
    if complete:
        (path / "done").write_text("")
    return path


def test_atomic_file_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "summary.json"
    atomic_file_write(f, "old")
    atomic_file_write(f, b"new")
    assert f.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]


def test_written_files_take_the_umask_not_the_temporary_files_mode(tmp_path):
    """safetensors (and tempfile) create files readable by their owner alone; a run folder or a
    merged model shared with others must read like every other file beside it."""
    import torch
    from safetensors.torch import save_file

    mask = os.umask(0)
    os.umask(mask)
    atomic_write(tmp_path / "one.safetensors", lambda t: save_file({"a": torch.zeros(1)}, str(t)))
    write_dir(tmp_path / "d", lambda t: (save_file({"a": torch.zeros(1)}, str(t / "w.safetensors")),
                                         (t / "x.json").write_text("{}")))
    for f in (tmp_path / "one.safetensors", tmp_path / "d" / "w.safetensors", tmp_path / "d" / "x.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))


def test_write_dir_failure_leaves_the_old_folder(tmp_path):
    dest = _folder(tmp_path / "last", "old")

    def broken(tmp: Path) -> None:
        (tmp / "data").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir(dest, broken)
    assert (dest / "data").read_text() == "old" and os.listdir(tmp_path) == ["last"]
    write_dir(dest, lambda tmp: (tmp / "data").write_text("new"))
    assert (dest / "data").read_text() == "new" and os.listdir(tmp_path) == ["last"]


def test_recover_finishes_a_swap_killed_between_its_renames(tmp_path, dead):
    dest = tmp_path / "last"
    _folder(temp_sibling(dest, "old", dead), "old")
    _folder(temp_sibling(dest, "tmp", dead), "new")
    note = recover_dir(dest, complete=lambda p: (p / "done").exists(), skip_live=False)
    assert note and "interrupted swap" in note
    assert (dest / "data").read_text() == "new" and os.listdir(tmp_path) == ["last"]


def test_recover_puts_the_old_folder_back_when_the_new_one_is_not_whole(tmp_path, dead):
    dest = tmp_path / "last"
    _folder(temp_sibling(dest, "old", dead), "old")
    _folder(temp_sibling(dest, "tmp", dead), "half", complete=False)
    assert "restored" in recover_dir(dest, complete=lambda p: (p / "done").exists())
    assert (dest / "data").read_text() == "old" and os.listdir(tmp_path) == ["last"]


def test_recover_leaves_live_writers_users_files_and_undeletable_asides(tmp_path, dead):
    dest = _folder(tmp_path / "run", "current")
    live = _folder(temp_sibling(dest, "tmp"), "being written by this process")
    kept_old = _folder(temp_sibling(dest, "old", dead), "not provably ours")
    for name in (".run.old-1", ".run.tmp-2", ".zshrc.old-1"):
        (tmp_path / name).write_text("a user's")
    assert recover_dir(dest, discardable=lambda p: False) is None
    assert live.exists() and kept_old.exists()
    assert all((tmp_path / n).read_text() == "a user's" for n in (".run.old-1", ".run.tmp-2", ".zshrc.old-1"))
    assert (dest / "data").read_text() == "current"


def test_a_temporary_of_a_temporary_is_tidied_with_its_folder(tmp_path, dead):
    dest = _folder(tmp_path / "out", "x")
    inner = temp_sibling(temp_sibling(dest, "tmp", dead), "tmp", dead)
    inner.mkdir()
    (tmp_path / "..out.peftcli-tmp-5").mkdir()  # the temporary of a folder named .out: not ours to touch
    assert [p for p, _, _ in temp_siblings(dest)] == [inner]
    recover_dir(dest)
    assert not inner.exists() and (tmp_path / "..out.peftcli-tmp-5").exists()


def test_temp_names_carry_peftcli_and_a_pid():
    assert parse_temp_name(".adapter.peftcli-old-12") == ("adapter", "old", 12)
    assert is_temp_name(temp_sibling(Path("x/.peftcli.json")).name)
    for name in (".zshrc.old-1", ".photos.old-2019", ".last.tmp-99", ".a.peftcli-tmp-x", "a.peftcli-tmp-1"):
        assert not is_temp_name(name), name
    with pytest.raises(ValueError):
        temp_sibling(Path("a"), "new")
