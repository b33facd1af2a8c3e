"""A model's structure without its weights, and the check that saved tensors fit it.

Built on the meta device, a model costs no memory and reads no weight file, so commands can count
parameters, name them in order, or check an adapter's shapes for bases this machine could not
load (a 4-bit base without CUDA, a model larger than memory).
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.core.quiet import quiet_libraries
from peftcli.models.loading import auto_class, load_config


def meta_model(name: str, task: str, *, num_labels: int | None = None, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False) -> nn.Module:
    """The base model `name` on the meta device; a classifier gets `num_labels` classes (2 if None).
    Code shipped with the model runs only with `trust_remote_code`: the user's own recipe, or the
    command line's flag for a recipe read from a run folder (`runs.load.untrusted`)."""
    config = load_config(name, trust_remote_code=trust_remote_code)
    if task == "classification":
        config.num_labels = num_labels or 2
    config._attn_implementation = attn_implementation
    with torch.device("meta"), quiet_libraries():
        return auto_class(task).from_config(config, **({"trust_remote_code": True} if trust_remote_code else {}))


def misfits(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[tuple[str, tuple, tuple | None]]:
    """The tensors of `state` that do not fit `params`, in order: (name, its shape, the parameter's
    shape, or None where `params` has no such name)."""
    out = []
    for k, t in state.items():
        p = params.get(k)
        if p is None or tuple(p.shape) != tuple(t.shape):
            out.append((k, tuple(t.shape), None if p is None else tuple(p.shape)))
    return out
