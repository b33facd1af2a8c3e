"""kill -9 at named points of a real CLI run, then --resume: the final adapters are bit-identical
to an uninterrupted run's and metrics.jsonl holds one curve.

Each run is the `peftcli` entry point in a process forked from a warm interpreter
(tests/helpers/warm_cli.py), so a dozen kills cost seconds, not a dozen interpreter starts.
The recipe is tests/harness/fault_inject.py's: dropout on, AdapterDrop's random layer drop, grad_accum 3
across an epoch boundary, warm-up + linear decay, clipping, a checkpoint every 3 steps.
"""

from __future__ import annotations

import os
import signal

import pytest
from helpers import warm_cli

# (point, pass): before the first checkpoint, inside and between each stage of a checkpoint swap
# (of `adapter/` and of `last/`), after optimizer steps and after metrics lines.
KILLS = [
    ("step", 1), ("step", 8), ("metrics:written", 2), ("metrics:written", 9),
    ("save:tmp-written", 1), ("save:tmp-written", 4), ("save:old-moved", 2), ("save:old-moved", 5),
    ("save:renamed", 1), ("save:renamed", 6), ("step", 15), ("save:tmp-written", 9),
]


def _run(argv: list[str], env: dict[str, str], tmp) -> int:
    return warm_cli.run(argv, tmp / "out", env={**os.environ, **env}).returncode


@pytest.mark.slow
def test_kill_at_twelve_points_then_resume_is_bit_identical(tmp_path):
    from harness import fault_inject as fi

    recipe = fi.build_tiny_recipe(tmp_path)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PEFTCLI_KILL_AT": ""}
    ref = tmp_path / "ref"
    assert _run(["train", str(recipe), f"output.dir={ref}"], env, tmp_path) == 0
    problems = {}
    for point, n in KILLS:
        run = tmp_path / f"{point.replace(':', '_')}_{n}"
        code = _run(["train", str(recipe), f"output.dir={run}"], {**env, "PEFTCLI_KILL_AT": f"{point}:{n}"}, tmp_path)
        assert code == -signal.SIGKILL, f"{point}:{n} did not kill the run (exit {code})"
        assert _run(["train", str(recipe), f"output.dir={run}", "--resume"], env, tmp_path) == 0, (point, n)
        diff = fi.compare_adapters(ref, run) + fi.compare_metrics(ref, run)
        if not (run / "summary.json").exists():
            diff.append("no summary.json")
        if list(run.glob(".*-tmp-*")) + list(run.glob(".*-old-*")):
            diff.append("temporary checkpoint folders left behind")
        if diff:
            problems[f"{point}:{n}"] = diff
    assert not problems, problems
