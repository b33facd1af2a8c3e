"""The method registry: one name -> one config dataclass + the functions that act on a model.

A method file defines a dataclass of its options and an `attach` function, and registers both
with `@register`. The recipe loader validates `method:` against the dataclass, so every option a
method has is a documented, typo-checked recipe key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .arch import ROLES, Arch, is_linear


@dataclass
class MethodSpec:
    name: str
    config_cls: type
    attach: Callable[[nn.Module, Arch, Any], None]
    summary: str
    # Bakes the method into the base weights in place and removes its modules. None: not mergeable,
    # and `merge_refusal` says why.
    merge: Callable[[nn.Module, Arch, Any], None] | None = None
    merge_refusal: str = ""
    # Adapter tensors to save, when not simply "every trainable parameter" (prefix tuning saves the
    # output of its reparameterisation MLP, not the MLP).
    export_state: Callable[[nn.Module, Arch, Any], dict] | None = None
    # Loads what export_state wrote. None: load_state_dict on the trainable parameters.
    load_state: Callable[[nn.Module, Arch, Any, dict], None] | None = None
    # Training-free bookkeeping shown by count-params, e.g. the closed-form parameter count.
    extras: dict = field(default_factory=dict)


REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    config_cls: type,
    *,
    summary: str,
    merge: Callable | None = None,
    merge_refusal: str = "",
    export_state: Callable | None = None,
    load_state: Callable | None = None,
) -> Callable:
    def deco(attach: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = MethodSpec(
            name=name,
            config_cls=config_cls,
            attach=attach,
            summary=summary,
            merge=merge,
            merge_refusal=merge_refusal,
            export_state=export_state,
            load_state=load_state,
        )
        return attach

    return deco


def get_method(name: str) -> MethodSpec:
    from . import methods  # noqa: F401  (importing registers every method)

    if name not in REGISTRY:
        raise KeyError(name)
    return REGISTRY[name]


def all_methods() -> dict[str, MethodSpec]:
    from . import methods  # noqa: F401

    return dict(REGISTRY)


# ---------------------------------------------------------------- helpers shared by methods


def select_linears(
    model: nn.Module, arch: Arch, targets: list[str], layers: list[int] | None = None
) -> list[str]:
    """Resolve recipe `targets` to full paths of linear modules.

    Each entry is an architecture role (q, k, v, o, ffn_in, ffn_out), "all-linear" (every linear
    layer inside the transformer layers), or a module-name pattern: a regular expression matched
    against the full path when it contains regex characters, otherwise a dotted suffix.
    """
    layer_ids = list(range(arch.num_layers)) if layers is None else list(layers)
    out: dict[str, None] = {}
    for t in targets:
        if t in ROLES:
            for p in arch.role_paths([t], layer_ids):
                out[p] = None
            continue
        in_layers = [f"{arch.layers_path}.{i}." for i in layer_ids]
        for name, mod in model.named_modules():
            if not is_linear(mod) or not any(name.startswith(p) for p in in_layers):
                continue
            if t == "all-linear":
                hit = True
            elif any(c in t for c in "*+?[]()|^$\\"):
                hit = re.fullmatch(t, name) is not None
            else:
                hit = name == t or name.endswith("." + t)
            if hit:
                out[name] = None
    return list(out)


def parse_layers(spec: Any, num_layers: int) -> list[int] | None:
    """`None` (all), a list of ints, or a string like "0-4,7". Negative indices count from the top."""
    if spec is None:
        return None
    items: list[int] = []
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-")[0], part[1:].split("-", 1)[1])
                items.extend(range(int(a), int(b) + 1))
            else:
                items.append(int(part))
    else:
        items = [int(x) for x in spec]
    norm = sorted({i % num_layers if i < 0 else i for i in items})
    bad = [i for i in norm if i >= num_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    return norm


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
