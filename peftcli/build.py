"""From a recipe (or its parts) to a base model with a method attached."""

from __future__ import annotations

import torch
from torch import nn

from .arch import Arch, UnsupportedArchitecture, resolve
from .registry import MethodSpec, count_trainable, freeze, get_method


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


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; set train.device: auto or cpu")
    return torch.device(choice)
