"""`peftcli export` and `peftcli import-peft`: run folders to and from HF PEFT adapter folders.

The format itself (names, configs, each method's twin) is peftcli/runs/peft_format.py, a library layer;
these commands add the folders: which may be written or replaced, and what a new run holds.
`export --as-lora` (runs/as_lora.py for the conversion) writes any weight-delta adapter as a plain
LoRA and measures what the approximation costs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftcli.config.recipe import Recipe, load_recipe
from peftcli.core.peft_layout import Layout
from peftcli.methods.attach import pick_device, trainable_summary
from peftcli.runs.load import build, open_run, refuse_dropped, refuse_edited_recipe, run_on_meta
from peftcli.runs.lock import hold, writes_folders
from peftcli.runs.peft_format import (
    export_model,
    head_rows,
    load_peft_weights,
    peft_type_for,
    read_peft_folder,
    recipe_from_peft,
)


@writes_folders
def export_run(run: Path, dest: Path, *, force: bool = False, trust_remote_code: bool = False) -> Layout:
    """`peftcli export RUN --to peft DEST`; `trust_remote_code` is the command line's flag."""
    from peftcli.runs.folder import check_destination, local_inputs, replacing

    run, dest = Path(run), Path(dest)

    def writable(recipe: Recipe) -> None:  # refuse before any work
        peft_type_for(recipe.method_name)
        hold(dest, what="export destination", sources=[run, *local_inputs(recipe)])
        check_destination(dest, what="export destination", sources=[run, *local_inputs(recipe)], replace=force)

    saved = open_run(run, trust_remote_code=trust_remote_code, before_weights=writable)
    refuse_dropped(saved, "export", "export the run it was made from (HF PEFT has no switch for them)")
    recipe, sd, labels = saved.recipe, saved.state, saved.meta.get("label_names")
    model, arch, spec = run_on_meta(recipe, labels)
    refuse_edited_recipe(model, saved)
    with replacing(dest, kind="export") as tmp:
        return export_model(model, arch, spec, recipe, sd, tmp)


# ------------------------------------------------------------------------------ export --as-lora

DEFAULT_AS_LORA_RANK = 16


@dataclass
class AsLoraReport:
    """What `export --as-lora` wrote and what the approximation costs."""

    dest: Path
    method: str
    layers: list  # runs.as_lora.LayerFit, one per adapted linear layer
    config: dict  # the adapter_config.json written
    max_logit_diff: float  # max |logits(adapter) - logits(base + LoRA)| on a sample batch
    split: str | None  # the held-out split scored ("val", or "test" when the recipe has no val rows)
    before: dict | None  # its metrics under the run's adapter
    after: dict | None  # ... and under base + LoRA
    notes: list[str]


def as_lora_options(rank: int | None, energy: float | None) -> tuple[int | None, float | None]:
    """--rank R or --energy E (not both); neither: rank DEFAULT_AS_LORA_RANK."""
    from peftcli.core.errors import UsageError

    if rank is not None and energy is not None:
        raise UsageError("--rank and --energy both given; choose one (a fixed rank, or the energy each layer keeps)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy {energy}: the fraction of squared singular values kept, 0 < E <= 1 (e.g. 0.99)")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: the LoRA rank is at least 1")
    if energy is None and rank is None:
        rank = DEFAULT_AS_LORA_RANK
    return rank, energy


@torch.no_grad()
@writes_folders
def export_as_lora(run: Path, dest: Path, *, rank: int | None = None, energy: float | None = None,
                   evaluate: bool = True, force: bool = False, trust_remote_code: bool = False) -> AsLoraReport:
    """`peftcli export RUN --to peft --as-lora DEST`: the run's adapter as a plain PEFT LoRA, each layer's
    delta truncated to `rank` (or to the rank keeping `energy`), checked against the adapter on a
    sample batch and, with `evaluate`, on the recipe's held-out split."""
    from peftcli.core.peft_layout import PeftFormatError
    from peftcli.methods import all_methods
    from peftcli.runs.as_lora import apply_lora, as_lora_refusal, to_lora
    from peftcli.runs.folder import check_destination, local_inputs, replacing
    from peftcli.runs.load import base_model, build_saved, sample_batch
    from peftcli.runs.peft_format import write_peft_folder

    run, dest = Path(run), Path(dest)
    rank, energy = as_lora_options(rank, energy)

    def writable(recipe: Recipe) -> None:  # refuse before any work
        refusal = as_lora_refusal(all_methods().get(recipe.method_name), recipe.method_name)
        if refusal:
            raise PeftFormatError(refusal)
        hold(dest, what="export destination", sources=[run, *local_inputs(recipe)])
        check_destination(dest, what="export destination", sources=[run, *local_inputs(recipe)], replace=force)

    saved = open_run(run, trust_remote_code=trust_remote_code, before_weights=writable)
    refuse_dropped(saved, "export", "export the run it was made from (HF PEFT has no switch for them)")
    dev = pick_device("cpu")
    built = build_saved(saved, dev, trust_remote_code=trust_remote_code)
    recipe, model, tok = built.recipe, built.model.eval(), built.tokenizer
    base, _ = base_model(recipe, dev, built.label_names, trust_remote_code)
    base.eval()
    exp = to_lora(model, base, built.arch, built.spec, recipe, rank=rank, energy=energy)
    split, examples = _held_out(recipe, tok) if evaluate else (None, [])
    sample = sample_batch(tok, dev)
    adapter_logits = model(**sample).logits.float()
    before = _score(model, examples, built) if examples else None
    apply_lora(base, exp)
    diff = float((adapter_logits - base(**sample).logits.float()).abs().max())
    after = _score(base, examples, built) if examples else None
    with replacing(dest, kind="export") as tmp:
        write_peft_folder(tmp, exp.tensors, exp.config)
    return AsLoraReport(dest, recipe.method_name, exp.layers, exp.config, diff, split, before, after, exp.notes)


def _held_out(recipe: Recipe, tok) -> tuple[str, list[dict]]:
    """The recipe's validation examples, or its test examples when it keeps no validation rows."""
    from peftcli.core.errors import DataError
    from peftcli.runs.load import prepare_data

    try:
        _, _, val, test = prepare_data(recipe, tok)
    except DataError as e:
        raise DataError(f"{e} (export --as-lora scores the run's held-out rows; --no-eval skips that)") from None
    return ("val", val) if val else ("test", test)


def _score(model: nn.Module, examples: list[dict], built) -> dict:
    from peftcli.inference.evaluate import evaluate
    from peftcli.runs.load import collator

    rec = built.recipe
    return evaluate(model, examples, collator(rec, built.tokenizer), task=rec.model.task, device=pick_device("cpu"),
                    batch_size=rec.eval.batch_size, precision=rec.train.precision,
                    num_labels=len(built.label_names or []) or None)


# ------------------------------------------------------------------------------ import


@writes_folders
def import_peft(src: Path, run_dir: Path, *, recipe_path: Path | None = None,
                overrides: list[str] | None = None, force: bool = False, trust_remote_code: bool = False) -> Path:
    """Turn a PEFT adapter folder into a peftcli run folder (then eval, merge, generate, export work).
    The base model named by the folder (or recipe) runs its own code only with `trust_remote_code`,
    the command line's flag."""
    from peftcli import __version__
    from peftcli.core.files import atomic_file_write
    from peftcli.runs.checkpoint import save_adapter
    from peftcli.runs.folder import (
        anchor_path,
        check_destination,
        check_paths,
        local_inputs,
        replacing,
        run_recipe_yaml,
    )
    from peftcli.runs.load import untrusted

    src, run_dir = Path(src), Path(run_dir)
    hold(run_dir, what="import destination", sources=[src, recipe_path])
    check_destination(run_dir, what="import destination", sources=[src, recipe_path], replace=force)
    config, sd = read_peft_folder(src)
    recipe = untrusted(load_recipe(recipe_path, overrides) if recipe_path else recipe_from_peft(src, overrides),
                       trust_remote_code)
    check_paths(run_dir, what="import destination", sources=local_inputs(recipe))
    label_names = recipe.data.label_names
    if recipe.model.task == "classification" and not recipe.model.num_labels and not label_names:
        recipe.model.num_labels = head_rows(sd)
    recipe.init_from = None
    built = build(recipe, pick_device("cpu"), label_names=label_names, trust_remote_code=trust_remote_code)
    load_peft_weights(built.model, built.arch, built.spec, recipe, src,
                      where=f"{src} (read with --recipe {recipe_path})" if recipe_path else str(src))
    recipe.output.dir = str(run_dir)
    budget = trainable_summary(built.model)
    meta = {
        "base_model": anchor_path(recipe.model.name),
        "task": recipe.model.task,
        "label_names": label_names,
        "trainable": budget["trainable"],
        "total": budget["total"],
        "imported_from": str(src),
        "peft_type": config.get("peft_type"),
        "importer_version": __version__,
    }
    with replacing(run_dir, kind="import") as tmp:
        atomic_file_write(tmp / "recipe.yaml", run_recipe_yaml(recipe))
        save_adapter(tmp / "adapter", built.model, built.spec, built.arch, recipe.method, meta)
    return run_dir


def temporary_run(src: Path, recipe_path: Path | None = None, *, trust_remote_code: bool = False):
    """A context manager yielding a throw-away run folder imported from a PEFT folder."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        with tempfile.TemporaryDirectory(prefix="peftcli-import-") as tmp:
            yield import_peft(src, Path(tmp) / "run", recipe_path=recipe_path, trust_remote_code=trust_remote_code)

    return cm()
