"""DoRA (Liu et al. 2024): LoRA with the direction and the magnitude of each weight row apart.

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖    (norm of each output row; m is a learned [out] vector)

m starts at the row norms of W, and B at zero, so training starts at the base model. As in PEFT the
norm is treated as a constant in backward (the paper's memory-saving choice), so the forward is

    y = b + (m / ‖W + s·B A‖) ⊙ (W x + s·B A x)

with W x taken from the frozen layer's own output. Because the norm carries no gradient it needs
no graph: it is computed without autograd and reused until A or B change, i.e. once per optimizer
step rather than once per forward (PEFT rebuilds the whole B A product on every forward, which is
most of why its DoRA runs about twice as slow as LoRA).

Selected through LoRA's `use_dora: true`; the parameter names match PEFT's
(`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector` [out]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import dense_weight, is_conv1d
from .lora import LoraLinear


class DoraLinear(LoraLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) with a DoRA update: LoRA's A and B
    (built and initialised as LoRA builds them) plus the magnitude vector."""

    peft_tensors = (*LoraLinear.peft_tensors, "lora_magnitude_vector")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        w = base.weight
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype))
        self._norm_cache: tuple[Any, torch.Tensor] | None = None
        if w.device.type != "meta":
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm().to(w.dtype))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row, in float32, without autograd."""
        key = (self.lora_A.weight.data_ptr(), self.lora_A.weight._version,
               self.lora_B.weight.data_ptr(), self.lora_B.weight._version, self.base.weight.data_ptr())
        if self._norm_cache is None or self._norm_cache[0] != key:
            w = dense_weight(self.base).float() + self.delta_weight().float()
            self._norm_cache = (key, w.norm(p=2, dim=1))
        return self._norm_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        scale = (self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)).to(y.dtype)
        dropped = self.lora_dropout(x)
        lora = self.low_rank(dropped).to(y.dtype) * self.scaling
        bias = getattr(self.base, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            wx = y - bias if bias is not None else y
        else:  # as PEFT: the base term sees the same dropped-out input as the low-rank term
            wx = F.linear(dropped.to(y.dtype), dense_weight(self.base).to(y.dtype))
        return y + (scale - 1) * wx + scale * lora

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The frozen layer with W' = m ⊙ (W + s·B A) / ‖W + s·B A‖ written into its weight."""
        base = self.base
        w = dense_weight(base).float() + self.delta_weight().float()
        merged = (self.lora_magnitude_vector.float() / w.norm(p=2, dim=1)).view(-1, 1) * w
        if is_conv1d(base):
            merged = merged.t()
        base.weight.copy_(merged.to(base.weight.dtype))
        return base


def check_dense(model: nn.Module, paths: list[str]) -> None:
    """DoRA takes row norms of the base weights, which a quantized layer does not hold."""
    for p in paths:
        if not model.get_submodule(p).weight.is_floating_point():
            raise ValueError(f"DoRA needs floating-point base weights to take row norms; {p} is quantized")


__all__ = ["DoraLinear", "check_dense"]
