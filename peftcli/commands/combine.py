"""`peftcli combine`: trained runs of one method on one base model into one new run.

The method decides how its tensors combine (`MethodSpec.combine`, e.g. LoRA's `linear`, `cat`,
`svd`, TIES, DARE; parameter averaging for IA³, bottleneck adapters and KronA); this module is
the command above it. It checks that the runs can be combined at all (one base model, one task,
one method, the same adapted modules), hands the method its tensors without the task heads, and
writes an ordinary run folder: recipe.yaml (the head run's recipe with the method options the
combined tensors need, e.g. `cat` adds the ranks), adapter/adapter.safetensors and meta.json.
The folder is rebuilt with `load_run` before it replaces DEST (for a 4-bit base without CUDA,
its tensors are checked against the model built on the meta device), so `eval`, `merge`,
`export` and `generate` take it as they take a trained run.

Task heads. A classification head is trained with, and for, one adapter body and one label set,
so heads are never averaged: the combined run keeps the head of one run (`head_from`, the first
run unless told), with that run's labels and data section, so `peftcli eval` measures that run's
task. Combining the same bodies once per head gives each task its own head over one shared body.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from peftcli.config.recipe import Recipe
from peftcli.core.adapter_files import ADAPTER_FILE, META_FILE
from peftcli.core.adapter_merging import (
    CombineError,
    CombineRequest,
    elects_sign,
    is_random,
    needs_density,
    uses_svd,
)
from peftcli.methods import get_method
from peftcli.methods.attach import pick_device
from peftcli.methods.registry import MethodSpec
from peftcli.models.meta import misfits
from peftcli.runs.load import (
    SavedRun,
    load_run,
    open_run,
    refuse_dropped,
    refuse_edited_recipe,
    run_on_meta,
    same_model,
)
from peftcli.runs.lock import hold, writes_folders
from peftcli.runs.peft_format import is_peft_folder

__all__ = ["combine_runs", "parse_weights"]


def parse_weights(text: str | None, n: int) -> list[float]:
    """`--weights 0.5,0.5`; None gives every run 1/n."""
    if text is None:
        return [1.0 / n] * n
    parts = [p.strip() for p in text.split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise CombineError(f"--weights {text!r}: expected numbers separated by commas, e.g. --weights 0.5,0.5") from None
    if len(weights) != n:
        raise CombineError(f"--weights {text!r} gives {len(weights)} weight(s) for {n} run(s); give one per run")
    if not all(math.isfinite(w) for w in weights):
        raise CombineError(f"--weights {text!r}: every weight must be a finite number")
    if not any(weights):
        raise CombineError(f"--weights {text!r}: all zero, the combined adapter would be zero (the base model); "
                           "give at least one run a weight")
    return weights


def _check_options(how: str | None, density: float | None, majority_sign: str | None, rank: int | None,
                   seed: int | None) -> None:
    """Options that only some rules read are refused with the others, so none is silently ignored."""
    if how is None:
        return
    if needs_density(how):
        if density is None:
            raise CombineError(f"--how {how} prunes each adapter first: give --density, the fraction of entries "
                               "kept (0 < d ≤ 1, e.g. --density 0.5)")
        if not 0 < density <= 1:
            raise CombineError(f"--density {density}: the fraction of entries kept must be in (0, 1]")
    elif density is not None:
        raise CombineError(f"--density applies to ties, dare_* and magnitude_prune, not to --how {how}")
    if majority_sign is not None:
        if not elects_sign(how):
            raise CombineError(f"--majority-sign applies to ties and dare_ties, not to --how {how}")
        if majority_sign not in ("total", "frequency"):
            raise CombineError(f"--majority-sign {majority_sign!r}: use 'total' (sign of the summed values) or "
                               "'frequency' (sign most adapters have)")
    if rank is not None:
        if not uses_svd(how):
            raise CombineError(f"--rank applies to svd and the *_svd rules, not to --how {how}")
        if rank < 1:
            raise CombineError(f"--rank {rank}: the rank of the combined adapter must be at least 1")
    if seed is not None and not is_random(how):
        raise CombineError(f"--seed seeds the random masks of dare_linear and dare_ties, not --how {how}")


def _read_run(folder: Path, trust_remote_code: bool = False) -> SavedRun:
    folder = Path(folder)
    if not (folder / "recipe.yaml").exists() and is_peft_folder(folder):
        raise CombineError(f"{folder} is an HF PEFT adapter folder; turn it into a run first: "
                           f"peftcli import-peft {folder} RUN")

    def combinable(recipe: Recipe) -> None:  # before any weights are read
        spec = get_method(recipe.method_name)
        if spec.combine is None:
            reason = spec.combine_refusal or "it has no rule for combining its adapters"
            raise CombineError(f"{folder}: method {recipe.method_name!r} cannot be combined: {reason}")

    run = open_run(folder, trust_remote_code=trust_remote_code, before_weights=combinable)
    refuse_edited_recipe(run_on_meta(run.recipe, run.meta.get("label_names"))[0], run)
    refuse_dropped(run, "combine", "combine the runs it was made from, then drop layers from the result")
    return run


def _same_target(runs: Sequence[SavedRun]) -> tuple[MethodSpec, str]:
    """One method and one base model for all runs; returns the method's spec and its name."""
    first = runs[0]
    name = first.recipe.method_name
    for r in runs[1:]:
        if r.recipe.method_name != name:
            raise CombineError(f"{r.folder} is a {r.recipe.method_name!r} run and {first.folder} a {name!r} run: "
                               "only adapters of one method combine")
        m, m0 = r.recipe.model, first.recipe.model
        if not same_model(m.name, m0.name) or m.revision != m0.revision:
            raise CombineError(
                f"{r.folder}/recipe.yaml has model.name {m.name!r} (revision {m.revision}) but {first.folder} has "
                f"{m0.name!r} (revision {m0.revision}): adapters of different base models do not combine"
            )
        if m.task != m0.task:
            raise CombineError(f"{r.folder} is a {m.task} run and {first.folder} a {m0.task} run; combine runs of "
                               "one model.task")
    return get_method(name), name


def _parameter_order(recipe: Recipe) -> tuple[list[str], tuple[str, ...], Any]:
    """The names of the tensors the method saves on the recipe's model, in the model's order, the
    name prefixes of its task head, and the model's architecture map. Order matters: a random
    rule draws its masks module by module, as HF PEFT does."""
    model, arch, _ = run_on_meta(recipe, None)
    heads = [n for n, _ in arch.head_modules()]
    pooler = arch.pooler()
    if pooler is not None:
        heads.append(pooler[0])
    spec = get_method(recipe.method_name)
    if spec.export_state is not None:
        order = list(spec.export_state(model, arch, recipe.method))
    else:
        order = [n for n, p in model.named_parameters() if p.requires_grad]
    return order, tuple(f"{h}." for h in heads), arch


def _method_tensors(runs: Sequence[SavedRun], head: SavedRun, order: list[str],
                    heads: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """Each run's tensors minus its task head, in the order of the head run's model; refuses runs
    that adapt other modules than the head run."""
    place = {k: i for i, k in enumerate(order)}
    ref = {k for k in head.state if not k.startswith(heads)}
    states = []
    for r in runs:
        body = {k: v for k, v in r.state.items() if not k.startswith(heads)}
        extra = [k for k in body if k not in ref or k not in place]
        missing = [k for k in ref if k not in body]
        if extra or missing:
            who, other, k = (r.folder, head.folder, extra[0]) if extra else (head.folder, r.folder, missing[0])
            raise CombineError(
                f"{who} has tensor {k} and {other} does not: the runs adapt different modules (method targets, "
                "layers or leave_out) or keep different tensors per module (a LoRA run with a PiSSA/OLoRA start keeps "
                "it, method.init); combine runs that adapt the same modules alike"
            )
        states.append({k: body[k] for k in sorted(body, key=place.__getitem__)})
    return states


def _base_weights(recipe: Recipe, label_names: list[str] | None) -> Callable[[str], torch.Tensor]:
    """path -> the frozen base layer's (out, in) weight, loading the base model on first use."""
    loaded: list[torch.nn.Module] = []

    def get(path: str) -> torch.Tensor:
        from peftcli.core.arch import dense_weight
        from peftcli.models.loading import load_base_model

        if not loaded:
            m = recipe.model
            loaded.append(load_base_model(
                m.name, m.task, num_labels=m.num_labels or (len(label_names) if label_names else None),
                revision=m.revision, trust_remote_code=m.trust_remote_code, label_names=label_names,
            ))
        return dense_weight(loaded[0].get_submodule(path)).detach().float()

    return get


def _check_written(recipe: Recipe, label_names: list[str] | None, state: dict[str, torch.Tensor]) -> None:
    """The written tensors are exactly the trainable parameters the recipe builds, shape for shape,
    on a model built on the meta device: the check for a 4-bit base, which loads only on CUDA."""
    model, _, _ = run_on_meta(recipe, label_names)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = misfits(params, state)
    if bad:
        k, shape, want = bad[0]
        raise CombineError(f"internal: combined tensor {k} {shape} does not fit the recipe "
                           f"({'no such parameter' if want is None else f'shape {want}'})")
    missing = [n for n in params if n not in state]
    if missing:
        raise CombineError(f"internal: the combined adapter lacks {missing[0]}")


def _shown(weights: Sequence[float]) -> str:
    return "--weights " + ",".join(f"{w:g}" for w in weights)


def _check_finite_inputs(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], runs: Sequence[str]) -> None:
    """Refuse before any rule runs when a run's tensors, scaled by its weight, leave float32's
    range: every rule would write NaN/inf (and an SVD would fail on them with linalg's own error)."""
    for state, w, run in zip(states, weights, runs, strict=True):
        for k, t in state.items():
            if not bool(torch.isfinite(t.float() * w).all()):
                raise CombineError(
                    f"{_shown(weights)}: {run}'s {k} times {w:g} is not a finite number (beyond float32's range); "
                    "nothing was written. Use smaller weights")


def _check_finite_result(state: dict[str, torch.Tensor], weights: Sequence[float]) -> None:
    """A combined adapter with a non-finite tensor is never written: it would load, and then
    generate nothing (or score NaN) without a word."""
    bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CombineError(f"{_shown(weights)}: the combined adapter's {bad} is not finite (the weighted sum leaves "
                           "float32's range); nothing was written. Use smaller weights")


def _changed_options(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    a, b = dataclasses.asdict(before), dataclasses.asdict(after)
    return {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}


def _head_index(read: list[SavedRun], head_from: str | Path | None) -> int:
    """Which of the runs gives the task head, labels and data section: --head-from, or the first."""
    if head_from is None:
        return 0
    target = Path(head_from).resolve()
    found = [i for i, r in enumerate(read) if r.folder.resolve() == target]
    if not found:
        raise CombineError(f"--head-from {head_from} is not one of the runs being combined; name one of them")
    return found[0]


def _combined_meta(head_meta: dict, name: str, state: dict[str, torch.Tensor], params: int,
                   record: dict) -> dict[str, Any]:
    """The head run's meta.json, less what described its own adapter, with the combined one's counts."""
    from peftcli import __version__

    meta = {k: v for k, v in head_meta.items() if k not in ("disabled_modules", "drop", "combine")}
    meta.update({"method": name, "peftcli_version": __version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "tensors": len(state), "adapter_parameters": params, "combine": record})
    if isinstance(meta.get("trainable"), int) and isinstance(meta.get("total"), int):
        meta["total"] = meta["total"] - meta["trainable"] + params
        meta["trainable"] = params
    return meta


def _write_combined(dest: Path, state: dict[str, torch.Tensor], name: str, meta: dict, recipe: Recipe,
                    label_names: list[str] | None, trust_remote_code: bool = False) -> None:
    """Write the combined run; it must rebuild (or, for a 4-bit base without CUDA, fit shape for
    shape) before it replaces DEST."""
    from safetensors.torch import save_file

    from peftcli.runs.folder import replacing, run_recipe_yaml

    # Written beside DEST and rebuilt there: a folder that does not load never replaces the old one.
    with replacing(dest, kind="combine") as tmp:
        (tmp / "adapter").mkdir()
        save_file(state, str(tmp / "adapter" / ADAPTER_FILE), metadata={"format": "pt", "method": name})
        (tmp / "adapter" / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / "recipe.yaml").write_text(run_recipe_yaml(recipe))
        _check_written(recipe, label_names, state)
        if recipe.model.quantization != "nf4" or torch.cuda.is_available():
            load_run(tmp, pick_device("auto" if recipe.model.quantization == "nf4" else "cpu"),
                     trust_remote_code=trust_remote_code)


@writes_folders
def combine_runs(
    runs: Sequence[str | Path],
    dest: str | Path,
    *,
    weights: Sequence[float],
    how: str | None,
    density: float | None = None,
    majority_sign: str | None = None,
    rank: int | None = None,
    seed: int | None = None,
    head_from: str | Path | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Combine the adapters of `runs` and write the result as a run folder at `dest`; returns a report.
    `trust_remote_code` is the command line's flag (the runs' recipes are never trusted to run code)."""
    from peftcli.runs.folder import check_destination, local_inputs

    if not runs:
        raise CombineError("name at least one run to combine")
    if len(weights) != len(runs):
        raise CombineError(f"{len(weights)} weight(s) for {len(runs)} run(s); give one per run")
    _check_options(how, density, majority_sign, rank, seed)
    read = [_read_run(Path(r), trust_remote_code) for r in runs]
    spec, name = _same_target(read)
    if how is None or how not in spec.combine_hows:
        given = "no --how" if how is None else f"--how {how}"
        raise CombineError(f"{given}: {name} adapters combine by " + ", ".join(spec.combine_hows)
                           + f" (e.g. --how {spec.combine_hows[0]})")
    head = read[_head_index(read, head_from)]
    dest = Path(dest)
    hold(dest, what="combine destination",
         sources=[*(r.folder for r in read), *(p for r in read for p in local_inputs(r.recipe))])
    check_destination(dest, what="combine destination", replace=force,
                      sources=[*(r.folder for r in read), *(p for r in read for p in local_inputs(r.recipe))])

    order, heads, arch = _parameter_order(head.recipe)
    states = _method_tensors(read, head, order, heads)
    label_names = head.meta.get("label_names")
    req = CombineRequest(
        states=states, weights=list(weights), how=how, cfgs=[r.recipe.method for r in read],
        runs=[str(r.folder) for r in read], method=name, density=density,
        majority_sign=majority_sign or "total", rank=rank,
        generator=torch.Generator().manual_seed(0 if seed is None else seed) if is_random(how) else None,
        base_weight=_base_weights(head.recipe, label_names), arch=arch,
    )
    _check_finite_inputs(states, list(weights), [str(r.folder) for r in read])
    result = spec.combine(req)

    head_state = {k: v for k, v in head.state.items() if k.startswith(heads)}
    state = {k: v.contiguous() for k, v in {**result.state, **head_state}.items()}
    _check_finite_result(state, list(weights))
    recipe = dataclasses.replace(head.recipe, method=result.config, init_from=None, source=None)
    recipe.output = dataclasses.replace(recipe.output, dir=str(dest))
    record = {
        "runs": [str(r.folder) for r in read], "weights": list(weights), "how": how,
        "density": density, "majority_sign": (majority_sign or "total") if elects_sign(how) else None,
        "rank": rank,
        "seed": (0 if seed is None else seed) if is_random(how) else None,
        "head_from": str(head.folder), "notes": result.notes,
    }
    params = int(sum(v.numel() for v in state.values()))
    meta = _combined_meta(head.meta, name, state, params, record)
    _write_combined(dest, state, name, meta, recipe, label_names, trust_remote_code)

    return {
        "dest": str(dest), "method": name, "how": how, "runs": record["runs"], "weights": list(weights),
        "head_from": str(head.folder) if head_state else None, "task": head.recipe.model.task,
        "changed": _changed_options(head.recipe.method, result.config), "tensors": len(state),
        "parameters": params, "notes": result.notes,
    }
