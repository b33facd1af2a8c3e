"""HF PEFT's adapter format as the methods see it: how one adapted model's tensors are named there.

Each method's PEFT twin (registry.PeftTwin) fills in a `Layout` with these helpers; the translator
that asks every method for its twin (peftcli/runs/peft_format.py) sits above the methods and uses them
too. Nothing here knows a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.core.adapter import LayerAdapter, is_adapter_module
from peftcli.core.arch import Arch, is_conv1d
from peftcli.core.errors import CheckpointError


class PeftFormatError(CheckpointError):
    """The adapter cannot be written to, or read from, HF PEFT's format as asked."""


@dataclass
class Layout:
    """How one adapted model's tensors are named in PEFT's format."""

    peft_type: str
    config: dict[str, Any]
    twin: Any  # the method's registry.PeftTwin
    task: str  # the recipe's model.task
    to_peft: dict[str, str] = field(default_factory=dict)  # our tensor name -> PEFT key
    # our tensor name -> (rows of the full PEFT vector it fills, full length): IA³ on part of a
    # fused projection; the other rows are 1 in PEFT's vector
    rows: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    # our tensor names PEFT neither has nor needs (prefix tuning's reparameterisation MLP)
    ignored: set[str] = field(default_factory=set)
    # PEFT key -> the module it adapts (for messages about target mismatches)
    module_of: dict[str, str] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)  # our names of trained task-head tensors
    notes: list[str] = field(default_factory=list)  # what a PEFT user should know about this export
    feedforward: set[str] = field(default_factory=set)  # our IA³ tensor names that scale their layer's input
    # Rewrites our adapter tensors before they are renamed, when PEFT's adapter is another function of
    # them (a PiSSA/OLoRA start folded into a plain LoRA relative to the original base); None: as saved.
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def _plain_module_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees them in the plain base: wrappers count as the layer they replaced,
    and nothing inside or added by a method counts."""
    names: list[str] = []
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_adapter_module(mod):
            inside.append(name)
            if isinstance(mod, LayerAdapter):  # a wrapper standing where the base layer was
                names.append(name)
            continue
        if name.split(".")[-1].startswith("peftcli_"):
            inside.append(name)
            continue
        names.append(name)
    return names


def shortest_suffixes(chosen: list[str], universe: list[str], feedforward: list[str] | None = None) -> dict[str, str]:
    """For each chosen module, the shortest name suffix that selects only chosen modules out of
    `universe` under PEFT's `target_modules` rule (name == s or name ends with "." + s).

    `feedforward` (IA³) must be told apart by a subset of the same strings under PEFT's
    `feedforward_modules` rule, a plain str.endswith over the targeted modules, so a suffix given
    to a feed-forward module must not end any other targeted module's name.
    """
    want = set(chosen)
    ff = set(feedforward or ())
    out: dict[str, str] = {}
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            ok = {n for n in universe if n == s or n.endswith("." + s)} <= want
            if ok and path in ff:
                ok = {c for c in chosen if c.endswith(s)} <= ff
            if ok:
                out[path] = s
                break
    return out


def adapted_linears(model: nn.Module, kind: type, method_name: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of every `kind` wrapper in the model; refuses a model without any."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    if not wrapped:
        raise PeftFormatError(f"no {method_name} layers found in the model; nothing to export")
    return wrapped


def linear_targets(model: nn.Module, lay: Layout, wrapped: list[tuple[str, nn.Module]],
                   feedforward: list[str] | None = None) -> dict[str, str]:
    """Writes target_modules (and the storage convention) for wrapped linear layers into the
    config; returns each wrapped path's suffix there. A plain (unwrapped) linear layer may stand in
    `wrapped` too: export --as-lora targets the layers whose biases BitFit trained."""
    suffix = shortest_suffixes([n for n, _ in wrapped], _plain_module_names(model), feedforward or [])
    lay.config["target_modules"] = sorted(set(suffix.values()))
    lay.config["fan_in_fan_out"] = any(is_conv1d(getattr(m, "base", m)) for _, m in wrapped)
    lay.config["exclude_modules"] = None
    return suffix


def prompt_learning_config(arch: Arch, num_virtual_tokens: int, *, kv_heads: bool) -> dict[str, Any]:
    """num_virtual_tokens and the dimensions PEFT's own `_prepare_prompt_learning_config` sets:
    with `kv_heads` (prefix tuning) token_dim / num_attention_heads describe the key/value heads,
    which differ under grouped-query attention."""
    d: dict[str, Any] = {
        "num_virtual_tokens": num_virtual_tokens,
        "num_layers": arch.num_layers,
        "token_dim": arch.hidden_size,
        "num_attention_heads": arch.num_heads,
        "num_transformer_submodules": 1,
    }
    if kv_heads and getattr(arch.config, "num_key_value_heads", None) is not None:
        d["token_dim"] = arch.head_dim * arch.num_kv_heads
        d["num_attention_heads"] = arch.num_kv_heads
    return d


def module_list(config: dict[str, Any], key: str) -> list[str]:
    """A PEFT config entry that is one module name or a list of them, as a sorted list."""
    v = config.get(key)
    return [v] if isinstance(v, str) else sorted(v or [])
