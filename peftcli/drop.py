"""AdapterDrop (Rücklé et al. 2021): switch adapters off in chosen layers.

Every module a method inserts inside a transformer layer carries an `adapter_enabled` flag and
skips its own contribution when it is False. Dropping is therefore a walk over the layers, with
no knowledge of which method put what where.
"""

from __future__ import annotations

import random

from torch import nn

from .arch import Arch


def adapter_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if hasattr(m, "adapter_enabled")]


def set_dropped_layers(model: nn.Module, arch: Arch, dropped: set[int] | list[int]) -> int:
    """Disable adapters in `dropped` layers and enable them elsewhere; returns modules switched off."""
    dropped = set(dropped)
    off = 0
    for i, layer in enumerate(arch.layers):
        for m in adapter_modules(layer):
            m.adapter_enabled = i not in dropped
            off += i in dropped
    return off


def random_drop(model: nn.Module, arch: Arch, max_layers: int, rng: random.Random | None = None) -> int:
    """Robust training: drop adapters from the n lowest layers, n drawn uniformly from 0..max_layers."""
    n = (rng or random).randint(0, min(max_layers, arch.num_layers))
    set_dropped_layers(model, arch, set(range(n)))
    return n
