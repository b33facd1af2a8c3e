"""From a recipe (or its parts) to a base model with a method attached."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from peftcli.core.arch import Arch, UnsupportedArchitecture, resolve
from peftcli.core.errors import BadInput
from peftcli.methods import all_methods, get_method
from peftcli.methods.registry import MethodSpec
from peftcli.models.quant import QuantizationUnavailable


def attach_method(
    model: nn.Module, method_name: str, method_cfg, *, train_pooler: bool = False
) -> tuple[Arch, MethodSpec]:
    """Freeze the base, attach the method, and make the task head trainable.

    The classification head is new (randomly initialised), so every method trains it, as HF PEFT
    does with `modules_to_save`. `train_pooler` adds BERT's pretrained pooler to the head, which
    then has the two layers AdapterHub's default head has (and its parameter count).
    """
    spec = get_method(method_name)
    arch = resolve(model)
    if train_pooler:
        if arch.pooler() is None:
            raise UnsupportedArchitecture(
                f"model.train_pooler: {model.config.model_type} {type(model).__name__} has no pretrained pooler "
                "(its head may already have two layers); fix: set model.train_pooler: false"
            )
        arch.train_pooler = True
    freeze(model)
    spec.attach(model, arch, method_cfg)
    if not spec.trains_base:
        for _, head in arch.head_modules():
            for p in head.parameters():
                p.requires_grad_(True)
    return arch, spec


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_summary(model: nn.Module) -> dict:
    trainable, total = count_trainable(model)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def per_module_table(model: nn.Module, depth: int = 3) -> list[tuple[str, int, int]]:
    """(module prefix, trainable, total) grouped to `depth` name parts, layer numbers folded to '*'."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        parts = ["*" if part.isdigit() else part for part in name.split(".")[:-1]]
        key = ".".join(parts[:depth]) or name
        r = rows.setdefault(key, [0, 0])
        r[1] += p.numel()
        if p.requires_grad:
            r[0] += p.numel()
    return [(k, v[0], v[1]) for k, v in rows.items()]


class DeviceError(BadInput, RuntimeError):
    """A device this machine does not have, or no device at all: bad input, exit 2."""


def pick_device(choice: str, key: str = "--device") -> torch.device:
    """The torch device `choice` names ("auto": CUDA where visible, else CPU). `key` is where the
    user wrote it (train.device in a recipe, --device on a command line), for the refusal."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    fix = "auto or cpu"
    try:
        dev = torch.device(choice)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{key} {choice!r} is not a device; use {fix} (or cuda, cuda:N on a GPU machine)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key} is {choice!r} but no CUDA device is visible; use {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"{key} is {choice!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{key} is {choice!r} but MPS is not available here; use {fix}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{key} {choice!r}: peftcli runs on cpu, cuda or mps; use {fix}")
    return dev


# ---------------------------------------------------------------- QLoRA: can this method train on a 4-bit base?


def dense_base_refusal(method: str, method_cfg: Any = None) -> str | None:
    """Why `method` (with these options) cannot train on a frozen 4-bit base; None when it can.

    Each method says so in its spec (`needs_dense_base`): full fine-tuning and BitFit train base
    weights, DoRA takes norms of them. Without a config only what holds for every config counts.
    """
    spec = all_methods().get(method)
    need = spec.needs_dense_base if spec is not None else ""
    if callable(need):
        text = need(method_cfg) if method_cfg is not None else ""
        return f"model.quantization: nf4 {text}" if text else None
    if need:
        return (f"model.quantization: nf4 freezes the base in 4 bits; method {method!r} {need}. "
                "Use an adapter method such as lora.")
    return None


def check_qlora_possible(method: str, device: torch.device, method_cfg: Any = None) -> None:
    """Refuse before any work when the machine or the method cannot run on a 4-bit base."""
    refusal = dense_base_refusal(method, method_cfg)
    if refusal:
        raise QuantizationUnavailable(refusal)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise QuantizationUnavailable(
            "model.quantization: nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
            "Use model.quantization: none to train in full precision here."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            "model.quantization: nf4 needs bitsandbytes: `pip install 'peftcli[qlora]'`"
        )
