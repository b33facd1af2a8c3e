"""Crash-and-resume check: kill training at random points, resume, and demand the same bits.

`peftcli train RECIPE --resume` promises that a run killed at any moment and resumed ends exactly
where the uninterrupted run ends. This script tests the promise the hard way:

  1. it trains the recipe once, uninterrupted, into a reference run folder;
  2. each trial starts the same recipe in a fresh folder and SIGKILLs it, either at a named point
     of the training code (PEFTCLI_KILL_AT=point:count, see peftcli/core/faults.py) or after a random
     delay, then resumes with --resume, killing again while kills still land (up to --max-kills),
     and finally lets it finish;
  3. it compares every tensor of adapter/adapter.safetensors and last/adapter.safetensors with the
     reference bit for bit (torch.equal), checks that metrics.jsonl holds each of the reference's
     step and eval records exactly once with equal values (timings aside), and that
     summary.json exists.

The default recipe is built in the work folder and is small on purpose but hard to resume: a
random 2-layer BERT (with the embedded MiniLM tokenizer) with dropout on, AdapterDrop's random
layer drop, 28 micro-batches per epoch accumulated 3 at a time (so one micro-batch's gradient
crosses into the next epoch), 2 epochs, warm-up then linear decay, clipping, and an evaluation and
checkpoint every 3 steps. Every random draw, and every byte written, must survive the kill.

    python tests/harness/fault_inject.py                          # 10 trials, kill points and timers
    python tests/harness/fault_inject.py --trials 30 --seed 1 --mode timer
    python tests/harness/fault_inject.py recipes/my.yaml --trials 3 --keep

Exit status: 0 when every trial matches the reference, 1 otherwise. From Python:
`run_trials(workdir, trials=2)` returns one TrialResult per trial.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Points the training code passes through (peftcli.core.faults.kill_point), and what one pass counts:
# the range of `count` drawn for a point is 1..(number of such events in the reference run).
KILL_POINTS: dict[str, str] = {
    "step": "steps",  # after an optimizer step
    "save:tmp-written": "saves",  # checkpoint written to its temporary folder
    "save:old-moved": "saves",  # previous checkpoint moved aside
    "save:renamed": "saves",  # new checkpoint renamed into place
    "metrics:written": "records",  # a metrics.jsonl line appended
}
MODES = ("points", "timer", "both")
ADAPTER_FILES = ("adapter/adapter.safetensors", "last/adapter.safetensors")
# Fields of metrics.jsonl that measure the machine, not the training.
TIMING_FIELDS = {"elapsed_s", "samples_per_s", "tokens_per_s"}
KILLED = -signal.SIGKILL
TIMED_OUT = -999  # an attempt that ran past its limit and was killed by this script

TINY_RECIPE = """\
model: {{name: {model}, task: classification}}
data: {{source: {data}, eval_size: 10, val_size: 10, max_length: 32}}
method: {{name: lora, r: 4, alpha: 8, targets: [q, v]}}
train:
  epochs: 2
  batch_size: 4
  grad_accum: 3
  lr: 1.0e-2
  warmup_ratio: 0.25
  scheduler: linear
  max_grad_norm: 0.5
  eval_every: 3
  log_every: 1
  drop_layers: 1
  device: cpu
  num_threads: 1
  progress: false
eval: {{metric: loss}}
output: {{dir: {out}, plot: false}}
"""


# ------------------------------------------------------------------------------------ set-up


def build_tiny_recipe(folder: Path) -> Path:
    """A random BERT, a 130-row csv and a recipe in `folder`; returns the recipe path.

    10 test and 10 validation rows leave 110 training rows: in batches of 4, 28 micro-batches per
    epoch, not a multiple of grad_accum: 9 steps per epoch, and the 28th micro-batch's gradient is
    left over at its end.
    """
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftcli.models.loading import resolve_source

    transformers.utils.logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "tiny-bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_source("sentence-transformers/all-MiniLM-L6-v2").path).save_pretrained(model_dir)
    rng = random.Random(0)
    good, bad = ["great", "lovely", "superb", "fine", "happy"], ["awful", "bad", "terrible", "sad", "poor"]
    filler = ["the", "film", "was", "today", "really", "quite", "a", "story"]
    data = folder / "toy.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(130):
            pos = i % 2 == 0
            words = rng.sample(filler, 4) + [rng.choice(good if pos else bad)]
            rng.shuffle(words)
            w.writerow([" ".join(words), "positive" if pos else "negative"])
    recipe = folder / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(model=model_dir, data=data, out=folder / "unused-run"))
    return recipe


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PEFTCLI_KILL_AT", "PEFTCLI_RAISE_AT", "PEFTCLI_RAISE_AS", "RANK", "WORLD_SIZE")}
    # COLUMNS: rich then wraps no log line, so STARTED is found whatever the paths' lengths.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", COLUMNS="1000")
    return env


def train_command(recipe: Path, run: Path, *, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "peftcli.cli", "train", str(recipe), f"output.dir={run}",
           "output.overwrite=false", "output.plot=false", "train.progress=false", "train.num_threads=1"]
    return [*cmd, "--resume"] if resume else cmd


@dataclass
class Attempt:
    kill: str  # "step:3", "timer 0.41s", or "" (let it finish)
    status: int  # the exit status; KILLED when SIGKILLed, TIMED_OUT past the limit
    seconds: float
    started_s: float | None  # when the model was built and training began, if it got that far
    done_s: float | None = None  # when summary.json appeared: training is over

    @property
    def landed(self) -> bool:
        return self.status == KILLED


# The training loop's first line once the model is built; a timer counts from it, because start-up
# (imports, loading) is most of a tiny run and jitters by more than its whole training.
STARTED = re.compile(r"trainable\s+of")


def run_once(recipe: Path, run: Path, log: Path, *, resume: bool, kill_at: str | None = None,
             kill_after: float | None = None, limit: float = 900.0) -> Attempt:
    """One `peftcli train` process, SIGKILLed at a point (kill_at) or `kill_after` seconds after
    training began."""
    env = _env()
    if kill_at:
        env["PEFTCLI_KILL_AT"] = kill_at
    t0 = time.perf_counter()
    started = done = None
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(recipe, run, resume=resume), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        while (status := proc.poll()) is None:
            now = time.perf_counter() - t0
            if started is None and STARTED.search(log.read_text(errors="replace")):
                started = now
            if done is None and (run / "summary.json").exists():
                done = now
            timer_due = kill_after is not None and started is not None and now >= started + kill_after
            if timer_due or now > limit:
                proc.kill()
                status = proc.wait()
                if not timer_due:
                    status = TIMED_OUT
                break
            time.sleep(0.01)
    kill = kill_at or (f"timer {kill_after:.2f}s" if kill_after is not None else "")
    return Attempt(kill, status, time.perf_counter() - t0, started, done)


# ------------------------------------------------------------------------------------ reference


@dataclass
class Reference:
    recipe: Path
    run: Path
    training_s: float  # from the start of training to summary.json
    events: dict[str, int]  # steps, saves, records in the whole run


def make_reference(recipe: Path, run: Path) -> Reference:
    run.parent.mkdir(parents=True, exist_ok=True)
    att = run_once(recipe, run, run.parent / "reference.log", resume=False)
    if att.status != 0:
        raise RuntimeError(f"the reference run failed (exit {att.status}); see {run.parent / 'reference.log'}")
    steps, evals, tests = _records(run)
    n_steps = json.loads((run / "summary.json").read_text())["steps"]
    events = {"steps": n_steps, "saves": 2 * len(evals) + 1, "records": len(steps) + len(evals) + len(tests)}
    # The window a timer aims at: after summary.json the process only prints and exits (which, on
    # a loaded machine, can take longer than the training of a tiny recipe).
    started = att.started_s if att.started_s is not None else 0.0
    done = att.done_s if att.done_s is not None else att.seconds
    return Reference(recipe, run, max(done - started, 0.01), events)


# ------------------------------------------------------------------------------------ checks


def _records(run: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(step records, validation records, test records) of metrics.jsonl, in file order, timings removed."""
    from peftcli.runs.metrics import METRICS_FILE, kind, read_lines

    steps, evals, tests = [], [], []
    for line, r in read_lines(run / METRICS_FILE):
        if r is None:  # a line cut short by a kill
            steps.append({"step": None, "torn": line[:40]})
            continue
        r = {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        {"test": tests, "val": evals}.get(kind(r), steps).append(r)
    return steps, evals, tests


def compare_adapters(ref: Path, run: Path) -> list[str]:
    """Differences between the two runs' adapter files; empty when every tensor is bit-identical."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for rel in ADAPTER_FILES:
        if not (run / rel).exists():
            problems.append(f"{rel} missing")
            continue
        a, b = load_file(str(ref / rel)), load_file(str(run / rel))
        if set(a) != set(b):
            problems.append(f"{rel}: other tensor names")
            continue
        differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
        if differ:
            problems.append(f"{rel}: {len(differ)}/{len(a)} tensors differ")
    return problems


def compare_metrics(ref: Path, run: Path) -> list[str]:
    """Records the run lacks, repeats, adds or changes, against the reference's."""
    problems = []
    for kind, r_recs, t_recs in zip(("step", "val", "test"), _records(ref), _records(run), strict=True):
        r_steps = [r["step"] for r in r_recs]
        t_steps = [r.get("step") for r in t_recs]
        dup = sorted({s for s in t_steps if t_steps.count(s) > 1}, key=str)
        missing = [s for s in r_steps if s not in t_steps]
        extra = sorted({s for s in t_steps if s not in r_steps}, key=str)
        changed = []
        if not dup:
            by_step = {r.get("step"): r for r in t_recs}
            changed = [r["step"] for r in r_recs if r["step"] in by_step and by_step[r["step"]] != r]
        for what, steps in (("repeated", dup), ("missing", missing), ("extra", extra), ("changed", changed)):
            if steps:
                problems.append(f"{kind} {what} {','.join(map(str, steps))}")
    return problems


# ------------------------------------------------------------------------------------ trials


@dataclass
class TrialResult:
    trial: int
    attempts: list[Attempt] = field(default_factory=list)
    finished: bool = False
    adapter_problems: list[str] = field(default_factory=list)
    metric_problems: list[str] = field(default_factory=list)
    summary_ok: bool = False

    @property
    def resumes(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def kills(self) -> int:
        return sum(a.landed for a in self.attempts)

    @property
    def identical(self) -> bool:
        return self.finished and not self.adapter_problems

    @property
    def metrics_ok(self) -> bool:
        return self.finished and not self.metric_problems and self.summary_ok

    @property
    def ok(self) -> bool:
        return self.identical and self.metrics_ok


def draw_kill(rng: random.Random, mode: str, ref: Reference) -> tuple[str | None, float | None]:
    """(PEFTCLI_KILL_AT value, None) or (None, seconds until SIGKILL)."""
    if mode == "both":
        mode = rng.choice(("points", "timer"))
    if mode == "points":
        point = rng.choice(sorted(KILL_POINTS))
        upper = max(1, ref.events[KILL_POINTS[point]])
        return f"{point}:{rng.randint(1, upper)}", None
    return None, rng.uniform(0.0, ref.training_s)


def run_trial(i: int, ref: Reference, folder: Path, rng: random.Random, *, mode: str, max_kills: int) -> TrialResult:
    res = TrialResult(i)
    run = folder / "run"
    while True:
        resume = bool(res.attempts)
        log = folder / f"attempt{len(res.attempts)}.log"
        if res.kills < max_kills:
            kill_at, kill_after = draw_kill(rng, mode, ref)
            att = run_once(ref.recipe, run, log, resume=resume, kill_at=kill_at, kill_after=kill_after)
        else:
            att = run_once(ref.recipe, run, log, resume=resume)
        res.attempts.append(att)
        if att.landed and att.kill:
            continue  # killed: resume
        if att.status == 0:
            res.finished = True
        break
    if res.finished:
        res.adapter_problems = compare_adapters(ref.run, run)
        res.metric_problems = compare_metrics(ref.run, run)
        res.summary_ok = (run / "summary.json").exists()
    return res


def run_trials(workdir: Path, *, recipe: Path | None = None, trials: int = 10, seed: int = 0, mode: str = "both",
               max_kills: int = 3, progress: Callable[[str], None] | None = None) -> list[TrialResult]:
    """The whole check in `workdir`; `progress(text)` is told about each step if given."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    say = progress or (lambda _text: None)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = Path(recipe).resolve() if recipe else build_tiny_recipe(workdir / "tiny")
    say(f"reference run of {recipe}")
    ref = make_reference(recipe, workdir / "reference" / "run")
    say(f"reference: {ref.events['steps']} steps in {ref.training_s:.2f} s (timers aim at that window)")
    rng = random.Random(seed)
    results = []
    for i in range(1, trials + 1):
        folder = workdir / f"trial{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        results.append(run_trial(i, ref, folder, rng, mode=mode, max_kills=max_kills))
        r = results[-1]
        say(f"trial {i}: {r.kills} kill(s), {r.resumes} resume(s), {'ok' if r.ok else 'DIFFERS'}")
    return results


# ------------------------------------------------------------------------------------ report


def report(results: list[TrialResult], console) -> int:
    from rich.table import Table

    def yes(b: bool) -> str:
        return "[green]yes[/]" if b else "[red]no[/]"

    table = Table(title="kill, resume, compare with the uninterrupted run")
    for col in ("trial", "kill point", "count", "kills", "resumes", "identical", "metrics consistent", "notes"):
        table.add_column(col, justify="right" if col in ("trial", "count", "kills", "resumes") else "left")
    for r in results:
        points, counts = [], []
        for a in r.attempts:
            if not a.kill:
                continue
            name, _, count = a.kill.rpartition(":") if not a.kill.startswith("timer") else (a.kill, "", "")
            missed = "" if a.landed else " (missed)"
            points.append(name + missed)
            counts.append(count or "-")
        notes = r.adapter_problems + r.metric_problems
        if r.finished and not r.summary_ok:
            notes.append("summary.json missing")
        if not r.finished:
            last = r.attempts[-1]
            notes.append("timed out" if last.status == TIMED_OUT else f"exit {last.status} (attempt{len(r.attempts) - 1}.log)")
        table.add_row(str(r.trial), "\n".join(points) or "-", "\n".join(counts) or "-", str(r.kills), str(r.resumes),
                      yes(r.identical), yes(r.metrics_ok), "; ".join(notes))
    console.print(table)
    tried = [a for r in results for a in r.attempts if a.kill and not a.kill.startswith("timer")]
    if tried and not any(a.landed for a in tried):
        console.print("[yellow]note:[/] no kill at a named point landed: does the training code call "
                      "peftcli.core.faults.kill_point with the names in KILL_POINTS?", highlight=False)
    ok = sum(r.ok for r in results)
    console.print(f"{ok}/{len(results)} resumes bit-identical", highlight=False)
    return 0 if ok == len(results) else 1


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", type=Path, help="recipe to check (default: a tiny one built in the work folder)")
    ap.add_argument("--trials", type=int, default=10, help="kill-and-resume trials (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill points, counts and delays")
    ap.add_argument("--mode", choices=MODES, default="both",
                    help="kill at named points, after random delays, or either at random (default)")
    ap.add_argument("--max-kills", type=int, default=3, help="kills per trial before it is let finish (default 3)")
    ap.add_argument("--workdir", type=Path, help="where runs go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder even when every trial matches")
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peftcli-faults-"))
    results = run_trials(workdir, recipe=args.recipe, trials=args.trials, seed=args.seed, mode=args.mode,
                         max_kills=args.max_kills, progress=lambda t: console.print(f"[dim]{t}[/]", highlight=False))
    status = report(results, console)
    if status == 0 and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        console.print(f"runs and logs kept in {workdir}", highlight=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
