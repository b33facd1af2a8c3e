"""Compacter and Compacter++ (Mahabadi et al. 2021; AdapterHub `compacter`, `compacter++`).

A bottleneck adapter whose down and up projections are PHM (parameterised hypercomplex
multiplication) layers: an (out × in) weight built as a sum of n Kronecker products

    W = Σ_{i=1..n} A_i ⊗ B_i,   A_i ∈ R^{n×n},   B_i = s_i t_iᵀ ∈ R^{(out/n)×(in/n)}, rank r

The "slow" rules A_i are shared by every adapter in the model (one set for all down projections,
one for all up projections); the "fast" factors s_i, t_i belong to each layer. Compacter uses the
Houlsby placement (after attention and after the FFN), Compacter++ the Pfeiffer placement (after
the FFN only). Defaults as AdapterHub: n = 4, rank 1, reduction factor 32, gelu.

Parameter count, with d = hidden, m = bottleneck size, L = adapted layers, k = adapters per layer
(2 for Compacter, 1 for Compacter++):

    one PHM layer (in → out):   r·(in + out) + out          (s_i, t_i over i, plus the bias)
    one adapter:                2·r·(d + m) + m + d         (down d → m, up m → d)
    total:                      L·k·(2·r·(d + m) + m + d) + 2·n³
    with shared_phm_rule false: L·k·(2·r·(d + m) + m + d + 2·n³)

Init: s, t Glorot-uniform, biases 0, and the up projection's s = 0, so W_up = 0 and training starts
exactly at the base model while every factor still receives a gradient after the first step.
A_i ~ N(0, 1/n): then Var(W) = n·Var(A)·Var(B) = Var(B), so W has the scale of one Glorot-sized
factor product. AdapterHub draws A_i with std 0.01, which makes W (and each step's change to it)
about 50× smaller at n = 4; `phm_rule_std: 0.01` restores that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods.bottleneck import (
    AS_LORA_REFUSAL,
    COMBINE,
    COMBINE_HOWS,
    NO_PEFT_REASON,
    Bottleneck,
    BottleneckOptions,
    NonLinearity,
    adapted_layers,
    bottleneck_dim,
    factory_kwargs,
    place_sequential,
)
from peftcli.methods.registry import register

SHARED_NAME = "compacter_phm_rules"


@dataclass
class CompacterConfig(BottleneckOptions):
    reduction_factor: float = field(
        default=32.0, metadata={"min": 0.01, "help": "bottleneck size m = hidden / reduction_factor"}
    )
    non_linearity: NonLinearity = field(default="gelu", metadata={"help": "activation between down and up projection"})
    phm_dim: int = field(default=4, metadata={"min": 1, "help": "n: Kronecker sums per PHM layer; divides hidden and m"})
    phm_rank: int = field(default=1, metadata={"min": 1, "help": "rank r of each B_i = s_i t_iᵀ"})
    shared_phm_rule: bool = field(
        default=True, metadata={"help": "share the A_i across all layers (Compacter); false: one set per PHM layer"}
    )
    phm_rule_std: float | None = field(
        default=None,
        metadata={"min": 0.0, "help": "std of the A_i at init; null = 1/sqrt(phm_dim) (AdapterHub uses 0.01)"},
    )


class PHMRule(nn.Module):
    """The n matrices A_i (n × n), stacked as one (n, n, n) tensor."""

    def __init__(self, n: int, std: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=n**-0.5 if std is None else std)


class PHMLinear(nn.Module):
    """y = x Wᵀ + b with W = Σ_i A_i ⊗ (s_i t_iᵀ), (out × in) like nn.Linear."""

    def __init__(
        self, in_features: int, out_features: int, n: int, rank: int, rule: PHMRule | None,
        zero: bool = False, rule_std: float | None = None, device=None, dtype=None,
    ) -> None:
        super().__init__()
        for what, size in (("input", in_features), ("output", out_features)):
            if size % n:
                raise ValueError(
                    f"compacter: PHM {what} size {size} is not divisible by phm_dim {n}; "
                    "choose phm_dim / reduction_factor / bottleneck_size so that hidden and m are multiples of phm_dim"
                )
        self.in_features, self.out_features, self.n = in_features, out_features, n
        fk = {"device": device, "dtype": dtype}
        self.s = nn.Parameter(torch.empty(n, out_features // n, rank, **fk))
        self.t = nn.Parameter(torch.empty(n, rank, in_features // n, **fk))
        self.bias = nn.Parameter(torch.zeros(out_features, **fk))
        if rule is None:
            self.rule = PHMRule(n, rule_std, **fk)
            self._shared: tuple[PHMRule, ...] = ()
        else:
            # Kept out of the module tree: the model root owns it, so it is saved once.
            self._shared = (rule,)
        if self.s.device.type != "meta":
            with torch.no_grad():
                for i in range(n):
                    nn.init.xavier_uniform_(self.s[i])
                    nn.init.xavier_uniform_(self.t[i])
                if zero:
                    self.s.zero_()

    def phm_rule(self) -> torch.Tensor:
        return self._shared[0].weight if self._shared else self.rule.weight

    def weight(self) -> torch.Tensor:
        a = self.phm_rule()
        b = self.s @ self.t  # (n, out/n, in/n)
        n = self.n
        return torch.einsum("iab,icd->acbd", a, b).reshape(n * b.shape[1], n * b.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class SharedRules(nn.Module):
    def __init__(self, n: int, std: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.down = PHMRule(n, std, device=device, dtype=dtype)
        self.up = PHMRule(n, std, device=device, dtype=dtype)


def _attach(model: nn.Module, arch: Arch, cfg: CompacterConfig, prefix: str, houlsby: bool) -> None:
    d = arch.hidden_size
    m = bottleneck_dim(d, cfg)
    n = cfg.phm_dim
    layers = adapted_layers(arch, cfg)
    shared: SharedRules | None = None
    if cfg.shared_phm_rule and layers:
        if SHARED_NAME in model._modules:
            raise ValueError("compacter is already attached to this model")
        shared = SharedRules(n, cfg.phm_rule_std, **factory_kwargs(arch.get(layers[0], "ffn_out")))
        model.add_module(SHARED_NAME, shared)

    def make(host: nn.Module) -> Bottleneck:
        fk = factory_kwargs(host)
        down = PHMLinear(d, m, n, cfg.phm_rank, shared.down if shared else None, rule_std=cfg.phm_rule_std, **fk)
        up = PHMLinear(m, d, n, cfg.phm_rank, shared.up if shared else None, zero=True, rule_std=cfg.phm_rule_std,
                       **fk)
        return Bottleneck(d, m, non_linearity=cfg.non_linearity, scale=cfg.scale, dropout=cfg.dropout,
                          down=down, up=up, **fk)

    place_sequential(arch, prefix, layers, make, attn=houlsby, ffn=True, post_ln_ffn=not houlsby and arch.post_norm)


def attach(model: nn.Module, arch: Arch, cfg: CompacterConfig) -> None:
    _attach(model, arch, cfg, "compacter", houlsby=True)


def attach_pp(model: nn.Module, arch: Arch, cfg: CompacterConfig) -> None:
    _attach(model, arch, cfg, "compacterpp", houlsby=False)


def closed_form(hidden: int, num_layers: int, cfg: CompacterConfig, per_layer: int) -> int:
    """L·k·(2·r·(d + m) + m + d) + 2·n³ (shared rules), or L·k·(… + 2·n³) (unshared)."""
    d, m, n, r = hidden, bottleneck_dim(hidden, cfg), cfg.phm_dim, cfg.phm_rank
    per_adapter = 2 * r * (d + m) + m + d
    if cfg.shared_phm_rule:
        return num_layers * per_layer * per_adapter + (2 * n**3 if num_layers else 0)
    return num_layers * per_layer * (per_adapter + 2 * n**3)


def budget(model: nn.Module, arch: Arch, cfg: CompacterConfig) -> int:
    return closed_form(arch.hidden_size, len(adapted_layers(arch, cfg)), cfg, 2)


def budget_pp(model: nn.Module, arch: Arch, cfg: CompacterConfig) -> int:
    return closed_form(arch.hidden_size, len(adapted_layers(arch, cfg)), cfg, 1)


_REFUSAL = "a Compacter adapter is non-linear (W_up act(W_down x)); it cannot be folded into a weight"
_NO_PEFT = NO_PEFT_REASON.replace("bottleneck adapters", "Compacter, i.e. bottleneck adapters with PHM weights")

register(
    "compacter",
    CompacterConfig,
    summary="Houlsby-placed adapters with PHM (Kronecker-sum) projections, rules shared across layers",
    merge_refusal=_REFUSAL,
    positionwise=True,
    no_peft_reason=_NO_PEFT,
    as_lora_refusal=AS_LORA_REFUSAL,
    combine=COMBINE,
    combine_hows=COMBINE_HOWS,
    budget=budget,
)(attach)

register(
    "compacter++",
    CompacterConfig,
    summary="Pfeiffer-placed adapter (after the FFN) with PHM (Kronecker-sum) projections",
    merge_refusal=_REFUSAL,
    positionwise=True,
    no_peft_reason=_NO_PEFT,
    as_lora_refusal=AS_LORA_REFUSAL,
    combine=COMBINE,
    combine_hows=COMBINE_HOWS,
    budget=budget_pp,
)(attach_pp)
