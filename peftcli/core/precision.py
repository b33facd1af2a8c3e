"""Precision and forward-input helpers shared by training, evaluation and the fused kernels.

They sit below the methods and the training loop so that a method's fast path, the loss and the
evaluation loop agree on one autocast policy and one set of model arguments without importing
each other.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


def autocast_ctx(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast region a recipe's `train.precision` asks for.

    "auto" is bf16 on CUDA (fp32's exponent range, so no loss scaling, unlike fp16) and no
    autocast on CPU; an explicit region even when disabled, so callers always have one `with`.
    """
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would compute in right now, or None outside autocast.

    Hand-written autograd Functions run with autocast off (so forward and backward see one
    dtype) and cast their operands themselves; this tells them what to cast to.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The base model's load dtype; "auto" halves memory on CUDA and keeps CPU in fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def forward_inputs(batch: dict[str, torch.Tensor], task: str) -> dict[str, Any]:
    """The model's arguments for one training or evaluation batch.

    Causal LMs run without a KV cache: nothing continues from it, building one copies every
    layer's keys and values, and its per-layer state makes compiled layers recompile one by one.
    Packed rows (`position_ids`, see data.datasets.pack) go without an attention mask: given restarting
    positions and no mask, transformers confines attention to each packed example (a block-
    diagonal causal mask, or the varlen kernel of flash attention).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task != "classification":
        inputs["use_cache"] = False
    return inputs


__all__ = ["autocast_ctx", "autocast_dtype", "forward_inputs", "resolve_dtype"]


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (checked by name: bitsandbytes need not be installed)."""
    return type(module).__name__ == "Linear4bit" or type(getattr(module, "weight", None)).__name__ == "Params4bit"


def float_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype new weights beside this layer should have.

    A 4-bit layer stores uint8; its matmul runs in `compute_dtype` (bf16 for QLoRA), which is
    the dtype LoRA weights beside it take.
    """
    w = module.weight
    if w.dtype.is_floating_point:
        return w.dtype
    if is_4bit(module):
        cd = getattr(module, "compute_dtype", None)
        if cd is None and getattr(w, "quant_state", None) is not None:
            cd = w.quant_state.dtype
        return cd or torch.bfloat16
    return torch.float32
