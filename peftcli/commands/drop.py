"""`peftcli drop`: switch adapters off in chosen layers of a run, measure, write a new run.

The switch itself (AdapterDrop, Rücklé et al. 2021) is `core.switch`; this module is the command
above it. A dropped run is an ordinary run folder whose adapter meta.json lists the switched-off
modules (`disabled_modules`); `runs.load.load_run` switches them off again after loading, so
`peftcli eval` and a further `peftcli drop` see the dropped model. The adapter file is copied
unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.config.recipe import Recipe
from peftcli.core.adapter_files import find_run_adapter
from peftcli.core.arch import Arch
from peftcli.core.errors import BadInput, CheckpointError
from peftcli.core.switch import (
    disable_layers,
    disabled_modules,
    dropped_layers,
    flags,
    set_flags,
)
from peftcli.inference.evaluate import evaluate
from peftcli.methods.attach import pick_device
from peftcli.methods.fusion import (
    attention_table,
    fusion_sites,
    prune,
    read_sources,
    record_attention,
    source_names,
)
from peftcli.methods.targets import parse_layers
from peftcli.runs.load import collator, load_run, prepare_data
from peftcli.runs.lock import hold, writes_folders
from peftcli.runs.state import is_trainer_state


class DropError(BadInput, ValueError):
    """Bad drop request: exit 2 at the command line."""


# ------------------------------------------------------------------------ measuring


def timed_eval(model: nn.Module, examples: list[dict], collate, *, task: str, device: torch.device,
               batch_size: int, precision: str, num_labels: int | None) -> tuple[dict[str, Any], float]:
    """Metrics and examples per second of one pass over `examples` (fixed batches, no shuffling)."""
    t = time.perf_counter()
    m = evaluate(model, examples, collate, task=task, device=device, batch_size=batch_size,
                 precision=precision, num_labels=num_labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return m, len(examples) / max(time.perf_counter() - t, 1e-9)


def compare(model: nn.Module, states: dict[str, dict[str, bool]], examples: list[dict], collate, *,
            repeats: int = 1, **kw: Any) -> dict[str, dict[str, Any]]:
    """Evaluate the model under each flag state on the same batches, alternating the states
    `repeats` times (in reverse order every other time) so that load from other processes hits
    them alike; speed is the median. An untimed pass first: the first time a batch shape is seen
    costs extra (kernel and buffer set-up), which would otherwise count against the first state."""
    set_flags(model, next(iter(states.values())))
    evaluate(model, examples, collate, **kw)
    out: dict[str, dict[str, Any]] = {}
    speeds: dict[str, list[float]] = {k: [] for k in states}
    for r in range(max(1, repeats)):
        for name, state in list(states.items())[:: -1 if r % 2 else 1]:
            set_flags(model, state)
            m, eps = timed_eval(model, examples, collate, **kw)
            out.setdefault(name, m)
            speeds[name].append(eps)
    for name in states:
        out[name]["examples_per_s"] = statistics.median(speeds[name])
    return out


# ------------------------------------------------------------------------ dropping a run


def _span(layers: list[int]) -> str:
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return "_".join(map(str, layers))


@writes_folders
def drop_run(
    run: str | Path,
    dest: str | Path | None = None,
    *,
    layers: str | None = None,
    lowest: int | None = None,
    prune_fusion: int | None = None,
    limit: int | None = None,
    repeats: int = 1,
    device: str = "cpu",
    force: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Drop adapters from layers (and/or prune a fused run's sources), measure, write a new run.
    `trust_remote_code` is the command line's flag (the run's recipe is never trusted to run code)."""
    if layers is None and lowest is None and prune_fusion is None:
        raise DropError("say what to drop: --layers 0-4, --lowest N, or --prune-fusion K")
    if layers is not None and lowest is not None:
        raise DropError("--layers and --lowest both choose layers; give one")
    run = Path(run)
    dev = pick_device(device)
    built, meta = load_run(run, dev, trust_remote_code=trust_remote_code)
    model, arch, rec = built.model, built.arch, built.recipe
    chosen = _chosen_layers(layers, lowest, arch.num_layers)
    if prune_fusion is not None:
        if not fusion_sites(model):
            raise DropError(f"--prune-fusion: {run} is a {built.spec.name} run, not a fused one")
        if prune_fusion < 1:
            raise DropError("--prune-fusion K keeps K sources per layer; K must be at least 1")
    dest = _destination(run, dest, chosen, prune_fusion)
    from peftcli.runs.folder import check_destination, local_inputs

    hold(dest, what="drop output", sources=[run, *local_inputs(rec)])
    check_destination(dest, what="drop output", sources=[run, *local_inputs(rec)], replace=force)

    # Measured on validation rows where the recipe has them: what is dropped or pruned is a choice.
    _, _, val, test = prepare_data(rec, built.tokenizer)
    split, examples = ("val", val) if val else ("test", test)
    examples = examples[:limit] if limit else examples
    if not examples:
        raise DropError(f"{run}: the recipe's validation and test rows are empty; nothing to measure on")
    collate = collator(rec, built.tokenizer)
    kw = dict(task=rec.model.task, device=dev, batch_size=rec.eval.batch_size, precision=rec.train.precision,
              num_labels=len(built.label_names or []) or None)

    before = flags(model)
    switched, attention = _switch_off(model, arch, rec, chosen, prune_fusion, examples, collate, kw)
    after = flags(model)
    result = compare(model, {"before": before, "after": after}, examples, collate, repeats=repeats, **kw)
    set_flags(model, after)

    off = disabled_modules(model)
    drop_info = {"layers": dropped_layers(model, arch), "prune_fusion": prune_fusion, "from": str(run)}
    report = {
        "run": str(run), "dest": str(dest), "examples": len(examples), "split": split, "layers_dropped": drop_info["layers"],
        "modules_switched_off": switched, "disabled_modules": off, "before": result["before"],
        "after": result["after"], "attention": attention, "device": str(dev), "repeats": repeats,
    }
    new_meta = {**meta, "disabled_modules": off, "drop": drop_info}
    report["reload_max_diff"] = _write_dropped_run(run, dest, new_meta, rec, report, model, examples[:32], collate, dev,
                                                  trust_remote_code)
    return report


def _chosen_layers(layers: str | None, lowest: int | None, n: int) -> list[int]:
    """The layers `--layers` or `--lowest` names, for a model of `n` layers."""
    chosen = parse_layers(layers, n, "--layers") if layers is not None else []
    if layers is not None and not chosen:  # "" or a reversed range such as 5-2
        raise DropError(f"--layers {layers!r} names no layer; write layers as 0-4 or 0,2,5 (low to high)")
    if lowest is not None:
        if not 1 <= lowest <= n:
            raise DropError(f"--lowest {lowest}: give 1 to {n}, the number of layers to drop adapters from")
        chosen = list(range(lowest))
    return chosen


def _destination(run: Path, dest: str | Path | None, chosen: list[int], prune_fusion: int | None) -> Path:
    """--out, or a sibling of the run named for what was dropped (RUN-drop-layers0-3-fusion2)."""
    tag = "-".join(([f"layers{_span(chosen)}"] if chosen else [])
                   + ([f"fusion{prune_fusion}"] if prune_fusion is not None else [])) or "none"
    real = Path(os.path.realpath(run))  # `drop .` names the sibling after the folder itself
    dest = Path(dest) if dest is not None else real.with_name(f"{real.name}-drop-{tag}")
    if dest.resolve() == run.resolve():
        raise DropError("the dropped run needs its own folder; choose another --out")
    return dest


def _switch_off(model: nn.Module, arch: Arch, rec: Recipe, chosen: list[int], prune_fusion: int | None,
                examples: list[dict], collate, kw: dict[str, Any]) -> tuple[int, dict | None]:
    """Switch off the chosen layers' adapters and prune the fusion sources; returns the number of
    modules switched off and, when pruning, the attention per layer measured before it."""
    before = flags(model)
    attention = None
    switched = disable_layers(model, arch, chosen)
    if prune_fusion is not None:
        set_flags(model, before)  # attention is measured on the model as it was
        record_attention(model, True)
        timed_eval(model, examples, collate, **kw)
        record_attention(model, False)
        names = source_names(read_sources(rec.method))
        attention = attention_table(model, names)
        disable_layers(model, arch, chosen)
        switched += len(prune(model, prune_fusion))
    return switched, attention


def _write_dropped_run(run: Path, dest: Path, new_meta: dict, rec: Recipe, report: dict, model: nn.Module,
                       check: list[dict], collate, dev: torch.device, trust_remote_code: bool = False) -> float:
    """Write the dropped run to DEST; returns the largest logit difference of the run reloaded
    from it on the `check` examples, which must rebuild the dropped model."""
    from peftcli.runs.folder import replacing, run_recipe_yaml

    src_adapter = find_run_adapter(run)
    # Written beside DEST and checked there: a run that does not rebuild never replaces the old one.
    with replacing(dest, kind="drop") as tmp:
        (tmp / "adapter").mkdir()
        for f in src_adapter.iterdir():
            if f.is_file() and not f.is_symlink() and not is_trainer_state(f.name):  # never what a link points at
                shutil.copy2(f, tmp / "adapter" / f.name)
        (tmp / "adapter" / "meta.json").write_text(json.dumps(new_meta, indent=2))
        rec.output.dir = str(dest)
        (tmp / "recipe.yaml").write_text(run_recipe_yaml(rec))
        (tmp / "drop.json").write_text(json.dumps(report, indent=2))

        # The written run must rebuild the dropped model: same outputs on a few examples.
        reloaded, _ = load_run(tmp, dev, trust_remote_code=trust_remote_code)
        with torch.no_grad():
            b = collate(check)
            b = {k: v.to(dev) for k, v in b.items() if k != "labels"}
            model.eval()
            reloaded.model.eval()
            diff = float((model(**b).logits.float() - reloaded.model(**b).logits.float()).abs().max())
        if diff > 1e-4:
            raise CheckpointError(f"{dest}: reloading the dropped run changes the outputs (max diff {diff:.2e})")
    return diff


__all__ = ["DropError", "compare", "drop_run", "timed_eval"]
