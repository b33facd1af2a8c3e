"""Sparse fine-tuning with a fixed Fisher mask (FISH mask, Sung et al. 2021).

Before the first step, the squared gradient of the training loss with respect to each targeted
weight is summed over `calibration_batches` batches of the training data (the empirical Fisher
information's diagonal, from batch gradients); the top `density` fraction of each weight's entries
by that score is the mask, fixed for the whole run. Only those entries train.

The masked entries are a parameter of their own, `sparse_values` (k numbers per weight, starting
at 0), added into the frozen weight at the recorded flat indices `sparse_index` on every forward:

    W' = W + scatter(index, values)

so the gradient reaches exactly the masked entries, the optimizer keeps state for those k numbers
only, and a checkpoint holds the indices and values. Merging adds the values into the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from peftcli.core.adapter import LayerAdapter, copy_into_params, merge_layer_adapters
from peftcli.core.arch import Arch, set_module
from peftcli.core.errors import CheckpointError
from peftcli.methods.registry import register
from peftcli.methods.targets import LAYERS_HELP, method_layers, require_linears

INDEX = "sparse_index"


@dataclass
class SparseConfig:
    density: float = field(
        default=0.005, metadata={"above": 0.0, "max": 1.0,
                                 "help": "fraction of each targeted weight's entries that train (0.005 = 0.5 %)"}
    )
    calibration_batches: int = field(
        default=8, metadata={"min": 1, "help": "training batches whose squared gradients choose the entries"}
    )
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "roles (q, k, v, o, ffn_in, ffn_out), 'all-linear', or module-name patterns"},
    )
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})


def kept(numel: int, density: float) -> int:
    """Entries a weight of `numel` elements trains: the density's share, at least one."""
    return max(1, min(numel, round(density * numel)))


class SparseLinear(LayerAdapter):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) with k trainable entries of its weight."""

    def __init__(self, base: nn.Module, k: int) -> None:
        super().__init__(base)
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.sparse_values = nn.Parameter(torch.zeros(k, device=w.device, dtype=dtype))
        # Until calibration (or a checkpoint) sets them: the first k entries, so shapes are known.
        self.register_buffer(INDEX, torch.arange(k, device=w.device), persistent=False)

    def set_index(self, index: torch.Tensor) -> None:
        if index.shape != self.sparse_index.shape or index.dtype != torch.long:
            raise CheckpointError(f"sparse_index: {tuple(index.shape)} {index.dtype} for a mask of "
                                  f"{self.sparse_index.numel()} int64 entries")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.base.weight.numel()):
            raise CheckpointError(f"sparse_index: an entry lies outside the weight's {self.base.weight.numel()} elements")
        self.sparse_index = index.to(self.sparse_index.device)

    def weight(self) -> torch.Tensor:
        w = self.base.weight
        flat = w.reshape(-1).index_add(0, self.sparse_index, self.sparse_values.to(w.dtype))
        return flat.view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        return functional_call(self.base, {"weight": self.weight()}, (x,))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        w = self.base.weight
        w.view(-1).index_add_(0, self.sparse_index, self.sparse_values.to(w.dtype))
        return self.base


def _paths(model: nn.Module, arch: Arch, cfg: SparseConfig) -> list[str]:
    return require_linears(model, arch, cfg.targets, method_layers(cfg, arch.num_layers))


def attach(model: nn.Module, arch: Arch, cfg: SparseConfig) -> None:
    paths = _paths(model, arch, cfg)
    for p in paths:
        base = model.get_submodule(p)
        set_module(model, p, SparseLinear(base, kept(base.weight.numel(), cfg.density)))


def calibrate(model: nn.Module, arch: Arch, cfg: SparseConfig, losses: Iterable[torch.Tensor]) -> None:
    """Sum squared gradients of the frozen weights over the first batches; keep the top entries."""
    mods = [m for m in model.modules() if isinstance(m, SparseLinear)]
    weights = [m.base.weight for m in mods]
    scores = [torch.zeros(w.numel(), dtype=torch.float32, device=w.device) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        seen = 0
        for loss in losses:
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for s, g in zip(scores, grads, strict=True):
                if g is not None:
                    s.add_(g.detach().float().reshape(-1).square())
            seen += 1
            if seen >= cfg.calibration_batches:
                break
    finally:
        getattr(losses, "close", lambda: None)()
        for w in weights:
            w.requires_grad_(False)
    for m, s in zip(mods, scores, strict=True):
        top = torch.topk(s, m.sparse_index.numel(), sorted=False).indices
        m.set_index(top.sort().values)


def export_state(model: nn.Module, arch: Arch, cfg: SparseConfig) -> dict[str, torch.Tensor]:
    sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            sd[f"{name}.{INDEX}"] = m.sparse_index
    return sd


def load_state(model: nn.Module, arch: Arch, cfg: SparseConfig, sd: dict[str, torch.Tensor]) -> None:
    mods = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    params = dict(model.named_parameters())
    index_keys = {k for k in sd if k.endswith("." + INDEX)}
    unknown = [k for k in sd if (k.rpartition(".")[0] not in mods if k in index_keys else k not in params)]
    if unknown:
        raise CheckpointError(f"sparse checkpoint has {len(unknown)} tensors this model lacks (e.g. {unknown[0]}); "
                              "was it trained with another base model or method.targets?")
    missing = [f"{n}.{INDEX}" for n in mods if f"{n}.{INDEX}" not in sd]
    missing += [n for n, p in params.items() if p.requires_grad and n not in sd]
    if missing:
        raise CheckpointError(f"sparse checkpoint is missing {len(missing)} tensors (e.g. {missing[0]})")
    for k in index_keys:
        mods[k.rpartition(".")[0]].set_index(sd[k].long())
    copy_into_params(params, {k: v for k, v in sd.items() if k not in index_keys})


def merge(model: nn.Module, arch: Arch, cfg: SparseConfig) -> None:
    merge_layer_adapters(model, SparseLinear)


def budget(model: nn.Module, arch: Arch, cfg: SparseConfig) -> int:
    """Σ over targeted weights of round(density · m · n), at least one each."""
    return sum(kept(math.prod(m.base.weight.shape), cfg.density)
               for m in model.modules() if isinstance(m, SparseLinear))


register(
    "sparse",
    SparseConfig,
    summary="a fixed mask of the top-density entries of each chosen weight by squared gradient (FISH); mergeable",
    combine_refusal="each run trains its own sparse mask; entries chosen by one run are absent from the other, so a weighted sum needs the masks' union, which no rule here defines",
    merge=merge,
    export_state=export_state,
    load_state=load_state,
    positionwise=True,
    needs_dense_base="adds trained entries into the base weights, which a 4-bit base cannot hold exactly",
    no_peft_reason="HF PEFT has no sparse-delta adapter; `peftcli merge` turns the run into a plain HF model",
    as_lora_refusal=("its update is a sparse set of weight entries with no low-rank structure, so a LoRA of useful "
                     "rank would approximate it poorly; `peftcli merge` writes the trained model instead"),
    budget=budget,
    calibrate=calibrate,
)(attach)
