"""QLoRA support: a frozen 4-bit NF4 base (bitsandbytes) under bf16 LoRA weights."""

from __future__ import annotations

import importlib.util

import torch


class QuantizationUnavailable(RuntimeError):
    pass


def check_qlora_possible(method: str, device: torch.device) -> None:
    """Refuse before any work when the machine cannot run a 4-bit base."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise QuantizationUnavailable(
            "model.quantization: nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
            "Use model.quantization: none to train in full precision here."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            "model.quantization: nf4 needs bitsandbytes: `pip install 'peftcli[qlora]'`"
        )
    if method in ("full", "bitfit"):
        raise QuantizationUnavailable(
            f"model.quantization: nf4 freezes the base in 4 bits; method {method!r} trains base weights. "
            "Use an adapter method such as lora."
        )


def nf4_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
