"""The method registry: one name -> one config dataclass + everything peftcli knows about the method.

A method file defines a dataclass of its options and an `attach` function, and registers both
with `register`, together with the facts and hooks the rest of peftcli asks about a method (can
it be merged, does it need a dense base, does the last-layer trim stay exact for it, what is its
HF PEFT twin, ...). No other file keeps a list of method names: adding a method is its file plus
its line in methods/__init__.py. The recipe loader validates `method:` against the dataclass, so
every option a method has is a documented, typo-checked recipe key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftcli.core.adapter_merging import Combined, CombineRequest
from peftcli.core.arch import ROLES, Arch, is_linear


@dataclass
class PeftTwin:
    """How a method's adapter is written as, and read from, one HF PEFT adapter type.

    peft_format.py does the bookkeeping every type shares (the folder, the task head, the checks
    of a folder against a recipe) and asks the twin for the rest.
    """

    peft_type: str  # PEFT's `peft_type`, e.g. "LORA"
    # Fills in a peft_format.Layout for a model this method adapted with the given method config:
    # the type's adapter_config.json entries and, per adapter tensor, our name -> PEFT key.
    layout: Callable[[nn.Module, Arch, Any, Any], None]
    # The recipe `method:` options (all but `name`) that build the adapter a PEFT config describes.
    import_config: Callable[[dict], dict]
    # What must agree between a folder's adapter_config.json and the recipe before its weights
    # load: (PEFT key, recipe key, the folder's value, the recipe's), and problems no recipe key fixes.
    settings: Callable[[dict, Any], tuple[list[tuple[str, str, Any, Any]], list[str]]] | None = None
    # Checks one PEFT tensor against the layout while a folder is read:
    # (PEFT key, our name, tensor, layout, "init_from DIR", adapter_config.json) -> None or raise.
    check_tensor: Callable[[str, str, torch.Tensor, Any, str, dict], None] | None = None
    # Prompt-learning types: PEFT does not wrap the model, so task heads sit under `base_model.`.
    prompt_learning: bool = False
    # How PEFT keys of this type's adapter tensors end, after the path of the module they adapt.
    key_suffixes: tuple[str, ...] = ()


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
    # Everything the method computes after the last layer's attention is position by position, so
    # that models.trim.trim_unread_positions (running that part of the last layer only where the head
    # reads) changes no number; set it only with a case in tests/test_lora_fast.py proving it.
    positionwise: bool = False
    # Why the method cannot train on a frozen 4-bit (QLoRA) base; "" when it can. A string always
    # applies and completes "method 'name' ..." (full: "trains the base weights"). A function of the
    # method config is for options that need dense weights (LoRA's use_dora): it returns the whole
    # refusal, after "model.quantization: nf4 ", or "" when the options are fine.
    needs_dense_base: str | Callable[[Any], str] = ""
    # Trains the base model's own weights (full fine-tuning): the head needs no unfreezing, and a
    # saved file need not hold every trainable tensor.
    trains_base: bool = False
    # A term the training loop adds to the task loss (fusion's value regulariser), or None for none.
    aux_loss: Callable[[nn.Module], torch.Tensor | None] | None = None
    # The HF PEFT adapter type computing the same function; None: `no_peft_reason` says why not.
    peft: PeftTwin | None = None
    no_peft_reason: str = ""  # "{name}" is replaced by the method's name
    # Closed form of the parameters the method adds (not the task head), from the attached model's
    # architecture and the config: count-params' cross-check, and the formula the docs quote.
    budget: Callable[[nn.Module, Arch, Any], int] | None = None
    # How trained adapters of this method combine into one (`peftcli combine`): the rules it
    # accepts for `--how`, and the function that answers a request. None: `combine_refusal` says why.
    # Whether this config's adapter can share a mixed-adapter batch as per-row stacked low-rank
    # factors (peftcli/inference/multi.py gathers each row's A and B); None or False: its rows run as a
    # sub-batch of their own through the run's model.
    stacks_rows: Callable[[Any], bool] | None = None
    combine: Callable[[CombineRequest], Combined] | None = None
    combine_hows: tuple[str, ...] = ()
    combine_refusal: str = ""
    # Builds the method's own optimizer, (model, arch, config, train config) -> optimizer, when
    # the method is an optimizer as much as a choice of weights (GaLore projects gradients before
    # Adam sees them); None: the one `train.optimizer` names. `optimizer_name` is shown to users.
    optimizer: Callable[[nn.Module, Arch, Any, Any], torch.optim.Optimizer] | None = None
    optimizer_name: str = ""
    # Closed form of that optimizer's state, in elements per parameter name, for count-params.
    optimizer_state: Callable[[nn.Module, Arch, Any], dict[str, int]] | None = None
    # Chooses what trains from the training data before the first step (the sparse method's mask):
    # (model, arch, config, losses) where `losses` yields the training loss of successive batches.
    # Not called on resume or with init_from: the checkpoint holds what it chose.
    calibrate: Callable[[nn.Module, Arch, Any, Any], None] | None = None


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
    positionwise: bool = False,
    needs_dense_base: str | Callable[[Any], str] = "",
    trains_base: bool = False,
    aux_loss: Callable | None = None,
    peft: PeftTwin | None = None,
    no_peft_reason: str = "",
    budget: Callable | None = None,
    stacks_rows: Callable | None = None,
    combine: Callable | None = None,
    combine_hows: tuple[str, ...] = (),
    combine_refusal: str = "",
    optimizer: Callable | None = None,
    optimizer_name: str = "",
    optimizer_state: Callable | None = None,
    calibrate: Callable | None = None,
) -> Callable:
    def deco(attach: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        if (combine is None) != (not combine_hows):
            raise ValueError(f"method {name!r}: `combine` and `combine_hows` are given together or not at all")
        REGISTRY[name] = MethodSpec(
            name=name,
            config_cls=config_cls,
            attach=attach,
            summary=summary,
            merge=merge,
            merge_refusal=merge_refusal,
            export_state=export_state,
            load_state=load_state,
            positionwise=positionwise,
            needs_dense_base=needs_dense_base,
            trains_base=trains_base,
            aux_loss=aux_loss,
            peft=peft,
            no_peft_reason=no_peft_reason,
            budget=budget,
            stacks_rows=stacks_rows,
            combine=combine,
            combine_hows=combine_hows,
            combine_refusal=combine_refusal,
            optimizer=optimizer,
            optimizer_name=optimizer_name,
            optimizer_state=optimizer_state,
            calibrate=calibrate,
        )
        return attach

    return deco


def unregister(name: str) -> MethodSpec:
    """Remove a method (tests that register a throw-away one)."""
    return REGISTRY.pop(name)


def get_method(name: str) -> MethodSpec:
    """A registered method. The registry imports no method: `peftcli.methods` registers them all
    and re-exports this function, so callers import it from there and the layers never circle."""
    if name not in REGISTRY:
        raise KeyError(name)
    return REGISTRY[name]


def all_methods() -> dict[str, MethodSpec]:
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


LAYERS_HELP = (
    "transformer layers that get the method: null = all; a list [0, 3], a string '0-5,8' (negative counts "
    "from the top), or 'top:k' / 'bottom:k' for the k layers nearest the output / the input"
)


def parse_layers(spec: Any, num_layers: int) -> list[int] | None:
    """The one reading of a `layers` option: `None` (all), an int, a list of ints, or a string of
    comma-separated parts, each an index, a range "a-b", "top:k" (the k layers nearest the output)
    or "bottom:k" (the k nearest the input). Negative indices count from the top."""
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
                    raise ValueError(f"layers {part!r}: k must be 1 to {num_layers}, the model's number of layers")
                items.extend(range(num_layers - k, num_layers) if m.group(1) == "top" else range(k))
            elif "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-")[0], part[1:].split("-", 1)[1])
                items.extend(range(int(a), int(b) + 1))
            else:
                try:
                    items.append(int(part))
                except ValueError:
                    raise ValueError(f"layers {spec!r}: cannot read {part!r}; write e.g. '0-5,8', 'top:4' or 'bottom:2'") from None
    else:
        items = [int(x) for x in spec]
    norm = sorted({i % num_layers if i < 0 else i for i in items})
    bad = [i for i in norm if i >= num_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    return norm


def method_layers(cfg: Any, num_layers: int) -> list[int]:
    """The layers a method config chooses: its `layers`, less the old `leave_out` spelling's."""
    chosen = parse_layers(getattr(cfg, "layers", None), num_layers)
    layers = list(range(num_layers)) if chosen is None else chosen
    skip = set(parse_layers(list(getattr(cfg, "leave_out", None) or []), num_layers) or [])
    return [i for i in layers if i not in skip]


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
