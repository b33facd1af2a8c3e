"""Budgeting a method on a model before training: parameters and training memory.

The model is built on PyTorch's meta device: shapes exist, storage does not, so a 70B-sized config
costs seconds and no memory. Memory is estimated for the parts that do not depend on the batch:
weights at their dtype, and gradients plus AdamW state for the trainable weights.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from .build import attach_method, per_module_table, trainable_summary
from .models import auto_class, load_config
from .recipe import Recipe

GIB = 1024**3
# bits per frozen weight: NF4 = 4 bits + a float32... constant per 64-block, itself 8-bit quantized
# in blocks of 256 with double quantization (Dettmers et al. 2023): 4 + 8/64 + 32/(64*256).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def meta_model(recipe: Recipe):
    config = load_config(recipe.model.name)
    if recipe.model.task == "classification":
        config.num_labels = recipe.model.num_labels or 2
    import transformers

    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        model = auto_class(recipe.model.task).from_config(config)
    return model


def memory_estimate(model, trainable: int, total: int) -> list[dict]:
    """Bytes for weights, grads and AdamW state under each precision a user can pick."""
    frozen = total - trainable
    rows = []
    # (name, frozen weight bytes/param, trainable weight bytes, grad bytes, optimizer bytes)
    setups = [
        ("fp32", 4.0, 4, 4, 8),
        ("bf16 base, fp32 adapter", 2.0, 4, 4, 8),
        ("bf16 base, bf16 adapter", 2.0, 2, 2, 4),
        ("nf4 base (QLoRA), bf16 adapter", NF4_BITS / 8, 2, 2, 4),
    ]
    for name, fb, tw, g, o in setups:
        weights = frozen * fb + trainable * tw
        rows.append({
            "precision": name,
            "weights_gib": weights / GIB,
            "grads_gib": trainable * g / GIB,
            "optimizer_gib": trainable * o / GIB,
            "total_gib": (weights + trainable * (g + o)) / GIB,
        })
    return rows


def budget(recipe: Recipe, *, depth: int = 3, batch_size: int = 8, seq_len: int = 1024) -> dict:
    model = meta_model(recipe)
    attach_method(model, recipe.method_name, recipe.method)
    s = trainable_summary(model)
    s["table"] = per_module_table(model, depth=depth)
    s["memory"] = memory_estimate(model, s["trainable"], s["total"])
    if recipe.method_name == "full":
        s["memory"] = [m for m in s["memory"] if "nf4" not in m["precision"] and "adapter" not in m["precision"]]
        s["memory"].insert(1, _full_bf16(s["total"]))
    return s


def _full_bf16(total: int) -> dict:
    # bf16 weights and grads, fp32 AdamW state (mixed precision without fp32 master weights).
    return {"precision": "bf16", "weights_gib": total * 2 / GIB, "grads_gib": total * 2 / GIB,
            "optimizer_gib": total * 8 / GIB, "total_gib": total * 12 / GIB}


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
    mem = Table(title="training memory, excluding activations (GiB)")
    for col in ("precision", "weights", "grads", "optimizer", "total"):
        mem.add_column(col, justify="left" if col == "precision" else "right")
    for m in b["memory"]:
        mem.add_row(m["precision"], f"{m['weights_gib']:.2f}", f"{m['grads_gib']:.2f}",
                    f"{m['optimizer_gib']:.2f}", f"{m['total_gib']:.2f}")
    console.print(mem)
