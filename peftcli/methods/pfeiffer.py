"""Pfeiffer adapters (Pfeiffer et al. 2021; AdapterHub `seq_bn`): one bottleneck after the FFN.

Post-LN models (BERT family), as AdapterHub:

    x = LN(h + r);   a = f(x) + h;   out = LN(a + r)

implemented as out = LN(z + f(LN(z))) with z = h + r, the input the layer's own FFN norm already
receives (see bottleneck.add_post_ln), so the model's LN is reused and no tensor is kept aside.

Pre-LN models (GPT-2, Llama) have no norm after the residual add to reuse; the adapter sits on the
FFN output before the residual add, out = r + h + f(h) (Houlsby's FFN adapter alone). Adding a
norm to the residual stream, or feeding the adapter the residual, would change what every later
pre-LN layer sees even with f = 0 at start; this placement keeps the base model exact at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods.bottleneck import (
    AS_LORA_REFUSAL,
    COMBINE,
    COMBINE_HOWS,
    NO_PEFT_REASON,
    DenseBottleneckOptions,
    adapted_layers,
    bottleneck_dim,
    dense_bottleneck,
    dense_params,
    place_sequential,
)
from peftcli.methods.registry import register


@dataclass
class PfeifferConfig(DenseBottleneckOptions):
    pass


def attach(model: nn.Module, arch: Arch, cfg: PfeifferConfig) -> None:
    d = arch.hidden_size
    place_sequential(
        arch, "pfeiffer", adapted_layers(arch, cfg), lambda host: dense_bottleneck(d, cfg, host),
        attn=False, ffn=True, post_ln_ffn=arch.post_norm,
    )


def closed_form(hidden: int, num_layers: int, cfg: PfeifferConfig) -> int:
    """1 bottleneck per adapted layer: 2·m·d + m + d."""
    return num_layers * dense_params(hidden, bottleneck_dim(hidden, cfg))


def budget(model: nn.Module, arch: Arch, cfg: PfeifferConfig) -> int:
    return closed_form(arch.hidden_size, len(adapted_layers(arch, cfg)), cfg)


register(
    "pfeiffer",
    PfeifferConfig,
    summary="one bottleneck adapter after the FFN (post-LN: between the model's two norms)",
    merge_refusal="a bottleneck adapter is non-linear (W_up act(W_down x)); it cannot be folded into a weight",
    positionwise=True,
    no_peft_reason=NO_PEFT_REASON,
    as_lora_refusal=AS_LORA_REFUSAL,
    combine=COMBINE,
    combine_hows=COMBINE_HOWS,
    budget=budget,
)(attach)
