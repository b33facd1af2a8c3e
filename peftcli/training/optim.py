"""The optimizers `train.optimizer` names, and what their state costs.

Optimizer state is often the largest thing training keeps besides the weights (AdamW: two moments
per trained weight), so the choice of optimizer is a memory choice as much as a numerical one:

- `adamw`: torch's AdamW, moments in the parameter's dtype.
- `adamw_8bit`, `paged_adamw`, `paged_adamw_8bit`: bitsandbytes. 8-bit keeps each moment as one
  byte per weight plus one float32 scale per block of 256 (Dettmers et al. 2022); paged keeps the
  state in CUDA unified memory that the driver can move to CPU RAM under pressure. They run on
  CUDA, and on CPU where the installed bitsandbytes has CPU optimizer kernels (0.50 has; tried
  once per process, since the version alone does not say whether this build carries them). Paging
  is a CUDA feature, so on CPU the paged ones are built as their non-paged twins, which
  bitsandbytes would fall back to anyway (with a warning per run) and whose state is the same.
- `adafactor`: torch's Adafactor (Shazeer & Stern 2018): a 2-D weight keeps one row and one column
  vector of second-moment statistics instead of a matrix, and no first moment.
- `sgd`: plain SGD; with `train.momentum` > 0 one buffer per weight, otherwise none.

A method may bring its own optimizer (GaLore projects gradients before Adam sees them): its spec's
`optimizer` hook builds it, and its `optimizer_state` hook gives the closed-form state size.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch
from torch import nn

from peftcli.core.errors import BadInput

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "sgd")
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}
# What the paged ones run as where there is no unified memory to page (CPU).
BNB_UNPAGED = {"adamw_8bit": "AdamW8bit", "paged_adamw": "AdamW32bit", "paged_adamw_8bit": "AdamW8bit"}
BNB_8BIT = ("adamw_8bit", "paged_adamw_8bit")
# bitsandbytes keeps 32-bit state for tensors smaller than this (its `min_8bit_size` default) and
# quantizes moments blockwise in blocks of 256 elements, each with one float32 absmax. The two
# 256-entry float32 code books (signed for the first moment, unsigned for the second) are one pair
# per optimizer that every 8-bit parameter's state points at.
BNB_MIN_8BIT = 4096
BNB_BLOCK = 256
BNB_QMAPS = 2 * 256 * 4
BNB_FIX = "`pip install 'bitsandbytes>=0.50'` (or `pip install 'peftcli[bnb]'`)"


class OptimizerUnavailable(BadInput, ValueError):
    """The recipe's optimizer cannot run here or with this method: bad input (exit 2)."""


def check_optimizer(name: str, device: torch.device, spec: Any = None) -> None:
    """Refuse an optimizer this machine or method cannot use, before any model is loaded."""
    if spec is not None and getattr(spec, "optimizer", None) is not None and name != "adamw":
        raise OptimizerUnavailable(
            f"train.optimizer {name}: method {spec.name} brings its own optimizer ({spec.optimizer_name}); "
            "set train.optimizer: adamw (its default)"
        )
    if name in BNB_OPTIMIZERS:
        if device.type not in ("cuda", "cpu"):
            raise OptimizerUnavailable(
                f"train.optimizer {name}: bitsandbytes' optimizers run on CUDA or CPU, not on {device.type}; "
                "set train.device: cpu, or use train.optimizer: adamw or adafactor"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizerUnavailable(
                f"train.optimizer {name} needs bitsandbytes, which is not installed: {BNB_FIX}, "
                "or use train.optimizer: adamw"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptimizerUnavailable(
                f"train.optimizer {name} on device cuda: this machine has no CUDA GPU. "
                "Set train.device: cpu (bitsandbytes >= 0.50 runs it there), or use train.optimizer: adamw"
            )
        if device.type == "cpu":
            problem = bnb_cpu_problem()
            if problem is not None:
                raise OptimizerUnavailable(
                    f"train.optimizer {name} on CPU needs bitsandbytes' CPU optimizer kernels, and {problem}: "
                    f"{BNB_FIX}, run on a CUDA GPU, or use train.optimizer: adamw"
                )
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        raise OptimizerUnavailable(
            f"train.optimizer adafactor needs torch >= 2.5 (this is {torch.__version__}); upgrade torch or use adamw"
        )


def optimizer_note(name: str, device: torch.device) -> str | None:
    """What a user should know before the run: a paged optimizer on CPU pages nothing."""
    if name.startswith("paged_") and device.type == "cpu":
        return (f"train.optimizer {name}: paging is a CUDA unified-memory feature; on CPU it runs as "
                f"bitsandbytes' non-paged {BNB_UNPAGED[name]} (the same state and updates, nothing paged)")
    return None


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported without the warnings its CPU backend logs about optional 4-bit
    kernels (a separate package): they concern 4-bit matmuls, never the optimizers, and would
    only confuse a user who asked for an 8-bit optimizer."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes


@cache
def bnb_cpu_problem() -> str | None:
    """None when the installed bitsandbytes steps its 8-bit AdamW on CPU tensors; otherwise what
    is missing. One tiny step, once per process: older builds import fine on CPU and fail only
    when the first step reaches a CUDA-only kernel, after the model has been loaded."""
    try:
        bnb = import_bitsandbytes()
    except Exception as e:  # noqa: BLE001  (a broken install fails in many ways)
        return f"bitsandbytes does not import here ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    version = getattr(bnb, "__version__", "?")
    try:
        p = nn.Parameter(torch.zeros(BNB_MIN_8BIT))
        p.grad = torch.ones_like(p)
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        opt.step()
        ok = opt.state[p]["state1"].dtype == torch.uint8 and bool(p.detach().lt(0).all())
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes {version} has none ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None if ok else f"bitsandbytes {version}'s CPU step did not update the weights"


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying norms' gains and biases towards 0 only hurts."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def lora_plus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float,
                     method: str = "") -> list[dict]:
    """LoRA+ (Hayou et al. 2024) parameter groups, as HF PEFT's `create_loraplus_optimizer` makes
    them: B matrices (parameters named `lora_B`) and every 1-D trained tensor learn at ratio x lr,
    everything else at lr. Weight decay goes to every group but the 1-D tensors of layer norms and
    biases (PEFT's rule under LoRA+, where plain training here decays matrices only). peftcli puts
    LoRA on linear layers only, so PEFT's separate embedding group is always empty."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    a, b, b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            (b_no_decay if id(p) in norms or "bias" in name else b).append(p)
        else:
            a.append(p)
    if not any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad):
        raise OptimizerUnavailable(
            f"train.lora_plus_ratio: method {method!r} trains no LoRA B matrix (a parameter named lora_B) for LoRA+ "
            "to speed up; use it with method.name: lora (or unipelt), or remove train.lora_plus_ratio"
        )
    groups = [{"params": a, "weight_decay": weight_decay, "lr": lr},
              {"params": b, "weight_decay": weight_decay, "lr": lr * ratio},
              {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]


def fused_adamw(device: torch.device) -> bool:
    """torch's fused AdamW (one kernel over every parameter) on CUDA and on CPU. Its default on a
    CPU is a Python loop of about ten ops per parameter tensor: with LoRA on every linear layer of
    a 30-layer model (420 small tensors) that loop took 3x the fused step's time, about 1 % of a
    SmolLM2-135M training step on 2 cores. The fused kernel computes the same update (to 1e-8
    after a step, float rounding)."""
    return device.type in ("cuda", "cpu")


def build_optimizer(model: nn.Module, train_model: nn.Module, spec: Any, arch: Any, method_cfg: Any, tcfg: Any,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of a run: the method's own, or the one `train.optimizer` names.

    Every parameter that may ever train is in a group, also those LISA keeps frozen for now: an
    optimizer skips parameters without a gradient and creates their state on their first step.
    """
    check_optimizer(tcfg.optimizer, device, spec)
    if spec.optimizer is not None:
        return spec.optimizer(model, arch, method_cfg, tcfg)
    if getattr(tcfg, "lora_plus_ratio", None) is not None:
        groups = lora_plus_groups(train_model, tcfg.lr, tcfg.lora_plus_ratio, tcfg.weight_decay, spec.name)
    else:
        groups = [g for g in decay_groups(train_model.parameters(), tcfg.weight_decay) if g["params"]]
    name = tcfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.lr, fused=fused_adamw(device))
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=tcfg.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)
    bnb = import_bitsandbytes()  # checked above
    cls = BNB_OPTIMIZERS[name] if device.type == "cuda" else BNB_UNPAGED[name]
    return getattr(bnb.optim, cls)(groups, lr=tcfg.lr)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold now, exactly (scalars such as `step` included).

    A tensor that several parameters' state points at (bitsandbytes' code books) is memory once.
    """
    total, seen = 0, set()
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and id(v) not in seen:
                seen.add(id(v))
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


def shared_state_bytes(shapes: Iterable[tuple[int, ...]], name: str) -> int:
    """State an optimizer keeps once, not per parameter: the 8-bit optimizers' two code books,
    present as soon as one parameter is large enough for 8-bit state."""
    if name in BNB_8BIT and any(math.prod(s) >= BNB_MIN_8BIT for s in shapes):
        return BNB_QMAPS
    return 0
