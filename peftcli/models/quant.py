"""QLoRA support: a frozen 4-bit NF4 base (bitsandbytes) under bf16 LoRA weights.

Loading goes through transformers' BitsAndBytesConfig; every nn.Linear of the base except the
output head becomes a bitsandbytes Linear4bit whose `weight` is packed uint8 plus a quantization
state. Two things follow for the rest of peftcli: adapter weights must take the layer's compute
dtype, not its storage dtype (`float_dtype`), and merging must first turn each 4-bit layer back
into a dense one (`dequantize_model`).
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.core.errors import BadInput
from peftcli.core.precision import is_4bit


class QuantizationUnavailable(BadInput, RuntimeError):
    pass


def skip_modules() -> list[str]:
    """Module-name suffixes kept dense: the task heads and LM heads of every mapped architecture.

    Task heads are trained by every method, and a packed 4-bit weight cannot be trained; the LM
    head is what transformers keeps dense by default too.
    """
    from peftcli.core.arch import SPECS

    names: set[str] = set()
    for spec in SPECS.values():
        names.update(spec.heads)
        if spec.lm_head:
            names.add(spec.lm_head)
    return sorted(names)


def nf4_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip_modules(),
    )


def quantized_names(model: nn.Module) -> list[str]:
    """Linear layers of the base that an NF4 load turns into 4-bit ones (for budgeting on meta)."""
    from peftcli.core.arch import is_linear

    skip = skip_modules()
    out = []
    for name, m in model.named_modules():
        if not is_linear(m) or m.weight.requires_grad:
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        out.append(name)
    return out




def dense_4bit_weight(module: nn.Module) -> torch.Tensor:
    """The weight a Linear4bit multiplies by, de-quantized.

    On CPUs with bf16 instructions, bitsandbytes (0.49 and newer) repacks a 4-bit weight into a
    CPU-only layout at its first evaluation-mode forward and marks the quantization state so;
    de-quantizing that layout as if it were the usual one gives wrong numbers, so it is unpacked
    first (in place: the layer then repacks on its next such forward).
    """
    from bitsandbytes.functional import dequantize_4bit

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return dequantize_4bit(w.data, w.quant_state)


def dequantize_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A dense nn.Linear with the exact weights a Linear4bit multiplies by."""
    dense = dense_4bit_weight(module).to(dtype)
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    out.weight = nn.Parameter(dense.reshape(module.out_features, module.in_features), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return out


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every 4-bit layer (wrapped by an adapter or not) by a dense one; returns how many.

    Afterwards the model carries no trace of quantization, so `save_pretrained` writes an ordinary
    checkpoint that loads without bitsandbytes.
    """
    from peftcli.core.arch import set_module

    names = [n for n, m in model.named_modules() if is_4bit(m)]
    for n in names:
        set_module(model, n, dequantize_linear(model.get_submodule(n), dtype))
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    return len(names)
