"""The training loop. Read it top to bottom: set-up, data, model, optimizer, loop, save."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import distributed as dist_utils
from .build import pick_device, trainable_summary
from .checkpoint import atomic_file_write, save_adapter
from .data import batches, num_batches
from .drop import random_drop, set_dropped_layers
from .evaluate import autocast_ctx, evaluate, forward_inputs, generation_eval
from .fast import compile_layers, trim_unread_positions
from .losses import causal_lm_loss_from_logits, chunked_causal_lm_loss, hidden_states_out
from .pipeline import build, collator, prepare_data
from .recipe import Recipe, recipe_yaml


class TrainingError(RuntimeError):
    pass


class RunExistsError(ValueError):
    """The run folder already holds a run: bad input (exit 2), not a failure."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    smoke: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train a recipe; returns the final evaluation metrics. Writes everything under the run dir."""
    # ---------------------------------------------------------------- set-up
    rank, world = dist_utils.init_from_env(recipe.train.device)
    is_main = rank == 0
    console = console or Console(stderr=True, quiet=not is_main)
    tcfg, task = recipe.train, recipe.model.task
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    device = dist_utils.device_for_rank(pick_device(tcfg.device), rank)
    # Refuse what this machine or this launch cannot do before any file is written or loaded.
    dist_mode = dist_utils.check_setup(tcfg.distributed, world, recipe.model.quantization)
    if recipe.model.quantization == "nf4":
        from .quant import check_qlora_possible

        check_qlora_possible(recipe.method_name, device, recipe.method)
    seed_everything(tcfg.seed)

    run_dir = recipe.run_dir()
    if is_main:
        if run_dir.exists() and not resume:
            # A folder holding only recipe.yaml is a start refused before any step (bad data): nothing to lose.
            if not recipe.output.overwrite and any(f.name != "recipe.yaml" for f in run_dir.iterdir()):
                raise RunExistsError(
                    f"{run_dir} already holds a run; pass --resume to continue it, "
                    "set output.overwrite=true to replace it, or choose output.dir"
                )
            if recipe.output.overwrite:
                shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_file_write(run_dir / "recipe.yaml", recipe_yaml(recipe))
    dist_utils.barrier()

    # ---------------------------------------------------------------- data and model
    from .models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name)
    splits, train_ex, eval_ex = prepare_data(recipe, tokenizer)
    if smoke:
        train_ex, eval_ex = train_ex[: 4 * tcfg.batch_size * max(world, 1)], eval_ex[:16]
    built = build(recipe, device, label_names=splits.label_names)
    model, arch, spec = built.model, built.arch, built.spec
    # Speed-ups that leave results unchanged (see peftcli/fast.py for why each is exact).
    trim_unread_positions(model, arch, spec.name, task)
    if tcfg.compile and device.type == "cuda":
        compile_layers(model, arch)
    collate = collator(recipe, tokenizer)
    budget = trainable_summary(model)
    console.print(
        f"[bold]{spec.name}[/] on {recipe.model.name}: {budget['trainable']:,} trainable of "
        f"{budget['total']:,} ({budget['percent']:.3f} %) · {len(train_ex)} train / {len(eval_ex)} eval · {device}"
        + (f" · {world} ranks ({dist_mode})" if world > 1 else "")
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(f"method {spec.name} left nothing trainable in {recipe.model.name}")
    # Adapter weights of a resumed run go in before wrapping: FSDP then shards them like the rest.
    resume_state = (
        dist_utils.load_resume_weights(run_dir / "last", model, spec, arch, recipe) if resume else None
    )
    train_model = (
        dist_utils.wrap(model, arch, dist_mode, device, find_unused=tcfg.drop_layers > 0) if world > 1 else model
    )
    # FSDP replaces every parameter by a sharded one: clip and optimize those.
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- optimizer and schedule
    steps_per_epoch = max(1, num_batches(len(train_ex), tcfg.batch_size, world) // tcfg.grad_accum)
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    if smoke:
        total_steps = min(total_steps, 4)
    warmup = int(tcfg.warmup_ratio * total_steps)
    decay = [p for n, p in train_model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in train_model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, tcfg.scheduler)
    )
    eval_every = tcfg.eval_every or steps_per_epoch
    if smoke:
        eval_every = total_steps

    # ---------------------------------------------------------------- resume
    step, best, start_epoch, skip_batches = 0, None, 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        state = resume_state
        if state is not None:
            state = dist_utils.load_resume_state(state, model, optimizer, batch_size=tcfg.batch_size)
            step, best = state["step"], state.get("best")
            start_epoch, skip_batches = state["epoch"], state["batch_in_epoch"]
            scheduler.load_state_dict(state["scheduler"])
            console.print(f"resuming at step {step} (epoch {start_epoch}, batch {skip_batches})")
        else:
            console.print("[yellow]--resume: no checkpoint in the run folder yet; starting from step 0[/]")

    def log(record: dict) -> None:
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    meta = {
        "base_model": recipe.model.name,
        "task": task,
        "label_names": splits.label_names,
        **{k: budget[k] for k in ("trainable", "total")},
    }

    def run_eval() -> dict[str, Any]:
        if tcfg.drop_layers:  # evaluate (and save) the whole model, not the last step's random drop
            set_dropped_layers(model, arch, ())
        m = evaluate(
            model, eval_ex, collate, task=task, device=device, batch_size=recipe.eval.batch_size,
            precision=tcfg.precision, num_labels=len(splits.label_names or []) or None,
        )
        if task == "causal_lm" and recipe.eval.generate_accuracy and eval_ex and "prompt_len" in eval_ex[0]:
            g, _ = generation_eval(
                model, arch, tokenizer, eval_ex, device=device,
                max_new_tokens=recipe.eval.max_new_tokens, limit=None,
            )
            m.update(g)
        return m

    def save(dest: str, extra_state: dict | None) -> None:
        # Every rank takes part in building the state (under FSDP, gathering a full tensor is a
        # collective); only rank 0 writes it, through the same save_adapter as a single process.
        sd = dist_utils.full_adapter_state(model, spec, arch, recipe.method)
        state_extra = None
        if extra_state is not None:
            state_extra = {**extra_state, "optimizer": dist_utils.optimizer_state(optimizer, model, trainable)}
        if is_main:
            gathered = dataclasses.replace(spec, export_state=lambda *_: sd)
            save_adapter(run_dir / dest, model, gathered, arch, recipe.method, meta, extra=state_extra)
        dist_utils.barrier()

    # ---------------------------------------------------------------- loop
    train_model.train()
    metric_name = recipe.eval.metric
    last_good_step = step
    started = time.perf_counter()
    seen = 0
    window_loss, window_n = 0.0, 0
    final_metrics: dict[str, Any] = {}
    stopped_nan = False
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (tcfg.progress and is_main),
        transient=False,
    )
    epoch = start_epoch
    with progress:
        bar = progress.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            micro = 0
            for bi, batch in enumerate(
                batches(train_ex, tcfg.batch_size, collate, shuffle=True, seed=tcfg.seed, epoch=epoch, rank=rank, world=world)
            ):
                if bi < skip_batches:
                    continue
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if tcfg.drop_layers:
                    random_drop(model, arch, tcfg.drop_layers)
                inputs = forward_inputs(batch, task)
                with autocast_ctx(device, tcfg.precision):
                    if task == "classification":
                        out = train_model(**inputs)
                        loss = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
                    elif tcfg.chunked_ce and arch.spec.lm_head:
                        with hidden_states_out(model, arch.spec.lm_head) as head:
                            out = train_model(**inputs)
                            loss, _ = chunked_causal_lm_loss(out.logits, head, batch["labels"])
                    else:
                        out = train_model(**inputs)
                        loss, _ = causal_lm_loss_from_logits(out.logits, batch["labels"])
                aux = getattr(model, "peftcli_aux_loss", None)  # a method's own loss term, e.g. fusion's
                if aux is not None:
                    loss = loss + aux()
                (loss / tcfg.grad_accum).backward()
                # The mean over ranks: the loss of the global batch, and a NaN stops every rank.
                lval = dist_utils.mean_across_ranks(loss.detach())
                if not math.isfinite(lval):
                    stopped_nan = True
                    break
                window_loss += lval
                window_n += 1
                seen += batch["input_ids"].shape[0] * world
                micro += 1
                if micro % tcfg.grad_accum:
                    continue
                if tcfg.max_grad_norm:
                    gnorm = torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
                    if not torch.isfinite(gnorm):
                        stopped_nan = True
                        break
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - started
                lr = scheduler.get_last_lr()[0]
                if step % tcfg.log_every == 0 or step == total_steps:
                    rec = {"step": step, "epoch": epoch, "loss": window_loss / max(window_n, 1), "lr": lr,
                           "samples_per_s": seen / max(elapsed, 1e-9), "elapsed_s": elapsed}
                    log(rec)
                    window_loss, window_n = 0.0, 0
                progress.update(bar, completed=step, info=f"loss {lval:.4f} lr {lr:.2e} {seen / max(elapsed, 1e-9):.0f} samples/s")
                if step % eval_every == 0 or step == total_steps:
                    m = run_eval()
                    final_metrics = m
                    log({"step": step, "epoch": epoch, "eval": m, "elapsed_s": time.perf_counter() - started})
                    console.print(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
                    # Rank 0 decides: a last-bit difference in a rank's eval must not send only
                    # some ranks into save()'s collectives.
                    if metric_name in m and dist_utils.rank0_decides(better(metric_name, m[metric_name], best)):
                        best = m[metric_name]
                        save("adapter", None)
                    save("last", {"step": step, "epoch": epoch, "batch_in_epoch": bi + 1, "best": best,
                                  "scheduler": scheduler.state_dict(), "world": world,
                                  "batch_size": tcfg.batch_size})
                    last_good_step = step
                if step >= total_steps:
                    break
            if stopped_nan:
                break
            if step < total_steps:
                epoch += 1
                skip_batches = 0

    if stopped_nan:
        msg = (f"loss became NaN or infinite at step {step}; stopped. The last good checkpoint (step "
               f"{last_good_step}) is in {run_dir}. Try a lower train.lr or train.max_grad_norm.")
        log({"step": step, "error": "non-finite loss"})
        dist_utils.shutdown()
        raise TrainingError(msg)

    elapsed = time.perf_counter() - started
    if not dist_utils.rank0_decides((run_dir / "adapter").exists()):
        save("adapter", None)
    summary = {"final": final_metrics, "best": {metric_name: best}, "train_time_s": elapsed, "steps": step,
               "trainable": budget["trainable"], "total": budget["total"]}
    show_samples = task == "causal_lm" and recipe.eval.generate_samples and eval_ex and "prompt_len" in eval_ex[0]
    if show_samples and (is_main or dist_mode == "fsdp"):  # FSDP: every rank runs the sharded forward
        _, samples = generation_eval(
            model, arch, tokenizer, eval_ex, device=device,
            max_new_tokens=recipe.eval.max_new_tokens, limit=recipe.eval.generate_samples,
        )
        for s in samples:
            console.print(f"[dim]sample[/] {s['generated']!r} (reference {s['reference']!r})")
    if is_main:
        atomic_file_write(run_dir / "summary.json", json.dumps(summary, indent=2))
        if recipe.output.plot:
            from .plot import plot_runs

            try:
                plot_runs([run_dir], run_dir / "curves.png")
            except Exception as e:  # noqa: BLE001  (a plot must never fail a finished run)
                console.print(f"[yellow]could not draw curves.png: {e}[/]")
    dist_utils.shutdown()
    return summary
