"""The `peftcli` command: parse the arguments, call the command's function, print its result.

Each command's work is a function of peftcli.commands (or of the library below it), so a Python
user can call it without the CLI; what stays here is the typer signatures and the printing.

Exit codes: 0 success, 2 bad input (recipe, arguments, missing files), 1 failure while running.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftcli.core.errors import BadInput, UsageError

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="Parameter-efficient fine-tuning of Hugging Face transformers from YAML recipes.",
    epilog="Example: `peftcli train recipes/quickstart.yaml` · shell completion: `peftcli --install-completion`",
    rich_markup_mode="markdown",
)
recipes_app = typer.Typer(help="List and copy the shipped recipes.", invoke_without_command=True,
                          epilog="Examples: `peftcli recipes` · `peftcli recipes copy tweets_lora my_recipe.yaml`")
app.add_typer(recipes_app, name="recipes")
out = Console()
err = Console(stderr=True)

BAD_INPUT, FAILURE = 2, 1


# Commands that read a run or adapter folder take consent to run a model's own code from here
# only, never from a saved recipe (a shared run folder must not be able to run code).
TrustFlag = Annotated[bool, typer.Option(
    "--trust-remote-code", help="allow the base model's own Python code (config.json auto_map / hub code) to run; "
                                "a run folder's recipe is never trusted for this")]


def _complete_methods(incomplete: str) -> list[str]:
    """Shell completion of method names (the registry is the only list)."""
    from peftcli.methods import all_methods

    return [m for m in sorted(all_methods()) if m.startswith(incomplete)]


def _complete_recipes(incomplete: str) -> list[str]:
    from peftcli.commands.recipes import shipped_recipes

    return [name for name in shipped_recipes() if name.startswith(incomplete)]


# What an interrupted command leaves, where it leaves something worth saying.
_INTERRUPTED = {"train": "; checkpoints already written are intact", "fuse": "; checkpoints already written are intact",
                "serve": " before the server started; nothing was served"}


def handle_errors(fn):
    """Turn known errors into a short message and an exit code; never a raw traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (BadInput, FileNotFoundError) as e:
            err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(BAD_INPUT) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as peftcli.core.signals.Stopped (exit 143)
            err.print(f"[yellow]interrupted[/]{_INTERRUPTED.get(fn.__name__, '')}")
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        except Exception as e:  # noqa: BLE001
            if os.environ.get("PEFTCLI_DEBUG"):
                raise
            msg = str(e).strip() or type(e).__name__
            err.print(f"[red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
            err.print("[dim](set PEFTCLI_DEBUG=1 for the full traceback)[/]")
            raise typer.Exit(FAILURE) from None

    return wrapper


def _load(recipe_path: Path, overrides: list[str] | None, *, check_files: bool = True):
    """Commands that go on to read the data check that a local data file exists, so a typo in
    data.source is reported by `validate` and before `train` loads a model."""
    from peftcli.config.recipe import load_recipe

    return load_recipe(recipe_path, overrides or [], check_files=check_files)


# ---------------------------------------------------------------------------------------- train


@app.command(epilog="Example: `peftcli train recipes/tweets_lora.yaml train.lr=3e-4 method.r=16`")
@handle_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe and budget, then exit")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in output.dir from its last checkpoint")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="a few batches end to end: train, eval, save, reload")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="launch N processes with torchrun (train.distributed), per node")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", help="machines in the launch: run the same command on each")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="this machine's number, 0 to nnodes-1 (0: the endpoint's host)")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        "--rdzv-endpoint", help="HOST:PORT of node 0 for torchrun's c10d rendezvous (--nnodes > 1)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="refuse malformed data rows (data.strict)")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="also show other libraries' warnings and progress bars")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Train a recipe and save the adapter into its run folder. The recipe's model.trust_remote_code
    counts for a new run; with --resume only --trust-remote-code does."""
    from peftcli.commands.train import check_train_flags
    from peftcli.training.launch import check_nodes

    nodes = check_nodes(nnodes, node_rank, rdzv_endpoint, nproc)
    r = _load(recipe, overrides)
    check_train_flags(r, resume=resume, smoke=smoke, dry_run=dry_run)
    if strict:
        r.data.strict = True
    if (nproc > 1 or nodes.count > 1) and not dry_run:
        from peftcli.training.launch import launch_torchrun

        given = [*(overrides or []), *(["data.strict=true"] if strict else [])]  # the ranks read the recipe again
        raise typer.Exit(launch_torchrun(recipe, given, nproc, resume=resume, smoke=smoke, nodes=nodes,
                                         trust_remote_code=trust_remote_code))
    if dry_run:
        from peftcli.config.recipe import recipe_yaml
        from peftcli.training.budget import budget_from_recipe

        out.print(recipe_yaml(r), highlight=False)
        b = budget_from_recipe(r)
        out.print(f"trainable parameters: {b['trainable']:,} of {b['total']:,} ({b['percent']:.4f} %)")
        return
    if smoke:
        r.output.dir = str(r.run_dir()) + "-smoke"
        r.output.overwrite = True
        r.train.progress = False
    from peftcli.core.quiet import quiet_command

    with quiet_command(verbose):
        _train(r, resume=resume, smoke=smoke, trust_remote_code=trust_remote_code)


def _train(r, *, resume: bool, smoke: bool, trust_remote_code: bool) -> None:
    from peftcli.training.loop import allowed_remote_code
    from peftcli.training.loop import train as run_train

    summary = run_train(r, resume=resume, smoke=smoke, trust_remote_code=trust_remote_code)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return
    test = summary.get("test", {})
    out.print(f"done in {summary['train_time_s']:.1f} s · kept the adapter of {kept_reason(summary, r.eval.metric)}",
              highlight=False, soft_wrap=True)
    out.print(f"run saved to {r.run_dir()}")
    if "accuracy" in test:
        out.print(f"test accuracy: {100 * test['accuracy']:.2f} % ({summary['rows']['test']} held-out rows, scored once)")
    elif test:
        out.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    if smoke:
        from peftcli.commands.train import smoke_reload_loss

        out.print(f"smoke ok: reloaded adapter reproduces eval loss "
                  f"{smoke_reload_loss(r, test, allowed_remote_code(r, resume, trust_remote_code)):.4f}")


def kept_reason(summary: dict, metric: str) -> str:
    """Which adapter the run kept and truly why: the best on validation, or the last one because
    there were no validation rows, or because validation did not report eval.metric."""
    step, val = summary["best"]["step"], summary.get("val") or {}
    if metric in val:
        return f"step {step} (best val {metric} {val[metric]:.4f})"
    if not summary.get("rows", {}).get("val"):
        return f"step {step} (no validation rows: the last)"
    return (f"step {step} (the last: validation does not report eval.metric {metric}, so none was chosen; "
            "set eval.metric to one it reports, e.g. loss)")


# ---------------------------------------------------------------------------------------- sweep


@app.command(epilog="Examples: `peftcli sweep recipes/tweets_lora.yaml train.lr=3e-4,1e-3,3e-3 "
             "train.scheduler=constant,linear` (grid) · `peftcli sweep recipes/tweets_lora.yaml train.lr=1e-5:1e-2 "
             "method.r=4,8,16 --trials 12` (random) · rerun the same command to resume")
@handle_errors
def sweep(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    settings: Annotated[list[str], typer.Argument(
        help="key=v1,v2,... (swept; one value: fixed for every trial) or, with --trials, key=lo:hi (a range; "
             "log-uniform for learning rates)", show_default=False)],
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="random mode: sample N trials")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="random mode: seed of the sampling (default 0)")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="sweep folder (default: the recipe's run folder + -sweep)")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="every trial runs `train --smoke` (a few batches)")] = False,
    parallel: Annotated[str, typer.Option(
        "--parallel", help="auto (one trial per visible GPU; one at a time on CPU) or a number of trials at once")] = "auto",
) -> None:
    """Train one recipe with several settings, each trial a run of its own; choose on the validation split.

    The winner's recipe is written to best.yaml; the test split is never used to choose.
    """
    import shlex

    from peftcli.commands.sweep import (
        lower_is_better,
        parse_parallel,
        plan_trials,
        run_sweep,
        visible_gpus,
        workers_for,
    )

    par = parse_parallel(parallel)
    plan = plan_trials(recipe, settings, trials=trials, seed=seed, out=out_dir, smoke=smoke)
    gpus = visible_gpus() if par == "auto" or int(par) > 1 else []
    workers = workers_for(par, gpus)
    if plan.n_trials is None:
        shape = "grid " + " × ".join(str(len(a.values or [])) for a in plan.axes)
    else:
        shape = f"random, seed {plan.seed}"
    where = f" on GPUs {', '.join(gpus)}" if len(gpus) > 1 and workers > 1 else ""
    better = "lower" if lower_is_better(plan.metric) else "higher"
    out.print(f"sweep of {len(plan.trials)} trials ({shape}) · chosen on val {plan.metric} ({better} is better) · "
              f"{workers} at a time{where} · {plan.out}", highlight=False, markup=False, soft_wrap=True)
    res = run_sweep(plan, workers=workers, gpus=gpus, console=out)
    counts = {s: sum(r["status"] == s for r in res.records) for s in ("done", "failed", "diverged")}
    out.print(" · ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(plan.trials)} trials "
              f"(logs: {plan.out}/trial-*.log)", highlight=False, markup=False, soft_wrap=True)
    if res.best is not None:
        b = res.best
        shown = " ".join(f"{k}={v}" for k, v in b["settings"].items())
        out.print(f"[bold green]best:[/] {b['trial']} · {escape(shown)} · val {plan.metric} {b['value']:.4f}",
                  highlight=False, soft_wrap=True)
        out.print(f"its run folder (trained adapter): {b['run']}", highlight=False, markup=False, soft_wrap=True)
        out.print("train the winner into the recipe's own run folder:", highlight=False)
        out.print(f"peftcli train {shlex.quote(str(res.best_yaml))}", highlight=False, markup=False, soft_wrap=True)
    elif counts["done"]:
        err.print(f"[yellow]no finished trial reported val {plan.metric}; nothing to choose (no best.yaml)[/]")
    if not counts["done"]:
        err.print("[red]no trial finished[/]; see the logs, fix the cause and rerun with another --out")
        raise typer.Exit(FAILURE)


# ---------------------------------------------------------------------------------------- eval


@app.command("eval", epilog="Examples: `peftcli eval runs/lora-tweets --split val` · "
             "`peftcli eval runs/lora-a runs/lora-b` (several runs of one base: each on its own split, in shared batches)")
@handle_errors
def eval_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run folder(s) written by `peftcli train`; NAME=RUN names one")],
    split: Annotated[str, typer.Option(
        help="'test' (the recipe's held-out rows; 'eval' says the same), 'val', 'train', or a split name of the source")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="evaluate on the first N examples only")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", help="also show other libraries' warnings and progress bars")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Evaluate a run's saved adapter on a split; prints and saves the metrics.

    Several runs of one base model are evaluated in one pass: each on its own recipe's split, the
    base model run once per batch of mixed examples, each run's metrics saved in its folder.
    """
    from peftcli.core.quiet import quiet_command

    split = "test" if split == "eval" else split
    with quiet_command(verbose):
        if len(runs) > 1:
            _eval_many(runs, split, limit, device, trust_remote_code)
        else:
            _eval(runs[0], split, limit, device, trust_remote_code)


def _eval(run: Path, split: str, limit: int | None, device: str, trust_remote_code: bool = False) -> None:
    from peftcli.commands.eval import evaluate_run
    from peftcli.core.adapter_files import unkept_note

    if note := unkept_note(run):
        out.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    score = evaluate_run(run, split, limit, device, trust_remote_code)
    for smp in score.samples:
        out.print(f"[dim]sample[/] {smp['generated']!r} (reference {smp['reference']!r})")
    table = Table(title=f"{run} · {split} · {score.examples} examples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in score.metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    if score.unsaved:
        out.print(f"[yellow]{escape(score.unsaved)}[/]", soft_wrap=True)


def _eval_many(runs: list[Path], split: str, limit: int | None, device: str, trust_remote_code: bool = False) -> None:
    from peftcli.commands.eval import evaluate_many

    base_name, metrics, unsaved = evaluate_many(runs, split, limit, device, trust_remote_code)
    table = Table(title=f"{len(runs)} runs on {base_name} · {split}")
    table.add_column("metric")
    for name in metrics:
        table.add_column(name, justify="right")
    for k in next(iter(metrics.values())):
        table.add_row(k, *(f"{m[k]:.4f}" if isinstance(m[k], float) else str(m[k]) for m in metrics.values()))
    out.print(table)
    for why in unsaved:
        out.print(f"[yellow]{escape(why)}[/]", soft_wrap=True)


# ---------------------------------------------------------------------------------------- count-params


@app.command("count-params", epilog="Examples: `peftcli count-params recipes/tweets_lora.yaml` · "
             "`peftcli count-params --model config.json --method lora method.r=16`")
@handle_errors
def count_params(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe (or use --model/--method)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    model: Annotated[str | None, typer.Option(help="hub id, model folder or config.json")] = None,
    method: Annotated[str | None, typer.Option(help="registered method name",
                                               autocompletion=lambda incomplete: _complete_methods(incomplete))] = None,
    task: Annotated[str | None, typer.Option(help="classification or causal_lm [default: causal_lm]")] = None,
    num_labels: Annotated[int | None, typer.Option(min=1, help="classes, for classification [default: 2]")] = None,
    depth: Annotated[int, typer.Option(min=1, help="module-name depth of the per-module table")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="memory estimate: sequences per step")] = 8,
    seq_len: Annotated[int, typer.Option(min=1, help="memory estimate: tokens per sequence")] = 1024,
) -> None:
    """Trainable / total parameters of a method on a model, built on the meta device (no weights read)."""
    from peftcli.commands.count_params import recipe_to_count
    from peftcli.training.budget import budget, print_budget

    r = recipe_to_count(recipe, overrides, model=model, method=method, task=task, num_labels=num_labels)
    b = budget(r, depth=depth, batch_size=batch_size, seq_len=seq_len)
    print_budget(out, r, b)


# ---------------------------------------------------------------------------------------- merge


@app.command(epilog="Examples: `peftcli merge runs/lora-tweets merged/` · "
             "`peftcli merge my-peft-adapter/ merged/ --recipe recipes/tweets_lora.yaml`")
@handle_errors
def merge(
    run: Annotated[Path, typer.Argument(help="run folder (or HF PEFT adapter folder)")],
    dest: Annotated[Path, typer.Argument(help="where to write the merged model folder")],
    force: Annotated[bool, typer.Option(help="replace DEST if it exists")] = False,
    recipe: Annotated[Path | None, typer.Option(
        help="HF PEFT folder only: recipe describing it (default: made from its adapter_config.json)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="also show other libraries' warnings and progress bars")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Bake a mergeable adapter (LoRA, rsLoRA, DoRA, IA³, KronA) into the base weights; write a plain HF
    model folder that runs as fast as the base model."""
    from peftcli.commands.merge import merge_run
    from peftcli.core.quiet import quiet_command

    with quiet_command(verbose):
        diff = merge_run(run, dest, force=force, recipe=recipe, trust_remote_code=trust_remote_code)
    out.print(f"merged model written to {dest}")
    out.print(f"max |logits(adapted) - logits(merged)| on a sample batch: {diff:.3e}")


# ---------------------------------------------------------------------------------------- combine


@app.command(epilog="Examples: `peftcli combine runs/a runs/b --weights 0.5,0.5 --how cat runs/ab` · "
             "`peftcli combine runs/a runs/b --weights 1,-1 --how ties --density 0.5 runs/a-minus-b` · "
             "`peftcli combine runs/a runs/b --how weighted runs/avg` (IA³, bottleneck adapters, KronA)")
@handle_errors
def combine(
    runs_and_dest: Annotated[list[Path], typer.Argument(
        metavar="RUN... DEST", help="run folders of one method on one base model, then the folder to write")],
    weights: Annotated[str | None, typer.Option(
        help="one weight per run, e.g. 0.5,0.5 (negative subtracts a LoRA task); default 1/N each")] = None,
    how: Annotated[str | None, typer.Option(
        help="LoRA/DoRA: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (and *_svd); "
             "IA³, bottleneck adapters, KronA: weighted")] = None,
    density: Annotated[float | None, typer.Option(help="ties, dare_*, magnitude_prune: fraction of entries kept")] = None,
    majority_sign: Annotated[str | None, typer.Option(
        "--majority-sign", help="ties, dare_ties: 'total' (default) or 'frequency'")] = None,
    rank: Annotated[int | None, typer.Option(help="svd rules: rank of the result (default: the largest rank)")] = None,
    seed: Annotated[int | None, typer.Option(help="dare_*: seed of the random masks (default 0)")] = None,
    head_from: Annotated[Path | None, typer.Option(
        "--head-from", help="classification: the run whose task head, labels and data the result keeps "
                            "(default: the first RUN)")] = None,
    force: Annotated[bool, typer.Option(help="replace DEST if peftcli wrote it")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Combine trained adapters of one method on one base model into a new run folder (eval, merge,
    export and generate take it like a trained run)."""
    from peftcli.commands.combine import combine_runs, parse_weights

    if len(runs_and_dest) < 2:
        raise UsageError("give at least one RUN and then DEST, e.g. `peftcli combine runs/a runs/b --how cat runs/ab`")
    *runs, dest = runs_and_dest
    rep = combine_runs(runs, dest, weights=parse_weights(weights, len(runs)), how=how, density=density,
                       majority_sign=majority_sign, rank=rank, seed=seed, head_from=head_from, force=force,
                       trust_remote_code=trust_remote_code)
    shown = ""
    for i, (w, r) in enumerate(zip(rep["weights"], rep["runs"], strict=True)):
        sign = ("−" if w < 0 else "") if i == 0 else (" − " if w < 0 else " + ")
        shown += f"{sign}{abs(w):g} × {r}"
    out.print(f"{rep['method']} · --how {rep['how']} · {shown}", highlight=False)
    for key, (old, new) in rep["changed"].items():
        out.print(f"method.{key}: {old} → {new}", highlight=False)
    if rep["head_from"] is not None:
        out.print(f"task head, labels and data section from {rep['head_from']} (--head-from picks another run)",
                  highlight=False)
    for note in rep["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    out.print(f"combined run written to {rep['dest']} ({rep['tensors']} tensors, {rep['parameters']:,} parameters); "
              f"`peftcli eval {rep['dest']}` measures it", highlight=False)


# ---------------------------------------------------------------------------------------- HF PEFT format


@app.command(epilog="Examples: `peftcli export runs/tweets_lora --to peft exported/` then, in Python, "
             "`PeftModel.from_pretrained(base, \"exported/\")` · "
             "`peftcli export runs/tweets_ia3 --to peft --as-lora --rank 8 exported-lora/` (any weight-delta "
             "adapter as a plain LoRA a LoRA-only server loads)")
@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="run folder written by `peftcli train`")],
    dest: Annotated[Path, typer.Argument(help="folder to write the adapter to")],
    to: Annotated[str, typer.Option("--to", help="target format; 'peft' = HF PEFT adapter folder")] = "peft",
    as_lora: Annotated[bool, typer.Option(
        "--as-lora", help="write a plain LoRA: each layer's weight delta (DoRA, IA³, KronA, BitFit, ...) by truncated "
                          "SVD; prints each layer's error and the logit and metric change")] = False,
    rank: Annotated[int | None, typer.Option(
        help="--as-lora: LoRA rank of every layer (default 16 when --energy is not given)")] = None,
    energy: Annotated[float | None, typer.Option(
        help="--as-lora: per layer, the smallest rank keeping this fraction of the squared singular values "
             "(0 < E <= 1; ranks then differ, written as PEFT's rank_pattern)")] = None,
    no_eval: Annotated[bool, typer.Option(
        "--no-eval", help="--as-lora: skip scoring the run's held-out split before and after "
                          "(the logit check on a sample batch still runs)")] = False,
    force: Annotated[bool, typer.Option(help="replace DEST if it exists")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Write a run's adapter in HF PEFT's format (LoRA, rsLoRA, DoRA, IA³, prefix and prompt tuning), or with
    --as-lora any weight-delta adapter as a plain LoRA."""
    if to != "peft":
        raise UsageError(f"--to {to!r}: the only export format is 'peft' (HF PEFT adapter folder)")
    if as_lora:
        _export_as_lora(run, dest, rank, energy, not no_eval, force, trust_remote_code)
        return
    if rank is not None or energy is not None or no_eval:
        raise UsageError("--rank, --energy and --no-eval go with --as-lora")
    from peftcli.commands.peft import export_run

    lay = export_run(run, dest, force=force, trust_remote_code=trust_remote_code)
    out.print(f"wrote {lay.peft_type} adapter to {dest} (adapter_config.json + adapter_model.safetensors)")
    if lay.config.get("target_modules"):
        out.print(f"target_modules: {lay.config['target_modules']}", highlight=False)
    for note in lay.notes:
        out.print(f"[yellow]note:[/] {note}", highlight=False)


def _export_as_lora(run: Path, dest: Path, rank: int | None, energy: float | None, evaluate: bool, force: bool,
                    trust_remote_code: bool) -> None:
    from peftcli.commands.peft import export_as_lora
    from peftcli.core.quiet import quiet_command

    with quiet_command(False):
        rep = export_as_lora(run, dest, rank=rank, energy=energy, evaluate=evaluate, force=force,
                             trust_remote_code=trust_remote_code)
    # One plain line per layer (a table would cut long module paths): path, shape, rank, relative error.
    width = max(len(f.path) for f in rep.layers)
    out.print(f"{rep.method} as LoRA, per layer: {'module':<{width}}  shape      rank  ‖ΔW − B·A‖/‖ΔW‖", highlight=False)
    for f in rep.layers:
        shape = f"{f.shape[0]}×{f.shape[1]}"
        out.print(f"  {f.path:<{width}}  {shape:<9}  {f.rank:>4}  {f.error:.2e}" + ("  (+ bias)" if f.bias else ""),
                  highlight=False, soft_wrap=True)
    ranks = sorted({f.rank for f in rep.layers})
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (rank_pattern)"
    out.print(f"wrote LORA adapter to {dest} (rank {shown}; adapter_config.json + adapter_model.safetensors)",
              highlight=False)
    out.print(f"max |logits(adapter) - logits(base + LoRA)| on a sample batch: {rep.max_logit_diff:.3e}")
    if rep.before is not None and rep.after is not None:
        for k in ("accuracy", "f1", "perplexity", "loss"):
            if k in rep.before:
                out.print(f"{rep.split} {k} ({rep.before['examples']} examples): adapter {rep.before[k]:.4f} → "
                          f"LoRA {rep.after[k]:.4f}", highlight=False)
    for note in rep.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command("import-peft", epilog="Examples: `peftcli import-peft my-peft-adapter/ runs/imported` · "
             "`peftcli import-peft my-peft-adapter/ runs/imported --recipe recipes/tweets_lora.yaml` · "
             "then `peftcli eval runs/imported` or `peftcli merge runs/imported merged/`")
@handle_errors
def import_peft_cmd(
    src: Annotated[Path, typer.Argument(help="HF PEFT adapter folder (adapter_config.json + weights)")],
    run: Annotated[Path, typer.Argument(help="run folder to create")],
    recipe: Annotated[Path | None, typer.Option(
        help="recipe whose method matches the adapter (default: made from adapter_config.json)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides of that recipe")] = None,
    force: Annotated[bool, typer.Option(help="replace RUN if it exists")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Turn an HF PEFT adapter folder into a peftcli run folder (eval, merge, generate, export then work)."""
    from peftcli.commands.peft import import_peft

    import_peft(src, run, recipe_path=recipe, overrides=overrides, force=force, trust_remote_code=trust_remote_code)
    out.print(f"imported {src} into run folder {run}")


# ---------------------------------------------------------------------------------------- validate


@app.command(epilog="Example: `peftcli validate recipes/tweets_lora.yaml method.r=16`")
@handle_errors
def validate(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    data: Annotated[bool, typer.Option("--data", help="also load and tokenize the data; show a rendered "
                                       "example with the tokens the loss covers highlighted")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="refuse malformed data rows (data.strict)")] = False,
) -> None:
    """Check a recipe without running it: its keys, then its method on the model's structure (no
    weights read), and with --data its data."""
    from peftcli.commands.validate import method_placement

    r = _load(recipe, overrides)
    if strict:
        r.data.strict = True
    out.print(method_placement(r), highlight=False, soft_wrap=True)
    if data:
        from peftcli.core.quiet import quiet_command

        with quiet_command():
            _show_data(r)
    out.print(f"{recipe}: ok · method {r.method_name} · model {r.model.name} · data {r.data.source}")


def _show_data(r) -> None:
    """What the loss covers, on the first training example: the one thing a user cannot see in a recipe."""
    from peftcli.commands.validate import data_report

    rep = data_report(r)
    n_train, n_val, n_test = rep.rows
    out.print(f"data: {n_train} train / {n_val} val / {n_test} test examples · {rep.kind}", highlight=False,
              soft_wrap=True)
    if rep.malformed:
        out.print(f"[yellow]{escape(rep.malformed)}; --strict refuses them[/]", highlight=False, soft_wrap=True)
    for note in rep.notes:
        out.print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
    if not rep.causal_lm:
        return
    lengths, trained, max_length = rep.lengths, rep.trained_tokens, r.data.max_length
    out.print(f"tokens per example: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
              f"(data.max_length {max_length}; {sum(n >= max_length for n in lengths)} cut) · "
              f"trained tokens {trained} of {sum(lengths)} ({100 * trained / max(sum(lengths), 1):.1f} %)",
              highlight=False, soft_wrap=True)
    if rep.packing:
        out.print(rep.packing, highlight=False, soft_wrap=True)
    legend = "highlighted" if out.is_terminal else "between ⟦ ⟧"
    what = ("first training pair, chosen side" if rep.rejected_pieces
            else f"first training row ({rep.kto_label})" if rep.kto_label else "first training example")
    out.print(f"{what}, rendered; the loss covers the tokens {legend}:", highlight=False, soft_wrap=True)
    out.print(_marked(rep.pieces), highlight=False, soft_wrap=True)
    if rep.rejected_pieces:
        out.print("the same pair, rejected side:", highlight=False, soft_wrap=True)
        out.print(_marked(rep.rejected_pieces), highlight=False, soft_wrap=True)


def _marked(pieces: list[tuple[str, bool]]) -> str:
    """Trained tokens in reverse video on a terminal; elsewhere (a pipe, a log) between ⟦ and ⟧."""
    marks = ("[reverse green]", "[/]") if out.is_terminal else ("⟦", "⟧")
    text = []
    for piece, is_trained in pieces:
        piece = escape(piece)
        text.append(f"{marks[0]}{piece}{marks[1]}" if is_trained and piece else piece)
    return "".join(text)


# ---------------------------------------------------------------------------------------- recipes


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the shipped recipes, one line each."""
    if ctx.invoked_subcommand is not None:
        return
    from peftcli.commands.recipes import recipe_rows

    table = Table(show_header=True)
    table.add_column("name")
    table.add_column("method")
    table.add_column("model")
    table.add_column("data")
    table.add_column("description")
    rows = recipe_rows()
    if not rows:
        err.print("[yellow]no recipes found in the peftcli.recipes package[/]; this installation lacks them")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@recipes_app.command("copy", epilog="Example: `peftcli recipes copy tweets_lora my_recipe.yaml`")
@handle_errors
def recipes_copy(
    name: Annotated[str, typer.Argument(help="shipped recipe name (see `peftcli recipes`)",
                                        autocompletion=lambda incomplete: _complete_recipes(incomplete))],
    dest: Annotated[Path, typer.Argument(help="file or folder to copy to")],
) -> None:
    """Copy a shipped recipe to edit."""
    from peftcli.commands.recipes import copy_recipe

    key, target = copy_recipe(name, dest)
    out.print(f"copied {key} to {target}")


# ---------------------------------------------------------------------------------------- plot


@app.command(epilog="Example: `peftcli plot runs/lora-tweets runs/full-tweets --out compare.png`")
@handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="one or more run folders")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG to write")] = Path("curves.png"),
    force: Annotated[bool, typer.Option("--force", help="replace an existing file that peftcli plot did not draw")] = False,
) -> None:
    """Draw loss and evaluation curves of several runs on one figure. An existing --out is replaced
    only when it is a figure peftcli drew (or with --force)."""
    from peftcli.runs.plot import plot_runs

    plot_runs(runs, out_file, replace=force)
    out.print(f"wrote {out_file}")


# ---------------------------------------------------------------------------------------- generate


@app.command("generate", epilog="Examples: `peftcli generate runs/smollm2_prefix \"Tweet: what a lovely day\"` · "
             "`peftcli generate runs/a runs/b --prompts prompts.jsonl` (each line `{\"adapter\": \"a\", \"prompt\": \"...\"}`)")
@handle_errors
def generate_cmd(
    args: Annotated[list[str], typer.Argument(
        help="RUN PROMPT (a run folder or causal_lm recipe, then the prompt), or with --prompts: one or more runs "
             "(NAME=RUN names one; default: the folder name)", show_default=False)],
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="JSONL file, one {\"adapter\": NAME, \"prompt\": TEXT} per line; answers are "
                          "printed as JSONL in the same order")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="tokens to generate")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    trust_remote_code: TrustFlag = False,
) -> None:
    """Greedy-generate continuations with a run's adapter, or with several runs' adapters in mixed
    batches (one base model pass per batch, each prompt with its own adapter; KV cache on)."""
    from peftcli.inference.generate import generate, generate_for_runs

    if prompts is not None:
        for answer in generate_for_runs(args, prompts, max_new_tokens=max_new_tokens, device=device,
                                        trust_remote_code=trust_remote_code):
            out.print(json.dumps(answer, ensure_ascii=False), highlight=False, markup=False, soft_wrap=True)
        return
    if len(args) != 2:
        raise UsageError(f"generate takes RUN PROMPT (got {len(args)} arguments); for several runs pass the prompts "
                         "as a file: --prompts prompts.jsonl, one {\"adapter\": NAME, \"prompt\": TEXT} per line")
    texts = generate(args[0], [args[1]], max_new_tokens=max_new_tokens, device=device,
                     trust_remote_code=trust_remote_code)
    out.print(texts[0], highlight=False, markup=False)


# ---------------------------------------------------------------------------------------- serve


@app.command(epilog="Example: `peftcli serve runs/a runs/b --port 8000`, then "
             "`curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
             "-d '{\"model\": \"a\", \"prompt\": \"Hello\"}'`")
@handle_errors
def serve(
    runs: Annotated[list[str], typer.Argument(help="run folders of one base model; NAME=RUN names one "
                                                   "(default: the folder name)", show_default=False)],
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface; then set --api-key)")]
    = "127.0.0.1",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="PEFTCLI_API_KEY", show_default=False,
        help="require 'Authorization: Bearer KEY' on every request but /health (env PEFTCLI_API_KEY)")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, help="largest max_tokens a request may ask for (also the chat default)")] = 512,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", min=0.001, max=86400.0,
        help="seconds a request may take, waiting included (then 504)")] = 600.0,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", min=1, help="largest request body (then 413)")] = 1 << 20,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="most requests decoded in one batch")] = 64,
    batch_window_ms: Annotated[float, typer.Option(
        "--batch-window-ms", min=0.0, max=10000.0,
        help="how long an idle server waits for more requests before decoding")] = 5.0,
    trust_remote_code: TrustFlag = False,
) -> None:
    """Serve runs over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models); `model` picks the adapter, requests join the running batch between decode steps.
    Ctrl-C or SIGTERM stops it after the requests in flight."""
    from peftcli.commands.serve import require_stack

    require_stack()
    from peftcli.commands.serve import ServeOptions, bind
    from peftcli.commands.serve import serve as run_server
    from peftcli.commands.serve_api import is_loopback_bind
    from peftcli.core.signals import stop_signals
    from peftcli.inference.multi import load_runs
    from peftcli.methods.attach import pick_device

    if not api_key and not is_loopback_bind(host):
        err.print(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
                  "server; set --api-key KEY (or PEFTCLI_API_KEY)", highlight=False, markup=False, soft_wrap=True)
    bind(host, port).close()  # a port in use is refused before minutes of loading
    with stop_signals():  # SIGTERM while loading says so and exits 143, as Ctrl-C does with 130
        multi = load_runs(runs, pick_device(device), trust_remote_code=trust_remote_code)
    if multi.recipe.model.task != "causal_lm":
        raise UsageError(f"{runs[0]}: model.task is {multi.recipe.model.task!r}; serve needs causal_lm runs")
    opts = ServeOptions(host=host, port=port, api_key=api_key or None, max_batch=max_batch,
                        window_ms=batch_window_ms, max_tokens=max_tokens, request_timeout_s=request_timeout,
                        max_body_bytes=max_body_bytes)

    def ready() -> None:
        shown = f"[{host}]" if ":" in host else host
        err.print(f"serving {multi.base_name} with adapters {', '.join(multi.names)} on http://{shown}:{port}/v1 "
                  "(Ctrl-C stops)", highlight=False, markup=False, soft_wrap=True)

    stop = run_server(multi, opts, on_ready=ready)
    err.print(f"server stopped{f' ({stop.signal})' if stop.signal else ''}"
              + ("; a second signal ended the requests in flight (503)" if stop.forced else ""), highlight=False)
    if stop.forced:
        raise typer.Exit(130 if stop.signal == "SIGINT" else 143)


# ---------------------------------------------------------------------------------------- fuse


@app.command(epilog="Example: `peftcli fuse recipes/tweets_fusion.yaml` (train the three *_source recipes first)")
@handle_errors
def fuse(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe with method.name: fusion")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in output.dir")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="a few batches end to end")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """AdapterFusion stage 2: learn attention over trained adapters (method.adapters) on a target task."""
    from peftcli.commands.fuse import fuse as run_fuse

    r = _load(recipe, overrides)
    if smoke:
        r.output.dir, r.output.overwrite, r.train.progress = str(r.run_dir()) + "-smoke", True, False
    summary = run_fuse(r, resume=resume, smoke=smoke, trust_remote_code=trust_remote_code)
    test = summary.get("test", {})
    out.print(f"done in {summary['train_time_s']:.1f} s · test " + ", ".join(
        f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    att = summary["attention"]
    table = Table(title=f"mean fusion attention per source ({att['examples']} held-out examples, all layers)")
    table.add_column("source")
    table.add_column("attention", justify="right")
    for name, v in att["mean"].items():
        table.add_row(name, f"{v:.3f}")
    out.print(table)
    out.print(f"run saved to {r.run_dir()} (self-contained: source adapters copied in)")


# ---------------------------------------------------------------------------------------- drop


@app.command(epilog="Examples: `peftcli drop runs/tweets_pfeiffer --lowest 5` · "
             "`peftcli drop runs/tweets_fusion --prune-fusion 2 --limit 500`")
@handle_errors
def drop(
    run: Annotated[Path, typer.Argument(help="trained (or fused) run folder")],
    layers: Annotated[str | None, typer.Option("--layers", help="layers to drop adapters from, e.g. 0-4")] = None,
    lowest: Annotated[int | None, typer.Option("--lowest", help="drop adapters from the N lowest layers")] = None,
    prune_fusion: Annotated[int | None, typer.Option(
        "--prune-fusion", help="fused run: keep the K most attended sources per layer")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="new run folder (default RUN-drop-...)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="measure on the first N eval examples")] = None,
    repeats: Annotated[int, typer.Option(help="timed passes per state (median)", min=1)] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    trust_remote_code: TrustFlag = False,
) -> None:
    """AdapterDrop: switch adapters off in chosen layers; report eval metric and speed before and after."""
    from peftcli.commands.drop import drop_run

    rep = drop_run(run, out_dir, layers=layers, lowest=lowest, prune_fusion=prune_fusion, limit=limit,
                   repeats=repeats, device=device, force=force, trust_remote_code=trust_remote_code)
    if rep["attention"]:
        names = list(next(iter(rep["attention"].values())))
        att = Table(title="mean fusion attention per layer (before pruning); sources: "
                    + ", ".join(f"{i} = {n}" for i, n in enumerate(names)))
        att.add_column("site")
        for i in range(len(names)):
            att.add_column(str(i), justify="right")
        for site, row in rep["attention"].items():
            short = site.split(".")[-2] + " " + site.rsplit("_", 1)[-1]  # "3 ffn"
            att.add_row(short, *(f"{row.get(n, 0.0):.3f}" for n in names))
        out.print(att)
    b, a = rep["before"], rep["after"]
    table = Table(title=f"{run} · {rep['examples']} eval examples · {rep['device']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for k in ("accuracy", "f1", "loss", "perplexity", "examples_per_s"):
        if k in b:
            table.add_row(k, f"{b[k]:.4f}", f"{a[k]:.4f}")
    out.print(table)
    out.print(f"layers without adapters: {rep['layers_dropped'] or 'none'} · modules switched off: "
              f"{rep['modules_switched_off']} · speed ×{a['examples_per_s'] / b['examples_per_s']:.3f}")
    out.print(f"dropped run written to {rep['dest']} (reload max |Δlogit| {rep['reload_max_diff']:.1e})")


def _exit_now_if_rank(code: int) -> None:
    """Under torchrun, a failing rank leaves at once, without the interpreter's tear-down.

    Its peers are waiting in a collective; closing its connections now is what tells them. The
    tear-down may itself wait on them (destroying a process group mid-collective can block), and
    nothing it would flush matters more than the message already printed.
    """
    if not code or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from peftcli.training.launch import record_rank_exit

    record_rank_exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a closed pipe must not keep the rank alive)
            pass
    os._exit(code)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        _exit_now_if_rank(code)
        sys.exit(e.code)
    except BaseException:  # PEFTCLI_DEBUG=1 lets errors through as tracebacks
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import traceback

            traceback.print_exc()
            _exit_now_if_rank(FAILURE)
        raise


if __name__ == "__main__":
    main()
