"""`peftcli export` and `peftcli import-peft`: run folders to and from HF PEFT adapter folders.

The format itself (names, configs, each method's twin) is peftcli/runs/peft_format.py, a library layer;
these commands add the folders: which may be written or replaced, and what a new run holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from peftcli.config.recipe import load_recipe
from peftcli.core.errors import CheckpointError
from peftcli.methods.attach import attach_method
from peftcli.runs.checkpoint import find_run_adapter, read_adapter
from peftcli.runs.lock import hold, writes_folders
from peftcli.runs.peft_format import (
    Layout,
    export_model,
    head_rows,
    peft_type_for,
    read_peft_folder,
    recipe_from_peft,
)


def _meta_model(recipe, label_names: list[str] | None) -> nn.Module:
    """The base model's structure without its weights."""
    from peftcli.models.loading import auto_class, load_config

    config = load_config(recipe.model.name)
    if recipe.model.task == "classification":
        config.num_labels = len(label_names) if label_names else (recipe.model.num_labels or 2)
    config._attn_implementation = recipe.model.attn_implementation
    from peftcli.core.quiet import quiet_libraries

    with torch.device("meta"), quiet_libraries():
        return auto_class(recipe.model.task).from_config(config)


def _check_shapes(model: nn.Module, sd: dict[str, torch.Tensor], adapter_dir: Path, recipe_path: Path) -> None:
    """The saved tensors must fit the recipe the export describes: a recipe edited after training
    (another rank, other targets) would otherwise wrap old tensors in a config that lies about them."""
    params = dict(model.named_parameters())
    for k, v in sd.items():
        p = params.get(k)
        if p is not None and tuple(p.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{adapter_dir}: {k} has shape {tuple(v.shape)}, but {recipe_path} describes {tuple(p.shape)}; "
                "the recipe was changed after training: restore it or retrain"
            )


@writes_folders
def export_run(run: Path, dest: Path, *, force: bool = False) -> Layout:
    """`peftcli export RUN --to peft DEST`."""
    from peftcli.runs.folder import check_destination, local_inputs, replacing

    run, dest = Path(run), Path(dest)
    if not (run / "recipe.yaml").exists():
        raise CheckpointError(f"{run}: not a run folder (no recipe.yaml); pass the folder `peftcli train` wrote")
    recipe = load_recipe(run / "recipe.yaml")
    peft_type_for(recipe.method_name)  # refuse before any work
    hold(dest, what="export destination", sources=[run, *local_inputs(recipe)])
    check_destination(dest, what="export destination", sources=[run, *local_inputs(recipe)], replace=force)
    from peftcli.runs.load import check_adapter_matches

    adapter_dir = find_run_adapter(run)
    sd, meta = read_adapter(adapter_dir)
    check_adapter_matches(recipe, meta, adapter_dir, str(run / "recipe.yaml"))
    model = _meta_model(recipe, meta.get("label_names"))
    arch, spec = attach_method(model, recipe.method_name, recipe.method, train_pooler=recipe.model.train_pooler)
    _check_shapes(model, sd, adapter_dir, run / "recipe.yaml")
    with replacing(dest, kind="export") as tmp:
        return export_model(model, arch, spec, recipe, sd, tmp)


# ------------------------------------------------------------------------------ import


@writes_folders
def import_peft(src: Path, run_dir: Path, *, recipe_path: Path | None = None,
                overrides: list[str] | None = None, force: bool = False) -> Path:
    """Turn a PEFT adapter folder into a peftcli run folder (then eval, merge, generate, export work)."""
    from peftcli import __version__
    from peftcli.config.recipe import load_recipe, recipe_yaml
    from peftcli.methods.attach import pick_device, trainable_summary
    from peftcli.runs.checkpoint import atomic_file_write, save_adapter
    from peftcli.runs.folder import check_destination, check_paths, local_inputs, replacing
    from peftcli.runs.load import build

    src, run_dir = Path(src), Path(run_dir)
    hold(run_dir, what="import destination", sources=[src, recipe_path])
    check_destination(run_dir, what="import destination", sources=[src, recipe_path], replace=force)
    config, sd = read_peft_folder(src)
    recipe = load_recipe(recipe_path, overrides) if recipe_path else recipe_from_peft(src, overrides)
    check_paths(run_dir, what="import destination", sources=local_inputs(recipe))
    label_names = recipe.data.label_names
    if recipe.model.task == "classification" and not recipe.model.num_labels and not label_names:
        recipe.model.num_labels = head_rows(sd)
    recipe.init_from = str(src)
    built = build(recipe, pick_device("cpu"), label_names=label_names)
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


def temporary_run(src: Path, recipe_path: Path | None = None):
    """A context manager yielding a throw-away run folder imported from a PEFT folder."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        with tempfile.TemporaryDirectory(prefix="peftcli-import-") as tmp:
            yield import_peft(src, Path(tmp) / "run", recipe_path=recipe_path)

    return cm()
