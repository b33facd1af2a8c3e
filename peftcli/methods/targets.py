"""Where a method goes: recipe `targets` resolved to linear modules, and `layers` to layer indices.

Every method that adapts chosen linears or chosen layers reads its options through these, so a
role name, a module pattern or a layer string means the same in every method.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from peftcli.core.arch import ROLES, Arch, is_linear
from peftcli.core.errors import BadInput


class TargetError(BadInput, ValueError):
    """A method's `targets` or `layers` that this model does not have. Only known once the model is
    built, so recipe validation cannot catch it; it is still the recipe's to fix (exit 2)."""


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


def require_linears(
    model: nn.Module, arch: Arch, targets: list[str], layers: list[int] | None = None, key: str = "method.targets"
) -> list[str]:
    """`select_linears`, refusing a choice that matches nothing with what the model does have: the
    roles its architecture maps and the names of the linear layers in one transformer layer."""
    paths = select_linears(model, arch, targets, layers)
    if paths:
        return paths
    i = layers[0] if layers else 0
    roles = [r for r in ROLES if arch.get_all(i, r)]
    prefix = f"{arch.layers_path}.{i}."
    names = [n[len(prefix):] for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m)]
    joined = [t for t in (targets if isinstance(targets, list | tuple) else [targets]) if "," in str(t)]
    as_list = f" ({joined[0]!r} is one name: write a list, {key}=[{joined[0]}])" if joined else ""
    raise TargetError(
        f"{key} {targets} matches no linear layer of this model{as_list}; use roles ({', '.join(roles)}), "
        f"'all-linear', or module names as in layer {i}: {', '.join(names) or 'none'}"
    )


LAYERS_HELP = (
    "transformer layers that get the method: null = all; a list [0, 3], a string '0-5,8' (negative counts "
    "from the top), or 'top:k' / 'bottom:k' for the k layers nearest the output / the input"
)


def parse_layers(spec: Any, num_layers: int, key: str = "method.layers") -> list[int] | None:
    """The one reading of a `layers` option: `None` (all), an int, a list of ints, or a string of
    comma-separated parts, each an index, a range "a-b", "top:k" (the k layers nearest the output)
    or "bottom:k" (the k nearest the input). Negative indices count from the top. `key` names the
    option in a `TargetError`."""
    if spec is None:
        return None
    items: list[int] = []
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip().lower()
            if not part:
                continue
            m = re.fullmatch(r"(top|bottom):\s*(\d+)", part)
            if m:
                k = int(m.group(2))
                if not 1 <= k <= num_layers:
                    raise TargetError(f"{key} {part!r}: k must be 1 to {num_layers}, the model's number of layers")
                items.extend(range(num_layers - k, num_layers) if m.group(1) == "top" else range(k))
                continue
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-")[0], part[1:].split("-", 1)[1])
                    items.extend(range(int(a), int(b) + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise TargetError(f"{key} {spec!r}: cannot read {part!r}; write e.g. '0-5,8', 'top:4' or 'bottom:2'") from None
    else:
        items = [int(x) for x in spec]
    bad = [i for i in items if not -num_layers <= i < num_layers]
    if bad:
        raise TargetError(f"{key} {spec!r}: layer {bad[0]} is out of range; the model has {num_layers} layers "
                          f"(0-{num_layers - 1}, or -1 to -{num_layers} from the top)")
    return sorted({i % num_layers for i in items})


def method_layers(cfg: Any, num_layers: int) -> list[int]:
    """The layers a method config chooses: its `layers`, less the old `leave_out` spelling's."""
    chosen = parse_layers(getattr(cfg, "layers", None), num_layers)
    layers = list(range(num_layers)) if chosen is None else chosen
    skip = set(parse_layers(list(getattr(cfg, "leave_out", None) or []), num_layers, "method.leave_out") or [])
    return [i for i in layers if i not in skip]
