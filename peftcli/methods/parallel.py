"""Parallel adapters (He et al. 2022; AdapterHub `par_bn`) and the scaled variant.

The bottleneck reads the sub-layer input x_in instead of its output and is added to the output
projection, in parallel with the frozen sub-layer:

    h' = h + s · f(x_in)          (post-LN: out = LN(h + s·f(r) + r); pre-LN: out = r + h + s·f(LN(r)))

x_in is what the sub-layer module (arch role `ffn`, or `attn` with `attn: true`) receives, which is
the normalised residual on pre-LN models, as in He et al.

Defaults follow AdapterHub par_bn: reduction factor 2, s = 4, down Kaiming-uniform / up zero.
`scaled_parallel` is the same placement with `learned_scale`: s becomes a trainable scalar per
adapter, initialised to `scale` (He et al. report fixed s = 4 beating both s = 1 and learned s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods.bottleneck import (
    AS_LORA_REFUSAL,
    COMBINE,
    COMBINE_HOWS,
    NO_PEFT_REASON,
    AdapterInit,
    DenseBottleneckOptions,
    adapted_layers,
    add_parallel,
    bottleneck_dim,
    dense_bottleneck,
    dense_params,
    get_role,
)
from peftcli.methods.registry import register


@dataclass
class ParallelConfig(DenseBottleneckOptions):
    reduction_factor: float = field(
        default=2.0, metadata={"min": 0.01, "help": "bottleneck size m = hidden / reduction_factor"}
    )
    scale: float = field(default=4.0, metadata={"help": "s in h + s · f(x_in)"})
    init: AdapterInit = field(
        default="lora",
        metadata={
            "help": "lora: down Kaiming-uniform, up 0 (par_bn); near_identity: down N(0, 0.01²), up 0; "
            "bert: both N(0, 0.02²) (AdapterHub's default for sequential adapters). Biases start at 0"
        },
    )
    attn: bool = field(default=False, metadata={"help": "also add a parallel adapter to the attention sub-layer"})


@dataclass
class ScaledParallelConfig(ParallelConfig):
    learned_scale: bool = field(default=False, metadata={"help": "train s (one scalar per adapter, starts at `scale`)"})


def _attach(arch: Arch, cfg: ParallelConfig, prefix: str, learned: bool) -> None:
    d = arch.hidden_size
    for i in adapted_layers(arch, cfg):
        layer = arch.layer(i)
        sites = [("ffn", "ffn", "ffn_out")] + ([("attn", "attn", "o")] if cfg.attn else [])
        for tag, src_role, host_role in sites:
            host = get_role(arch, i, host_role)
            adapter = dense_bottleneck(d, cfg, host, learned_scale=learned)
            add_parallel(layer, f"{prefix}_{tag}", get_role(arch, i, src_role), host, adapter)


def attach(model: nn.Module, arch: Arch, cfg: ParallelConfig) -> None:
    _attach(arch, cfg, "parallel", learned=False)


def attach_scaled(model: nn.Module, arch: Arch, cfg: ScaledParallelConfig) -> None:
    _attach(arch, cfg, "scaled_parallel", learned=cfg.learned_scale)


def closed_form(hidden: int, num_layers: int, cfg: ParallelConfig) -> int:
    """Per adapted layer, one bottleneck (two with `attn`) of 2·m·d + m + d, + 1 for a learned s."""
    per = dense_params(hidden, bottleneck_dim(hidden, cfg)) + int(getattr(cfg, "learned_scale", False))
    return num_layers * per * (2 if cfg.attn else 1)


def budget(model: nn.Module, arch: Arch, cfg: ParallelConfig) -> int:
    return closed_form(arch.hidden_size, len(adapted_layers(arch, cfg)), cfg)


_REFUSAL = "a parallel adapter is non-linear (W_up act(W_down x)); it cannot be folded into a weight"

register(
    "parallel",
    ParallelConfig,
    summary="bottleneck adapter reading the FFN input, added to the FFN output (s = 4); optional on attention",
    merge_refusal=_REFUSAL,
    positionwise=True,
    no_peft_reason=NO_PEFT_REASON,
    as_lora_refusal=AS_LORA_REFUSAL,
    combine=COMBINE,
    combine_hows=COMBINE_HOWS,
    budget=budget,
)(attach)

register(
    "scaled_parallel",
    ScaledParallelConfig,
    summary="parallel adapter with the scale s fixed or learned",
    merge_refusal=_REFUSAL,
    positionwise=True,
    no_peft_reason=NO_PEFT_REASON,
    as_lora_refusal=AS_LORA_REFUSAL,
    combine=COMBINE,
    combine_hows=COMBINE_HOWS,
    budget=budget,
)(attach_scaled)
