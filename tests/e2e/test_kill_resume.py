"""kill -9 at named points of a real CLI run, then --resume: the final adapters are bit-identical
to an uninterrupted run's and metrics.jsonl holds one curve.

Each run is the `peftcli` entry point in a process forked from a server that imported peftcli
once (multiprocessing's forkserver), so a dozen kills cost seconds, not a dozen interpreter starts.
The recipe is tests/harness/fault_inject.py's: dropout on, AdapterDrop's random layer drop, grad_accum 3
across an epoch boundary, warm-up + linear decay, clipping, a checkpoint every 3 steps.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import sys

import pytest


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def cli_in_child(argv: list[str], env: dict[str, str]) -> None:
    """The `peftcli` command in this (forked) process; exits with the command's status."""
    os.environ.update(env)
    sys.argv = ["peftcli", *argv]
    from peftcli.cli import main

    main()


# (point, pass): before the first checkpoint, inside and between each stage of a checkpoint swap
# (of `adapter/` and of `last/`), after optimizer steps and after metrics lines.
KILLS = [
    ("step", 1), ("step", 8), ("metrics:written", 2), ("metrics:written", 9),
    ("save:tmp-written", 1), ("save:tmp-written", 4), ("save:old-moved", 2), ("save:old-moved", 5),
    ("save:renamed", 1), ("save:renamed", 6), ("step", 15), ("save:tmp-written", 9),
]


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    # Everything a run imports (transformers loads its model and data code lazily), so that each
    # forked run starts warm.
    ctx.set_forkserver_preload([m for m in [
        "peftcli.cli", "peftcli.training.loop", "peftcli.methods", "peftcli.runs.state", "datasets", "pandas", "sympy",
        "scipy.optimize", "scipy.sparse", "torch._dynamo", "torch.distributed", "accelerate",
        "transformers.models.bert.modeling_bert", "transformers.models.auto.modeling_auto",
        "transformers.models.auto.tokenization_auto", "transformers.generation", "transformers.integrations",
        "transformers.quantizers", "matplotlib.pyplot",
    ] if _installed(m)])
    return ctx


def _run(ctx, argv: list[str], env: dict[str, str]) -> int:
    p = ctx.Process(target=cli_in_child, args=(argv, env))
    p.start()
    p.join(timeout=240)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"{argv} did not finish in 240 s")
    return p.exitcode


@pytest.mark.slow
def test_kill_at_twelve_points_then_resume_is_bit_identical(forkserver, tmp_path):
    from harness import fault_inject as fi

    recipe = fi.build_tiny_recipe(tmp_path)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PEFTCLI_KILL_AT": ""}
    ref = tmp_path / "ref"
    assert _run(forkserver, ["train", str(recipe), f"output.dir={ref}"], env) == 0
    problems = {}
    for point, n in KILLS:
        run = tmp_path / f"{point.replace(':', '_')}_{n}"
        code = _run(forkserver, ["train", str(recipe), f"output.dir={run}"], {**env, "PEFTCLI_KILL_AT": f"{point}:{n}"})
        assert code == -signal.SIGKILL, f"{point}:{n} did not kill the run (exit {code})"
        assert _run(forkserver, ["train", str(recipe), f"output.dir={run}", "--resume"], env) == 0, (point, n)
        diff = fi.compare_adapters(ref, run) + fi.compare_metrics(ref, run)
        if not (run / "summary.json").exists():
            diff.append("no summary.json")
        if list(run.glob(".*-tmp-*")) + list(run.glob(".*-old-*")):
            diff.append("temporary checkpoint folders left behind")
        if diff:
            problems[f"{point}:{n}"] = diff
    assert not problems, problems
