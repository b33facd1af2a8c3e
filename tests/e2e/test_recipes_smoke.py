"""Every shipped recipe, smoke-run end to end (train a few batches, evaluate, save, reload).

A recipe that cannot run on this machine must say so at once with exit code 2: one that needs a
network (a hub model or dataset with none installed locally), QLoRA without a CUDA GPU, and a
bitsandbytes optimizer without bitsandbytes (or, with no CUDA GPU, without its CPU kernels). What a
recipe needs is read from the recipe itself, so recipes added later are covered with no edit here.
Sizes are cut down (classification: two optimizer steps, batch 4, 32 tokens; causal LM: one step,
batch 2, two scored rows per split, one generated sample): the smoke
run checks the plumbing, not the accuracy. Marked `slow` (a few minutes in all on 2 CPU cores); the
plain `pytest` run that CI does includes it, `-m "not slow"` skips it while iterating.
"""

from __future__ import annotations

import importlib.util
import time
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from peftcli.cli import app

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
COMMAND_FOR_METHOD = {"fusion": "fuse"}  # methods trained by another command than `train`
runner = CliRunner()


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@cache
def offline_model(name: str) -> bool:
    from peftcli.models.loading import resolve_source

    src = resolve_source(name)
    return src.embedded or Path(name).expanduser().exists()


@cache
def offline_data(source: str) -> bool:
    from peftcli.core.errors import DataError
    from peftcli.data.sources import builtin_rows

    if Path(source).expanduser().exists():
        return True
    try:
        return builtin_rows(source) is not None
    except DataError:  # built in, but its package is not installed
        return False


def expected_refusal(r: dict) -> str | None:
    """The message a recipe must stop with on this machine, or None if it must run."""
    model, data = r.get("model") or {}, r.get("data") or {}
    if model.get("quantization") == "nf4":
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "needs bitsandbytes"
    optimizer = (r.get("train") or {}).get("optimizer", "adamw")
    if optimizer in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        if importlib.util.find_spec("bitsandbytes") is None:
            return "needs bitsandbytes"
        if not torch.cuda.is_available():
            from peftcli.training.optim import bnb_cpu_problem

            if bnb_cpu_problem() is not None:
                return "on CPU needs bitsandbytes' CPU optimizer kernels"
    name = model.get("name", "sentence-transformers/all-MiniLM-L6-v2")
    if not offline_model(name):
        return f"could not load model {name!r}"
    if not offline_data(data.get("source", "tweets")):
        return "data.source: could not load"
    return None


def smoke_overrides(r: dict, out: Path) -> list[str]:
    # No curves plot: a smoke run's two points say nothing, and the plot is tested on its own (tests/e2e/test_cli.py).
    if (r.get("model") or {}).get("task", "classification") == "classification":
        return ["train.batch_size=4", "data.max_length=32", "data.train_size=16", "data.eval_size=8",
                "train.max_steps=2", "output.plot=false", f"output.dir={out}"]
    # Causal-LM recipes keep their max_length (prompt and response must fit), take smaller batches and
    # one optimizer step: on a 135M model a step of full fine-tuning with 8-bit Adam on the CPU, or
    # GaLore's first projection, costs seconds; the step after runs the same code (the unit tests on
    # tiny models take many steps of each).
    # Every scored row costs a forward of the 135M model (and a generation where the recipe scores
    # generated labels), so the validation and test splits are two rows and one sample is shown.
    extra = ["data.val_size=2"] if "val_size" in (r.get("data") or {}) else []
    return ["train.batch_size=2", "data.train_size=4", "data.eval_size=2", "train.max_steps=1", *extra,
            "eval.generate_samples=1", "output.plot=false", f"output.dir={out}"]


_done: dict[str, tuple[int, str, Path]] = {}


def smoke(path: Path, tmp: Path) -> tuple[int, str, Path]:
    """Smoke-run one recipe once per session; returns (exit code, output, smoke run folder)."""
    if path.stem in _done:
        return _done[path.stem]
    r = raw(path)
    method = (r.get("method") or {}).get("name", "lora")
    out = tmp / path.stem
    args = [COMMAND_FOR_METHOD.get(method, "train"), str(path), "--smoke", *smoke_overrides(r, out)]
    if method == "fusion":
        args.append(f"method.adapters=[{','.join(str(p) for p in fusion_sources(r, tmp))}]")
    res = runner.invoke(app, args)
    _done[path.stem] = (res.exit_code, res.output, Path(f"{out}-smoke"))
    return _done[path.stem]


def fusion_sources(r: dict, tmp: Path) -> list[Path]:
    """AdapterFusion fuses trained runs: smoke the shipped recipes that write them, use those runs."""
    by_dir = {str((raw(p).get("output") or {}).get("dir", "")).rstrip("/"): p for p in RECIPES}
    runs = []
    for run in (r.get("method") or {}).get("adapters", []):
        src = by_dir.get(str(run).rstrip("/"))
        assert src is not None, f"fusion source {run} is written by no shipped recipe"
        code, output, run_dir = smoke(src, tmp)
        assert code == 0, f"fusion source {src.name} failed its smoke run:\n{output}"
        runs.append(run_dir)
    return runs


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke")


def test_recipes_are_found():
    assert len(RECIPES) >= 10 and any(p.stem == "tweets_lora" for p in RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke(path: Path, smoke_dir: Path):
    r = raw(path)
    refusal = expected_refusal(r)
    started = time.perf_counter()
    code, output, run_dir = smoke(path, smoke_dir)
    if refusal is not None:
        assert code == 2, f"{path.name} should stop with exit 2 ({refusal}), got {code}:\n{output}"
        assert refusal in " ".join(output.split()), output
        assert "Traceback" not in output
        assert time.perf_counter() - started < 120, "a recipe this machine cannot run must fail fast"
        return
    assert code == 0, f"{path.name} smoke run failed (exit {code}):\n{output}"
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "adapter").is_dir(), output
    if COMMAND_FOR_METHOD.get((r.get("method") or {}).get("name", "lora"), "train") == "train":
        assert "smoke ok" in output, output
