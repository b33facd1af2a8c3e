"""The training loop. Read `train()` top to bottom: set up, take steps, evaluate and save, finish.

Everything the loop needs is built once by `set_up` into a `Session`; where the run stands is a
`Position` (peftcli.runs.state), the one object a checkpoint restores. A run either finishes, stops
with a message, or can be resumed to exactly where an uninterrupted run would be: the data
position, optimizer, schedule and every RNG are in each checkpoint, and gradients never cross an
optimizer step (the last group of an epoch is a shorter step of its own).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from peftcli.config.recipe import Recipe, RecipeError, load_recipe
from peftcli.core import signals
from peftcli.core.errors import BadInput, DataError
from peftcli.core.faults import kill_point
from peftcli.core.files import atomic_file_write, is_temp_name, parse_temp_name, pid_alive, remove
from peftcli.core.precision import autocast_ctx, forward_inputs
from peftcli.core.switch import random_drop, set_dropped_layers
from peftcli.data.batching import batches, length_group_size, num_batches
from peftcli.data.packing import pack_for_training
from peftcli.data.splits import malformed_summary
from peftcli.inference.evaluate import evaluate, generation_eval
from peftcli.methods.attach import pick_device, trainable_summary
from peftcli.models.compile import compile_layers
from peftcli.models.losses import causal_lm_loss_from_logits, chunked_causal_lm_loss, hidden_states_out
from peftcli.models.packed_attention import packed_rows
from peftcli.models.trim import trim_unread_positions
from peftcli.runs import folder as runfolder
from peftcli.runs.checkpoint import recover_checkpoint, save_adapter
from peftcli.runs.load import SMOKE_SCORED, SMOKE_TOKENIZED, build, collator, prepare_data, train_collator
from peftcli.runs.lock import folder_lock
from peftcli.runs.state import (
    Position,
    Saved,
    check_resume,
    read_trainer_state,
    restore_rng,
    trainer_state,
    trim_metrics,
    write_trainer_state,
)
from peftcli.training import distributed as dist_utils
from peftcli.training import lisa
from peftcli.training.optim import build_optimizer
from peftcli.training.preference import Objective, PrefStats, Reference


class TrainingError(RuntimeError):
    pass


class NonFiniteError(TrainingError):
    """The loss (training or evaluation) or the gradient norm became NaN or infinite."""


class RunExistsError(BadInput, ValueError):
    """The run folder cannot be used as asked: bad input (exit 2), not a failure."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(optimizer: torch.optim.Optimizer, tcfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's learning-rate schedule: `train.warmup_ratio` of the steps warming up, then `train.scheduler`."""
    warmup = int(tcfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda st: lr_factor(st, total_steps, warmup, tcfg.scheduler))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric == "loss" else new > best


@dataclass
class Session:
    """What one training run works with, built once by `set_up` and never rebuilt."""

    recipe: Recipe
    run_dir: Path
    console: Console
    rank: int
    world: int
    dist_mode: str
    device: torch.device
    tokenizer: Any
    label_names: list[str] | None
    train_ex: list[dict]
    val_ex: list[dict]  # choose the best checkpoint; empty = no validation, the last checkpoint is kept
    test_ex: list[dict]  # the held-out rows: scored once, in `finish`, with the kept adapter
    collate: Any  # evaluation's: never packed
    train_collate: Any  # training's: packs each batch with data.packing "batch"
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    arch: Any
    spec: Any
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    drop_rng: random.Random
    lisa_active: list[int] | None  # the layers LISA trains now; None without LISA
    loss_kind: str  # "classification", "chunked" or "logits": chosen once, see compute_loss
    micro_per_epoch: int  # micro-batches per epoch on each rank
    total_steps: int
    eval_every: int
    meta: dict
    budget: dict
    started: float
    aside: Path | None = None  # a replaced run, kept until this run's first checkpoint
    trackers: Any = None  # rank 0's train.report_to trackers (peftcli.training.tracking.Trackers), once the run folder is open
    grad_norm: float | None = None  # of the latest optimizer step, when train.max_grad_norm computes it
    step_lr: float | None = None  # the learning rate the latest optimizer step applied (the first group's)
    # Examples and real tokens (all ranks) trained on by this process, since `started`: the rates'
    # numerators. Not part of the Position, so a resumed run's rates count only its own work.
    seen: int = 0
    tokens: int = 0
    pref: Objective | None = None  # a preference objective (train.objective other than sft)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    smoke: bool = False,
    console: Console | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Train a recipe; returns the run's summary. Writes everything under the run folder.
    `trust_remote_code` is the command line's --trust-remote-code (see `allowed_remote_code`).

    One process writes a run folder at a time (the lock, taken by set_up, is released here). A
    SIGTERM or Ctrl-C while steps are taken stops at the end of the step, with a checkpoint that
    `--resume` continues exactly; a second one, or one during set-up or the final scoring, stops
    at once (peftcli.core.signals)."""
    with ExitStack() as held, signals.stop_signals():
        s, pos, finished = set_up(recipe, resume=resume, smoke=smoke, console=console, held=held,
                                  trust_remote_code=trust_remote_code)
        if finished is not None:
            return finished
        try:
            with signals.deferred():
                _take_steps(s, pos)
        except NonFiniteError as e:
            log(s, {"step": pos.step, "error": "non-finite", "detail": str(e)})
            _close_trackers(s)
            _restore_replaced(s)
            dist_utils.shutdown()
            raise TrainingError(
                f"{e}; stopped. The last good checkpoint is in {s.run_dir / 'last'}"
                + " (none was written yet)" * (not (s.run_dir / "last").exists())
                + ". Try a lower train.lr or train.max_grad_norm."
            ) from None
        except BaseException:
            _close_trackers(s)
            _restore_replaced(s)
            raise
        return finish(s, pos)


def _take_steps(s: Session, pos: Position) -> None:
    """Optimizer steps from `pos` to the last one, evaluating and saving on the way."""
    s.train_model.train()  # dropout on: models come back from loading in evaluation mode
    with _progress(s) as (bar, update):
        update(bar, pos, None)
        while pos.step < s.total_steps:
            steps_at_start = pos.step
            epoch_from_start = pos.micro == 0
            group: list[dict] = []
            for batch in batches(s.train_ex, s.recipe.train.batch_size, s.train_collate, shuffle=True,
                                 seed=s.recipe.train.seed, epoch=pos.epoch, rank=s.rank, world=s.world,
                                 start=pos.micro, length_group=length_group_size(s.recipe.train, s.world)):
                group.append(batch)
                if len(group) < s.recipe.train.grad_accum and pos.micro + len(group) < s.micro_per_epoch:
                    continue
                losses = train_step(s, group, pos)
                pos.micro += len(group)
                pos.step += 1
                pos.window_loss += sum(losses)
                pos.window_n += len(losses)
                s.seen += sum(_examples_in(b) for b in group) * s.world // (2 if s.pref else 1)  # pairs: 2 rows
                s.tokens += sum(int(b["attention_mask"].sum()) for b in group) * s.world
                group = []
                kill_point("step")
                if pos.step % s.recipe.train.log_every == 0 or pos.step == s.total_steps:
                    log_train(s, pos)
                update(bar, pos, losses[-1])
                saved = pos.step % s.eval_every == 0 or pos.step == s.total_steps
                if saved:
                    evaluate_and_save(s, pos)
                _stop_if_asked(s, pos, saved=saved)
                if pos.step >= s.total_steps:
                    break
            else:
                if epoch_from_start and pos.step == steps_at_start:  # never spin without progress
                    raise TrainingError(f"epoch {pos.epoch} made no optimizer step; nothing left to train on")
                pos.epoch, pos.micro = pos.epoch + 1, 0


def _stop_if_asked(s: Session, pos: Position, *, saved: bool) -> None:
    """At a step boundary: on a stop signal (on any rank), checkpoint this step and stop."""
    signum = signals.requested() or 0
    if s.world > 1:  # every rank stops at the same step, or one would wait in a collective alone
        signum = dist_utils.max_across_ranks(signum)
    if not signum:
        return
    if not saved:
        _save_last(s, pos)
    s.console.print(f"[yellow]stopped by {signal.Signals(signum).name} after step {pos.step}; the checkpoint in "
                    f"{s.run_dir / 'last'} continues with `peftcli train RECIPE --resume`[/]")
    raise signals.Stopped(signum)


def _examples_in(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a micro-batch: rows, or in packed rows the starts of examples (padding excluded)."""
    if "position_ids" in batch:
        return int(((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum())
    return int(batch["input_ids"].shape[0])


# ------------------------------------------------------------------------------------------ set-up


def allowed_remote_code(recipe: Recipe, resume: bool, flag: bool) -> bool:
    """Whether code shipped with the model may run. A new run trusts the user's own recipe
    (`model.trust_remote_code`) or the flag; `--resume` reads a run folder, whose recipe may be
    the folder's own recipe.yaml, so there only the command line's flag counts."""
    return bool(flag) or (not resume and recipe.model.trust_remote_code)


def set_up(
    recipe: Recipe, *, resume: bool, smoke: bool, console: Console | None, held: ExitStack | None = None,
    trust_remote_code: bool = False,
) -> tuple[Session, Position, dict | None]:
    """Check, load and build everything; restore a checkpoint. Returns (session, position, summary
    of an already finished run or None). With `held`, rank 0 takes the run folder's one-writer
    lock into it before the folder is looked at, after the checks that need no folder."""
    rank, world = dist_utils.init_from_env(recipe.train.device)
    console = console or Console(stderr=True, quiet=rank != 0, soft_wrap=True)
    tcfg = recipe.train
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    device = dist_utils.device_for_rank(pick_device(tcfg.device, "train.device"), rank)
    dist_mode = _refuse_what_this_run_cannot_do(recipe, device, world, rank, console)
    seed_everything(tcfg.seed)
    run_dir = recipe.run_dir()
    if held is not None and rank == 0:
        held.enter_context(folder_lock(run_dir, what="output.dir", sources=runfolder.protected_inputs(recipe)))
    trust = allowed_remote_code(recipe, resume, trust_remote_code)
    saved, saved_recipe, resume = _check_run_folder(recipe, run_dir, resume=resume, world=world, rank=rank,
                                                    console=console)
    dist_utils.barrier()
    if trust:
        console.print(f"[yellow]trust_remote_code: code shipped with {escape(recipe.model.name)} will run on this "
                      "machine[/]")
    tokenizer, splits, (train_ex, val_ex, test_ex), n_examples = _read_examples(recipe, smoke, world, console, trust)
    micro_per_epoch = num_batches(len(train_ex), tcfg.batch_size, world)
    model, train_model, arch, spec, budget, reference = _build_model(
        recipe, device, splits.label_names, dist_mode, world,
        resume_from=run_dir / "last" if saved is not None else None, trust_remote_code=trust)
    # FSDP replaces every parameter by a sharded one: clip and optimize those.
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = -(-micro_per_epoch // tcfg.grad_accum)
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    if smoke:
        total_steps = min(total_steps, 4)
    lisa.check_layers(recipe, arch)
    optimizer, scheduler, scaler = _build_optimizer(recipe, model, train_model, spec, arch, device, total_steps)
    s = Session(
        recipe=recipe, run_dir=run_dir, console=console, rank=rank, world=world, dist_mode=dist_mode, device=device,
        tokenizer=tokenizer, label_names=splits.label_names, train_ex=train_ex, val_ex=val_ex,
        test_ex=test_ex,
        collate=collator(recipe, tokenizer), train_collate=train_collator(recipe, tokenizer), model=model, train_model=train_model, arch=arch, spec=spec,
        trainable=trainable, optimizer=optimizer, scheduler=scheduler, scaler=scaler, drop_rng=random.Random(tcfg.seed),
        lisa_active=None,
        loss_kind=_loss_kind(recipe, arch), micro_per_epoch=micro_per_epoch, total_steps=total_steps,
        eval_every=total_steps if smoke else (tcfg.eval_every or steps_per_epoch),
        meta={"base_model": runfolder.anchor_path(recipe.model.name), "task": recipe.model.task, "label_names": splits.label_names,
              **{k: budget[k] for k in ("trainable", "total")}},
        budget=budget, started=time.perf_counter(),
        pref=(Objective(recipe, reference, arch.spec.lm_head if _loss_kind(recipe, arch) == "chunked" else None, device)
              if tcfg.objective != "sft" else None),
    )
    _announce(s, n_examples, splits.val_from)
    if spec.calibrate is not None and saved is None and not recipe.init_from:
        # Every rank reads the same batches, so that every rank chooses the same weights to train.
        spec.calibrate(model, arch, recipe.method, _calibration_losses(s))
    s, pos, finished = _take_position(s, saved, saved_recipe, resumed=resume)
    if finished is None and s.pref is not None and tcfg.precompute_reference:
        how = s.pref.precompute(s.model, {"train": s.train_ex, "val": s.val_ex, "test": s.test_ex}, s.collate,
                                recipe.eval.batch_size, s.run_dir if s.is_main else None)
        s.console.print(f"[dim]{escape(how)}[/]")
    return s, pos, finished


def _refuse_what_this_run_cannot_do(recipe: Recipe, device: torch.device, world: int, rank: int,
                                    console: Console) -> str:
    """Refuse what this machine or this launch cannot do before any file is written or loaded;
    returns the distributed mode."""
    tcfg = recipe.train
    dist_mode = dist_utils.check_setup(tcfg.distributed, world, recipe.model.quantization)
    if recipe.model.quantization == "nf4":
        from peftcli.methods.attach import check_qlora_possible

        check_qlora_possible(recipe.method_name, device, recipe.method)
    from peftcli.methods import get_method
    from peftcli.training.optim import check_optimizer, optimizer_note

    method_spec = get_method(recipe.method_name)
    check_optimizer(tcfg.optimizer, device, method_spec)
    if (note := optimizer_note(tcfg.optimizer, device)) is not None:
        console.print(f"[yellow]{note}[/]")
    if dist_mode == "fsdp" and method_spec.optimizer is not None:
        raise RecipeError(recipe.source or "recipe", [
            f"train.distributed: fsdp shards each weight across ranks, but method {recipe.method_name}'s optimizer "
            "needs whole gradients (an SVD per weight); use train.distributed: ddp"])
    lisa.check_one_process(recipe, world)
    if tcfg.report_to and rank == 0:
        from peftcli.training.tracking import check_trackers

        check_trackers(recipe)
    if tcfg.precision in ("fp16", "bf16") and device.type != "cuda":  # autocast_ctx's CPU region is off
        console.print(f"[yellow]train.precision {tcfg.precision} autocasts on CUDA only; training in fp32 here[/]")
    if tcfg.compile and device.type != "cuda":
        console.print(f"[yellow]train.compile compiles on CUDA only; training eager on {device.type} (docs/performance.md "
                      "gives the CPU figures)[/]")
    return dist_mode


def _check_run_folder(recipe: Recipe, run_dir: Path, *, resume: bool, world: int, rank: int,
                      console: Console) -> tuple[Saved | None, dict | None, bool]:
    """(trainer state, saved recipe dict, resume?): the run folder may be used as asked. Nothing
    is written yet; rank 0 checks a new run's destination."""
    if resume:
        return _resume_target(recipe, run_dir, world, rank, console)
    if rank == 0:
        if not recipe.output.overwrite and (run_dir / "recipe.yaml").exists() and runfolder.is_ours(run_dir):
            raise RunExistsError(f"{run_dir} already holds a run; pass --resume to continue it, "
                                 "set output.overwrite=true to replace it, or choose output.dir")
        runfolder.check_destination(run_dir, what="output.dir", sources=runfolder.protected_inputs(recipe),
                                    replace=recipe.output.overwrite)
    return None, None, False


def _read_examples(recipe: Recipe, smoke: bool, world: int, console: Console, trust_remote_code: bool):
    """(tokenizer, splits, (train, val, test) rows, training examples before packing). Refuses
    too few rows for one optimizer step."""
    from peftcli.models.loading import load_tokenizer

    tcfg = recipe.train
    tokenizer = load_tokenizer(recipe.model.name, trust_remote_code=trust_remote_code)
    # A smoke run trains on 4 batches: twice that many rows are tokenized, for those that truncation
    # leaves with nothing to train on.
    limits = (8 * tcfg.batch_size * max(world, 1), SMOKE_TOKENIZED) if smoke else (None, None)
    splits, train_ex, val_ex, test_ex = prepare_data(recipe, tokenizer, limits)
    if splits.malformed:
        console.print(f"[yellow]{escape(recipe.data.source)}: {escape(malformed_summary(splits.malformed))}; "
                      "--strict refuses them[/]")
    for note in splits.notes:
        console.print(f"[yellow]{escape(note)}[/]")
    n_examples = len(train_ex)
    train_ex = pack_for_training(recipe, train_ex)
    if smoke:
        train_ex = train_ex[: 4 * tcfg.batch_size * max(world, 1)]
        val_ex, test_ex = val_ex[:SMOKE_SCORED], test_ex[:SMOKE_SCORED]
    # Rows for one whole global batch also give every rank at least grad_accum micro-batches.
    if len(train_ex) < tcfg.batch_size * tcfg.grad_accum * world:
        raise DataError(
            f"{recipe.source or 'recipe'}: {len(train_ex)} training rows cannot make one optimizer step of "
            f"train.batch_size {tcfg.batch_size} x train.grad_accum {tcfg.grad_accum} x {world} rank(s) = "
            f"{tcfg.batch_size * tcfg.grad_accum * world} rows; lower train.batch_size or train.grad_accum, "
            "or use more data (data.train_size / data.eval_fraction / data.val_fraction)"
        )
    return tokenizer, splits, (train_ex, val_ex, test_ex), n_examples


def _build_model(recipe: Recipe, device: torch.device, label_names: list[str] | None, dist_mode: str, world: int,
                 *, resume_from: Path | None, trust_remote_code: bool = False):
    """(model, the model as trained (its DDP/FSDP wrapper under several ranks), arch, method spec,
    parameter counts, the preference reference), with a resumed run's adapter weights in place."""
    tcfg = recipe.train
    built = build(recipe, device, label_names=label_names, trust_remote_code=trust_remote_code)
    model, arch, spec = built.model, built.arch, built.spec
    if recipe.data.packing:
        from peftcli.models.packed_attention import check_packing, use_packed_attention

        what = f"{model.config.model_type} ({recipe.model.name}) with method {spec.name}"
        if not use_packed_attention(model, device, what):
            check_packing(model, device, what)
    # Speed-ups that leave results unchanged (models/trim.py and models/compile.py say why each is exact).
    trim_unread_positions(model, arch, spec.positionwise, recipe.model.task)
    if tcfg.compile and device.type == "cuda":
        compile_layers(model, arch)
    budget = trainable_summary(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError(f"method {spec.name} left nothing trainable in {recipe.model.name}")
    reference = Reference(recipe, model)  # before a resumed run's weights: it may keep the starting ones
    if resume_from is not None:
        # Adapter weights of a resumed run go in before wrapping: FSDP then shards them like the rest.
        dist_utils.load_resume_weights(resume_from, model, spec, arch, recipe)
    train_model = dist_utils.wrap(model, arch, dist_mode, device, find_unused=tcfg.drop_layers > 0) if world > 1 else model
    return model, train_model, arch, spec, budget, reference


def _build_optimizer(recipe: Recipe, model, train_model, spec, arch, device: torch.device, total_steps: int):
    """(optimizer, learning-rate schedule, fp16 loss scaler)."""
    tcfg = recipe.train
    optimizer = build_optimizer(model, train_model, spec, arch, recipe.method, tcfg, device)
    scheduler = lr_schedule(optimizer, tcfg, total_steps)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and tcfg.precision == "fp16")
    return optimizer, scheduler, scaler


def _loss_kind(recipe: Recipe, arch) -> str:
    """How `compute_loss` computes: chosen once, see there."""
    if recipe.model.task == "classification":
        return "classification"
    return "chunked" if recipe.train.chunked_ce and arch.spec.lm_head else "logits"


def _announce(s: Session, n_examples: int, val_from: str | None) -> None:
    """The start-up line: method, model, trainable share, rows (and where the validation rows come
    from), device, ranks."""
    recipe, budget = s.recipe, s.budget
    s.console.print(
        f"[bold]{s.spec.name}[/] on {recipe.model.name}: {budget['trainable']:,} trainable of "
        f"{budget['total']:,} ({budget['percent']:.3f} %) · "
        + (f"{n_examples} train in {len(s.train_ex)} packed rows" if recipe.data.packing is True
           else f"{len(s.train_ex)} train" + " (each batch packed)" * (recipe.data.packing == "batch"))
        + f" / {len(s.val_ex)} val" + (f" ({val_from})" if val_from else "")
        + f" / {len(s.test_ex)} test · {s.device}"
        + (f" · {s.world} ranks ({s.dist_mode})" if s.world > 1 else "")
    )
    if s.pref is not None:
        s.console.print(f"objective {recipe.train.objective}: {s.pref.reference.describe()}")


def _take_position(s: Session, saved: Saved | None, saved_recipe: dict | None, *,
                   resumed: bool) -> tuple[Session, Position, dict | None]:
    """Where training starts: step 0, or the checkpoint's position with its optimizer, schedule
    and RNG back. Opens the run folder (rank 0), unless the resumed run had already finished."""
    pos = Position()
    if saved is not None:
        pos = _restore(s, saved)
    if saved is not None and pos.step >= s.total_steps and (s.run_dir / "summary.json").exists():
        s.console.print(f"{s.run_dir} already finished at step {pos.step}; raise train.epochs or "
                        "train.max_steps to train further")
        dist_utils.shutdown()
        return s, pos, json.loads((s.run_dir / "summary.json").read_text())
    if s.is_main:
        _open_run_folder(s, pos, resumed=resumed, saved_recipe=saved_recipe)
        if s.recipe.train.report_to:
            from peftcli.training.tracking import Trackers

            s.trackers = Trackers(s.run_dir, s.recipe)
            s.console.print(f"[dim]tracking: {escape(s.trackers.where())}[/]")
    dist_utils.barrier()
    _check_nodes_share(s)
    if s.recipe.train.lisa_layers:
        s.lisa_active = lisa.draw(s.recipe, s.arch, s.optimizer, pos.step)
    if saved is not None:
        restore_rng(saved, s.drop_rng)  # last: nothing after this may draw random numbers
        s.console.print(f"resuming at step {pos.step} (epoch {pos.epoch}, micro-batch {pos.micro})")
    return s, pos, None


def _check_nodes_share(s: Session) -> None:
    """Across machines: every rank must see the run folder rank 0 has just opened, or the run would
    fail only at its end, when every rank reads back the adapter validation kept."""
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) <= 1:  # one machine: one filesystem
        return
    import uuid

    name, token = f".nodes.peftcli-tmp-{os.getpid()}", uuid.uuid4().hex
    if s.is_main:
        (s.run_dir / name).write_text(token)
    name, token = dist_utils.from_rank0((name, token))
    probe = s.run_dir / name  # in this rank's own output.dir: the same folder only if the filesystem is shared
    try:
        seen = "this run's folder" if probe.is_file() and probe.read_text() == token else "no such run folder"
    except OSError:
        seen = "no such run folder"
    try:
        dist_utils.check_folder_shared(s.run_dir, seen, what="output.dir")
        dist_utils.barrier()  # every rank has read the probe
    except BaseException:
        if s.is_main:
            probe.unlink(missing_ok=True)
        _close_trackers(s)  # train() closes and restores only from its first step on
        _restore_replaced(s)
        raise
    if s.is_main:
        probe.unlink(missing_ok=True)


def _resume_target(recipe: Recipe, run_dir: Path, world: int, rank: int, console: Console):
    """(trainer state, saved recipe dict, resume?) for `--resume`, after every check passes."""
    if world > 1:  # every rank takes the same branch below, or a node's folder is not the shared one
        dist_utils.check_folder_shared(
            run_dir, "a run" if (run_dir / "recipe.yaml").exists() else "no run (no recipe.yaml)", what="--resume")
    if not (run_dir / "recipe.yaml").exists():
        if rank == 0:
            _clear_unstarted_run(recipe, run_dir)
        console.print(f"[yellow]--resume: nothing to resume in {run_dir}; starting the run[/]")
        return None, None, False
    _refuse_foreign_resume(run_dir)
    if not os.access(run_dir, os.W_OK):  # else the first write stops the run with errno's words (exit 1)
        raise runfolder.UnsafePathError(f"--resume: {run_dir} is read-only here, and resuming writes its checkpoints "
                                        "and metrics; make it writable, or copy it and resume the copy")
    if rank == 0:  # a kill inside a checkpoint swap leaves it half-renamed: finish or undo it first
        for name in ("last", "adapter"):
            note = recover_checkpoint(run_dir / name)
            if note:
                console.print(f"[yellow]{note}[/]")
    dist_utils.barrier()
    _refuse_finished_without_checkpoint(run_dir)
    saved_path = run_dir / "recipe.yaml"
    # A damaged file is refused with the reason (exit 2); paths compare as the run folder keeps them.
    saved_recipe = runfolder.anchored(load_recipe(saved_path)).to_dict()
    saved = read_trainer_state(run_dir / "last")
    if world > 1:
        dist_utils.check_folder_shared(
            run_dir, f"a checkpoint at step {saved.position.step}" if saved is not None else "no checkpoint",
            what="--resume")
    check_resume(saved_recipe, runfolder.anchored(recipe).to_dict(), saved, world=world, source=str(saved_path))
    if saved is None:
        console.print(f"[yellow]--resume: {run_dir} has no checkpoint yet; training from step 0[/]")
    return saved, saved_recipe, True


def _refuse_foreign_resume(run_dir: Path) -> None:
    """--resume continues only a training run peftcli wrote: a user's folder that holds a
    recipe.yaml would otherwise be trained into, and a combined or imported adapter retrained from
    step 0 over itself. Files someone added to a run are left alone (never listed as the run's)."""
    marker = runfolder.read_marker(run_dir)
    if marker is None and not runfolder.reads_as_run(run_dir):
        names = sorted(p.name for p in run_dir.iterdir() if p.name != "recipe.yaml")
        held = f" (beside recipe.yaml it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
        raise RunExistsError(f"--resume: {run_dir} is not a run folder peftcli wrote{held}; check output.dir, "
                             "or train into a new one")
    kind = marker["kind"] if marker is not None else "run"
    if kind != "run":
        raise RunExistsError(f"--resume: {run_dir} was written by `peftcli {kind.replace('import', 'import-peft')}`, "
                             "not by training, so there is nothing to resume; to train on from its adapter, set "
                             f"init_from: {run_dir} and a new output.dir")


def _refuse_finished_without_checkpoint(run_dir: Path) -> None:
    """A finished run whose last/ is gone would retrain from step 0 over its own adapter."""
    if (run_dir / "summary.json").exists() and not (run_dir / "last").exists():
        raise RunExistsError(f"--resume: {run_dir} finished and has no checkpoint (last/) to go on from; to train "
                             f"on from its adapter, set init_from: {run_dir} and a new output.dir")


def _clear_unstarted_run(recipe: Recipe, run_dir: Path) -> None:
    """--resume on a folder without recipe.yaml: a run killed before recipe.yaml was in place
    leaves at most the marker and peftcli's temporary files. Every path check passes before
    anything is deleted, and then only peftcli's temporary entries, of processes that died, in a
    folder that is provably ours (its marker lists the rest, or it holds nothing else)."""
    runfolder.check_paths(run_dir, what="output.dir", sources=runfolder.protected_inputs(recipe))
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        runfolder.check_destination(run_dir, what="output.dir", sources=runfolder.protected_inputs(recipe), replace=True)  # refuses
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    leftovers = [n for n in names if is_temp_name(n)]
    others = [n for n in names if n not in leftovers]
    if others and not runfolder.is_ours(run_dir):
        raise RunExistsError(f"--resume: {run_dir} is not a peftcli run folder (no recipe.yaml); check output.dir")
    for n in leftovers:
        if not pid_alive(parse_temp_name(n)[2]):
            remove(run_dir / n)
    runfolder.check_destination(run_dir, what="output.dir", sources=runfolder.protected_inputs(recipe), replace=True)


def _restore(s: Session, saved: Saved) -> Position:
    """Optimizer, schedule and loss scale back from a checkpoint; the position in this world size."""
    dist_utils.load_optimizer_state(s.optimizer, s.model, saved.optimizer)
    s.scheduler.load_state_dict(saved.scheduler)
    if saved.scaler and s.scaler.is_enabled():
        s.scaler.load_state_dict(saved.scaler)
    pos = replace(saved.position)
    pos.micro = dist_utils.micro_in_epoch(pos.micro, saved.batch_size, saved.world,
                                          batch_size=s.recipe.train.batch_size)
    return pos


def _open_run_folder(s: Session, pos: Position, *, resumed: bool, saved_recipe: dict | None) -> None:
    """Rank 0: the run folder, with recipe.yaml written only now that every check has passed."""
    if not resumed and s.run_dir.exists() and any(s.run_dir.iterdir()):
        s.aside = runfolder.move_aside(s.run_dir)  # removed at this run's first checkpoint
    s.run_dir.mkdir(parents=True, exist_ok=True)
    # A resumed run re-runs what came after its checkpoint (all of it when it has none yet).
    if dropped := trim_metrics(s.run_dir / "metrics.jsonl", pos.step):
        s.console.print(f"[dim]metrics.jsonl: {dropped} line(s) after the checkpoint dropped; they are re-run[/]")
    # The marker first: a kill right after recipe.yaml lands must still leave a folder --resume knows.
    runfolder.write_marker(s.run_dir, "run")
    if saved_recipe is None or saved_recipe != runfolder.anchored(s.recipe).to_dict():
        atomic_file_write(s.run_dir / "recipe.yaml", runfolder.run_recipe_yaml(s.recipe))
        runfolder.write_marker(s.run_dir, "run")


def _restore_replaced(s: Session) -> None:
    """A run that fails before its first checkpoint gives the replaced run back."""
    if s.aside is not None and s.is_main:
        runfolder.restore_aside(s.aside, s.run_dir)
        s.console.print(f"[yellow]the previous run in {s.run_dir} was put back[/]")
        s.aside = None


# ------------------------------------------------------------------------------------------ one step


def compute_loss(s: Session, batch: dict[str, torch.Tensor], stats: PrefStats | None = None) -> torch.Tensor:
    """The training loss of one micro-batch (plus the method's own term, e.g. fusion's); a
    preference objective adds its reward statistics to `stats`."""
    inputs = forward_inputs(batch, s.recipe.model.task)
    with autocast_ctx(s.device, s.recipe.train.precision), packed_rows("position_ids" in batch):
        if s.pref is not None:
            loss = s.pref.loss(s.model, batch, stats if stats is not None else PrefStats(), forward=s.train_model)
        elif s.loss_kind == "classification":
            out = s.train_model(**inputs)
            loss = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
        elif s.loss_kind == "chunked":
            with hidden_states_out(s.model, s.arch.spec.lm_head) as head:
                out = s.train_model(**inputs)
                loss, _ = chunked_causal_lm_loss(out.logits, head, batch["labels"])
        else:
            out = s.train_model(**inputs)
            loss, _ = causal_lm_loss_from_logits(out.logits, batch["labels"])
    aux = s.spec.aux_loss(s.model) if s.spec.aux_loss else None
    if aux is not None:
        loss = loss + aux
    return loss


def train_step(s: Session, group: list[dict], pos: Position) -> list[float]:
    """One optimizer step over a group of micro-batches; returns each micro-batch's loss."""
    if s.recipe.train.lisa_layers and pos.step % s.recipe.train.lisa_interval == 0:
        s.lisa_active = lisa.draw(s.recipe, s.arch, s.optimizer, pos.step)
    losses = []
    for batch in group:
        batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
        if s.recipe.train.drop_layers:
            random_drop(s.model, s.arch, s.recipe.train.drop_layers, rng=s.drop_rng)
        loss = compute_loss(s, batch, PrefStats(pos.window_stats))
        s.scaler.scale(loss / len(group)).backward()
        # The mean over ranks: the loss of the global batch, and a NaN stops every rank.
        lval = dist_utils.mean_across_ranks(loss.detach())
        if not math.isfinite(lval):
            raise NonFiniteError(f"training loss became NaN or infinite ({lval}) at step {pos.step + 1}")
        losses.append(lval)
    if s.recipe.train.max_grad_norm:
        s.scaler.unscale_(s.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(s.trainable, s.recipe.train.max_grad_norm)
        s.grad_norm = float(gnorm)
        if not torch.isfinite(gnorm) and not s.scaler.is_enabled():  # fp16: the scaler skips the step
            raise NonFiniteError(f"gradient norm became NaN or infinite ({float(gnorm)}) at step {pos.step + 1}")
    s.step_lr = s.scheduler.get_last_lr()[0]  # before the schedule moves on to the next step's
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return losses


def _calibration_losses(s: Session):
    """Training losses of the first batches of epoch 0, in the order training reads them, with the
    model in eval mode (no dropout: the choice draws no random number and resume stays exact)."""
    was_training = s.model.training
    s.model.eval()
    plain = replace(s, train_model=s.model)  # no DDP hooks: each rank calibrates on its own
    try:
        for batch in batches(s.train_ex, s.recipe.train.batch_size, s.train_collate, shuffle=True,
                             seed=s.recipe.train.seed, epoch=0, rank=0, world=1, start=0):
            yield compute_loss(plain, {k: v.to(s.device) for k, v in batch.items()})
    finally:
        s.model.train(was_training)


# ------------------------------------------------------------------------------------------ evaluate and save


def log(s: Session, record: dict) -> None:
    """Append to metrics.jsonl, the run's record; the trackers get a copy."""
    if s.is_main:
        with open(s.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        kill_point("metrics:written")
        if s.trackers is not None:
            s.trackers.log(record)


def _close_trackers(s: Session) -> None:
    if s.trackers is not None:
        s.trackers.close()
        s.trackers = None


def applied_lr(s: Session) -> float:
    """The learning rate of the latest optimizer step (before any: the first one's)."""
    return s.step_lr if s.step_lr is not None else s.scheduler.get_last_lr()[0]


def log_train(s: Session, pos: Position) -> None:
    elapsed = time.perf_counter() - s.started
    record = {"step": pos.step, "epoch": pos.epoch, "loss": pos.window_loss / max(pos.window_n, 1),
              "lr": applied_lr(s), "samples_per_s": s.seen / max(elapsed, 1e-9),
              "tokens_per_s": s.tokens / max(elapsed, 1e-9), "elapsed_s": elapsed}
    if s.grad_norm is not None:
        record["grad_norm"] = s.grad_norm
    if s.pref is not None:
        record.update({k: v for k, v in PrefStats(pos.window_stats).metrics().items() if k not in ("loss", "accuracy")})
    log(s, record)
    pos.window_loss, pos.window_n, pos.window_stats = 0.0, 0, {}


def run_eval(s: Session, examples: list[dict]) -> dict[str, Any]:
    if s.recipe.train.drop_layers:  # evaluate (and save) the whole model, not the last step's random drop
        set_dropped_layers(s.model, s.arch, ())
    if s.pref is not None:
        m = s.pref.evaluate(s.model, examples, s.collate, s.recipe.eval.batch_size)
    else:
        m = evaluate(
            s.model, examples, s.collate, task=s.recipe.model.task, device=s.device,
            batch_size=s.recipe.eval.batch_size, precision=s.recipe.train.precision,
            num_labels=len(s.label_names or []) or None,
        )
    if (s.recipe.model.task == "causal_lm" and s.recipe.eval.generate_accuracy and examples
            and "prompt_len" in examples[0]):
        g, _ = generation_eval(s.model, s.arch, s.tokenizer, examples, device=s.device,
                               max_new_tokens=s.recipe.eval.max_new_tokens, limit=None)
        m.update(g)
    return m


def evaluate_and_save(s: Session, pos: Position) -> None:
    """Evaluate on the validation rows; save the best adapter and the `last` checkpoint (in that
    order: `last` says which best it has seen). Without validation rows nothing is chosen: the
    adapter is the last weights, which `finish` saves once. The test rows are never looked at here."""
    metric = s.recipe.eval.metric
    if s.val_ex:
        m = run_eval(s, s.val_ex)
        log(s, {"step": pos.step, "epoch": pos.epoch, "val": m, "elapsed_s": time.perf_counter() - s.started})
        if not math.isfinite(m["loss"]):
            raise NonFiniteError(f"validation loss became NaN or infinite ({m['loss']}) at step {pos.step}")
        s.console.print(f"step {pos.step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
        pos.last_eval = m
        # Rank 0 decides: a last-bit difference in a rank's eval must not send only some ranks into
        # save()'s collectives.
        if metric in m and dist_utils.rank0_decides(better(metric, m[metric], pos.best)):
            pos.best, pos.best_step, pos.best_eval = m[metric], pos.step, m
            save_checkpoint(s, "adapter", None)
    _save_last(s, pos)


def _save_last(s: Session, pos: Position) -> None:
    """The `last` checkpoint, that `--resume` continues; the first one retires a replaced run."""
    save_checkpoint(s, "last", pos)
    if s.aside is not None and s.is_main:
        runfolder.discard_aside(s.aside)
        s.aside = None


def save_checkpoint(s: Session, dest: str, pos: Position | None) -> None:
    """All ranks: build the state (under FSDP gathering a tensor is a collective); rank 0 writes."""
    with lisa.every_layer_trainable(s.recipe, s.arch, s.lisa_active):
        sd = dist_utils.full_adapter_state(s.model, s.spec, s.arch, s.recipe.method)
    extra = None
    if pos is not None:
        state = trainer_state(
            pos, optimizer=dist_utils.optimizer_state(s.optimizer, s.model, s.trainable),
            scheduler=s.scheduler.state_dict(), scaler=s.scaler.state_dict() if s.scaler.is_enabled() else None,
            drop_rng=s.drop_rng, world=s.world, batch_size=s.recipe.train.batch_size,
        )

        def extra(folder: Path) -> None:
            write_trainer_state(folder, *state)

    if s.is_main:
        gathered = replace(s.spec, export_state=lambda *_: sd)
        save_adapter(s.run_dir / dest, s.model, gathered, s.arch, s.recipe.method, s.meta, extra=extra)
    dist_utils.barrier()


# ------------------------------------------------------------------------------------------ finish


def finish(s: Session, pos: Position) -> dict[str, Any]:
    """Score the kept adapter on the test rows (once), then samples, summary.json and the curves."""
    if not dist_utils.rank0_decides((s.run_dir / "adapter").exists()):
        save_checkpoint(s, "adapter", None)
        pos.best_step = pos.step
    kept = pos.best_step if pos.best_step is not None else pos.step  # None: a checkpoint from before best_step
    if kept != pos.step:
        # The kept adapter is an earlier one: score it, not the last weights.
        with lisa.every_layer_trainable(s.recipe, s.arch, s.lisa_active):
            dist_utils.load_kept_weights(s.run_dir / "adapter", s.model, s.spec, s.arch, s.recipe)
    test = run_eval(s, s.test_ex) if s.test_ex else {}
    if test:
        log(s, {"step": pos.step, "epoch": pos.epoch, "test": test, "kept_step": kept,
                "elapsed_s": time.perf_counter() - s.started})
        s.console.print("test (held-out, scored once): "
                        + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    metric = s.recipe.eval.metric
    summary = {
        "val": pos.best_eval or {}, "test": test,
        "best": {metric: pos.best, "step": kept},
        "rows": {"train": len(s.train_ex), "val": len(s.val_ex), "test": len(s.test_ex)},
        "train_time_s": time.perf_counter() - s.started, "steps": pos.step,
        "trainable": s.budget["trainable"], "total": s.budget["total"],
        "versions": versions(), "recipe_sha256": recipe_hash(s.recipe),
    }
    task = s.recipe.model.task
    show_samples = task == "causal_lm" and s.recipe.eval.generate_samples and s.test_ex and "prompt_len" in s.test_ex[0]
    if show_samples and (s.is_main or s.dist_mode == "fsdp"):  # FSDP: every rank runs the sharded forward
        _, samples = generation_eval(
            s.model, s.arch, s.tokenizer, s.test_ex, device=s.device,
            max_new_tokens=s.recipe.eval.max_new_tokens, limit=s.recipe.eval.generate_samples,
        )
        for smp in samples:
            s.console.print(f"[dim]sample[/] {smp['generated']!r} (reference {smp['reference']!r})")
    if s.is_main:
        atomic_file_write(s.run_dir / "summary.json", json.dumps(summary, indent=2))
        if s.recipe.output.plot:
            from peftcli.runs.plot import plot_runs

            try:
                plot_runs([s.run_dir], s.run_dir / "curves.png", replace=True)
            except Exception as e:  # noqa: BLE001  (a plot must never fail a finished run)
                s.console.print(f"[yellow]could not draw curves.png: {e}[/]")
        runfolder.write_marker(s.run_dir, "run")
    _close_trackers(s)
    dist_utils.shutdown()
    return summary


def versions() -> dict[str, str]:
    """What a figure depends on besides the recipe: two runs agree only on the same versions."""
    import platform

    import transformers

    from peftcli import __version__

    return {"peftcli": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 of the resolved recipe (every key, defaults included, canonical JSON) less what
    cannot change a number: where the run is written and whether a progress bar is drawn. Two
    runs with one hash and one `versions` should agree to the last digit."""
    import hashlib

    d = recipe.to_dict()
    d.pop("output")
    d["train"].pop("progress")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


class _progress:
    """The progress bar (rank 0, `train.progress`) and its update function."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=s.console, disable=not (s.recipe.train.progress and s.is_main), transient=False,
        )

    def __enter__(self):
        self.bar.__enter__()
        task_id = self.bar.add_task("train", total=self.s.total_steps, completed=0, info="")
        return task_id, self._update

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def _update(self, task_id, pos: Position, loss: float | None) -> None:
        elapsed = max(time.perf_counter() - self.s.started, 1e-9)
        info = "" if loss is None else (
            f"loss {loss:.4f} lr {applied_lr(self.s):.2e} {self.s.seen / elapsed:.0f} samples/s "
            f"{self.s.tokens / elapsed:.0f} tokens/s")
        self.bar.update(task_id, completed=pos.step, info=info)
