"""Hyper-parameter sweeps: many runs of one recipe, the winner chosen on validation metrics only.

Each trial is an ordinary `peftcli train` of a resolved recipe, run as a subprocess: a crash, an
out-of-memory or a NaN in one trial cannot take the sweep down, and each process can be pinned to
its own GPU. The sweep folder holds everything needed to pick up where a killed sweep stopped:

    sweep.json         the definition (recipe hash, swept keys, trials, seed); a rerun must match it
    sweep.jsonl        one line per trial that ended (done, failed or diverged) or was stopped with
                       the sweep (interrupted: run again by the next invocation), fsync'ed per line
    trial-001.yaml     the trial's resolved recipe, output.dir pointing at trial-001/
    trial-001.log      the trial's stdout and stderr, every attempt appended
    trial-001/         the trial's run folder (trial-001-smoke/ under --smoke)
    best.yaml          the base recipe with the winning settings, output.dir the base run folder

The held-out test score a finished run may also report is never read: choosing on it would make
it a second validation set and its number optimistic.

One sweep at a time writes a sweep folder (peftcli.runs.lock), and each trial runs in a process
group of its own: on SIGTERM or Ctrl-C the sweep forwards SIGTERM to its running trials, which
stop at the end of a step with a checkpoint, waits for them, records them as interrupted and
exits 143 or 130; the next invocation resumes them. A second signal kills the trials at once.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from peftcli.commands.validate import method_placement
from peftcli.config.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_yaml
from peftcli.core import signals
from peftcli.core.errors import BadInput
from peftcli.core.files import atomic_file_write, fsync_path
from peftcli.runs.folder import UnsafePathError, check_paths, local_inputs
from peftcli.runs.lock import folder_lock

DEFINITION_FILE = "sweep.json"
RECORDS_FILE = "sweep.jsonl"
BEST_FILE = "best.yaml"
DIVERGED_TEXT = "NaN or infinite"  # what train.NonFiniteError says; the log is all a subprocess leaves
# How a trial stopped by SIGINT / SIGTERM exits: 128 + signal from peftcli, minus the signal when it died of it.
# Exits that stopped a trial from outside, resumed on the next invocation: SIGINT and SIGTERM (the
# trial checkpointed), and SIGKILL (the out-of-memory killer, `kill -9`: its last checkpoint stands).
STOPPED_EXITS = {128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGKILL,
                 -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL}
# Keys the sweep sets itself: a trial's folder is the sweep's to choose.
RESERVED_KEYS = {
    "output.dir": "the sweep gives each trial its own folder; choose where with --out",
    "output.overwrite": "the sweep restarts only the trial folders it wrote itself",
}
# Keys that may be set once but not swept: trials ranked on different metrics cannot be compared.
UNSWEPT_KEYS = {"eval.metric": "it ranks the trials, so it is one for the whole sweep; set it once (eval.metric=loss)"}


class SweepError(BadInput, ValueError):
    """Bad sweep arguments or a sweep folder that cannot be used: bad input, exit 2."""


# ------------------------------------------------------------------------------ definition


@dataclass
class Axis:
    """One swept key: a list of values (`key=a,b`) or, in random mode, a range (`key=lo:hi`)."""

    key: str
    values: list[str] | None = None  # the texts as typed, parsed like `train key=value` parses them
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    integer: bool = False

    def describe(self) -> dict[str, Any]:
        if self.values is not None:
            return {"values": self.values}
        return {"range": [self.low, self.high], "scale": "log" if self.log else "linear", "integer": self.integer}


@dataclass
class Trial:
    id: str
    settings: dict[str, Any]  # swept key -> the value the trial's recipe resolved it to
    overrides: list[str]  # the dotted overrides that make its recipe (fixed ones first)
    recipe: Recipe = field(repr=False)


@dataclass
class SweepPlan:
    recipe_path: Path
    recipe_sha256: str
    base: Recipe  # the recipe with the fixed overrides: its run folder is where best.yaml trains
    fixed: list[str]
    axes: list[Axis]
    n_trials: int | None  # None: grid mode
    seed: int | None
    smoke: bool
    out: Path
    trials: list[Trial]

    @property
    def metric(self) -> str:
        return self.base.eval.metric

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.axes]

    def definition(self) -> dict[str, Any]:
        return {
            "recipe": str(self.recipe_path),
            "recipe_sha256": self.recipe_sha256,
            "mode": "grid" if self.n_trials is None else "random",
            "fixed": self.fixed,
            "axes": {a.key: a.describe() for a in self.axes},
            "trials": len(self.trials),
            "seed": self.seed,
            "smoke": self.smoke,
            "metric": self.metric,
        }

    def run_dir(self, trial: Trial) -> Path:
        """Where the trial's run actually lands: `train --smoke` appends -smoke to output.dir."""
        return self.out / (trial.id + ("-smoke" if self.smoke else ""))


def _has_validation(recipe: Recipe) -> bool:
    """Whether the recipe keeps a validation split apart from its test split: without one, the
    only score to choose on would be the test score, which then stops being a fair estimate."""
    data = recipe.data
    return bool(data.val_size or data.val_fraction > 0 or data.val_split)


def _split_values(text: str) -> list[str]:
    """Split at commas outside brackets and quotes, so `method.targets=[q,v],[q,k,v]` is two values."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _number(text: str) -> float | int | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _as_range(text: str) -> tuple[float | int, float | int] | None:
    """`lo:hi` with two numbers is a range; `top:4` (a layer selection) is a value."""
    if text.count(":") != 1:
        return None
    lo, hi = (_number(p) for p in text.split(":"))
    if lo is None or hi is None:
        return None
    return lo, hi


def _is_lr(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == "lr" or last.endswith("_lr")


def parse_axes(args: Sequence[str], *, random_mode: bool) -> tuple[list[str], list[Axis]]:
    """(fixed overrides, swept axes) from `key=v1,v2` / `key=lo:hi` arguments, in the order given."""
    fixed: list[str] = []
    axes: list[Axis] = []
    seen: set[str] = set()
    for arg in args:
        key, eq, text = arg.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SweepError(f"{arg!r} is not key=v1,v2,... (e.g. train.lr=3e-4,1e-3)")
        if key in seen:
            raise SweepError(f"{key} is given twice; list all its values in one argument, e.g. {key}=a,b")
        seen.add(key)
        if key in RESERVED_KEYS:
            raise SweepError(f"{key} cannot be set in a sweep: {RESERVED_KEYS[key]}")
        pieces = _split_values(text)
        rng = _as_range(text) if len(pieces) == 1 else None
        if key in UNSWEPT_KEYS and (len(pieces) > 1 or rng is not None):
            raise SweepError(f"{key} cannot be swept: {UNSWEPT_KEYS[key]}")
        if rng is not None:
            if not random_mode:
                raise SweepError(f"{arg}: a range is sampled in random mode; add --trials N, or list the values "
                                 f"(e.g. {key}={rng[0]},{rng[1]})")
            lo, hi = rng
            if lo > hi:
                raise SweepError(f"{arg}: the lower bound is above the upper one; write {key}={hi}:{lo}")
            log = _is_lr(key)
            if log and lo <= 0:
                raise SweepError(f"{arg}: a learning rate is sampled log-uniformly, so its range must be positive "
                                 f"(e.g. {key}=1e-5:1e-2)")
            both_int = isinstance(lo, int) and isinstance(hi, int)
            axes.append(Axis(key, low=lo, high=hi, log=log, integer=both_int))
            continue
        if len(pieces) > 1:
            for p in pieces:
                if p.strip() == "":
                    raise SweepError(f"{arg}: an empty value in the list; write null for a null value")
                if _as_range(p) is not None:
                    raise SweepError(f"{arg}: {p!r} looks like a range; a key takes either a list or one range")
            axes.append(Axis(key, values=pieces))
        else:
            fixed.append(f"{key}={text}")
    return fixed, axes


def _round4(v: float) -> float:
    """Four significant digits: readable in the table and best.yaml, and the same on every machine."""
    return float(f"{v:.4g}")


def _sample(axis: Axis, rng: random.Random) -> str:
    """One value of an axis as override text."""
    if axis.values is not None:
        return rng.choice(axis.values)
    lo, hi = axis.low, axis.high
    assert lo is not None and hi is not None
    if axis.integer:
        if axis.log:
            v = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        else:
            v = rng.randint(int(lo), int(hi))
        return str(min(max(v, int(lo)), int(hi)))
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if axis.log else rng.uniform(lo, hi)
    return repr(min(max(_round4(x), float(lo)), float(hi)))


def expand(axes: Sequence[Axis], *, n_trials: int | None, seed: int) -> list[list[str]]:
    """The trials' swept overrides: the cartesian product (grid) or `n_trials` seeded draws."""
    if n_trials is None:
        lists = [[f"{a.key}={v}" for v in (a.values or [])] for a in axes]
        return [list(combo) for combo in itertools.product(*lists)]
    rng = random.Random(seed)
    return [[f"{a.key}={_sample(a, rng)}" for a in axes] for _ in range(n_trials)]


def _value_at(d: dict, key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _escape_braces(path: Path | str) -> str:
    """output.dir is a template ({method}, {data}): a literal folder must not be read as one."""
    return str(path).replace("{", "{{").replace("}", "}}")


def default_out(base: Recipe, smoke: bool) -> Path:
    """Next to the run folder it tunes; a smoke sweep apart, so it never blocks the real one."""
    return Path(str(base.run_dir()) + "-sweep" + ("-smoke" if smoke else ""))


def plan_trials(
    recipe_path: str | Path,
    args: Sequence[str],
    *,
    trials: int | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    smoke: bool = False,
) -> SweepPlan:
    """Parse the arguments and validate every trial's recipe; nothing is written or run.

    All trials are checked before the first one starts, so a typo in a key or one bad value is
    one error now rather than a failure hours into the sweep.
    """
    if trials is not None and trials < 1:
        raise SweepError(f"--trials {trials}: give a positive number of trials")
    if trials is None and seed is not None:
        raise SweepError("--seed is for random mode (--trials N); a grid runs every combination, "
                         "so sweep train.seed=0,1,2 to vary the training seed")
    random_mode = trials is not None
    fixed, axes = parse_axes(args, random_mode=random_mode)
    if not axes:
        raise SweepError("nothing to sweep: give a key with several values (train.lr=3e-4,1e-3)"
                         + (" or a range (train.lr=1e-4:1e-2)" if random_mode else ", or a range with --trials N"))
    recipe_path = Path(recipe_path)
    base = load_recipe(recipe_path, fixed, check_files=True)  # the file's own errors, as `train` reports them
    text = recipe_path.read_bytes()
    raw = yaml.safe_load(text)
    seed = (0 if seed is None else seed) if random_mode else None
    combos = expand(axes, n_trials=trials, seed=seed or 0)
    width = max(3, len(str(len(combos))))
    problems: list[str] = []
    planned: list[Trial] = []
    placed: set[str] = set()
    grid_seen: dict[str, list[str]] = {}
    for i, swept in enumerate(combos, 1):
        overrides = [*fixed, *swept]
        try:
            r = recipe_from_dict(copy.deepcopy(raw), str(recipe_path), overrides, check_files=True)
        except RecipeError as e:
            problems += [p for p in e.problems if p not in problems]
            continue
        r.source = str(recipe_path)
        resolved = r.to_dict()
        # Targets and layers against the model's structure, as `validate` checks them: once per
        # model and method the trials name (a trial would otherwise fail after the others started).
        placement = json.dumps([resolved["model"], resolved["method"]], sort_keys=True, default=str)
        if placement not in placed:
            placed.add(placement)
            try:
                method_placement(r)
            except RecipeError as e:
                problems += [f"{', '.join(swept)}: {p}" for p in e.problems if p not in problems]
                continue
        settings = {a.key: _value_at(resolved, a.key) for a in axes}
        same = json.dumps(settings, sort_keys=True, default=str)
        if not random_mode and same in grid_seen:  # "1e-4,0.0001": one value twice, trained twice alike
            pairs = [(a, b) for a, b in zip(grid_seen[same], swept, strict=True) if a != b]
            msg = "; ".join(f"{a} and {b.partition('=')[2]}" for a, b in pairs) + " are the same value; list each value once"
            problems += [msg] if msg not in problems else []
            continue
        grid_seen[same] = swept
        planned.append(Trial(f"trial-{i:0{width}d}", settings, overrides, r))
    if problems:
        raise RecipeError(str(recipe_path), problems)
    no_val = [t for t in planned if not _has_validation(t.recipe)]
    if no_val:
        raise SweepError(
            f"{recipe_path}: no validation split, so the sweep has nothing to choose on (it never chooses on the "
            "test split, whose score would then be optimistic); set data.val_fraction (e.g. 0.1), data.val_size "
            "or data.val_split"
        )
    out_path = Path(out) if out is not None else default_out(base, smoke)
    return SweepPlan(recipe_path, hashlib.sha256(text).hexdigest(), base, fixed, axes, trials, seed, smoke,
                     out_path, planned)


# ------------------------------------------------------------------------------ the sweep folder


def _definition_differences(old: dict, new: dict) -> list[str]:
    """Keys of the definition that differ; the recipe's path may (a rerun from elsewhere), its content may not.
    The swept keys compare in order: trials are numbered (and random draws made) in that order, so
    the same keys given in another order would resume other trials under the recorded ones' numbers."""
    def same(a: Any, b: Any) -> bool:
        return list(a.items()) == list(b.items()) if isinstance(a, dict) and isinstance(b, dict) else a == b

    keys = [k for k in new if k != "recipe"] + [k for k in old if k not in new and k != "recipe"]
    diffs = [k for k in keys if not same(old.get(k), new.get(k))]
    if "axes" in diffs and isinstance(old.get("axes"), dict) and old["axes"] == new.get("axes"):
        diffs[diffs.index("axes")] = f"the order of the swept keys (first given: {', '.join(old['axes'])})"
    return diffs


def open_sweep_folder(plan: SweepPlan) -> bool:
    """Create the sweep folder, or accept it for resuming; returns True when it already held this sweep.

    A folder that is not a sweep folder, or one holding a different sweep, is refused untouched:
    resuming into it would mix two experiments' trials in one ranking.
    """
    out = plan.out
    sources = [plan.recipe_path, *local_inputs(plan.base)]
    check_paths(out, what="--out", sources=sources)
    if out.is_symlink():
        raise UnsafePathError(f"--out {out} is a symbolic link; name the folder itself, or a new one")
    if out.exists() and not out.is_dir():
        raise UnsafePathError(f"--out {out} exists and is not a folder; choose another --out")
    final = Path(os.path.realpath(plan.base.run_dir()))
    here = Path(os.path.realpath(out))
    if here == final or final in here.parents:
        raise SweepError(f"--out {out} is or lies in the recipe's run folder {plan.base.run_dir()}, where best.yaml "
                         "trains the winner; choose another --out")
    definition = plan.definition()
    marker = out / DEFINITION_FILE
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise UnsafePathError(f"--out {out} exists and is not a sweep folder (no {DEFINITION_FILE}); "
                                  "choose another --out")
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise SweepError(f"{marker} cannot be read ({e}); choose another --out") from None
        diffs = _definition_differences(old if isinstance(old, dict) else {}, definition)
        if diffs:
            raise SweepError(
                f"--out {out} holds a different sweep ({', '.join(diffs)} differ{'s' if len(diffs) == 1 else ''}); "
                "rerun its own command to resume it, or pass another --out for this one"
            )
        return True
    out.mkdir(parents=True, exist_ok=True)
    atomic_file_write(marker, json.dumps(definition, indent=2) + "\n")
    fsync_path(out)
    return False


def read_records(out: Path) -> list[dict]:
    """The trials that ended, in the order they ended. A line torn by a kill is dropped from the
    file too, so the next appended line starts on a line of its own."""
    path = Path(out) / RECORDS_FILE
    if not path.exists():
        return []
    text = path.read_text()
    good_text = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
    if good_text != text:
        atomic_file_write(path, good_text)
    records = []
    for line in good_text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("trial"), str):
            records.append(rec)
    return records


def append_record(out: Path, record: dict) -> None:
    """One line, on disk before the next trial starts: a kill loses at most the running trials."""
    with open(Path(out) / RECORDS_FILE, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_val(run: Path) -> tuple[dict[str, Any], float | None]:
    """(validation metrics, train_time_s) from a finished run's summary.json; nothing else is read,
    the test score least of all."""
    try:
        summary = json.loads((Path(run) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}, None
    if not isinstance(summary, dict):
        return {}, None
    val = summary.get("val") or {}
    val = {k: _finite_or_none(v) for k, v in val.items()} if isinstance(val, dict) else {}
    t = summary.get("train_time_s")
    return val, (float(t) if isinstance(t, (int, float)) else None)


def lower_is_better(metric: str) -> bool:
    return metric == "loss"


def pick_best(records: Sequence[dict], metric: str) -> dict | None:
    """The finished trial with the best validation value (the first one on a tie)."""
    scored = [r for r in records if r.get("status") == "done" and isinstance(r.get("value"), (int, float))]
    if not scored:
        return None
    sign = 1.0 if lower_is_better(metric) else -1.0
    return min(scored, key=lambda r: sign * r["value"])


def _last_error(log_text: str) -> str:
    """The line a user would look for: peftcli's `error:` message, else a traceback's last line."""
    lines = [ln.rstrip() for ln in log_text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("(set PEFTCLI_DEBUG")]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error:"):
            tail = [lines[i]] + [ln.strip() for ln in lines[i + 1:] if ln.startswith(" ")]
            return " ".join(tail)[:500]
    return lines[-1][:500] if lines else "no output"


def best_recipe_yaml(plan: SweepPlan, trial: Trial) -> str:
    """The winner as a recipe of its own, training into the base recipe's run folder: the trial
    folder already holds its adapter, and a sweep's folders are not where a final run belongs."""
    r = copy.deepcopy(trial.recipe)
    r.output = copy.deepcopy(plan.base.output)
    r.output.dir = _escape_braces(plan.base.run_dir())
    return recipe_yaml(r)


def trial_recipe_yaml(plan: SweepPlan, trial: Trial) -> str:
    r = copy.deepcopy(trial.recipe)
    r.output.dir = _escape_braces(plan.out / trial.id)
    r.output.overwrite = True  # a trial killed before its first checkpoint restarts in its own folder
    r.train.progress = False  # a bar redrawn into a log file is noise
    return recipe_yaml(r)


def trial_command(trial_yaml: Path, *, resume: bool, smoke: bool) -> list[str]:
    """The command that runs one trial: `peftcli train`, in a process of its own."""
    return [sys.executable, "-m", "peftcli.cli", "train", str(trial_yaml),
            *(["--resume"] if resume else []), *(["--smoke"] if smoke else [])]


# ------------------------------------------------------------------------------ scheduling


class ProcessLike(Protocol):
    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


T = TypeVar("T")


def schedule(
    pending: Sequence[T],
    workers: int,
    launch: Callable[[T, int], ProcessLike],
    on_done: Callable[[T, int, int], None] | None = None,
    *,
    on_start: Callable[[T, int], None] | None = None,
    on_stopped: Callable[[T, int, int], None] | None = None,
    poll_s: float = 0.1,
) -> list[tuple[T, int, int]]:
    """Run `pending` in order on `workers` slots; returns (item, worker, exit code) as they end.

    A worker index is held by one item at a time, which is what pins one trial to one GPU. A stop
    requested by a signal (peftcli.core.signals.deferred) starts nothing more. On it, or on any
    exception, the running processes are sent SIGTERM and waited for (a second signal kills them),
    `on_stopped` is told how each ended, and the stop or the exception propagates.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    queue = list(pending)
    free = list(range(workers))
    running: list[tuple[T, int, ProcessLike]] = []
    ended: list[tuple[T, int, int]] = []
    try:
        while queue or running:
            signals.stop_if_requested()
            while queue and free:
                item, w = queue.pop(0), free.pop(0)
                running.append((item, w, launch(item, w)))
                if on_start is not None:
                    on_start(item, w)
            still = []
            for item, w, proc in running:
                rc = proc.poll()
                if rc is None:
                    still.append((item, w, proc))
                    continue
                free.append(w)
                free.sort()
                ended.append((item, w, rc))
                if on_done is not None:
                    on_done(item, w, rc)
            if len(still) == len(running):
                time.sleep(poll_s)
            running = still
    except BaseException:
        try:
            signals.stop_and_wait([proc for _, _, proc in running])
        finally:
            for item, w, proc in running:
                rc = proc.poll()
                if on_stopped is not None and rc is not None:
                    on_stopped(item, w, rc)
        raise
    return ended


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as names for CUDA_VISIBLE_DEVICES (which may already
    narrow them: with CUDA_VISIBLE_DEVICES=2,3 the workers get 2 and 3, not 0 and 1)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [d.strip() for d in env.split(",") if d.strip()][:n]
    return [str(i) for i in range(n)]


def parse_parallel(value: str | int) -> str | int:
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    n = _number(text)
    if not isinstance(n, int) or n < 1:
        raise SweepError(f"--parallel {value}: give auto (one trial per visible GPU) or a positive number")
    return n


def workers_for(parallel: str | int, gpus: Sequence[str]) -> int:
    """auto: one worker per GPU, and trials one after another on a CPU or a single GPU."""
    if parallel == "auto":
        return max(1, len(gpus))
    return int(parallel)


def worker_env(worker: int, gpus: Sequence[str]) -> dict[str, str]:
    """Environment additions for a worker: its own GPU when there are several to share out."""
    if len(gpus) < 2:
        return {}
    return {"CUDA_VISIBLE_DEVICES": gpus[worker % len(gpus)]}


# ------------------------------------------------------------------------------ running


@dataclass
class SweepResult:
    out: Path
    records: list[dict]  # every trial that ended, this invocation's and earlier ones', in trial order
    best: dict | None
    best_yaml: Path | None
    resumed: int  # trials already recorded when this invocation started

    @property
    def finished(self) -> int:
        return sum(r.get("status") == "done" for r in self.records)


def as_override(v: Any) -> str:
    """A value as a user would type it back on the command line: `[q, v]`, not `['q', 'v']`."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(as_override(x) for x in v) + "]"
    return str(v)


class _Board:
    """The trial table: settings, status, validation metric, time; the best so far highlighted."""

    def __init__(self, plan: SweepPlan, records: dict[str, dict]) -> None:
        self.plan = plan
        self.records = records
        self.started: dict[str, float] = {}

    def __rich__(self) -> Table:
        plan = self.plan
        best = pick_best(list(self.records.values()), plan.metric)
        arrow = "↓" if lower_is_better(plan.metric) else "↑"
        table = Table(title=escape(f"sweep · {len(plan.trials)} trials · {plan.out}"))
        table.add_column("trial")
        for k in plan.keys:
            table.add_column(k, justify="right")
        table.add_column("status")
        table.add_column(f"val {plan.metric} {arrow}", justify="right")
        table.add_column("time", justify="right")
        colours = {"done": "green", "failed": "red", "diverged": "yellow", "interrupted": "magenta", "running": "cyan",
                   "pending": "dim"}
        for t in plan.trials:
            rec = self.records.get(t.id)
            if rec is not None:
                status, value, secs = rec["status"], rec.get("value"), rec.get("wall_s") or rec.get("train_time_s")
            elif t.id in self.started:
                status, value, secs = "running", None, time.perf_counter() - self.started[t.id]
            else:
                status, value, secs = "pending", None, None
            style = "bold green" if best is not None and best["trial"] == t.id else None
            table.add_row(t.id, *(escape(as_override(t.settings[k])) for k in plan.keys),
                          f"[{colours[status]}]{status}[/]", "" if value is None else f"{value:.4f}",
                          "" if secs is None else f"{secs:.0f} s", style=style)
        return table


def _line(plan: SweepPlan, rec: dict) -> str:
    settings = " ".join(f"{k}={as_override(v)}" for k, v in rec["settings"].items())
    value = "" if rec.get("value") is None else f" · val {plan.metric} {rec['value']:.4f}"
    secs = f" · {rec['wall_s']:.0f} s" if rec.get("wall_s") is not None else ""
    err = f" · {rec['error']}" if rec.get("error") else ""
    return f"{rec['trial']} {settings} · {rec['status']}{value}{secs}{err}"


def run_sweep(
    plan: SweepPlan,
    *,
    workers: int = 1,
    gpus: Sequence[str] = (),
    console: Console | None = None,
    command: Callable[..., list[str]] | None = None,
) -> SweepResult:
    """Run the trials not yet recorded in the sweep folder, record each as it ends, write best.yaml.

    A trial that fails or diverges is recorded and the sweep goes on. Rerunning resumes: recorded
    trials are skipped, a trial with a `last/` checkpoint continues with `train --resume`, one
    killed before any checkpoint starts again in its own folder. One sweep writes a folder at a
    time; a stop signal stops the running trials with it (see the module).
    """
    console = console or Console()
    sources = [plan.recipe_path, *local_inputs(plan.base)]
    with folder_lock(plan.out, what="--out", sources=sources), signals.stop_signals(), signals.deferred():
        try:
            return _run_trials(plan, workers, gpus, console, command or trial_command)
        except signals.Stopped:
            console.print(f"sweep stopped; run the same command again to resume it ({plan.out})",
                          highlight=False, markup=False, soft_wrap=True)
            raise


def _start_trial(plan: SweepPlan, trial: Trial, worker: int, gpus: Sequence[str],
                 command: Callable[..., list[str]]) -> tuple[subprocess.Popen, tuple[float, int]]:
    """Start one attempt at a trial, in a process group of its own, its output appended to its log
    after a header line; returns the process and (start time, log offset of this attempt)."""
    out = plan.out
    trial_yaml = out / f"{trial.id}.yaml"
    atomic_file_write(trial_yaml, trial_recipe_yaml(plan, trial))
    resume = not plan.smoke and (plan.run_dir(trial) / "last").is_dir()  # a smoke trial starts again: it is short
    argv = command(trial_yaml, resume=resume, smoke=plan.smoke)
    if resume and trial.recipe.model.trust_remote_code:  # the user's recipe, given to this very sweep
        argv.append("--trust-remote-code")
    env = {**os.environ, **worker_env(worker, gpus)}
    # The child must run this very peftcli, even when it was imported from a clone not on sys.path.
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    pinned = worker_env(worker, gpus).get("CUDA_VISIBLE_DEVICES")
    with open(out / f"{trial.id}.log", "ab") as log:
        header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} · {shlex.join(argv)}" + (f" · GPU {pinned}" if pinned else "")
        log.write((header + " ===\n").encode())
        log.flush()
        attempt = (time.perf_counter(), log.tell())
        return signals.ProcessGroup(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env), attempt


def _how_it_ended(rc: int, log_text: str, summary: Path, *, stopped: bool) -> tuple[str, str | None]:
    """(status, error) of an attempt that exited with `rc`, from its log; `stopped`: by the sweep."""
    if rc == 0 and summary.exists():
        return "done", None
    if stopped or rc in STOPPED_EXITS:  # resumable: the next invocation runs it again
        killed = rc in (-signal.SIGKILL, 128 + signal.SIGKILL) and not stopped
        return "interrupted", "killed (SIGKILL: out of memory?); the next run of this sweep resumes it" if killed else None
    if DIVERGED_TEXT in " ".join(log_text.split()):
        return "diverged", _last_error(log_text)
    return "failed", _last_error(log_text) if rc != 0 else f"exited 0 without {summary}"


def _run_trials(plan: SweepPlan, workers: int, gpus: Sequence[str], console: Console,
                command: Callable[..., list[str]]) -> SweepResult:
    open_sweep_folder(plan)
    out = plan.out
    known = {t.id for t in plan.trials}
    records = {r["trial"]: r for r in read_records(out) if r["trial"] in known}
    records = {k: r for k, r in records.items() if r.get("status") != "interrupted"}  # those run again
    resumed = len(records)
    by_id = {t.id: t for t in plan.trials}
    attempts: dict[str, tuple[float, int]] = {}  # trial -> (start time, log offset of this attempt)

    def record(trial: Trial, status: str, *, rc: int | None, wall: float | None, error: str | None) -> dict:
        run = plan.run_dir(trial)
        val, train_time = read_val(run) if status == "done" else ({}, None)
        value = val.get(plan.metric)
        rec = {"trial": trial.id, "settings": trial.settings, "status": status, "metric": plan.metric,
               "value": value if isinstance(value, (int, float)) else None, "val": val, "train_time_s": train_time,
               "wall_s": None if wall is None else round(wall, 2), "run": str(run), "exit_code": rc, "error": error}
        append_record(out, rec)
        records[trial.id] = rec
        return rec

    pending = []
    for t in plan.trials:
        if t.id in records:
            continue
        if (plan.run_dir(t) / "summary.json").exists():  # it finished; the sweep was killed before recording it
            record(t, "done", rc=0, wall=None, error=None)
            continue
        pending.append(t)

    def launch(trial: Trial, worker: int) -> subprocess.Popen:
        proc, attempts[trial.id] = _start_trial(plan, trial, worker, gpus, command)
        return proc

    board = _Board(plan, records)
    live = console.is_terminal

    def on_start(trial: Trial, worker: int) -> None:
        board.started[trial.id] = time.perf_counter()

    def on_stopped(trial: Trial, worker: int, rc: int) -> None:
        on_done(trial, worker, rc, stopped=True)

    def on_done(trial: Trial, worker: int, rc: int, stopped: bool = False) -> None:
        start, offset = attempts[trial.id]
        wall = time.perf_counter() - start
        with open(out / f"{trial.id}.log", "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        status, error = _how_it_ended(rc, text, plan.run_dir(trial) / "summary.json", stopped=stopped)
        rec = record(trial, status, rc=rc, wall=wall, error=error)
        if not live:
            console.print(_line(plan, rec), highlight=False, markup=False, soft_wrap=True)

    if resumed:
        console.print(f"resuming {out}: {resumed} of {len(plan.trials)} trials already recorded in {RECORDS_FILE}",
                      highlight=False, markup=False)
    if live:
        with Live(board, console=console, refresh_per_second=2):
            schedule(pending, workers, launch, on_done, on_start=on_start, on_stopped=on_stopped)
    else:
        schedule(pending, workers, launch, on_done, on_start=on_start, on_stopped=on_stopped)

    ordered = [records[t.id] for t in plan.trials if t.id in records]
    best = pick_best(ordered, plan.metric)
    best_yaml = None
    if best is not None:
        best_yaml = out / BEST_FILE
        atomic_file_write(best_yaml, best_recipe_yaml(plan, by_id[best["trial"]]))
    return SweepResult(out=out, records=ordered, best=best, best_yaml=best_yaml, resumed=resumed)


__all__ = [
    "Axis", "SweepError", "SweepPlan", "SweepResult", "Trial", "append_record", "best_recipe_yaml", "default_out",
    "expand", "lower_is_better", "open_sweep_folder", "parse_axes", "parse_parallel", "pick_best", "plan_trials",
    "read_records", "read_val", "run_sweep", "schedule", "trial_command", "visible_gpus", "worker_env", "workers_for",
]
