"""The optimizers `train.optimizer` names, and what their state costs.

Optimizer state is often the largest thing training keeps besides the weights (AdamW: two moments
per trained weight), so the choice of optimizer is a memory choice as much as a numerical one:

- `adamw`: torch's AdamW, moments in the parameter's dtype.
- `adamw_8bit`, `paged_adamw`, `paged_adamw_8bit`: bitsandbytes. 8-bit keeps each moment as one
  byte per weight plus one float32 scale per block of 256 (Dettmers et al. 2022); paged keeps the
  state in CUDA unified memory that the driver can move to CPU RAM under pressure. Their kernels
  are CUDA kernels, so they are refused on any other device with a message that says so.
- `adafactor`: torch's Adafactor (Shazeer & Stern 2018): a 2-D weight keeps one row and one column
  vector of second-moment statistics instead of a matrix, and no first moment.
- `sgd`: plain SGD; with `train.momentum` > 0 one buffer per weight, otherwise none.

A method may bring its own optimizer (GaLore projects gradients before Adam sees them): its spec's
`optimizer` hook builds it, and its `optimizer_state` hook gives the closed-form state size.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "sgd")
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}
# bitsandbytes keeps 32-bit state for tensors smaller than this (its `min_8bit_size` default) and
# quantizes moments blockwise in blocks of 256 elements, each with one float32 absmax.
BNB_MIN_8BIT = 4096
BNB_BLOCK = 256


class OptimizerUnavailable(ValueError):
    """The recipe's optimizer cannot run here or with this method: bad input (exit 2)."""


def check_optimizer(name: str, device: torch.device, spec: Any = None) -> None:
    """Refuse an optimizer this machine or method cannot use, before any model is loaded."""
    if spec is not None and getattr(spec, "optimizer", None) is not None and name != "adamw":
        raise OptimizerUnavailable(
            f"train.optimizer {name}: method {spec.name} brings its own optimizer ({spec.optimizer_name}); "
            "set train.optimizer: adamw (its default)"
        )
    if name in BNB_OPTIMIZERS:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise OptimizerUnavailable(
                f"train.optimizer {name} needs bitsandbytes with CUDA; this machine has no CUDA GPU "
                f"(device {device.type}). Use train.optimizer: adamw or adafactor here"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizerUnavailable(
                f"train.optimizer {name} needs bitsandbytes, which is not installed: `pip install bitsandbytes`, "
                "or use train.optimizer: adamw"
            )
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        raise OptimizerUnavailable(
            f"train.optimizer adafactor needs torch >= 2.5 (this is {torch.__version__}); upgrade torch or use adamw"
        )


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying norms' gains and biases towards 0 only hurts."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train_model: nn.Module, spec: Any, arch: Any, method_cfg: Any, tcfg: Any,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of a run: the method's own, or the one `train.optimizer` names.

    Every parameter that may ever train is in a group, also those LISA keeps frozen for now: an
    optimizer skips parameters without a gradient and creates their state on their first step.
    """
    check_optimizer(tcfg.optimizer, device, spec)
    if spec.optimizer is not None:
        return spec.optimizer(model, arch, method_cfg, tcfg)
    groups = [g for g in decay_groups(train_model.parameters(), tcfg.weight_decay) if g["params"]]
    name = tcfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.lr, fused=device.type == "cuda")
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=tcfg.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)
    import bitsandbytes as bnb  # checked above

    return getattr(bnb.optim, BNB_OPTIMIZERS[name])(groups, lr=tcfg.lr)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold now, exactly (scalars such as `step` included)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def state_bytes_estimate(shape: tuple[int, ...], param_bytes: float, name: str, momentum: float = 0.0) -> float:
    """Closed-form state bytes one parameter of `shape` costs under optimizer `name` (no scalars)."""
    n = math.prod(shape)
    if name == "adamw":
        return 2 * n * param_bytes
    if name == "paged_adamw":
        return 2 * n * 4  # bitsandbytes keeps 32-bit state in float32 whatever the weight's dtype
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        if n < BNB_MIN_8BIT:
            return 2 * n * 4
        return 2 * (n + math.ceil(n / BNB_BLOCK) * 4)
    if name == "adafactor":
        if len(shape) >= 2:
            return (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * param_bytes
        return n * param_bytes
    if name == "sgd":
        return n * param_bytes if momentum > 0 else 0.0
    raise ValueError(f"unknown optimizer {name!r}")
