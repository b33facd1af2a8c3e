"""A run folder can never make peftcli run code (issue 28 item 1).

A model folder whose config.json has an `auto_map` and a model type transformers does not know
loads only by importing the folder's own modeling file. Such a folder is planted with a modeling
file that creates a file when imported; a run folder whose saved recipe names it with
`model.trust_remote_code: true` is then read by `eval`, `generate` and the library loader: each
refuses with exit 2 naming the model and `--trust-remote-code`, and the file is never created.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.models.loading import RemoteCodeRefused, load_base_model, needs_remote_code

runner = CliRunner()

# Imported only if peftcli lets transformers run the folder's code: it leaves a witness file, and
# then behaves as GPT-2 so that a load the user allowed also works.
MODELING = '''
from pathlib import Path
Path({witness!r}).write_text("code from the model folder ran")
from transformers import GPT2Config, GPT2LMHeadModel


class PlantedConfig(GPT2Config):
    def __init__(self, **kwargs):
        kwargs.pop("model_type", None)  # gpt2 once loaded, so peftcli's architecture map knows it
        super().__init__(**kwargs)
        self.model_type = "gpt2"


class PlantedModel(GPT2LMHeadModel):
    config_class = PlantedConfig
'''


@pytest.fixture
def planted(tiny_gpt2_dir, tiny_csv, tmp_path):
    """(run folder, model folder, witness file): a run whose saved recipe trusts a planted model."""
    model = tmp_path / "planted-model"
    shutil.copytree(tiny_gpt2_dir, model)
    witness = tmp_path / "witness.txt"
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "peftcli_planted"
    cfg["auto_map"] = {"AutoConfig": "modeling_planted.PlantedConfig",
                       "AutoModelForCausalLM": "modeling_planted.PlantedModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_planted.py").write_text(MODELING.format(witness=str(witness)))
    run = tmp_path / "shared-run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(model), "task": "causal_lm", "trust_remote_code": True},
        "data": {"source": str(tiny_csv), "format": "prompt_response", "prompt_column": "prompt",
                 "response_column": "response", "max_length": 32},
        "method": {"name": "lora", "r": 2},
        "output": {"dir": str(run)},
    }))
    save_file({}, str(run / "adapter" / "adapter.safetensors"))
    (run / "adapter" / "meta.json").write_text(json.dumps({"method": "lora", "base_model": str(model),
                                                           "task": "causal_lm"}))
    return run, model, witness


def _refused(res, model: Path) -> None:
    assert res.exit_code == 2, res.output
    assert str(model) in res.output and "--trust-remote-code" in res.output, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("command", [
    ["generate", "{run}", "hello"], ["generate", "{run}/recipe.yaml", "hello"], ["eval", "{run}"],
    ["eval", "a={run}", "b={run}"], ["export", "{run}", "{out}"], ["merge", "{run}", "{out}"],
    ["combine", "{run}", "{run}", "--how", "cat", "{out}"], ["drop", "{run}", "--lowest", "1", "--out", "{out}"],
    ["serve", "{run}", "--port", "1"],
])
def test_run_folder_recipe_never_runs_model_code(planted, tmp_path, command):
    run, model, witness = planted
    args = [a.format(run=run, out=tmp_path / "out") for a in command]
    _refused(runner.invoke(app, args), model)
    assert not witness.exists()


def test_library_loader_refuses_without_the_flag(planted):
    from peftcli.methods.attach import pick_device
    from peftcli.runs.load import load_run

    run, model, witness = planted
    assert needs_remote_code(str(model))
    with pytest.raises(RemoteCodeRefused, match="--trust-remote-code"):
        load_run(run, pick_device("cpu"))
    with pytest.raises(RemoteCodeRefused):
        load_base_model(str(model), "causal_lm")
    assert not witness.exists()


def test_the_flag_is_the_only_consent(planted):
    """The planted file is live: with --trust-remote-code on the command line its code does run
    (so the refusals above are what kept it from running)."""
    from peftcli.models.loading import load_base_model

    _, model, witness = planted
    loaded = load_base_model(str(model), "causal_lm", trust_remote_code=True)
    assert witness.exists()
    assert type(loaded).__name__ == "PlantedModel"


def test_hub_refusal_names_the_flag():
    """A hub model whose class transformers lacks: transformers' own refusal becomes exit 2's message."""
    from peftcli.models.loading import _offline_hint

    err = ValueError("The repository org/model contains custom code which must be executed to correctly load "
                     "the model. Please pass the argument `trust_remote_code=True` to allow custom code to be run.")
    refusal = _offline_hint("org/model", err)
    assert isinstance(refusal, RemoteCodeRefused)
    assert "'org/model'" in str(refusal) and "--trust-remote-code" in str(refusal)


@pytest.mark.slow
def test_train_keeps_the_users_key_and_says_so_but_resume_needs_the_flag(planted, tmp_path):
    """`train` on the user's own recipe honours model.trust_remote_code and says code will run;
    `--resume` reads a run folder, so there only --trust-remote-code counts."""
    run, model, witness = planted
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["train"] = {"max_steps": 2, "batch_size": 4, "progress": False, "eval_every": 2}
    raw["data"]["eval_size"] = 8
    raw["output"] = {"dir": str(tmp_path / "own-run")}
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 0, res.output
    assert res.output.count("will run on this machine") == 1 and witness.exists()
    raw["train"]["max_steps"] = 3
    recipe.write_text(yaml.safe_dump(raw))
    _refused(runner.invoke(app, ["train", str(recipe), "--resume"]), model)
    res = runner.invoke(app, ["train", str(recipe), "--resume", "--trust-remote-code"])
    assert res.exit_code == 0, res.output
