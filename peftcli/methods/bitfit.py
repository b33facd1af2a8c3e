"""BitFit (Ben Zaken et al. 2022): train only the bias terms (and the task head).

Nothing is added: once the trained biases are loaded they are part of the base weights, so
"merging" is writing the model out as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods.registry import register
from peftcli.methods.targets import LAYERS_HELP, method_layers


@dataclass
class BitFitConfig:
    include_norm_bias: bool = field(default=True, metadata={"help": "also train layer-norm biases"})
    layers: str | int | list[int] | None = field(
        default=None, metadata={"help": LAYERS_HELP + "; embedding biases always train"}
    )


def attach(model: nn.Module, arch: Arch, cfg: BitFitConfig) -> None:
    prefixes = tuple(f"{arch.layers_path}.{i}." for i in method_layers(cfg, arch.num_layers))
    found = 0
    for mname, mod in model.named_modules():
        bias = getattr(mod, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if not ((mname + ".").startswith(prefixes) or "embeddings" in mname):
            continue
        if not cfg.include_norm_bias and "norm" in type(mod).__name__.lower():
            continue
        bias.requires_grad_(True)
        found += 1
    if found == 0:
        raise ValueError("bitfit: this model has no bias terms to train (Llama-like models have none)")


def merge(model: nn.Module, arch: Arch, cfg: BitFitConfig) -> None:
    """The trained biases already live in the base modules; nothing to fold."""


register(
    "bitfit",
    BitFitConfig,
    summary="train bias terms only (+ head); merge writes the model with its trained biases",
    merge=merge,
    combine_refusal=("its adapter is the trained biases themselves, not a change to them, so a weighted sum of "
                     "runs would also scale the pretrained biases"),
    positionwise=True,
    needs_dense_base="trains the base model's biases, all of which peftcli then treats as base weights",
    no_peft_reason=(
        "HF PEFT has no BitFit: the trained biases are base-model weights, not an adapter; "
        "use the run folder with peftcli"
    ),
)(attach)
