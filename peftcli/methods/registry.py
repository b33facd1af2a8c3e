"""The method registry: one name -> one config dataclass + everything peftcli knows about the method.

A method file defines a dataclass of its options and an `attach` function, and registers both
with `register`, together with the facts and hooks the rest of peftcli asks about a method (can
it be merged, does it need a dense base, does the last-layer trim stay exact for it, what is its
HF PEFT twin, ...). No other file keeps a list of method names: adding a method is its file plus
its line in methods/__init__.py. The recipe loader validates `method:` against the dataclass, so
every option a method has is a documented, typo-checked recipe key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftcli.core.adapter_merging import Combined, CombineRequest
from peftcli.core.arch import Arch


@dataclass
class PeftTwin:
    """How a method's adapter is written as, and read from, one HF PEFT adapter type.

    runs/peft_format.py does the bookkeeping every type shares (the folder, the task head, the checks
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


@dataclass(kw_only=True)
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
    # export_state returns some of the model's own parameters and buffers as they are (LoRA's frozen A
    # and its PiSSA start), computing nothing: a sharded (FSDP) model gathers each of them alone
    # instead of unsharding the whole model around the call.
    saves_own_tensors: bool = False
    # Everything the method computes after the last layer's attention is position by position, so
    # that models.trim.trim_unread_positions (running that part of the last layer only where the head
    # reads) changes no number; set it only with a case in tests/methods/test_lora_kernel.py proving it.
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
    # Whether this config's adapter can share a mixed-adapter batch as per-row stacked low-rank
    # factors (peftcli/inference/multi.py gathers each row's A and B); None or False: its rows run as a
    # sub-batch of their own through the run's model.
    stacks_rows: Callable[[Any], bool] | None = None
    # How trained adapters of this method combine into one (`peftcli combine`): the rules it
    # accepts for `--how`, and the function that answers a request. None: `combine_refusal` says why.
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
    # Why `export --as-lora` cannot turn the method into a LoRA: its effect is not a change of
    # linear weights (a bottleneck MLP, prefixes). "": every layer adapter it inserts gives
    # `delta_weight()` (core/adapter.py), and base parameters it trains (BitFit's biases) are
    # compared with the untouched base.
    as_lora_refusal: str = ""


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
    saves_own_tensors: bool = False,
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
    as_lora_refusal: str = "",
) -> Callable:
    """Decorate a method's `attach` function to register it under `name` with these facts.

    The keyword arguments are MethodSpec's fields, so the spec is built from them as given.
    """
    fields = dict(locals())  # first statement: exactly the parameters, each named as its field

    def deco(attach: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        if (combine is None) != (not combine_hows):
            raise ValueError(f"method {name!r}: `combine` and `combine_hows` are given together or not at all")
        REGISTRY[name] = MethodSpec(attach=attach, **fields)
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
