"""The command line as a user meets it: examples in every --help, shell completion, exit codes.

Exit codes: 0 success, 2 bad input (arguments, recipe, missing files, refused requests),
1 a failure while running (short message, traceback only with PEFTCLI_DEBUG=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def all_commands() -> list[tuple[str, ...]]:
    """Every command path, sub-commands included, e.g. ("recipes", "copy")."""
    out: list[tuple[str, ...]] = []

    def walk(cmd, path: tuple[str, ...]) -> None:
        if path:
            out.append(path)
        if hasattr(cmd, "commands"):  # a group (typer may bring its own click)
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return out


def test_the_commands_users_expect_exist():
    names = {p[0] for p in all_commands()}
    assert {"train", "eval", "merge", "export", "import-peft", "count-params", "validate", "recipes"} <= names


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p))
def test_every_help_shows_an_example(path):
    res = runner.invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output, f"`peftcli {' '.join(path)} --help` has no example (add an epilog)"
    assert "peftcli " in res.output.split("Example", 1)[1]


def test_top_level_help_mentions_completion():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "--install-completion" in res.output and "--show-completion" in res.output


def _peftcli() -> list[str]:
    exe = shutil.which("peftcli")
    if exe is None:
        pytest.skip("the peftcli console script is not installed (pip install -e .)")
    return [exe]


def test_show_completion_prints_a_bash_script():
    # With shellingham installed, typer detects the shell from the process tree (none under
    # pytest) and --show-completion takes no value; its test switch restores the explicit value.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = subprocess.run([*_peftcli(), "--show-completion", "bash"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert "complete " in res.stdout and "_PEFTCLI_COMPLETE=complete_bash" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("words,cword,expect", [
    ("peftcli mer", 1, {"merge"}),
    ("peftcli merge --fo", 2, {"--force"}),
    ("peftcli recipes copy tweets_lo", 3, {"tweets_lora"}),
    ("peftcli count-params --method compa", 3, {"compacter", "compacter++"}),
])
def test_bash_completion_completes(words, cword, expect):
    env = {**os.environ, "_PEFTCLI_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    res = subprocess.run(_peftcli(), capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert expect <= set(res.stdout.split()), res.stdout


# ------------------------------------------------------------------------------ exit codes


def test_exit_0_on_success():
    res = runner.invoke(app, ["validate", str(ROOT / "recipes" / "tweets_lora.yaml")])
    assert res.exit_code == 0, res.output
    assert "method lora fits sentence-transformers/all-MiniLM-L6-v2" in res.output
    # A hub id whose config is not on this machine: validated without the network, and it says so.
    res = runner.invoke(app, ["validate", str(ROOT / "recipes" / "tweets_lora.yaml"), "model.name=org/not-here"])
    assert res.exit_code == 0 and "method placement not checked" in res.output, res.output
    # AdapterFusion before its source runs are trained: a recipe to plan with, not an error.
    res = runner.invoke(app, ["validate", str(ROOT / "recipes" / "tweets_fusion.yaml"),
                              "method.adapters=[no/such/run-a,no/such/run-b]"])
    assert res.exit_code == 0 and "method placement not checked" in res.output, res.output


@pytest.mark.parametrize("args,message", [
    (["validate", "no/such/recipe.yaml"], "file not found"),
    (["no-such-command"], "No such command"),
    (["train"], "Missing argument"),
    (["merge", "no/such/run", "out"], "no such folder"),
    (["export", "no/such/run", "out"], "no such folder"),
    (["eval", "no/such/run"], "no such folder"),
    (["eval", str(ROOT / "recipes" / "tweets_lora.yaml")], "is a file; pass the run folder"),
    (["count-params", str(ROOT / "README.md")], "README.md is not a .yaml recipe: as a model, add --method"),
    # IA³'s feed-forward layers must be targets: it was a ValueError, exit 1, with no fix
    (["validate", str(ROOT / "recipes" / "tweets_ia3.yaml"), "method.targets=[q]"], "or set method.feedforward: []"),
    (["import-peft", "no/such/folder", "out"], "no adapter_config.json"),
    (["validate", str(ROOT / "recipes" / "tweets_lora.yaml"), "method.rank=4"], "method.rank: unknown key"),
    (["recipes", "copy", "tweets_lroa", "x.yaml"], "did you mean 'tweets_lora'"),
    # Counts are at least 1: --limit -1 once scored all but the last example, --limit 0 all of them.
    (["eval", "no/such/run", "--limit", "-1"], "'--limit'"),
    (["eval", "no/such/run", "--limit", "0"], "'--limit'"),
    (["drop", "no/such/run", "--lowest", "1", "--limit", "0"], "'--limit'"),
    *[(["count-params", str(ROOT / "recipes" / "tweets_lora.yaml"), flag, "0"], f"'{flag}'")
      for flag in ("--seq-len", "--batch-size", "--depth", "--num-labels")],
    # Flags that would be ignored without a word, and a dry run of a run folder train refuses.
    (["train", str(ROOT / "recipes" / "tweets_lora.yaml"), "--smoke", "--resume"], "--resume with --smoke"),
    (["train", str(ROOT / "recipes" / "tweets_lora.yaml"), "--dry-run", "--resume"], "--resume with --dry-run"),
    (["train", str(ROOT / "recipes" / "tweets_lora.yaml"), "--dry-run", "output.dir=/"], "root of the file system"),
    # torch's and numpy's seeds are unsigned 64 and 32 bits: a larger one stopped train with exit 1
    (["validate", str(ROOT / "recipes" / "tweets_lora.yaml"), "train.seed=99999999999999999999"],
     "train.seed: 99999999999999999999 is above the maximum 4294967295"),
])
def test_exit_2_on_bad_input(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_exit_1_on_failure_while_running(monkeypatch):
    import peftcli.commands.merge

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(peftcli.commands.merge, "merge_run", boom)
    res = runner.invoke(app, ["merge", "run", "out"])
    assert res.exit_code == 1
    assert "error: disk on fire" in res.output and "PEFTCLI_DEBUG=1" in res.output
    assert "Traceback" not in res.output
    monkeypatch.setenv("PEFTCLI_DEBUG", "1")
    res = runner.invoke(app, ["merge", "run", "out"])
    assert isinstance(res.exception, RuntimeError)  # the real traceback, for bug reports


@pytest.mark.slow
def test_module_entry_point_exit_codes():
    """`python -m peftcli.cli` returns the same codes to the shell as the console script."""
    ok = subprocess.run([sys.executable, "-m", "peftcli.cli", "validate", str(ROOT / "recipes" / "tweets_lora.yaml")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "peftcli.cli", "validate", "no/such.yaml"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "file not found" in bad.stderr + bad.stdout
