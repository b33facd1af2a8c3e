"""Full fine-tuning: the baseline every PEFT method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import Arch
from ..registry import register


@dataclass
class FullConfig:
    pass


def attach(model: nn.Module, arch: Arch, cfg: FullConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


register(
    "full",
    FullConfig,
    summary="train every weight (baseline); the checkpoint is the whole model",
    merge_refusal="full fine-tuning has no adapter: the checkpoint already is the full model",
)(attach)
