"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every adapted layer,
and two trained scaling vectors per layer.

    y = W x + Λ_b B Λ_d A dropout(x),   Λ_b = diag(λ_b) [out],  Λ_d = diag(λ_d) [r]

A [r, in_max] and B [out_max, r] are drawn once, as HF PEFT (0.21) draws them: a CPU generator
seeded with `projection_prng_key`, A first, each uniform in ±√3·√2/√fan_in (Kaiming-uniform, fan_in
= columns), with in_max and out_max the largest input and output sizes among the adapted layers.
Each layer reads the top-left block it needs (A[:, :in], B[:out, :]). λ_b starts at 0 and λ_d at
`d_initial`, so ΔW = 0 at the start; only the vectors train (out + r numbers per layer, about ten
times fewer than LoRA's r (in + out) at the paper's ranks).

The shared matrices live once, on the model (`peftcli_vera`, buffers that no state dict holds);
every layer keeps a reference. With `save_projection` (PEFT's default) the adapter file holds them
too, as PEFT's does (`base_model.vera_A` / `vera_B` there), so that loading never depends on
regenerating them; without it they are regenerated from the key. Names are PEFT's
(`vera_lambda_b`, `vera_lambda_d`), so exporting is a key rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import LayerAdapter, copy_into_params, merge_layer_adapters
from peftcli.core.arch import Arch, linear_dims
from peftcli.core.errors import CheckpointError
from peftcli.methods.bottleneck import factory_kwargs
from peftcli.methods.loha import COMBINE_REFUSAL, TARGETS_HELP, target_paths
from peftcli.methods.lora import merge_into_base, wrap_linears
from peftcli.methods.registry import PeftTwin, register
from peftcli.methods.targets import LAYERS_HELP

ATTR = "peftcli_vera"  # the shared projections' module on the top model
PROJECTIONS = (f"{ATTR}.vera_A", f"{ATTR}.vera_B")  # their names in the adapter file


@dataclass
class VeraConfig:
    r: int = field(default=256, metadata={"min": 1, "help": "rank of the shared random matrices A [r, in], B [out, r]"})
    targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": TARGETS_HELP})
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})
    projection_prng_key: int = field(default=0, metadata={"min": 0, "help": "seed of the shared random A and B"})
    d_initial: float = field(default=0.1, metadata={"help": "starting value of every entry of λ_d"})
    vera_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "dropout on the adapter input"})
    save_projection: bool = field(
        default=True, metadata={"help": "keep A and B in the adapter file (else they are regenerated from the key)"})


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform in ±√3 · √2 / √fan_in, the bound computed in PEFT's order so that it rounds alike."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(key: int, r: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in_max] and B [out_max, r] in float32, drawn in that order from one seeded generator."""
    g = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming((r, in_max), g)
    return a, _kaiming((out_max, r), g)


class VeraProjection(nn.Module):
    """The frozen A and B every VeRA layer of a model reads."""

    def __init__(self, key: int, r: int, in_max: int, out_max: int, fk: dict[str, Any]) -> None:
        super().__init__()
        if fk["device"].type == "meta":
            a, b = torch.empty(r, in_max, **fk), torch.empty(out_max, r, **fk)
        else:
            a, b = (t.to(**fk) for t in projections(key, r, in_max, out_max))
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


class VeraLinear(LayerAdapter):
    """A frozen nn.Linear or GPT-2 Conv1D with VeRA's Λ_b B Λ_d A beside it."""

    def __init__(self, base: nn.Module, shared: VeraProjection, cfg: VeraConfig) -> None:
        super().__init__(base)
        self.in_features, self.out_features = linear_dims(base)
        self.r = cfg.r
        fk = factory_kwargs(base)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **fk))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), cfg.d_initial, **fk))
        self.vera_dropout = nn.Dropout(cfg.vera_dropout) if cfg.vera_dropout > 0 else nn.Identity()
        self._shared = (shared,)  # a reference, not a child: the matrices are the model's, once

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's blocks A[:, :in] and B[:out, :], in the vectors' dtype."""
        shared, dt = self._shared[0], self.vera_lambda_d.dtype
        return shared.vera_A[:, : self.in_features].to(dt), shared.vera_B[: self.out_features, :].to(dt)

    def delta_weight(self) -> torch.Tensor:
        """Λ_b B Λ_d A as an (out, in) matrix."""
        a, b = self.sliced()
        return (self.vera_lambda_b.unsqueeze(-1) * b) @ (self.vera_lambda_d.unsqueeze(-1) * a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        a, b = self.sliced()
        xs = self.vera_dropout(x.to(self.vera_lambda_d.dtype))
        return (y + self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(xs, a), b)).to(y.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        return merge_into_base(self.base, self.delta_weight())


def find_store(model: nn.Module) -> VeraProjection:
    store = getattr(model, ATTR, None)
    if not isinstance(store, VeraProjection):
        raise CheckpointError("no VeRA projections on this model; was the vera method attached?")
    return store


def attach(model: nn.Module, arch: Arch, cfg: VeraConfig) -> None:
    paths = target_paths(model, arch, cfg)
    dims = [linear_dims(model.get_submodule(p)) for p in paths]
    store = VeraProjection(cfg.projection_prng_key, cfg.r, max(d[0] for d in dims), max(d[1] for d in dims),
                           factory_kwargs(model.get_submodule(paths[0])))
    setattr(model, ATTR, store)
    wrap_linears(model, paths, lambda m: VeraLinear(m, store, cfg))


def merge(model: nn.Module, arch: Arch, cfg: VeraConfig) -> None:
    merge_layer_adapters(model, VeraLinear)
    delattr(model, ATTR)


def budget(model: nn.Module, arch: Arch, cfg: VeraConfig) -> int:
    """out + r per adapted layer (λ_b and λ_d); the shared A and B are not trained."""
    return sum(m.out_features + m.r for m in model.modules() if isinstance(m, VeraLinear))


def export_state(model: nn.Module, arch: Arch, cfg: VeraConfig) -> dict[str, torch.Tensor]:
    """The trained vectors (and the task head), plus A and B with save_projection."""
    sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if cfg.save_projection:
        store = find_store(model)
        sd.update(zip(PROJECTIONS, (store.vera_A, store.vera_B), strict=True))
    return sd


def load_state(model: nn.Module, arch: Arch, cfg: VeraConfig, sd: dict[str, torch.Tensor]) -> None:
    """As the default load, with A and B taken from the file when it holds them."""
    store = find_store(model)
    targets = dict(model.named_parameters())
    targets.update(zip(PROJECTIONS, (store.vera_A, store.vera_B), strict=True))
    unknown = [k for k in sd if k not in targets]
    if unknown:
        raise CheckpointError(f"adapter has {len(unknown)} tensors this model lacks (e.g. {unknown[0]}); "
                              "was it trained with another base model or method?")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in sd]
    if missing:
        raise CheckpointError(f"adapter is missing {len(missing)} trained tensors (e.g. {missing[0]})")
    copy_into_params(targets, sd)


# ------------------------------------------------------------------ HF PEFT's VERA type


def peft_layout(model: nn.Module, arch: Arch, cfg: VeraConfig, lay: fmt.Layout) -> None:
    """The vectors sit at our module paths; A and B, saved once, at `base_model.vera_A` / `vera_B`."""
    wrapped = fmt.adapted_linears(model, VeraLinear, "vera")
    fmt.linear_targets(model, lay, wrapped)
    del lay.config["exclude_modules"]  # not a field of PEFT's VeraConfig, which warns about unknown keys
    for n, _ in wrapped:
        for t in ("vera_lambda_b", "vera_lambda_d"):
            lay.to_peft[f"{n}.{t}"] = f"base_model.model.{n}.{t}"
            lay.module_of[f"base_model.model.{n}.{t}"] = n
    if cfg.save_projection:
        lay.to_peft.update({PROJECTIONS[0]: "base_model.vera_A", PROJECTIONS[1]: "base_model.vera_B"})
    lay.config.update({
        "r": cfg.r, "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
        "vera_dropout": cfg.vera_dropout, "d_initial": cfg.d_initial, "bias": "none", "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    })


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = dict(
        r=int(config.get("r", 256)), targets=fmt.module_list(config, "target_modules"),
        projection_prng_key=int(config.get("projection_prng_key", 0)), d_initial=float(config.get("d_initial", 0.1)),
        vera_dropout=float(config.get("vera_dropout", 0.0)), save_projection=bool(config.get("save_projection", True)),
    )
    layers = config.get("layers_to_transform")
    if layers is not None:
        block["layers"] = ",".join(str(i) for i in ([layers] if isinstance(layers, int) else layers))
    return block


def peft_settings(config: dict[str, Any], cfg: VeraConfig) -> tuple[list[tuple[str, str, Any, Any]], list[str]]:
    """r sets the shapes; the key and save_projection decide where A and B come from."""
    pairs = [("r", "r", int(config.get("r", 256)), cfg.r),
             ("projection_prng_key", "projection_prng_key", int(config.get("projection_prng_key", 0)),
              cfg.projection_prng_key),
             ("save_projection", "save_projection", bool(config.get("save_projection", True)), cfg.save_projection)]
    problems = []
    if config.get("bias", "none") != "none":
        problems.append(f"adapter_config.json trains biases (bias: {config.get('bias')!r}), which peftcli's VeRA does not")
    return pairs, problems


register(
    "vera",
    VeraConfig,
    summary="VeRA: frozen shared random A, B and trained scaling vectors λ_b, λ_d per linear layer; mergeable",
    merge=merge,
    positionwise=True,
    budget=budget,
    export_state=export_state,
    load_state=load_state,
    combine_refusal=COMBINE_REFUSAL.format(kind="VeRA", why="ΔW = Λ_b B Λ_d A is a product of the two vectors"),
    peft=PeftTwin(
        peft_type="VERA",
        layout=peft_layout,
        import_config=from_peft_config,
        settings=peft_settings,
        key_suffixes=(".vera_lambda_b", ".vera_lambda_d"),
    ),
)(attach)

__all__ = ["VeraConfig", "VeraLinear", "VeraProjection", "attach", "find_store", "merge", "projections"]
