"""Houlsby adapters (Houlsby et al. 2019; AdapterHub `double_seq_bn`).

Two bottlenecks per layer, one after the attention output projection and one after the FFN
output projection, each before its sub-layer's residual add (and, on post-LN models, its norm):

    a = f(h) + h;   out = LN(a + r)          (pre-LN: out = r + a)

The adapter is a forward hook on the projection itself (arch roles `o`, `ffn_out`), so it reads h
before the sub-layer's own dropout (AdapterHub reads it after); in evaluation the two coincide.
Default init is near identity (up-projection zero), so training starts at the base model.
Not mergeable: f is non-linear.
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
    DenseBottleneckOptions,
    NonLinearity,
    adapted_layers,
    bottleneck_dim,
    dense_bottleneck,
    dense_params,
    place_sequential,
)
from peftcli.methods.registry import register


@dataclass
class HoulsbyConfig(DenseBottleneckOptions):
    non_linearity: NonLinearity = field(default="swish", metadata={"help": "activation between down and up projection"})


def attach(model: nn.Module, arch: Arch, cfg: HoulsbyConfig) -> None:
    d = arch.hidden_size
    place_sequential(
        arch, "houlsby", adapted_layers(arch, cfg), lambda host: dense_bottleneck(d, cfg, host),
        attn=True, ffn=True, post_ln_ffn=False,
    )


def closed_form(hidden: int, num_layers: int, cfg: HoulsbyConfig) -> int:
    """2 bottlenecks per adapted layer, each 2·m·d + m + d."""
    return 2 * num_layers * dense_params(hidden, bottleneck_dim(hidden, cfg))


def budget(model: nn.Module, arch: Arch, cfg: HoulsbyConfig) -> int:
    return closed_form(arch.hidden_size, len(adapted_layers(arch, cfg)), cfg)


register(
    "houlsby",
    HoulsbyConfig,
    summary="bottleneck adapters after attention and after the FFN, before each residual add",
    merge_refusal="a bottleneck adapter is non-linear (W_up act(W_down h)); it cannot be folded into a weight",
    positionwise=True,
    no_peft_reason=NO_PEFT_REASON,
    as_lora_refusal=AS_LORA_REFUSAL,
    combine=COMBINE,
    combine_hows=COMBINE_HOWS,
    budget=budget,
)(attach)
