"""LISA (Pan et al. 2024, layer-wise importance sampling): full fine-tuning that trains only γ
randomly drawn layers at a time, redrawn every `train.lisa_interval` optimizer steps.

The draw is a function of the seed and the draw's number only, so a resumed run draws what the
uninterrupted run drew. Layers switched off lose their optimizer state (a layer drawn again
starts its moments afresh, like the re-created optimizer of the paper) and compute no gradient;
embeddings, final norm and head stay trained throughout.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from peftcli.config.recipe import Recipe, RecipeError
from peftcli.methods.targets import method_layers


def pool(recipe: Recipe, arch: Any) -> list[int]:
    """The layers LISA draws from: those `method.layers` gives full fine-tuning (all by default)."""
    return method_layers(recipe.method, arch.num_layers)


def check_one_process(recipe: Recipe, world: int) -> None:
    """Refuse LISA under several ranks, before any file is written or loaded."""
    if recipe.train.lisa_layers and world > 1:
        raise RecipeError(recipe.source or "recipe", [
            f"train.lisa_layers: LISA runs in one process ({world} ranks here: the layers it switches off would leave "
            "DDP/FSDP waiting for their gradients); launch without --nproc or set train.lisa_layers: 0"])


def check_layers(recipe: Recipe, arch: Any) -> None:
    """Refuse drawing more layers than the method trains, once the model is built."""
    n = len(pool(recipe, arch))
    if recipe.train.lisa_layers > n:
        raise RecipeError(recipe.source or "recipe", [
            f"train.lisa_layers: {recipe.train.lisa_layers} is more than the {n} layers method full "
            f"trains in {recipe.model.name}; set it to 1-{n}"])


def draw(recipe: Recipe, arch: Any, optimizer: torch.optim.Optimizer, step: int) -> list[int]:
    """Switch on the γ layers that train from `step` until the next draw; returns them, sorted."""
    tcfg = recipe.train
    number = step // tcfg.lisa_interval
    rng = random.Random(tcfg.seed * 1_000_003 + number)
    layers = pool(recipe, arch)
    active = sorted(rng.sample(layers, tcfg.lisa_layers))
    for i in layers:
        on = i in active
        for p in arch.layers[i].parameters():
            if not on:
                optimizer.state.pop(p, None)
                p.grad = None
            p.requires_grad_(on)
    return active


@contextmanager
def every_layer_trainable(recipe: Recipe, arch: Any, active: list[int] | None) -> Iterator[None]:
    """Every layer trainable while a checkpoint is written: full fine-tuning saves what trains, and
    under LISA every layer has trained or will. `active` None (no LISA): nothing to do."""
    if active is None:
        yield
        return
    layers = pool(recipe, arch)
    for i in layers:
        arch.layers[i].requires_grad_(True)
    try:
        yield
    finally:
        on = set(active)
        for i in layers:
            arch.layers[i].requires_grad_(i in on)
