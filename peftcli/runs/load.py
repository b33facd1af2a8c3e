"""Glue between a recipe and live objects: model + method + tokenizer + data, or a saved run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.config.recipe import Recipe, RecipeError, load_recipe
from peftcli.core.adapter_files import (
    ADAPTER_FILE,
    find_run_adapter,
    read_adapter,
    read_run_recipe,
    run_recipe_file,
)
from peftcli.core.arch import Arch
from peftcli.core.arch import resolve as resolve_arch
from peftcli.core.errors import CheckpointError, DataError
from peftcli.core.precision import resolve_dtype
from peftcli.core.switch import apply_recorded
from peftcli.data.batching import Collator
from peftcli.data.packing import PackEachBatch
from peftcli.data.preference import (
    KTOCollator,
    PairCollator,
    add_mismatched,
    load_preference_splits,
    tokenize_preference,
)
from peftcli.data.splits import Splits, load_splits, malformed_summary
from peftcli.data.tokenize import Untrained, check_trained, tokenize
from peftcli.methods import get_method
from peftcli.methods.attach import attach_method, check_qlora_possible
from peftcli.methods.registry import MethodSpec
from peftcli.methods.targets import TargetError
from peftcli.models.loading import FLAG_HINT, RECIPE_HINT, load_base_model, load_tokenizer
from peftcli.models.meta import meta_model, misfits
from peftcli.runs.checkpoint import load_adapter_state


@dataclass
class Built:
    recipe: Recipe
    model: nn.Module
    arch: Arch
    spec: MethodSpec
    tokenizer: Any
    label_names: list[str] | None


def base_model(recipe: Recipe, device: torch.device, label_names: list[str] | None = None,
               trust_remote_code: bool | None = None) -> tuple[nn.Module, Any]:
    """The recipe's base model on `device` (nothing attached) and its tokenizer.

    `trust_remote_code` None takes the recipe's `model.trust_remote_code`: only for the user's own
    recipe (`train`). Whatever reads a run or adapter folder passes the command line's
    --trust-remote-code instead, so a saved recipe can never make peftcli run a model's code.
    """
    if recipe.model.quantization == "nf4":
        check_qlora_possible(recipe.method_name, device, recipe.method)
    trust, hint = ((recipe.model.trust_remote_code, RECIPE_HINT) if trust_remote_code is None
                   else (trust_remote_code, FLAG_HINT))
    tok = load_tokenizer(recipe.model.name, trust_remote_code=trust, hint=hint)
    dtype = resolve_dtype(recipe.model.dtype, device)
    model = load_base_model(
        recipe.model.name,
        recipe.model.task,
        num_labels=head_size(recipe, label_names),
        dtype=dtype,
        attn_implementation=recipe.model.attn_implementation,
        quantization=recipe.model.quantization,
        revision=recipe.model.revision,
        trust_remote_code=trust,
        label_names=label_names,
        hint=hint,
    )
    if recipe.model.quantization != "nf4":
        model.to(device)
    if model.config.pad_token_id is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def head_size(recipe: Recipe, label_names: list[str] | None) -> int | None:
    """A classifier's outputs: one per class name where the run has them (transformers sizes the
    head by the names it is given), else the recipe's model.num_labels; None lets the model's
    config decide. The data check keeps the two equal where both are set (`data.splits`)."""
    return len(label_names) if label_names else recipe.model.num_labels


def run_on_meta(recipe: Recipe, label_names: list[str] | None) -> tuple[nn.Module, Arch, MethodSpec]:
    """A saved run's model with its method attached on the meta device, no weights read: the names
    and shapes its adapter must fit. The recipe is the run's (`open_run`), whose
    model.trust_remote_code is the command line's flag."""
    m = recipe.model
    model = meta_model(m.name, m.task, num_labels=head_size(recipe, label_names),
                       attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)
    arch, spec = attach_recipe(model, recipe)
    return model, arch, spec


def attach_recipe(model: nn.Module, recipe: Recipe) -> tuple[Arch, MethodSpec]:
    """The recipe's method attached to `model`. Targets or layers the model does not have are a
    recipe problem that only the model could show, so they are reported like one: the recipe file,
    the key and the fix."""
    try:
        return attach_method(model, recipe.method_name, recipe.method, train_pooler=recipe.model.train_pooler)
    except TargetError as e:
        raise RecipeError(recipe.source or "recipe", [str(e)]) from None


def check_positions(arch: Arch, recipe: Recipe) -> None:
    """data.max_length within the model's position table (`train` and `validate`): beyond it, the
    first long example stops training mid-epoch with torch's words."""
    limit = arch.position_limit()
    if limit is not None and recipe.data.max_length > limit:
        raise RecipeError(recipe.source or "recipe", [
            f"data.max_length: {recipe.data.max_length} tokens, but {recipe.model.name} reads at most {limit} "
            f"(its position table); set data.max_length: {limit} or less"])


def build(recipe: Recipe, device: torch.device, *, label_names: list[str] | None = None,
          trust_remote_code: bool | None = None) -> Built:
    """Base model with the recipe's method attached (fresh adapter weights), on `device`;
    `trust_remote_code` as for `base_model`."""
    get_method(recipe.method_name)  # an unknown method is refused before the base model loads
    model, tok = base_model(recipe, device, label_names, trust_remote_code)
    arch, spec = attach_recipe(model, recipe)
    check_positions(arch, recipe)
    # Adapter weights follow the base's device; their dtype is float32 on CPU and the base dtype
    # under CUDA autocast.
    model.to(device)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if recipe.init_from:
        load_initial_adapter(model, arch, spec, recipe)
    return Built(recipe=recipe, model=model, arch=arch, spec=spec, tokenizer=tok, label_names=label_names)


def load_initial_adapter(model: nn.Module, arch: Arch, spec: MethodSpec, recipe: Recipe) -> None:
    """`init_from:` a peftcli run/adapter folder or an HF PEFT adapter folder."""
    src = Path(recipe.init_from)
    if (src / "adapter_config.json").exists():
        from peftcli.runs.peft_format import load_peft_weights

        load_peft_weights(model, arch, spec, recipe, src)
        return
    adapter_dir = find_run_adapter(src)
    sd, meta = read_adapter(adapter_dir)
    check_adapter_matches(recipe, meta, adapter_dir, None)
    load_adapter_state(model, spec, arch, recipe.method, sd, f"init_from {adapter_dir / ADAPTER_FILE}")


def same_model(a: str, b: str) -> bool:
    """The same hub id, or two spellings of one local folder."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_adapter_matches(recipe: Recipe, meta: dict, adapter_dir: Path, recipe_file: str | None) -> None:
    """Refuse an adapter saved for another method or base model before loading it.

    Tensor names often still line up across base models of one family, so loading would "work" and
    give a silently wrong model; across methods it fails deep in load_state with no hint of why.
    `recipe_file` is the run's recipe.yaml; None means the adapter is the recipe's `init_from`.
    """
    holder = recipe_file or "the recipe"
    diffs, fixes = [], []
    saved_method, saved_base = meta.get("method"), meta.get("base_model")
    if saved_method is not None and saved_method != recipe.method_name:
        diffs.append(f"method {saved_method!r}, but {holder} has method.name {recipe.method_name!r}")
        fixes.append(f"method.name: {saved_method}")
    if saved_base is not None and not same_model(saved_base, recipe.model.name):
        diffs.append(f"base model {saved_base!r}, but {holder} has model.name {recipe.model.name!r}")
        fixes.append(f"model.name: {saved_base}")
    if not diffs:
        return
    meta_file = Path(adapter_dir) / "meta.json"
    if recipe_file is None:
        raise CheckpointError(
            f"init_from: {meta_file}: the adapter was trained with {'; and '.join(diffs)}; point init_from at an "
            f"adapter of method {recipe.method_name!r} on {recipe.model.name!r}, or set {' and '.join(fixes)}"
        )
    raise CheckpointError(
        f"{meta_file}: the adapter was trained with {'; and '.join(diffs)}; "
        f"restore {' and '.join(fixes)} in {recipe_file}, or train a new run"
    )


# A smoke run scores 16 validation and 16 test rows (the first ones truncation leaves with something
# to score): it tokenizes this many of each, in training and again when it reloads the run.
SMOKE_SCORED, SMOKE_TOKENIZED = 16, 64


def prepare_data(recipe: Recipe, tokenizer, limits: tuple[int | None, int | None] = (None, None),
                 ) -> tuple[Splits, list[dict], list[dict], list[dict]]:
    """Tokenized training, validation and held-out test examples (unpacked:
    `peftcli.data.packing.pack_for_training` packs them).

    Malformed rows are left out and listed in `splits.malformed`; with data.strict they are refused.
    Examples that truncation leaves with no trained token are left out and counted in `splits.notes`;
    a split left with none is refused. `limits` tokenizes only the first rows of training and of
    validation and test (a smoke run takes a few batches; tokenizing thousands of rows for those
    took longer than its steps).
    """
    cfg = recipe.data
    objective = recipe.train.objective
    splits = (load_splits(cfg, recipe.model.task, recipe.model.num_labels) if objective == "sft"
              else load_preference_splits(cfg, objective))
    task = recipe.model.task
    parts = []
    for role, rows, split, limit in (("training", splits.train, cfg.train_split, limits[0]),
                                     ("validation", splits.val, cfg.val_split or cfg.train_split, limits[1]),
                                     ("test", splits.eval, cfg.eval_split or cfg.train_split, limits[1])):
        rows = rows[:limit]
        untrained: list[Untrained] = []
        if objective == "sft":
            parts.append(tokenize(rows, tokenizer, task, cfg, split=split, malformed=splits.malformed,
                                  untrained=untrained))
        else:
            parts.append(tokenize_preference(rows, tokenizer, cfg, split=split, malformed=splits.malformed,
                                             untrained=untrained))
            if objective == "kto":
                add_mismatched(parts[-1], cfg.max_length)
        if note := check_trained(role, parts[-1], untrained, cfg):
            splits.notes.append(note)
    train, val, test = parts
    if splits.malformed and cfg.strict:
        raise DataError(f"data.strict: {cfg.source}: {malformed_summary(splits.malformed).replace(' skipped', '')}; "
                        "fix or remove those rows, or set data.strict: false to skip them")
    if not train:
        raise DataError(f"data: no training rows left in {cfg.source} ({malformed_summary(splits.malformed)})")
    return splits, train, val, test


def collator(recipe: Recipe, tokenizer) -> Collator | PairCollator | KTOCollator:
    """Evaluation's batches (never packed), and training's unless data.packing is "batch"."""
    if recipe.train.objective == "kto":
        return KTOCollator(tokenizer.pad_token_id)
    if recipe.train.objective != "sft":
        return PairCollator(tokenizer.pad_token_id)
    return Collator(tokenizer.pad_token_id, recipe.model.task)


def train_collator(recipe: Recipe, tokenizer) -> Collator | PackEachBatch:
    base = collator(recipe, tokenizer)
    return PackEachBatch(base, recipe.data.max_length) if recipe.data.packing == "batch" else base


@dataclass
class SavedRun:
    """A run folder as written: its recipe and its kept adapter, checked to belong together."""

    folder: Path
    recipe_file: Path
    recipe: Recipe
    adapter_dir: Path
    state: dict[str, torch.Tensor]
    meta: dict
    init_from: str | None = None  # the adapter the run started from; `recipe.init_from` is cleared


def open_run(run: str | Path, overrides: list[str] | None = None, *, trust_remote_code: bool = False,
             before_weights: Callable[[Recipe], None] | None = None) -> SavedRun:
    """Read a run folder without building a model: every command that takes a run starts here.

    The run's recipe.yaml is never trusted to run code: `trust_remote_code` is the command line's
    --trust-remote-code, whatever the saved `model.trust_remote_code` says.

    `before_weights` sees the recipe before any adapter file is read, to refuse early (a method
    that cannot be combined, a destination that cannot be written).
    """
    run = Path(run)
    recipe_file = run_recipe_file(run)
    recipe = untrusted(load_recipe(recipe_file, overrides), trust_remote_code)
    if before_weights is not None:
        before_weights(recipe)
    init_from, recipe.init_from = recipe.init_from, None  # the saved adapter is the run's weights, not its start
    adapter_dir = find_run_adapter(run)
    state, meta = read_adapter(adapter_dir)
    check_adapter_matches(recipe, meta, adapter_dir, str(recipe_file))
    return SavedRun(run, recipe_file, recipe, adapter_dir, state, meta, init_from)


def load_run(run: str | Path, device: torch.device, overrides: list[str] | None = None, *,
             trust_remote_code: bool = False) -> tuple[Built, dict]:
    """Rebuild a trained run: its recipe, base model, method, and saved adapter weights."""
    saved = open_run(run, overrides, trust_remote_code=trust_remote_code)
    return build_saved(saved, device, trust_remote_code=trust_remote_code), saved.meta


def refuse_edited_recipe(model: nn.Module, saved: SavedRun) -> None:
    """The saved tensors must fit the model the run's recipe builds (`model`, on any device): a
    recipe edited after training (another rank, other targets) would otherwise be read as if it
    described them, wrapped in a config that lies (export) or scaled by the wrong alpha/r (combine)."""
    names = saved.meta.get("label_names")
    heads = tuple(f"{n}." for n, _ in resolve_arch(model).head_modules()) if names else ()
    for k, shape, want in misfits(dict(model.named_parameters()), saved.state):
        if want is None:  # a tensor the recipe does not build is the caller's to refuse
            continue
        if k.startswith(heads) and want[0] == len(names) != shape[0]:  # the head is sized by meta.json's classes
            raise CheckpointError(
                f"{saved.adapter_dir / 'meta.json'}: label_names has {len(names)} classes, but the saved head {k} "
                f"has {shape[0]}; meta.json was changed after training: restore it or retrain")
        raise CheckpointError(
            f"{saved.adapter_dir}: {k} has shape {shape}, but {saved.recipe_file} describes {want}; "
            "the recipe was changed after training: restore it or retrain"
        )


def build_saved(saved: SavedRun, device: torch.device, *, trust_remote_code: bool = False) -> Built:
    """The model of a run `open_run` read (for a command that checked the recipe on the way)."""
    recipe, meta = saved.recipe, saved.meta
    built = build(recipe, device, label_names=meta.get("label_names"), trust_remote_code=trust_remote_code)
    refuse_edited_recipe(built.model, saved)
    load_adapter_state(built.model, built.spec, built.arch, recipe.method, saved.state, saved.adapter_dir / ADAPTER_FILE)
    apply_recorded(built.model, meta)  # a run written by `peftcli drop` lists its switched-off adapters
    return built


def sample_batch(tok, device: torch.device) -> dict[str, torch.Tensor]:
    """Two sentences of different lengths, padded into one batch: the inputs on which merge and
    export --as-lora compare the model they write with the adapter it came from."""
    return tok(["The movie was a delight from start to finish.", "I would not recommend this to anyone."],
               return_tensors="pt", padding=True).to(device)


def peek_recipe(run: str | Path) -> dict[str, dict]:
    """The sections of a run folder's recipe.yaml as plain dicts, read without checks, for a
    command's early choices (mergeable? a preference run?); {} for a section, or for the whole file,
    that cannot be read as one: `open_run` then refuses the file with the reason."""
    try:
        raw = read_run_recipe(Path(run))
    except CheckpointError:
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, dict)}


def untrusted(recipe: Recipe, trust_remote_code: bool) -> Recipe:
    """A recipe read from a run or adapter folder, with `model.trust_remote_code` set to the
    command line's flag: what a folder says is never consent to run code (and a folder written
    from it, by combine or import-peft, records only what the user allowed)."""
    recipe.model.trust_remote_code = bool(trust_remote_code)
    return recipe


def refuse_dropped(saved: SavedRun, command: str, why: str) -> None:
    """A `peftcli drop` run switches adapters off in its meta.json; a command that would write them
    (merged into weights, exported, combined) refuses it rather than ignore the switch."""
    if saved.meta.get("disabled_modules"):
        raise CheckpointError(f"{saved.adapter_dir / 'meta.json'} lists switched-off adapters (a `peftcli drop` run), "
                              f"which {command} would write as if they were on; {why}")


def run_meta(run: Path) -> dict:
    p = find_run_adapter(run) / "meta.json"
    return json.loads(p.read_text()) if p.exists() else {}
