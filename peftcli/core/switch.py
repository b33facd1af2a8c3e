"""The adapter on/off switch: AdapterDrop's layer dropping (Rücklé et al. 2021) as a library.

Every module a method inserts inside a transformer layer carries an `adapter_enabled` flag and
skips its own contribution when it is False. Dropping is therefore a walk over the layers, with
no knowledge of which method put what where. Training (`train.drop_layers`), run loading (a
dropped run's meta.json lists its switched-off modules) and the `peftcli drop` command all use
this switch; it lives below them so that none of them has to import another.
"""

from __future__ import annotations

import random
from typing import Any

from torch import nn

from peftcli.core.adapter import is_adapter_module
from peftcli.core.arch import Arch
from peftcli.core.errors import CheckpointError


def adapter_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if is_adapter_module(m)]


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


# ------------------------------------------------------------------------ switching, recording


def disable_layers(model: nn.Module, arch: Arch, layers: set[int] | list[int]) -> int:
    """Switch adapters off in `layers`, leaving every other flag as it is (unlike set_dropped_layers)."""
    off = 0
    for i in set(layers):
        for m in adapter_modules(arch.layer(i)):
            off += bool(m.adapter_enabled)
            m.adapter_enabled = False
    return off


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: bool(m.adapter_enabled) for n, m in model.named_modules() if is_adapter_module(m)}


def set_flags(model: nn.Module, state: dict[str, bool]) -> None:
    for n, on in state.items():
        model.get_submodule(n).adapter_enabled = on


def disabled_modules(model: nn.Module) -> list[str]:
    return [n for n, on in flags(model).items() if not on]


def apply_recorded(model: nn.Module, meta: dict[str, Any]) -> int:
    """Switch off the modules a dropped run's meta.json lists; returns how many."""
    names = meta.get("disabled_modules") or []
    for n in names:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise CheckpointError(f"the run's meta.json drops {n}, which this model does not have") from None
        m.adapter_enabled = False
    return len(names)


def dropped_layers(model: nn.Module, arch: Arch) -> list[int]:
    """Layers whose adapter modules are all switched off."""
    out = []
    for i, layer in enumerate(arch.layers):
        mods = adapter_modules(layer)
        if mods and not any(m.adapter_enabled for m in mods):
            out.append(i)
    return out


__all__ = [
    "adapter_modules", "apply_recorded", "disable_layers", "disabled_modules", "dropped_layers", "flags",
    "random_drop", "set_dropped_layers", "set_flags",
]
