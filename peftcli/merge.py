"""Merging: bake an adapter into the base weights and write a plain HF model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .build import pick_device
from .checkpoint import CheckpointError, atomic_dir_write
from .pipeline import load_run


class MergeRefused(CheckpointError):
    pass


@torch.no_grad()
def merge_run(run: Path, dest: Path, *, force: bool = False, device: str = "cpu") -> float:
    """Merge, save, reload the saved folder, and return max |logit difference| on a sample batch."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise CheckpointError(f"{dest} exists and is not empty; pass --force to replace it")
    dev = pick_device(device)
    built, _ = load_run(run, dev)
    spec = built.spec
    if spec.merge is None:
        raise MergeRefused(f"method {spec.name!r} cannot be merged: {spec.merge_refusal or 'it is not a weight delta'}")
    model, tok = built.model, built.tokenizer
    model.eval()
    sample = tok(
        ["The movie was a delight from start to finish.", "I would not recommend this to anyone."],
        return_tensors="pt", padding=True,
    ).to(dev)
    before = model(**sample).logits.float()
    spec.merge(model, built.arch, built.recipe.method)
    leftovers = [n for n, m in model.named_modules() if hasattr(m, "adapter_enabled")]
    if leftovers:
        raise RuntimeError(f"merge left adapter modules in place (e.g. {leftovers[0]})")
    for p in model.parameters():
        p.requires_grad_(False)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    if dest.exists() and force:
        shutil.rmtree(dest)
    atomic_dir_write(dest, write)
    from .models import auto_class

    reloaded = auto_class(built.recipe.model.task).from_pretrained(str(dest), dtype=next(model.parameters()).dtype)
    reloaded.to(dev).eval()
    after = reloaded(**sample).logits.float()
    return float((before - after).abs().max())
