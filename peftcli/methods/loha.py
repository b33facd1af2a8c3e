"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a Hadamard product of two low-rank updates.

    y = W x + ΔW x,   ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b),   W·a ∈ R^{out×r}, W·b ∈ R^{r×in}

The element-wise product of two rank-r matrices can have rank up to r², for the parameters of two
rank-r LoRAs. As HF PEFT (0.21): W1a, W1b, W2a are Kaiming-uniform(a=√5) and W2b is zero, so ΔW = 0
at the start; parameter names are PEFT's (`hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a`,
`hada_w2_b`), so exporting is a key rename.

Training-time regularisers, as PEFT defines them (both off by default, neither active at eval):
`module_dropout` skips a layer's whole update with that probability per forward; `rank_dropout`
zeroes each output row of ΔW with that probability and rescales the kept rows by 1 / (fraction
kept) (PEFT's "rank" dropout acts on ΔW's rows, not on the rank).

This file also holds what LoKr (methods/lokr.py) shares with LoHa, both being LyCORIS types of
PEFT: the layer base class with the two dropouts, and the PEFT layout and config reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import LayerAdapter, merge_layer_adapters
from peftcli.core.arch import Arch, is_conv1d, linear_dims
from peftcli.methods.bottleneck import factory_kwargs
from peftcli.methods.lora import merge_into_base, wrap_linears
from peftcli.methods.registry import PeftTwin, register
from peftcli.methods.targets import LAYERS_HELP, parse_layers, require_linears

TARGETS_HELP = "roles (q, k, v, o, ffn_in, ffn_out), 'all-linear', or module-name patterns"


@dataclass
class LohaConfig:
    r: int = field(default=8, metadata={"min": 1, "help": "rank of each of the two factors W1a W1b and W2a W2b"})
    alpha: float = field(default=8.0, metadata={"min": 0.0, "help": "scaling numerator: ΔW is multiplied by alpha / r"})
    rank_dropout: float = field(
        default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "training only: probability of zeroing each output row "
                                                                "of ΔW (the kept rows are divided by their fraction)"})
    module_dropout: float = field(
        default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "training only: probability of skipping a layer's update"})
    targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": TARGETS_HELP})
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})


def kaiming_(t: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) default start for a factor: Kaiming-uniform with a = √5."""
    if t.device.type != "meta":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LycorisLinear(LayerAdapter):
    """A frozen nn.Linear or GPT-2 Conv1D with an update ΔW whose parameters a subclass defines.

    The subclass gives `delta_weight()` (ΔW as (out, in), scaled) and may give `delta_out(x)`, ΔW x
    computed without forming ΔW. Here: the two training-time dropouts of PEFT's LyCORIS layers, and
    the merge.
    """

    # Whether rank dropout divides the kept rows by their fraction (LoHa always; LoKr by option).
    rescale_rank_dropout: bool = True

    def __init__(self, base: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float) -> None:
        super().__init__(base)
        self.in_features, self.out_features = linear_dims(base)
        self.r = r
        self.scaling = alpha / r
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x; subclasses override it where a cheaper form exists."""
        dw = self.delta_weight()
        return F.linear(x.to(dw.dtype), dw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        # In training PEFT draws the module-dropout number on every call, even at p = 0; drawing
        # alike keeps the random stream, and so train-mode outputs, the same as PEFT's.
        if self.training and not bool(torch.rand(1) > self.module_dropout):
            return y
        d = self.delta_out(x)
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(self.out_features) > self.rank_dropout).to(device=d.device, dtype=d.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean()
            d = d * keep
        return y + d.to(y.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        return merge_into_base(self.base, self.delta_weight())


class _Hadamard(torch.autograd.Function):
    """s · (W1a W1b) ⊙ (W2a W2b), keeping only the four factors for backward: autograd's own graph
    would hold both [out, in] products of every adapted layer until the backward pass."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):  # type: ignore[override]
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g = grad * ctx.scale
        g1 = g * (w2a @ w2b)  # d/d(W1a W1b)
        g2 = g * (w1a @ w1b)  # d/d(W2a W2b)
        return g1 @ w1b.t(), w1a.t() @ g1, g2 @ w2b.t(), w2a.t() @ g2, None


class LohaLinear(LycorisLinear):
    """A frozen linear layer with LoHa's ΔW = (alpha/r) · (W1a W1b) ⊙ (W2a W2b)."""

    peft_tensors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float) -> None:
        super().__init__(base, r, alpha, rank_dropout, module_dropout)
        fk = factory_kwargs(base)
        out_f, in_f = self.out_features, self.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, r, **fk))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_f, **fk))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, r, **fk))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_f, **fk))
        for t in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):  # PEFT's order of draws
            kaiming_(t)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · (W1a W1b) ⊙ (W2a W2b) as an (out, in) matrix."""
        return _Hadamard.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)


def target_paths(model: nn.Module, arch: Arch, cfg: Any) -> list[str]:
    """The linear layers `cfg.targets` and `cfg.layers` choose (LoHa, LoKr, VeRA); none is an error."""
    return require_linears(model, arch, cfg.targets, parse_layers(cfg.layers, arch.num_layers))


def attach(model: nn.Module, arch: Arch, cfg: LohaConfig) -> None:
    wrap_linears(model, target_paths(model, arch, cfg),
                 lambda m: LohaLinear(m, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout))


def merge(model: nn.Module, arch: Arch, cfg: LohaConfig) -> None:
    merge_layer_adapters(model, LohaLinear)


def budget(model: nn.Module, arch: Arch, cfg: LohaConfig) -> int:
    """2 r (out + in) per adapted layer: two [out, r] and two [r, in] factors."""
    return sum(2 * m.r * (m.out_features + m.in_features) for m in model.modules() if isinstance(m, LohaLinear))


# ------------------------------------------------------------------ HF PEFT's LyCORIS types (LOHA, LOKR)


def lycoris_layout(model: nn.Module, kind: type, name: str, peft_type: str, lay: fmt.Layout,
                   config: dict[str, Any]) -> None:
    """PEFT's tensors sit at our module paths under the same names. PEFT's LyCORIS layers wrap
    torch's nn.Linear (and convolutions) only, so a model whose adapted layers are GPT-2's Conv1D
    has no PEFT form."""
    wrapped = fmt.adapted_linears(model, kind, name)
    conv = [n for n, m in wrapped if is_conv1d(m.base)]
    if conv:
        raise fmt.PeftFormatError(
            f"HF PEFT's {peft_type} adapts torch's nn.Linear layers only, and {conv[0]} (like every linear layer "
            "of GPT-2) is transformers' Conv1D, which PEFT refuses for this type; use the run folder with peftcli, "
            "or `peftcli merge` for a plain HF model"
        )
    fmt.linear_targets(model, lay, wrapped)
    del lay.config["fan_in_fan_out"]  # not a LyCORIS option (always nn.Linear); PEFT warns about unknown keys
    for n, m in wrapped:
        for t, _ in m.named_parameters(recurse=False):
            lay.to_peft[f"{n}.{t}"] = f"base_model.model.{n}.{t}"
            lay.module_of[f"base_model.model.{n}.{t}"] = n
    lay.config.update({"layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                       "init_weights": True, "use_effective_conv2d": False, **config})


def lycoris_import(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe options every LyCORIS type shares, from its adapter_config.json."""
    block: dict[str, Any] = dict(
        r=int(config.get("r", 8)), alpha=float(config.get("alpha", 8)),
        rank_dropout=float(config.get("rank_dropout", 0.0)), module_dropout=float(config.get("module_dropout", 0.0)),
        targets=fmt.module_list(config, "target_modules"),
    )
    layers = config.get("layers_to_transform")
    if layers is not None:
        block["layers"] = ",".join(str(i) for i in ([layers] if isinstance(layers, int) else layers))
    return block


def lycoris_settings(config: dict[str, Any], cfg: Any) -> tuple[list[tuple[str, str, Any, Any]], list[str]]:
    """r and alpha decide the shapes and the scale; the patterns (a rank or alpha per layer) have
    no recipe key here."""
    pairs = [("r", "r", int(config.get("r", 8)), cfg.r),
             ("alpha", "alpha", float(config.get("alpha", 8)), float(cfg.alpha))]
    problems = []
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("adapter_config.json sets rank_pattern/alpha_pattern (a rank or alpha per layer), "
                        "which peftcli's LoHa and LoKr do not have")
    return pairs, problems


def peft_layout(model: nn.Module, arch: Arch, cfg: LohaConfig, lay: fmt.Layout) -> None:
    lycoris_layout(model, LohaLinear, "loha", "LOHA", lay, {
        "r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
    })


# HF PEFT 0.21's add_weighted_adapter exists for LoRA and IA³ only.
COMBINE_REFUSAL = (
    "HF PEFT has no add_weighted_adapter for {kind}, so there is no rule to match, and a weighted sum of "
    "the factors is not the weighted sum of the updates ({why})"
)

register(
    "loha",
    LohaConfig,
    summary="LoHa: Hadamard product of two low-rank updates beside chosen linear layers; mergeable",
    merge=merge,
    positionwise=True,
    budget=budget,
    combine_refusal=COMBINE_REFUSAL.format(kind="LoHa", why="ΔW is a product of them"),
    peft=PeftTwin(
        peft_type="LOHA",
        layout=peft_layout,
        import_config=lycoris_import,
        settings=lycoris_settings,
        key_suffixes=tuple(f".{t}" for t in (*LohaLinear.peft_tensors, "hada_t1", "hada_t2")),
    ),
)(attach)

__all__ = ["LohaConfig", "LohaLinear", "LycorisLinear", "attach", "merge"]
