"""`peftcli export` and `peftcli import-peft`: run folders to and from HF PEFT adapter folders.

The format itself (names, configs, each method's twin) is peftcli/runs/peft_format.py, a library layer;
these commands add the folders: which may be written or replaced, and what a new run holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from peftcli.config.recipe import Recipe, load_recipe, recipe_yaml
from peftcli.core.errors import CheckpointError
from peftcli.core.peft_layout import Layout
from peftcli.methods.attach import attach_method, pick_device, trainable_summary
from peftcli.models.meta import meta_model, misfits
from peftcli.runs.load import build, open_run
from peftcli.runs.lock import hold, writes_folders
from peftcli.runs.peft_format import (
    export_model,
    head_rows,
    peft_type_for,
    read_peft_folder,
    recipe_from_peft,
)


def _refuse_edited_recipe(model: nn.Module, sd: dict[str, torch.Tensor], adapter_dir: Path, recipe_path: Path) -> None:
    """The saved tensors must fit the recipe the export describes: a recipe edited after training
    (another rank, other targets) would otherwise wrap old tensors in a config that lies about them."""
    for k, shape, want in misfits(dict(model.named_parameters()), sd):
        if want is not None:  # a tensor the recipe does not build is the exporter's to refuse
            raise CheckpointError(
                f"{adapter_dir}: {k} has shape {shape}, but {recipe_path} describes {want}; "
                "the recipe was changed after training: restore it or retrain"
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
    recipe, sd, labels = saved.recipe, saved.state, saved.meta.get("label_names")
    model = meta_model(recipe.model.name, recipe.model.task, num_labels=len(labels) if labels else recipe.model.num_labels,
                       attn_implementation=recipe.model.attn_implementation, trust_remote_code=trust_remote_code)
    arch, spec = attach_method(model, recipe.method_name, recipe.method, train_pooler=recipe.model.train_pooler)
    _refuse_edited_recipe(model, sd, saved.adapter_dir, saved.recipe_file)
    with replacing(dest, kind="export") as tmp:
        return export_model(model, arch, spec, recipe, sd, tmp)


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
    from peftcli.runs.folder import check_destination, check_paths, local_inputs, replacing
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
    recipe.init_from = str(src)
    built = build(recipe, pick_device("cpu"), label_names=label_names, trust_remote_code=trust_remote_code)
    recipe.init_from = None
    recipe.output.dir = str(run_dir)
    budget = trainable_summary(built.model)
    meta = {
        "base_model": recipe.model.name,
        "task": recipe.model.task,
        "label_names": label_names,
        "trainable": budget["trainable"],
        "total": budget["total"],
        "imported_from": str(src),
        "peft_type": config.get("peft_type"),
        "importer_version": __version__,
    }
    with replacing(run_dir, kind="import") as tmp:
        atomic_file_write(tmp / "recipe.yaml", recipe_yaml(recipe))
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
