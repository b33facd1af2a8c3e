"""KronA (Edalati et al. 2022): a Kronecker-product update beside a frozen linear layer.

    y = W x + s · (A ⊗ B) dropout(x),   A ∈ R^{a1×a2},  B ∈ R^{(out/a1)×(in/a2)}

Unlike LoRA's rank-r product, A ⊗ B can be full rank for the same parameter count. The product is
never formed in the forward pass: with x viewed as X ∈ R^{a2×(in/a2)}, (A ⊗ B) x = vec(A X Bᵀ).

Factor shapes: `a1`, `a2` when given; otherwise each is the divisor of out (resp. in) closest to
its square root, which nearly minimises a1·a2 + (out·in)/(a1·a2). A is Kaiming-uniform and B is
zero, so ΔW = 0 at the start. Mergeable: ΔW is added to W in the layer's own storage convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from peftcli.core.adapter import LayerAdapter, merge_layer_adapters
from peftcli.core.adapter_merging import WEIGHTED, averaging
from peftcli.core.arch import Arch, linear_dims, set_module
from peftcli.methods.bottleneck import adapted_layers, factory_kwargs
from peftcli.methods.lora import merge_into_base
from peftcli.methods.registry import register
from peftcli.methods.targets import LAYERS_HELP, require_linears


@dataclass
class KronaConfig:
    targets: list[str] = field(
        default_factory=lambda: ["q", "v"],
        metadata={"help": "roles (q, k, v, o, ffn_in, ffn_out), 'all-linear', or module-name patterns"},
    )
    a1: int | None = field(default=None, metadata={"min": 1, "help": "rows of A (divides out_features); null = ≈√out"})
    a2: int | None = field(default=None, metadata={"min": 1, "help": "columns of A (divides in_features); null = ≈√in"})
    scale: float = field(default=1.0, metadata={"help": "s in ΔW = s · (A ⊗ B)"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "dropout on the adapter input"})
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})
    leave_out: list[int] = field(
        default_factory=list, metadata={"help": "old spelling: layer indices that get no adapter; use layers"}
    )


def near_sqrt_divisor(n: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - math.sqrt(n)), k))


class KronaLinear(LayerAdapter):
    """Wraps a frozen nn.Linear or GPT-2 Conv1D with s · (A ⊗ B)."""

    def __init__(self, base: nn.Module, a1: int | None, a2: int | None, scale: float, dropout: float) -> None:
        super().__init__(base)
        in_f, out_f = linear_dims(base)
        a1 = a1 or near_sqrt_divisor(out_f)
        a2 = a2 or near_sqrt_divisor(in_f)
        if out_f % a1 or in_f % a2:
            raise ValueError(
                f"krona: A of shape ({a1}, {a2}) does not tile a ({out_f}, {in_f}) weight; "
                "a1 must divide out_features and a2 in_features"
            )
        self.in_features, self.out_features = in_f, out_f
        self.scaling = scale
        fk = factory_kwargs(base)
        self.krona_A = nn.Parameter(torch.empty(a1, a2, **fk))
        self.krona_B = nn.Parameter(torch.zeros(out_f // a1, in_f // a2, **fk))
        if self.krona_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))
        self.krona_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """s · (A ⊗ B) as an (out, in) matrix."""
        return self.scaling * torch.kron(self.krona_A, self.krona_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        a, b = self.krona_A, self.krona_B
        xs = self.krona_dropout(x).to(a.dtype)
        xs = xs.reshape(*xs.shape[:-1], a.shape[1], b.shape[1])  # (..., a2, in/a2)
        z = torch.matmul(a, torch.matmul(xs, b.t()))  # (..., a1, out/a1) = A X Bᵀ
        return y + (self.scaling * z.reshape(*z.shape[:-2], self.out_features)).to(y.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        return merge_into_base(self.base, self.delta_weight())


def attach(model: nn.Module, arch: Arch, cfg: KronaConfig) -> None:
    paths = require_linears(model, arch, cfg.targets, adapted_layers(arch, cfg))
    for p in paths:
        set_module(model, p, KronaLinear(model.get_submodule(p), cfg.a1, cfg.a2, cfg.scale, cfg.dropout))


def merge(model: nn.Module, arch: Arch, cfg: KronaConfig) -> None:
    merge_layer_adapters(model, KronaLinear)


register(
    "krona",
    KronaConfig,
    summary="Kronecker-product update s·(A ⊗ B) beside chosen linear layers; mergeable",
    merge=merge,
    positionwise=True,
    # Averaging A and B (AdapterHub's linear merging of parameters) makes the update (sum w_i A_i) ⊗
    # (sum w_i B_i), not sum w_i A_i ⊗ B_i; exact only for equal adapters.
    combine=averaging(("dropout",), "a negative weight negates both A and B, and (-A) ⊗ (-B) = A ⊗ B: it does "
                                    "not subtract a KronA update"),
    combine_hows=(WEIGHTED,),
    no_peft_reason=(
        "HF PEFT has no KronA update s·(A ⊗ B) (its LoKr factorises differently and is not "
        "interchangeable); `peftcli merge` turns the run into a plain HF model instead"
    ),
)(attach)
