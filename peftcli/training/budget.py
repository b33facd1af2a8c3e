"""Budgeting a method on a model before training: parameters and training memory.

The model is built on PyTorch's meta device: shapes exist, storage does not, so a 70B-sized config
costs no memory. For a local config.json of a family whose shapes follow from the config in
closed form (peftcli.models.skeleton: BERT classification, GPT-2, Llama, Mistral) the model is a
skeleton of plain torch modules, which spares importing transformers and its modelling code (most
of the time otherwise); anything else is built by transformers. Memory is estimated in closed form for what does not depend on the
batch (weights at their dtype, gradients and the optimizer state of the trainable weights: AdamW's
moments, 8-bit or factored ones, or GaLore's projected ones), plus a
rough figure for activations, so that a user can choose between full fine-tuning, LoRA on a
bf16 base and QLoRA before renting a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftcli.config.recipe import Recipe, RecipeError
from peftcli.methods.attach import dense_base_refusal, per_module_table, trainable_summary
from peftcli.models.meta import meta_model

GIB = 1024**3
# Bits per NF4 weight with double quantization (Dettmers et al. 2023): 4 bits, plus one absmax
# per block of 64 stored in 8 bits, plus one float32 constant per 256 of those blocks.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# Activation bytes kept for backward per token, per layer, per unit of hidden size, in 16-bit
# precision with a fused attention kernel (Korthikanti et al. 2022, eq. 1 without the s²·a term
# that an sdpa/flash kernel never stores). Training a frozen base still stores them: the adapter
# gradient of layer i needs the activations of every layer above it.
ACT_BYTES_PER_HIDDEN = 34


# name -> (frozen dense weight bytes, trainable weight bytes, gradient bytes, AdamW bytes) per param.
# torch's AdamW keeps both moments in the parameter's dtype, and peftcli creates adapter weights in
# the base's dtype (bf16 on CUDA by default), so the bf16 rows count 2 + 2 + 4 bytes per trainable
# parameter. QLoRA differs from bf16 only in the frozen linear weights of the layers.
PRECISIONS: dict[str, tuple[float, float, float, float]] = {
    "fp32": (4, 4, 4, 8),
    "bf16 mixed": (2, 2, 2, 4),
    "nf4 QLoRA": (2, 2, 2, 4),
}


def memory_estimate(
    trainable: int, total: int, quantizable: int, *, method: str | None = None, method_cfg: Any = None,
    tokens: int = 0, hidden: int = 0, layers: int = 0,
    optimizer_bytes: Callable[[float], float] | None = None, trained_at_once: int | None = None,
    reference_copy: int = 0,
) -> list[dict]:
    """Bytes for weights, gradients and optimizer state under each precision a user can pick.

    `quantizable` is the number of frozen linear weights an NF4 load turns into 4 bits; every
    other frozen parameter (embeddings, norms, biases, heads) stays in bf16 under QLoRA; the QLoRA
    row is left out where `method` (with `method_cfg`'s options: DoRA, PiSSA) cannot take a 4-bit base.
    `tokens` (batch × sequence length), `hidden` and `layers` give the activation estimate.
    `optimizer_bytes(bytes per trainable weight)` is the optimizer's state (AdamW's two moments
    when None); `trained_at_once` the weights that have gradients at one time (LISA: fewer than
    the trainable ones); `reference_copy` the weights a preference objective keeps a second copy
    of as its reference (the starting weights, at the trainable weights' dtype).
    """
    at_once = trainable if trained_at_once is None else trained_at_once

    frozen = total - trainable
    rows = []
    for name, (fb, tw, g, o) in PRECISIONS.items():
        if name == "nf4 QLoRA":
            if (method is not None and dense_base_refusal(method, method_cfg) is not None) or frozen == 0:
                continue
            weights = quantizable * NF4_BITS / 8 + (frozen - quantizable) * fb + trainable * tw
        else:
            weights = frozen * fb + trainable * tw
        weights += reference_copy * tw
        act_bytes = ACT_BYTES_PER_HIDDEN * (2 if name == "fp32" else 1) * tokens * hidden * layers
        opt = trainable * o if optimizer_bytes is None else optimizer_bytes(tw)
        rows.append({
            "precision": name,
            "weights_gib": weights / GIB,
            "grads_gib": at_once * g / GIB,
            "optimizer_gib": opt / GIB,
            "total_gib": (weights + at_once * g + opt) / GIB,
            "activations_gib": act_bytes / GIB,
        })
    return rows


SKELETON, META = "config.json in closed form", "transformers' model on the meta device"


def count_model(recipe: Recipe):
    """(model on the meta device, what it was built from) for counting: the closed-form skeleton
    where one covers the model, else transformers' own class."""
    from peftcli.models.skeleton import skeleton_model

    skeleton = skeleton_model(recipe.model.name, recipe.model.task, _head_classes(recipe) or 2)
    if skeleton is not None:
        return skeleton, SKELETON
    return _transformers_meta(recipe), META


def _head_classes(recipe: Recipe) -> int | None:
    """The classifier head's outputs as training will size them: model.num_labels, else
    data.label_names, else the classes of a built-in source (a file's are known only once it is
    read: both counting paths then take 2, and `head_guess` says so)."""
    from peftcli.data.sources import BUILTIN_CLASSES

    names = recipe.data.label_names
    return recipe.model.num_labels or (len(names) if names else None) or BUILTIN_CLASSES.get(recipe.data.source)


def head_guess(recipe: Recipe) -> str | None:
    """A note when the classifier head was counted without knowing the classes: training sizes it
    to the classes it finds in the data, which counting does not read."""
    if recipe.model.task != "classification" or _head_classes(recipe) is not None:
        return None
    return (f"the classifier head is counted with 2 classes: model.num_labels is not set, and training takes "
            f"the classes from {recipe.data.source}; set model.num_labels (or data.label_names) to count it exactly")


def _transformers_meta(recipe: Recipe):
    """transformers' own model of the recipe on the meta device. Code shipped with the model runs
    only when the recipe allows it; a recipe read from a run folder has had that key set from the
    command line's flag (`runs.load.untrusted`)."""
    m = recipe.model
    return meta_model(m.name, m.task, num_labels=_head_classes(recipe), attn_implementation=m.attn_implementation,
                      trust_remote_code=m.trust_remote_code)


def method_on_meta(recipe: Recipe):
    """(model, arch, method spec, what the model was built from): the recipe's method attached to
    its model on the meta device, no weights read. Targets or layers the model lacks are refused
    here as `train` would refuse them."""
    from peftcli.models.skeleton import skip_meta_fills
    from peftcli.runs.load import attach_recipe

    with skip_meta_fills():
        model, built_from = count_model(recipe)
        try:
            arch, spec = attach_recipe(model, recipe)
        except RecipeError:
            raise
        except Exception:
            if built_from == META:
                raise
            # The method needs transformers' own modules (prefix tuning their attention functions,
            # prompt tuning their forward): count on those; a real refusal comes again from there.
            model, built_from = _transformers_meta(recipe), META
            arch, spec = attach_recipe(model, recipe)
    return model, arch, spec, built_from


def budget(recipe: Recipe, *, depth: int = 3, batch_size: int = 8, seq_len: int = 1024) -> dict:
    from peftcli.models.quant import quantized_names

    model, arch, spec, built_from = method_on_meta(recipe)
    s = trainable_summary(model)
    s["built_from"] = built_from
    s["head_note"] = head_guess(recipe)
    # The method's own closed form for what it adds (None where it has none): a cross-check of the count.
    s["closed_form"] = spec.budget(model, arch, recipe.method) if spec.budget is not None else None
    s["table"] = per_module_table(model, depth=depth)
    s["quantizable"] = sum(model.get_submodule(n).weight.numel() for n in quantized_names(model))
    s["batch_size"], s["seq_len"] = batch_size, seq_len
    state_of, at_once = optimizer_state_model(model, arch, spec, recipe)
    s["optimizer"] = spec.optimizer_name or recipe.train.optimizer
    s["trained_at_once"] = at_once
    s["objective"], rows, s["reference_copy"] = preference_cost(recipe, model, s["trainable"])
    s["memory"] = memory_estimate(
        s["trainable"], s["total"], s["quantizable"], method=recipe.method_name, method_cfg=recipe.method,
        tokens=rows * batch_size * seq_len, hidden=arch.hidden_size, layers=arch.num_layers,
        optimizer_bytes=state_of, trained_at_once=at_once, reference_copy=s["reference_copy"],
    )
    return s


def preference_cost(recipe: Recipe, model, trainable: int) -> tuple[str, int, int]:
    """(objective, sequences per example that keep activations, weights kept twice). A pair is two
    sequences in the policy pass (chosen and rejected); a KTO row is one (its mismatched row runs
    without gradients, as the reference pass does, and keeps no activations); the reference's weights cost nothing
    when it switches the adapter off or reads cached log-probs, and one copy of the trainable
    weights when it is the starting weights (peftcli.training.preference.Reference)."""
    from peftcli.config.recipe import REFERENCE_FREE
    from peftcli.core.switch import flags

    obj = recipe.train.objective
    if obj == "sft":
        return obj, 1, 0
    swapped = (obj not in REFERENCE_FREE and not recipe.train.precompute_reference
               and (bool(recipe.init_from) or not flags(model)))
    return obj, 1 if obj == "kto" else 2, trainable if swapped else 0


def optimizer_state_model(model, arch, spec, recipe: Recipe) -> tuple[Callable[[float], float], int]:
    """(state bytes as a function of bytes per weight, weights with gradients at one time).

    LISA trains everything outside the layer stack plus `train.lisa_layers` layers at a time, and
    keeps optimizer state only for those; the largest layers are counted, to be safe.
    """
    from peftcli.methods.targets import method_layers
    from peftcli.training.optim import shared_state_bytes, state_bytes_estimate

    tcfg = recipe.train
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if tcfg.lisa_layers:
        prefix = arch.layers_path + "."
        sizes = sorted((sum(p.numel() for p in arch.layers[i].parameters())
                        for i in method_layers(recipe.method, arch.num_layers)), reverse=True)
        outside = sum(p.numel() for n, p in params.items() if not n.startswith(prefix))
        at_once = outside + sum(sizes[: tcfg.lisa_layers])
        scale = at_once / max(sum(p.numel() for p in params.values()), 1)
    else:
        at_once, scale = sum(p.numel() for p in params.values()), 1.0
    if spec.optimizer_state is not None:
        elems = sum(spec.optimizer_state(model, arch, recipe.method).values())
        return (lambda pb: elems * pb), at_once

    shared = shared_state_bytes((tuple(p.shape) for p in params.values()), tcfg.optimizer)

    def state_of(pb: float) -> float:
        full = sum(state_bytes_estimate(tuple(p.shape), pb, tcfg.optimizer, tcfg.momentum) for p in params.values())
        return full * scale + shared

    return state_of, at_once


def budget_from_recipe(recipe: Recipe) -> dict:
    return budget(recipe)


def print_budget(console: Console, recipe: Recipe, b: dict) -> None:
    table = Table(title=f"{recipe.method_name} on {recipe.model.name}")
    table.add_column("module")
    table.add_column("trainable", justify="right")
    table.add_column("total", justify="right")
    for name, tr, tot in b["table"]:
        if tr or tot:
            table.add_row(name, f"{tr:,}", f"{tot:,}")
    console.print(table)
    console.print(
        f"trainable: {b['trainable']:,} · total: {b['total']:,} · trainable %: {b['percent']:.4f}"
    )
    if "built_from" in b:
        console.print(f"[dim]counted from {b['built_from']}[/]")
    if b.get("head_note"):
        console.print(f"[yellow]{escape(b['head_note'])}[/]", soft_wrap=True)
    if b.get("trained_at_once", b["trainable"]) != b["trainable"]:
        console.print(f"trained at once (LISA): {b['trained_at_once']:,}; gradients and optimizer state are "
                      "counted for those")
    mem = Table(title=f"training memory (GiB): weights + grads + {b.get('optimizer', 'adamw')} state; activations apart")
    for col in ("precision", "weights", "grads", "optimizer", "total", "activations ≈"):
        mem.add_column(col, justify="left" if col == "precision" else "right")
    for m in b["memory"]:
        mem.add_row(m["precision"], f"{m['weights_gib']:.2f}", f"{m['grads_gib']:.2f}",
                    f"{m['optimizer_gib']:.2f}", f"{m['total_gib']:.2f}", f"{m['activations_gib']:.2f}")
    console.print(mem)
    if b.get("objective", "sft") != "sft":
        console.print(f"objective {b['objective']}: activations for {1 if b['objective'] == 'kto' else 2} sequence(s) "
                      "per example; the reference pass keeps "
                      "none" + (f"; weights include the reference's copy of {b['reference_copy']:,} trainable weights"
                                if b.get("reference_copy") else " and adds no weights"))
    console.print(
        f"[dim]activations: rough, for batch {b.get('batch_size', '?')} × {b.get('seq_len', '?')} tokens "
        "without gradient checkpointing (model.gradient_checkpointing: true cuts them to about 1/17); "
        "nf4 QLoRA needs a CUDA GPU and bitsandbytes[/]"
    )
