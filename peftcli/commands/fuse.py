"""`peftcli fuse`: AdapterFusion stage 2 from a recipe with `method.name: fusion`.

The recipe names the stage-1 runs (`method.adapters`) and the target task (its `data:`). Before
training, the sources are checked (finished runs, fusable method, same base model) and their
method options are written into `method.sources`, so the fused run's recipe.yaml describes the
whole model and the run reloads without the source folders (their weights are saved into the
fused run's adapter file too). Training itself is the ordinary loop (`peftcli.training.loop.train`); the
V regulariser reaches it through `model.peftcli_aux_loss`.

`peftcli train` on the same recipe trains the same model, but its recipe.yaml keeps only the
paths, so that run reloads only while the source folders exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from peftcli.config.recipe import Recipe, load_recipe
from peftcli.core.adapter_files import find_run_adapter
from peftcli.core.errors import CheckpointError
from peftcli.methods.fusion import (
    FusionConfig,
    FusionError,
    Source,
    attention_table,
    read_sources,
    record_attention,
    source_names,
)
from peftcli.runs.folder import check_paths, local_inputs


def prepare(recipe: Recipe) -> list[Source]:
    """Check the sources and record their method options in the recipe (in place)."""
    if not isinstance(recipe.method, FusionConfig):
        raise FusionError(f"peftcli fuse needs a recipe with method.name: fusion (this one has {recipe.method_name!r})")
    cfg = recipe.method
    if len(cfg.adapters) < 2:
        raise FusionError(f"method.adapters names {len(cfg.adapters)} run(s); fusion mixes two or more")
    cfg.sources = []
    sources = read_sources(cfg)
    for s in sources:
        try:
            find_run_adapter(Path(s.run))
        except CheckpointError as e:
            raise FusionError(f"source {s.run}: {e}") from None
        src = load_recipe(Path(s.run) / "recipe.yaml")
        if src.model.name != recipe.model.name:
            raise FusionError(
                f"source {s.run} adapts {src.model.name!r} but the recipe's model is {recipe.model.name!r}; "
                "fused adapters must come from the same base model"
            )
    # The fused run folder must not be, hold or sit inside a source run (or the data, or the base
    # model): output.overwrite would otherwise delete the adapters being fused.
    check_paths(recipe.run_dir(), what="output.dir", sources=local_inputs(recipe))
    cfg.sources = [s.to_json() for s in sources]
    return sources


def attention_summary(run: str | Path, *, limit: int = 256, device: str = "cpu",
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """Reload the fused run from its folder and measure the mean attention each source receives
    on up to `limit` held-out examples: per site, and averaged over sites."""
    from peftcli.commands.drop import timed_eval
    from peftcli.methods.attach import pick_device
    from peftcli.runs.load import collator, load_run, prepare_data

    dev = pick_device(device)
    built, _ = load_run(run, dev, trust_remote_code=trust_remote_code)
    rec = built.recipe
    _, _, _, held = prepare_data(rec, built.tokenizer)
    names = source_names(read_sources(rec.method))
    record_attention(built.model, True)
    m, _ = timed_eval(built.model, held[:limit], collator(rec, built.tokenizer), task=rec.model.task, device=dev,
                      batch_size=rec.eval.batch_size, precision=rec.train.precision,
                      num_labels=len(built.label_names or []) or None)
    table = attention_table(built.model, names)
    mean = {n: sum(t.get(n, 0.0) for t in table.values()) / max(len(table), 1) for n in names}
    return {"per_site": table, "mean": mean, "examples": len(held[:limit]), "reloaded_metrics": m}


def fuse(recipe: Recipe, *, resume: bool = False, smoke: bool = False, console: Console | None = None,
         attention_examples: int = 256, trust_remote_code: bool = False) -> dict[str, Any]:
    """Train the fusion described by `recipe`; returns the training summary plus the sources'
    mean attention measured on the reloaded run. `trust_remote_code` (the command line's flag)
    counts with --resume, as in `train`."""
    from peftcli.training.loop import allowed_remote_code, train

    sources = prepare(recipe)
    summary = train(recipe, resume=resume, smoke=smoke, console=console, trust_remote_code=trust_remote_code)
    summary["sources"] = [s.run for s in sources]
    if attention_examples:
        with torch.no_grad():
            summary["attention"] = attention_summary(
                recipe.run_dir(), limit=attention_examples,
                trust_remote_code=allowed_remote_code(recipe, resume, trust_remote_code))
    return summary


__all__ = ["attention_summary", "fuse", "prepare"]
