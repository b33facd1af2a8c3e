"""`peftcli sweep`: planning, validation, scheduling, keep-going, resume, the winner.

Trials run through a fake `train` (a few lines of Python that read the trial's recipe and write a
summary.json, or fail, or report a NaN), so the whole sweep machinery runs for real in seconds.
One end-to-end test trains a real 2x1 grid; it waits for the validation split (data.val_fraction).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.commands import sweep as sw
from peftcli.config.recipe import RecipeError

runner = CliRunner()

# A stand-in for `python -m peftcli.cli train TRIAL.yaml [--resume] [--smoke]`. FAKE_PLAN maps
# train.lr (as %g) to what the run reports: val/test metrics, or "diverge" / "fail".
FAKE = r"""
import json, os, sys, yaml
from pathlib import Path
path = sys.argv[1]
r = yaml.safe_load(open(path))
run = Path(r["output"]["dir"] + ("-smoke" if "--smoke" in sys.argv else ""))
lr = "%g" % float(r["train"]["lr"])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"yaml": path, "flags": sys.argv[2:], "lr": lr}) + "\n")
todo = json.loads(os.environ["FAKE_PLAN"]).get(lr, {})
print("training", lr)
if todo == "diverge":
    print("error: training loss became NaN or infinite (nan) at step 3; stopped.", file=sys.stderr)
    print("(set PEFTCLI_DEBUG=1 for the full traceback)", file=sys.stderr)
    sys.exit(1)
if todo == "fail":
    print("error: CUDA out of memory", file=sys.stderr)
    sys.exit(1)
run.mkdir(parents=True, exist_ok=True)
(run / "summary.json").write_text(json.dumps({"val": todo.get("val", {}), "test": todo.get("test", {}),
                                              "best": {"accuracy": 0.0, "step": 4}, "train_time_s": 1.25}))
"""


def fake_command(trial_yaml: Path, *, resume: bool, smoke: bool) -> list[str]:
    return [sys.executable, "-c", FAKE, str(trial_yaml), *(["--resume"] if resume else []),
            *(["--smoke"] if smoke else [])]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Validation split assumed (the keys arrive with another change); trials run through FAKE."""
    monkeypatch.setattr(sw, "_has_validation", lambda r: True)
    monkeypatch.setattr(sw, "trial_command", fake_command)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))

    def set_plan(plan: dict) -> None:
        monkeypatch.setenv("FAKE_PLAN", json.dumps(plan))

    def read_calls() -> list[dict]:
        return [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []

    set_plan({})
    return set_plan, read_calls


@pytest.fixture
def recipe(tmp_path, tiny_csv):
    return write_recipe(
        tmp_path / "r.yaml",
        model={"name": "tiny-org/tiny-model"},
        data={"source": str(tiny_csv), "text_column": "sentence"},
        method={"name": "lora", "r": 4},
        train={"epochs": 1, "batch_size": 8, "lr": 1e-3},
        output={"dir": str(tmp_path / "run")},
    )


def acc(v: float, test: float = 0.5) -> dict:
    return {"val": {"accuracy": v, "loss": 1 - v}, "test": {"accuracy": test, "loss": 1 - test}}


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ planning


def test_grid_is_the_cartesian_product(recipe, fake, tmp_path):
    plan = sw.plan_trials(recipe, ["train.lr=3e-4,1e-3,3e-3", "train.scheduler=constant,linear", "method.r=8"],
                          out=tmp_path / "sw")
    assert [t.id for t in plan.trials] == [f"trial-00{i}" for i in range(1, 7)]
    assert plan.keys == ["train.lr", "train.scheduler"]
    assert plan.fixed == ["method.r=8"]
    assert [t.settings for t in plan.trials[:2]] == [{"train.lr": 3e-4, "train.scheduler": "constant"},
                                                      {"train.lr": 3e-4, "train.scheduler": "linear"}]
    assert isinstance(plan.trials[0].settings["train.lr"], float)  # YAML reads 3e-4 as text; the recipe as a float
    assert all(t.recipe.method.r == 8 for t in plan.trials)
    assert plan.out == tmp_path / "sw"
    assert not (tmp_path / "sw").exists()  # planning writes nothing


def test_default_out_and_list_values(recipe, fake, tmp_path):
    plan = sw.plan_trials(recipe, ["method.targets=[q,v],[q,k,v]"])
    assert [t.settings["method.targets"] for t in plan.trials] == [["q", "v"], ["q", "k", "v"]]
    assert plan.out == Path(str(tmp_path / "run") + "-sweep")
    assert sw.plan_trials(recipe, ["train.lr=1e-3,1e-2"], smoke=True).out == Path(str(tmp_path / "run") + "-sweep-smoke")


def test_every_trial_is_validated_up_front(recipe, fake, tmp_path):
    with pytest.raises(RecipeError) as e:
        sw.plan_trials(recipe, ["train.lrr=1e-3,1e-2"], out=tmp_path / "sw")
    assert e.value.problems == ["train.lrr: unknown key; did you mean 'lr'?"]  # once, not once per trial
    with pytest.raises(RecipeError) as e:
        sw.plan_trials(recipe, ["train.scheduler=constant,linaer"], out=tmp_path / "sw")
    assert len(e.value.problems) == 1 and "train.scheduler" in e.value.problems[0] and "'linaer'" in e.value.problems[0]


def test_one_value_listed_twice_is_refused(recipe, fake, tmp_path):
    """1e-4 and 0.0001 are one learning rate: a grid would train the same recipe twice."""
    with pytest.raises(RecipeError) as e:
        sw.plan_trials(recipe, ["train.lr=1e-4,3e-4,0.0001", "method.r=4,8"], out=tmp_path / "sw")
    assert e.value.problems == ["train.lr=1e-4 and 0.0001 are the same value; list each value once"]
    assert not (tmp_path / "sw").exists()


def test_targets_the_model_lacks_are_refused_before_any_trial(tiny_bert_dir, tiny_csv, fake, tmp_path):
    """As `validate` and `train` refuse them; a sweep used to start and fail that trial alone."""
    rec = write_recipe(tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
                       data={"source": str(tiny_csv), "text_column": "sentence"}, method={"name": "lora", "r": 4})
    with pytest.raises(RecipeError) as e:
        sw.plan_trials(rec, ["method.targets=zzz,q"], out=tmp_path / "sw")
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("method.targets=zzz: ")
    assert "matches no linear layer" in e.value.problems[0] and not (tmp_path / "sw").exists()


@pytest.mark.parametrize("args,kwargs,expect", [
    (["train.lr"], {}, "is not key=v1,v2"),
    (["train.lr=1e-4:1e-2"], {}, "add --trials N"),
    (["train.lr=0:1e-2"], {"trials": 3}, "log-uniformly"),
    (["method.r=16:4"], {"trials": 3}, "lower bound is above"),
    (["train.lr=1e-3,1e-2", "train.lr=3e-3,1e-2"], {}, "given twice"),
    (["output.dir=a,b"], {}, "--out"),
    (["eval.metric=loss,accuracy"], {}, "cannot be swept"),
    (["method.r=8"], {}, "nothing to sweep"),
    (["train.lr=1e-3,"], {}, "empty value"),
    (["train.lr=1e-3,1e-2"], {"seed": 1}, "--seed is for random mode"),
    (["train.lr=1e-3,1e-2"], {"trials": 0}, "positive number"),
])
def test_bad_sweep_arguments(recipe, fake, tmp_path, args, kwargs, expect):
    with pytest.raises(sw.SweepError, match=expect.replace("-", r"\-")):
        sw.plan_trials(recipe, args, out=tmp_path / "sw", **kwargs)


def test_no_validation_split_is_refused_before_anything_runs(recipe, monkeypatch, tmp_path):
    monkeypatch.setattr(sw, "trial_command", lambda *a, **k: pytest.fail("a trial ran"))
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,1e-2", "data.val_fraction=0", "--out",
                              str(tmp_path / "sw")])
    assert res.exit_code == 2, res.output
    assert "no validation split" in res.output and "data.val_fraction" in res.output
    assert not (tmp_path / "sw").exists()


def test_has_validation_reads_the_data_keys():
    from types import SimpleNamespace as NS

    assert not sw._has_validation(NS(data=NS(val_size=None, val_fraction=0.0, val_split=None)))
    assert sw._has_validation(NS(data=NS(val_size=None, val_fraction=0.1, val_split=None)))
    assert sw._has_validation(NS(data=NS(val_size=200, val_fraction=0.0, val_split=None)))
    assert sw._has_validation(NS(data=NS(val_size=None, val_fraction=0.0, val_split="validation")))


# ------------------------------------------------------------------------------ random mode


@pytest.mark.slow
def test_random_sampling_ranges_and_reproducibility(recipe, fake, tmp_path):
    args = ["train.lr=1e-5:1e-1", "method.r=2:16", "train.warmup_ratio=0:0.2", "train.scheduler=constant,linear"]
    plan = sw.plan_trials(recipe, args, trials=200, seed=3, out=tmp_path / "sw")
    lrs = [t.settings["train.lr"] for t in plan.trials]
    assert len(plan.trials) == 200 and plan.trials[-1].id == "trial-200"
    assert all(1e-5 <= v <= 1e-1 for v in lrs)
    assert all(float(f"{v:.4g}") == v for v in lrs)  # four significant digits
    # log-uniform: each decade about equally often (uniform would put ~90 % in the top decade)
    below = sum(v < 1e-3 for v in lrs) / len(lrs)
    assert 0.35 < below < 0.65, below
    assert sum(v < 1e-4 for v in lrs) > 20
    rs = [t.settings["method.r"] for t in plan.trials]
    assert all(isinstance(v, int) and 2 <= v <= 16 for v in rs) and len(set(rs)) > 8
    wr = [t.settings["train.warmup_ratio"] for t in plan.trials]
    assert all(0 <= v <= 0.2 for v in wr) and sum(v > 0.1 for v in wr) > 60  # uniform
    assert {t.settings["train.scheduler"] for t in plan.trials} == {"constant", "linear"}
    again = sw.plan_trials(recipe, args, trials=200, seed=3, out=tmp_path / "sw")
    assert [t.settings for t in again.trials] == [t.settings for t in plan.trials]
    other = sw.plan_trials(recipe, args, trials=200, seed=4, out=tmp_path / "sw")
    assert [t.settings for t in other.trials] != [t.settings for t in plan.trials]
    assert plan.definition()["seed"] == 3 and plan.definition()["mode"] == "random"
    assert plan.definition()["axes"]["train.lr"] == {"range": [1e-5, 1e-1], "scale": "log", "integer": False}


def test_layer_selection_with_a_colon_is_a_value_not_a_range(recipe, fake, tmp_path):
    plan = sw.plan_trials(recipe, ["method.layers=top:1", "train.lr=1e-4:1e-2"], trials=2, out=tmp_path / "sw")
    assert plan.fixed == ["method.layers=top:1"]
    assert all(t.recipe.method.layers == "top:1" for t in plan.trials)


# ------------------------------------------------------------------------------ scheduling


_TIMED = ("import os, sys, time, json; t0 = time.time(); time.sleep(0.3); "
          "open(sys.argv[1], 'w').write(json.dumps([t0, time.time(), os.environ.get('CUDA_VISIBLE_DEVICES')]))")


@pytest.mark.slow
def test_scheduler_runs_one_trial_per_gpu(tmp_path):
    gpus = ["4", "6"]
    seen: dict[int, int] = {}

    def launch(item: int, worker: int):
        seen[item] = worker
        env = {**os.environ, **sw.worker_env(worker, gpus)}
        return subprocess.Popen([sys.executable, "-c", _TIMED, str(tmp_path / f"{item}.json")], env=env)

    started = time.perf_counter()
    ended = sw.schedule(list(range(6)), 2, launch, poll_s=0.02)
    took = time.perf_counter() - started
    assert sorted(i for i, _, _ in ended) == list(range(6)) and all(rc == 0 for _, _, rc in ended)
    spans = {i: json.loads((tmp_path / f"{i}.json").read_text()) for i in range(6)}
    for i, (_, _, gpu) in spans.items():
        assert gpu == gpus[seen[i]]  # the worker's own GPU
    for i in spans:
        for j in spans:
            if i < j and spans[i][2] == spans[j][2]:  # one GPU: never two trials at once
                a, b = spans[i], spans[j]
                assert a[1] <= b[0] or b[1] <= a[0], (a, b)
    assert {g for _, _, g in spans.values()} == set(gpus)
    assert took < 6 * 0.3 + 2  # two at a time, not one after another (with room for slow starts)


def test_scheduler_stops_running_trials_on_error(tmp_path):
    procs = []

    def launch(item: int, worker: int):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        procs.append(p)
        return p

    def boom(item, worker, rc):  # never reached: nothing ends on its own
        raise AssertionError

    def start(item, worker):
        if len(procs) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sw.schedule([1, 2, 3], 2, launch, boom, on_start=start)
    assert all(p.poll() is not None for p in procs)


def test_workers_and_gpu_environment(monkeypatch):
    assert sw.workers_for("auto", []) == 1
    assert sw.workers_for("auto", ["0"]) == 1
    assert sw.workers_for("auto", ["0", "1", "2"]) == 3
    assert sw.workers_for(2, []) == 2
    assert sw.worker_env(0, []) == {} and sw.worker_env(0, ["0"]) == {}
    assert sw.worker_env(3, ["0", "1"]) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert sw.parse_parallel("auto") == "auto" and sw.parse_parallel("3") == 3
    with pytest.raises(sw.SweepError, match="--parallel"):
        sw.parse_parallel("0")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert sw.visible_gpus() == ["5", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sw.visible_gpus() == ["0", "1"]


# ------------------------------------------------------------------------------ running


@pytest.mark.slow
def test_keeps_going_and_chooses_on_validation_only(recipe, fake, tmp_path):
    set_plan, calls = fake
    # 1e-3 has the best TEST score and must still lose: only val counts.
    set_plan({"0.001": acc(0.60, test=0.99), "0.5": "diverge", "0.25": "fail", "0.01": acc(0.80, test=0.10)})
    plan = sw.plan_trials(recipe, ["train.lr=1e-3,0.5,0.25,0.01", "method.r=8"], out=tmp_path / "sw")
    res = sw.run_sweep(plan, console=_console())
    recs = records(tmp_path / "sw")
    assert [r["status"] for r in recs] == ["done", "diverged", "failed", "done"]
    assert recs[1]["error"].startswith("error: training loss became NaN or infinite")
    assert recs[2]["error"] == "error: CUDA out of memory" and recs[2]["exit_code"] == 1
    assert recs[0]["value"] == 0.60 and recs[0]["val"] == {"accuracy": 0.60, "loss": 0.4}
    assert recs[0]["train_time_s"] == 1.25 and recs[0]["wall_s"] > 0
    assert recs[0]["run"] == str(tmp_path / "sw" / "trial-001")
    assert recs[0]["settings"] == {"train.lr": 0.001}
    text = (tmp_path / "sw" / "sweep.jsonl").read_text()
    assert '"test"' not in text and "0.99" not in text, text  # nothing of the test split is copied
    assert res.best["trial"] == "trial-004" and res.finished == 2
    best = yaml.safe_load((tmp_path / "sw" / "best.yaml").read_text())
    assert best["train"]["lr"] == 0.01 and best["method"]["r"] == 8
    assert best["output"]["dir"] == str(tmp_path / "run") and best["output"]["overwrite"] is False
    assert best["train"]["progress"] is True  # the trial's log-only settings stay in the trial
    trial = yaml.safe_load((tmp_path / "sw" / "trial-001.yaml").read_text())
    assert trial["output"] == {"dir": str(tmp_path / "sw" / "trial-001"), "overwrite": True, "plot": True}
    assert "training 0.001" in (tmp_path / "sw" / "trial-001.log").read_text()
    definition = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert definition["recipe"] == recipe and definition["mode"] == "grid" and definition["trials"] == 4
    assert definition["axes"] == {"train.lr": {"values": ["1e-3", "0.5", "0.25", "0.01"]}}
    assert len(definition["recipe_sha256"]) == 64 and definition["fixed"] == ["method.r=8"]
    assert [c["flags"] for c in calls()] == [[]] * 4


def test_loss_is_lower_is_better(recipe, fake, tmp_path):
    set_plan, _ = fake
    set_plan({"0.001": acc(0.9), "0.01": acc(0.7), "0.1": acc(0.8)})  # val loss = 1 - accuracy
    plan = sw.plan_trials(recipe, ["train.lr=1e-3,1e-2,1e-1", "eval.metric=loss"], out=tmp_path / "sw")
    res = sw.run_sweep(plan, console=_console())
    assert res.best["trial"] == "trial-001" and math.isclose(res.best["value"], 0.1)
    assert sw.pick_best([{"trial": "a", "status": "done", "value": 0.2},
                         {"trial": "b", "status": "failed", "value": None},
                         {"trial": "c", "status": "done", "value": 0.1}], "loss")["trial"] == "c"


def test_missing_val_means_no_winner(recipe, fake, tmp_path):
    set_plan, _ = fake
    set_plan({"0.001": {"test": {"accuracy": 0.9}}, "0.01": {"test": {"accuracy": 0.8}}})  # no val: a run without the split
    plan = sw.plan_trials(recipe, ["train.lr=1e-3,1e-2"], out=tmp_path / "sw")
    res = sw.run_sweep(plan, console=_console())
    assert res.finished == 2 and res.best is None and not (tmp_path / "sw" / "best.yaml").exists()
    assert all(r["value"] is None and r["val"] == {} for r in res.records)


@pytest.mark.slow
def test_resume_skips_recorded_continues_checkpointed_restarts_the_rest(recipe, fake, tmp_path):
    set_plan, calls = fake
    set_plan({"0.001": acc(0.5), "0.002": acc(0.6), "0.003": acc(0.7), "0.004": acc(0.65)})
    args = ["train.lr=1e-3,2e-3,3e-3,4e-3"]
    out = tmp_path / "sw"
    sw.run_sweep(sw.plan_trials(recipe, args, out=out), console=_console())
    # As if killed while trial-002 and -003 ran and before trial-004's line was written:
    first = (out / "sweep.jsonl").read_text().splitlines()[0]
    (out / "sweep.jsonl").write_text(first + "\n" + '{"trial": "trial-00')  # and a torn line
    (out / "trial-002" / "summary.json").unlink()
    (out / "trial-002" / "last").mkdir()  # has a checkpoint: continue it
    (out / "trial-003" / "summary.json").unlink()
    (out / "trial-003" / "recipe.yaml").write_text("{}")  # killed before its first checkpoint: restart
    (tmp_path / "calls.jsonl").unlink()
    res = sw.run_sweep(sw.plan_trials(recipe, args, out=out), console=_console())
    assert res.resumed == 1
    assert [(Path(c["yaml"]).name, c["flags"]) for c in calls()] == [("trial-002.yaml", ["--resume"]),
                                                                     ("trial-003.yaml", [])]
    recs = records(out)
    assert sorted(r["trial"] for r in recs) == ["trial-001", "trial-002", "trial-003", "trial-004"]
    assert recs[1]["trial"] == "trial-004" and recs[1]["wall_s"] is None  # found finished, not rerun
    assert res.best["trial"] == "trial-003"
    assert (out / "trial-002.log").read_text().count("=== ") == 2  # both attempts kept in the log
    # A third run has nothing left to do.
    (tmp_path / "calls.jsonl").unlink()
    res = sw.run_sweep(sw.plan_trials(recipe, args, out=out), console=_console())
    assert calls() == [] and res.resumed == 4 and res.best["trial"] == "trial-003"


def test_a_different_sweep_into_the_same_folder_is_refused(recipe, fake, tmp_path):
    set_plan, calls = fake
    set_plan({"0.001": acc(0.5), "0.002": acc(0.6)})
    out = tmp_path / "sw"
    sw.run_sweep(sw.plan_trials(recipe, ["train.lr=1e-3,2e-3"], out=out), console=_console())
    before = (out / "sweep.jsonl").read_text()
    with pytest.raises(sw.SweepError, match="holds a different sweep .*axes differs.*--out"):
        sw.run_sweep(sw.plan_trials(recipe, ["train.lr=1e-3,3e-3"], out=out), console=_console())
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--smoke", "--out", str(out)])
    assert res.exit_code == 2 and "smoke differs" in res.output and "--out" in res.output
    # The same keys in another order number the trials otherwise: resuming took recorded trials for others.
    two = tmp_path / "sw2"
    sw.run_sweep(sw.plan_trials(recipe, ["train.lr=1e-3,2e-3", "method.r=2,4"], out=two), console=_console())
    with pytest.raises(sw.SweepError, match=r"the order of the swept keys \(first given: train.lr, method.r\) differs"):
        sw.open_sweep_folder(sw.plan_trials(recipe, ["method.r=2,4", "train.lr=1e-3,2e-3"], out=two))
    Path(recipe).write_text(Path(recipe).read_text().replace("r: 4", "r: 2"))  # the recipe changed
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--out", str(out)])
    assert res.exit_code == 2 and "recipe_sha256 differs" in res.output
    assert (out / "sweep.jsonl").read_text() == before


def test_a_folder_that_is_not_a_sweep_is_refused(recipe, fake, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--out", str(out)])
    assert res.exit_code == 2 and "not a sweep folder" in res.output and "--out" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()  # an empty folder is fine
    assert runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--out", str(out)]).exit_code == 0


def test_out_inside_an_input_is_refused(recipe, fake, tmp_path, tiny_csv):
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--out", str(Path(tiny_csv) / "sw")])
    assert res.exit_code == 2 and "which this command reads" in res.output
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "where best.yaml trains the winner" in res.output


# ------------------------------------------------------------------------------ the command


def test_cli_sweep_end_to_end_with_a_fake_train(recipe, fake, tmp_path):
    set_plan, calls = fake
    set_plan({"0.001": acc(0.7, test=0.95), "0.003": acc(0.75, test=0.5)})
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,3e-3", "train.scheduler=constant,linear",
                              "--out", str(out), "--smoke", "--parallel", "1"])
    assert res.exit_code == 0, res.output
    assert "sweep of 4 trials (grid 2 × 2)" in res.output and "higher is better" in res.output
    # not a terminal: one line per finished trial
    assert "trial-003 train.lr=0.003 train.scheduler=constant · done · val accuracy 0.7500" in res.output
    assert "4 done · 0 failed · 0 diverged" in res.output
    assert "best: trial-003" in res.output
    assert f"peftcli train {out / 'best.yaml'}" in res.output
    assert str(out / "trial-003-smoke") in res.output  # --smoke: the run lands in trial-003-smoke
    assert "0.95" not in res.output
    assert all(c["flags"] == ["--smoke"] for c in calls())
    assert (out / "trial-003-smoke" / "summary.json").exists()


def test_cli_exit_1_when_no_trial_finishes(recipe, fake, tmp_path):
    set_plan, _ = fake
    set_plan({"0.001": "fail", "0.002": "diverge"})
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--out", str(tmp_path / "sw")])
    assert res.exit_code == 1, res.output
    assert "0 done · 1 failed · 1 diverged" in res.output and "no trial finished" in res.output


def test_cli_typo_is_exit_2_before_anything_runs(recipe, fake, tmp_path):
    res = runner.invoke(app, ["sweep", recipe, "train.lrr=1e-3,2e-3", "--out", str(tmp_path / "sw")])
    assert res.exit_code == 2
    assert "train.lrr: unknown key; did you mean 'lr'?" in res.output and res.output.count("train.lrr") == 1
    assert "Traceback" not in res.output and not (tmp_path / "sw").exists()
    res = runner.invoke(app, ["sweep", recipe, "train.lr=1e-3,2e-3", "--parallel", "many"])
    assert res.exit_code == 2 and "--parallel many" in res.output


def test_live_table_on_a_terminal(recipe, fake, tmp_path):
    from rich.console import Console

    set_plan, _ = fake
    set_plan({"0.001": acc(0.7), "0.002": acc(0.9, test=0.31), "0.003": "fail"})
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, color_system="truecolor")
    plan = sw.plan_trials(recipe, ["train.lr=1e-3,2e-3,3e-3"], out=tmp_path / "sw")
    res = sw.run_sweep(plan, console=console)
    assert res.best["trial"] == "trial-002"
    shown = buf.getvalue()
    assert "val accuracy ↑" in shown and "0.9000" in shown and "failed" in shown and "0.31" not in shown
    table = sw._Board(plan, {r["trial"]: r for r in res.records}).__rich__()
    assert [table.rows[i].style for i in range(3)] == [None, "bold green", None]  # the best row stands out


def test_sweep_help_has_an_example():
    res = runner.invoke(app, ["sweep", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "peftcli sweep" in res.output


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False)


# ------------------------------------------------------------------------------ real training


@pytest.mark.slow
def test_real_grid_on_tiny_bert(tiny_bert_dir, tiny_csv, tmp_path):
    """Two real trials of `peftcli train` in subprocesses, ranked on the validation split.

    The recipe's default data.val_fraction gives the sweep its split.
    """
    rec = write_recipe(
        tmp_path / "r.yaml",
        model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "max_length": 32},
        method={"name": "lora", "r": 4},
        train={"max_steps": 4, "batch_size": 8, "progress": False, "num_threads": 1},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", rec, "train.lr=1e-3,5e-3", "method.r=2", "--out", str(out)])
    assert res.exit_code == 0, res.output + "".join(p.read_text() for p in out.glob("*.log"))
    recs = records(out)
    assert [r["status"] for r in recs] == ["done", "done"]
    assert all(isinstance(r["value"], float) and r["val"] for r in recs)
    assert all((out / f"trial-00{i}" / "adapter").is_dir() for i in (1, 2))
    best = yaml.safe_load((out / "best.yaml").read_text())
    winner = sw.pick_best(recs, "accuracy")
    assert best["train"]["lr"] == winner["settings"]["train.lr"] and best["method"]["r"] == 2
    assert best["output"]["dir"] == str(tmp_path / "run")
    assert f"peftcli train {out / 'best.yaml'}" in res.output


def test_settings_print_as_typed_overrides():
    """A trial's settings print the way a user types them back: `method.targets=[q,v]` pastes."""
    from peftcli.commands.sweep import as_override

    assert as_override(["q", "v"]) == "[q,v]"
    assert as_override(True) == "true" and as_override(False) == "false"
    assert as_override(0.00012345678) == "0.0001235"
    assert as_override(50) == "50"
