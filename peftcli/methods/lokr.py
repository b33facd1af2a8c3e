"""LoKr (LyCORIS; Yeh et al. 2024): a Kronecker product whose factors may themselves be low rank.

    y = W x + ΔW x,   ΔW = (alpha / r) · W1 ⊗ W2,   W1 ∈ R^{a×c},  W2 ∈ R^{b×d},  out = a·b,  in = c·d

The shapes are HF PEFT's (0.21): (a, b) = factorization(out), (c, d) = factorization(in), each the
pair of divisors with a ≤ b found by `factorization` below (nearest the square root, or
`decompose_factor` when it divides). W2 is the low-rank product W2a W2b ([b, r] [r, d]) when
r < max(b, d) / 2, else a full matrix; W1 likewise only with `decompose_both`. At the start W1 (or
W1a) is zero and every other factor Kaiming-uniform(a=√5), so ΔW = 0. Names are PEFT's (`lokr_w1`,
`lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`).

Unlike KronA (methods/krona.py: s · A ⊗ B, A near √out × √in, no rank, no alpha/r), LoKr follows
PEFT's factorisation and scaling and exports to PEFT's LOKR type. The forward never forms ΔW: with x
viewed as X ∈ R^{c×d}, (W1 ⊗ W2) x = vec(W1 X W2ᵀ). The dropouts are LoHa's (methods/loha.py);
LoKr's rank dropout rescales the kept rows only with `rank_dropout_scale`, as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import merge_layer_adapters
from peftcli.core.arch import Arch
from peftcli.methods.bottleneck import factory_kwargs
from peftcli.methods.loha import (
    COMBINE_REFUSAL,
    TARGETS_HELP,
    LycorisLinear,
    kaiming_,
    lycoris_import,
    lycoris_layout,
    lycoris_settings,
    target_paths,
)
from peftcli.methods.lora import wrap_linears
from peftcli.methods.registry import PeftTwin, register
from peftcli.methods.targets import LAYERS_HELP


@dataclass
class LokrConfig:
    r: int = field(default=8, metadata={"min": 1, "help": "rank of W2 = W2a W2b (and of W1 with decompose_both) "
                                                          "when r < half its larger side; else that factor is full"})
    alpha: float = field(default=8.0, metadata={"min": 0.0, "help": "scaling numerator: ΔW is multiplied by alpha / r"})
    decompose_both: bool = field(default=False, metadata={"help": "also write W1 as a rank-r product W1a W1b"})
    decompose_factor: int = field(
        default=-1, metadata={"min": -1, "help": "-1: factor each dimension near its square root; f > 0: use f and "
                                                  "dim / f when f divides it (PEFT's decompose_factor)"})
    rank_dropout: float = field(
        default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "training only: probability of zeroing each output row of ΔW"})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "divide the rows rank dropout keeps by their fraction"})
    module_dropout: float = field(
        default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "training only: probability of skipping a layer's update"})
    targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": TARGETS_HELP})
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})

    def __post_init__(self) -> None:
        if self.decompose_factor == 0:
            raise ValueError("decompose_factor: 0 is no factor; give -1 (near the square root) or a positive divisor")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dim and m ≤ n, as PEFT's LoKr factors a dimension.

    A positive `factor` that divides `dim` gives (factor, dim / factor). Otherwise m steps through
    the divisors of dim while m < n and m stays within `factor` (no bound for -1), which ends at the
    divisor pair nearest √dim for -1. (PEFT's loop also stops when m + n would exceed 1 + dim,
    which no divisor pair does.)"""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        nxt = next(k for k in range(m + 1, dim + 1) if dim % k == 0)
        if nxt > bound:
            break
        m, n = nxt, dim // nxt
    return min(m, n), max(m, n)


def lokr_shapes(in_f: int, out_f: int, r: int, decompose_both: bool, factor: int) -> dict[str, tuple[int, int]]:
    """Every LoKr tensor of an (out, in) layer, by PEFT's name, with its shape."""
    c, d = factorization(in_f, factor)
    a, b = factorization(out_f, factor)
    shapes: dict[str, tuple[int, int]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    else:
        shapes["lokr_w2"] = (b, d)
    return shapes


class LokrLinear(LycorisLinear):
    """A frozen linear layer with LoKr's ΔW = (alpha/r) · W1 ⊗ W2."""

    peft_tensors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, base: nn.Module, cfg: LokrConfig) -> None:
        super().__init__(base, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout)
        self.rescale_rank_dropout = cfg.rank_dropout_scale
        fk = factory_kwargs(base)
        shapes = lokr_shapes(self.in_features, self.out_features, cfg.r, cfg.decompose_both, cfg.decompose_factor)
        for name, shape in shapes.items():  # PEFT's order of draws: W1 (or W1b), then W2 (or W2a, W2b)
            p = nn.Parameter(torch.zeros(shape, **fk))
            setattr(self, name, p)
            if name not in ("lokr_w1", "lokr_w1_a"):
                kaiming_(p)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 and W2, each the full matrix or its low-rank product."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · W1 ⊗ W2 as an (out, in) matrix."""
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.factors()
        xs = x.to(w1.dtype)
        xs = xs.reshape(*xs.shape[:-1], w1.shape[1], w2.shape[1])  # (..., c, d)
        z = torch.matmul(w1, torch.matmul(xs, w2.t()))  # (..., a, b) = W1 X W2ᵀ
        return z.reshape(*z.shape[:-2], self.out_features) * self.scaling


def attach(model: nn.Module, arch: Arch, cfg: LokrConfig) -> None:
    wrap_linears(model, target_paths(model, arch, cfg), lambda m: LokrLinear(m, cfg))


def merge(model: nn.Module, arch: Arch, cfg: LokrConfig) -> None:
    merge_layer_adapters(model, LokrLinear)


def budget(model: nn.Module, arch: Arch, cfg: LokrConfig) -> int:
    """Per adapted layer, the sizes of its factors (lokr_shapes): a·c or r(a + c) for W1, b·d or
    r(b + d) for W2."""
    return sum(sum(s[0] * s[1] for s in lokr_shapes(m.in_features, m.out_features, cfg.r, cfg.decompose_both,
                                                    cfg.decompose_factor).values())
               for m in model.modules() if isinstance(m, LokrLinear))


# ------------------------------------------------------------------ HF PEFT's LOKR type


def peft_layout(model: nn.Module, arch: Arch, cfg: LokrConfig, lay: fmt.Layout) -> None:
    lycoris_layout(model, LokrLinear, "lokr", "LOKR", lay, {
        "r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
        "decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": cfg.rank_dropout_scale,
    })


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**lycoris_import(config), "decompose_both": bool(config.get("decompose_both", False)),
            "decompose_factor": int(config.get("decompose_factor", -1)),
            "rank_dropout_scale": bool(config.get("rank_dropout_scale", False))}


def peft_settings(config: dict[str, Any], cfg: LokrConfig) -> tuple[list[tuple[str, str, Any, Any]], list[str]]:
    """r, decompose_both and decompose_factor decide which factors exist and their shapes."""
    pairs, problems = lycoris_settings(config, cfg)
    pairs += [("decompose_both", "decompose_both", bool(config.get("decompose_both", False)), cfg.decompose_both),
              ("decompose_factor", "decompose_factor", int(config.get("decompose_factor", -1)), cfg.decompose_factor)]
    return pairs, problems


register(
    "lokr",
    LokrConfig,
    summary="LoKr: Kronecker product W1 ⊗ W2 (W2 low rank) beside chosen linear layers; mergeable",
    merge=merge,
    positionwise=True,
    budget=budget,
    combine_refusal=COMBINE_REFUSAL.format(kind="LoKr", why="ΔW is a Kronecker product of them"),
    peft=PeftTwin(
        peft_type="LOKR",
        layout=peft_layout,
        import_config=from_peft_config,
        settings=peft_settings,
        key_suffixes=tuple(f".{t}" for t in (*LokrLinear.peft_tensors, "lokr_t2")),
    ),
)(attach)

__all__ = ["LokrConfig", "LokrLinear", "attach", "factorization", "merge"]
