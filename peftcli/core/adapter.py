"""The contract every module a method puts into a model keeps.

Code outside the methods (AdapterDrop, the merge check, the PEFT translator, fusion pruning)
handles adapter modules without knowing which method made them, so every one of them answers the
same three questions the same way:

- on/off: `adapter_enabled`. False makes the module add nothing, so that the model computes what
  it would without it; AdapterDrop and fusion pruning flip it, layer by layer or source by source.
- state: what a module learns is its own parameters, saved and moved with the model. Tensors it
  keeps from one hook to the next within a forward call (see `hf_call.Capture`) are not state.
- merge: a `LayerAdapter` takes the place of a base layer and calls it (`base`); when its update
  is a weight change, `merged_base()` gives that layer back with the update written into it, and
  `delta_weight()` / `delta_bias()` give the change itself (what `export --as-lora` approximates).
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.core.arch import set_module
from peftcli.core.errors import CheckpointError


class AdapterModule(nn.Module):
    """Base class of every module a method inserts; see the module docstring for the contract."""

    adapter_enabled: bool

    def __init__(self) -> None:
        super().__init__()
        self.adapter_enabled = True


class LayerAdapter(AdapterModule):
    """An adapter standing where a base layer was: PEFT and the merge see it as that layer."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def merged_base(self) -> nn.Module:
        """The base layer with this adapter's update written into its weights."""
        raise TypeError(f"{type(self).__name__}'s update is not a weight change; it cannot be merged")

    def delta_weight(self) -> torch.Tensor:
        """The adapter's whole effect on the layer's weight, as an (out, in) matrix: the layer computes
        (W + delta_weight()) x + b + delta_bias(). Anything that turns an update into a plain LoRA (an SVD)
        needs only this, whatever the method."""
        raise TypeError(f"{type(self).__name__}'s update is not a weight change")

    def delta_bias(self) -> torch.Tensor | None:
        """The adapter's change to the layer's bias ([out]), or None when it leaves the bias alone."""
        return None


def is_adapter_module(module: nn.Module) -> bool:
    return isinstance(module, AdapterModule)


def merge_layer_adapters(model: nn.Module, kind: type[LayerAdapter]) -> int:
    """Put each `kind` adapter's merged base layer back in its place; returns how many."""
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, kind)]
    for name, mod in found:
        set_module(model, name, mod.merged_base())
    return len(found)


def copy_into_params(params: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into named parameters, refusing any shape mismatch."""
    with torch.no_grad():
        for k, v in sd.items():
            p = params[k]
            if p.shape != v.shape:
                raise CheckpointError(f"{k}: shape {tuple(v.shape)} in the file, {tuple(p.shape)} in the model")
            if hasattr(p, "device_mesh"):  # an FSDP2 shard: cut the full tensor the same way
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
            p.copy_(v.to(p.dtype))
