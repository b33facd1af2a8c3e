"""Full fine-tuning: the baseline every PEFT method is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods.registry import register
from peftcli.methods.targets import LAYERS_HELP, method_layers


@dataclass
class FullConfig:
    layers: str | int | list[int] | None = field(
        default=None, metadata={"help": LAYERS_HELP + "; weights outside the layer stack (embeddings, final norm, "
                                "head) always train"}
    )


def attach(model: nn.Module, arch: Arch, cfg: FullConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    keep = set(method_layers(cfg, arch.num_layers))
    for i, layer in enumerate(arch.layers):
        if i not in keep:
            layer.requires_grad_(False)


def merge(model: nn.Module, arch: Arch, cfg: FullConfig) -> None:
    """Every weight was trained in place; `merge` just writes the HF model folder."""


register(
    "full",
    FullConfig,
    summary="train every weight (baseline); merge writes a plain HF model folder",
    merge=merge,
    positionwise=True,
    trains_base=True,
    combine_refusal="it trains the whole model; combining full fine-tunes is model merging, outside an adapter tool",
    needs_dense_base="trains the base weights",
    no_peft_reason="full fine-tuning trains the whole model, which is no adapter; use the run folder with peftcli",
    as_lora_refusal=("full fine-tuning trains every weight, embeddings and norms included, which a LoRA cannot "
                     "carry; `peftcli merge` writes the trained model instead"),
)(attach)
