"""peftcli leaves other libraries' logging and progress bars as it found them.

A program that imports peftcli as a library keeps its own transformers / datasets /
huggingface_hub settings: peftcli quiets them only around its own loading calls
(`core.quiet.quiet_libraries`) and restores them exactly, unusual settings included.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import warm_cli

ROOT = Path(__file__).resolve().parents[2]
LIBS = ("transformers", "datasets", "huggingface_hub")


def settings() -> dict:
    import datasets
    import transformers

    hub_bars = importlib.import_module("huggingface_hub.utils.tqdm")
    return {
        "transformers verbosity": transformers.logging.get_verbosity(),
        "datasets verbosity": datasets.logging.get_verbosity(),
        "logger levels": {n: logging.getLogger(n).level for n in LIBS},
        "transformers bars": transformers.utils.logging.is_progress_bar_enabled(),
        "datasets bars disabled": datasets.utils.are_progress_bars_disabled(),
        "hub bars": dict(hub_bars.progress_bar_states),
    }


def set_settings(s: dict) -> None:
    import datasets
    import transformers

    hub_bars = importlib.import_module("huggingface_hub.utils.tqdm")
    for n, level in s["logger levels"].items():
        logging.getLogger(n).setLevel(level)
    if s["transformers bars"]:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    if s["datasets bars disabled"]:
        datasets.disable_progress_bars()
    else:
        datasets.enable_progress_bars()
    hub_bars.progress_bar_states.clear()
    hub_bars.progress_bar_states.update(s["hub bars"])


@pytest.fixture
def unusual_settings():
    """Settings no library defaults to, so that "unchanged" cannot hold by coincidence."""
    before = settings()
    unusual = {
        "logger levels": {"transformers": logging.WARNING, "datasets": logging.NOTSET, "huggingface_hub": logging.INFO},
        "transformers bars": False,
        "datasets bars disabled": False,
        "hub bars": {"_global": True, "some.group": False},
    }
    set_settings(unusual)
    yield settings()
    set_settings(before)


def test_quiet_block_quiets_and_restores_exactly(unusual_settings):
    from peftcli.core.quiet import quiet_libraries

    with quiet_libraries():
        inside = settings()
        assert inside["transformers verbosity"] == logging.ERROR
        assert inside["datasets verbosity"] == logging.ERROR
        assert not inside["transformers bars"] and inside["datasets bars disabled"]
    assert settings() == unusual_settings
    with pytest.raises(KeyError), quiet_libraries():
        raise KeyError("an error inside the block")
    assert settings() == unusual_settings
    with quiet_libraries(verbose=True):
        assert settings() == unusual_settings


def test_quiet_block_never_raises_a_quieter_level(unusual_settings):
    from peftcli.core.quiet import quiet_libraries

    logging.getLogger("transformers").setLevel(logging.CRITICAL)
    with quiet_libraries():
        assert logging.getLogger("transformers").level == logging.CRITICAL
    assert logging.getLogger("transformers").level == logging.CRITICAL


def test_loading_models_and_data_leaves_settings_unchanged(unusual_settings, tiny_bert_dir, tiny_csv):
    from peftcli.config.recipe import recipe_from_dict
    from peftcli.models.meta import meta_model
    from peftcli.runs.load import build, prepare_data
    from peftcli.training.budget import budget

    r = recipe_from_dict({
        "model": {"name": str(tiny_bert_dir), "task": "classification", "num_labels": 2},
        "data": {"source": str(tiny_csv), "text_column": "sentence", "eval_size": 8, "max_length": 32},
        "method": {"name": "lora"},
    })
    built = build(r, torch.device("cpu"))
    splits, train, _, held = prepare_data(r, built.tokenizer)
    assert train and held
    budget(r, depth=1)
    meta_model(r.model.name, r.model.task, num_labels=2)
    assert settings() == unusual_settings


@pytest.mark.slow
def test_importing_peftcli_changes_no_library_setting():
    """In a fresh interpreter: import every module of the package, compare before and after."""
    code = """
import importlib, logging, pkgutil, sys
import datasets, huggingface_hub, transformers
hub = importlib.import_module("huggingface_hub.utils.tqdm")
def snap():
    return ([logging.getLogger(n).level for n in ("transformers", "datasets", "huggingface_hub")],
            transformers.utils.logging.is_progress_bar_enabled(), datasets.utils.are_progress_bars_disabled(),
            dict(hub.progress_bar_states))
before = snap()
import peftcli
for m in pkgutil.walk_packages(peftcli.__path__, "peftcli."):
    importlib.import_module(m.name)
after = snap()
assert after == before, (before, after)
print("unchanged")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------ the terminal


@pytest.fixture(scope="module")
def causal_run(tiny_gpt2_dir, chat_file, tmp_path_factory) -> Path:
    from conftest import write_recipe
    from typer.testing import CliRunner

    from peftcli.cli import app

    d = tmp_path_factory.mktemp("causal")
    rec = write_recipe(d / "run.yaml", model={"name": str(tiny_gpt2_dir), "task": "causal_lm"},
                       data={"source": chat_file, "eval_size": 8, "max_length": 96},
                       method={"name": "lora", "r": 4}, train={"epochs": 1, "batch_size": 2, "progress": False},
                       output={"dir": str(d / "run"), "plot": False})
    res = CliRunner().invoke(app, ["train", rec])
    assert res.exit_code == 0, res.output
    return d / "run"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "peftcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_eval_and_merge_print_only_peftcli_lines_unless_verbose(causal_run, tmp_path):
    # A fresh interpreter: output printed while transformers' model code is imported counts too.
    ev = _cli("eval", str(causal_run), "--limit", "4")
    assert ev.returncode == 0, ev.stderr
    assert ev.stderr == "" and "loss" in ev.stdout
    # Forked from a warm interpreter (what merge prints while it loads and writes, with and without --verbose).
    quiet = warm_cli.run(["merge", str(causal_run), str(tmp_path / "m1")], tmp_path / "out")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and "merged model written" in quiet.stdout
    loud = warm_cli.run(["merge", str(causal_run), str(tmp_path / "m2"), "--verbose"], tmp_path / "out")
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr
