"""Bottleneck adapters: the shared module f(x) = s · W_up act(W_down x) and where it is placed.

Houlsby, Pfeiffer, parallel, scaled-parallel and Compacter differ only in (a) which projections
W_down / W_up are (dense, or PHM for Compacter) and (b) which tensor the adapter reads and where
its output is added. (a) lives in `Bottleneck`; (b) in the three placement helpers below, which
attach to the frozen HF modules with forward hooks so that no modeling class is copied or patched:

    add_after(host)            host output h  ->  h + f(h)                    (Houlsby, pre-LN Pfeiffer)
    add_post_ln(norm)          norm(z)        ->  norm(z + f(norm(z)))        (post-LN Pfeiffer)
    add_parallel(src, host)    host output h  ->  h + f(input of src)         (parallel adapters)

With z = h + r the input of a post-LN norm, norm(z + f(norm(z))) is exactly the Pfeiffer
formula x = LN(h + r); a = f(x) + h; out = LN(a + r), and it needs neither h nor r separately, so
it works for any post-LN layer whose norm sees (sub-layer output + residual), with or without a
BertOutput-like block around it.

Each adapter is registered as a child of its transformer layer (so it is saved, moved by `.to()`
and found by AdapterDrop) and is an AdapterModule; a disabled adapter's hooks return the host's
output untouched. Hooks are small picklable objects, not closures, so `copy.deepcopy` of an
adapted model re-points them at the copied adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.core.adapter import AdapterModule, is_adapter_module
from peftcli.core.adapter_merging import WEIGHTED, averaging
from peftcli.core.arch import Arch
from peftcli.core.hf_call import Capture
from peftcli.methods.targets import LAYERS_HELP, method_layers

NonLinearity = Literal["relu", "gelu", "silu", "swish", "tanh"]
AdapterInit = Literal["near_identity", "bert", "lora"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


# ------------------------------------------------------------------------------------ options


@dataclass
class BottleneckOptions:
    """Options every bottleneck method has. Subclasses override defaults, never the meaning."""

    reduction_factor: float = field(
        default=16.0, metadata={"min": 0.01, "help": "bottleneck size m = hidden / reduction_factor"}
    )
    bottleneck_size: int | None = field(
        default=None, metadata={"min": 1, "help": "bottleneck size m; overrides reduction_factor when set"}
    )
    non_linearity: NonLinearity = field(default="relu", metadata={"help": "activation between down and up projection"})
    scale: float = field(default=1.0, metadata={"help": "s in f(x) = s · W_up act(W_down x)"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "dropout on the adapter output"})
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})
    leave_out: list[int] = field(
        default_factory=list, metadata={"help": "old spelling: layer indices that get no adapter; use layers"}
    )


@dataclass
class DenseBottleneckOptions(BottleneckOptions):
    init: AdapterInit = field(
        default="near_identity",
        metadata={
            "help": "near_identity: down N(0, 0.01²), up 0 (Houlsby); bert: both N(0, 0.02²) (AdapterHub's default); "
            "lora: down Kaiming-uniform, up 0. Biases start at 0"
        },
    )


# Why the bottleneck methods have no HF PEFT twin ("{name}": the method's name).
# Why `export --as-lora` refuses every bottleneck method (MethodSpec.as_lora_refusal).
AS_LORA_REFUSAL = ("a bottleneck adapter W_up act(W_down h) is a non-linear function of the activations, not a "
                   "change of any weight matrix, so no LoRA (a weight delta B·A) computes it")

NO_PEFT_REASON = (
    "HF PEFT has no bottleneck adapters (W_up act(W_down h) inserted into each layer), so its format "
    "cannot hold a {name} adapter; use the run folder with peftcli (eval, generate)"
)


# How bottleneck adapters of one method combine: parameter averaging (AdapterHub's
# `average_adapter`), for adapters alike in every option but their dropout and initialisation.
COMBINE = averaging(
    ("dropout", "init", "phm_rule_std"),
    "a negative weight subtracts parameters of a non-linear function, which does not subtract what the adapter does",
)
COMBINE_HOWS = (WEIGHTED,)


def bottleneck_dim(hidden: int, cfg: BottleneckOptions) -> int:
    if cfg.bottleneck_size is not None:
        return cfg.bottleneck_size
    m = int(hidden // cfg.reduction_factor)
    if m < 1:
        raise ValueError(
            f"reduction_factor {cfg.reduction_factor} leaves no bottleneck for hidden size {hidden}; "
            "lower it or set bottleneck_size"
        )
    return m


def adapted_layers(arch: Arch, cfg: Any) -> list[int]:
    """The layers that get adapters: `layers`, less the old `leave_out` spelling's (methods/targets.method_layers)."""
    return method_layers(cfg, arch.num_layers)


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """Device and dtype for new parameters next to `module`: its weight's, or a float dtype when the
    weight is stored quantized (integers)."""
    w = getattr(module, "weight", None)
    if w is None:
        w = next(module.parameters())
    dtype = w.dtype
    if not dtype.is_floating_point:
        dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    return {"device": w.device, "dtype": dtype}


# ------------------------------------------------------------------------------------ the module


class Bottleneck(AdapterModule):
    """f(x) = dropout(s · W_up act(W_down x)), computed in the adapter's own dtype.

    `down` / `up` default to nn.Linear with bias (2·m·d + m + d parameters); Compacter passes PHM
    layers instead. `learned_scale` makes s a trainable scalar initialised to `scale`.
    """

    def __init__(
        self,
        hidden: int,
        m: int,
        *,
        non_linearity: str = "relu",
        init: str = "near_identity",
        scale: float = 1.0,
        learned_scale: bool = False,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        down: nn.Module | None = None,
        up: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.hidden, self.m = hidden, m
        fk = {"device": device, "dtype": dtype}
        self.down = down if down is not None else nn.Linear(hidden, m, **fk)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = up if up is not None else nn.Linear(m, hidden, **fk)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if learned_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale), **fk))
        else:
            self.scale = float(scale)
        if down is None and up is None and (device is None or torch.device(device).type != "meta"):
            init_dense(self.down, self.up, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = next(self.down.parameters())
        y = self.up(self.act(self.down(x.to(w.dtype))))
        return self.dropout(y * self.scale).to(x.dtype)


def init_dense(down: nn.Linear, up: nn.Linear, init: str) -> None:
    with torch.no_grad():
        if init == "lora":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init == "bert":
            # AdapterHub's `init_weights: bert`: BERT's initializer range, 0.02, for both weights.
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(up.weight, std=0.02)
        else:  # near_identity: the adapter starts as exactly zero, the block as the identity
            nn.init.normal_(down.weight, std=0.01)
            nn.init.zeros_(up.weight)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)


def dense_bottleneck(hidden: int, cfg: DenseBottleneckOptions, like: nn.Module, **kw: Any) -> Bottleneck:
    return Bottleneck(
        hidden,
        bottleneck_dim(hidden, cfg),
        non_linearity=cfg.non_linearity,
        init=cfg.init,
        scale=cfg.scale,
        dropout=cfg.dropout,
        **factory_kwargs(like),
        **kw,
    )


def dense_params(hidden: int, m: int) -> int:
    """Closed form for one dense bottleneck: W_down, b_down, W_up, b_up."""
    return 2 * m * hidden + m + hidden


# ------------------------------------------------------------------------------------ placement


def _register(layer: nn.Module, name: str, adapter: nn.Module) -> None:
    if name in layer._modules:
        raise ValueError(f"layer already has an adapter named {name!r}; attach each bottleneck method once")
    if not is_adapter_module(adapter):
        raise TypeError(f"{type(adapter).__name__} is not an AdapterModule (peftcli.core.adapter)")
    layer.add_module(name, adapter)


class _AddAfter:
    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.adapter.adapter_enabled:
            return None
        return output + self.adapter(output)


class _PostLN:
    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.adapter.adapter_enabled:
            return None
        # `forward`, not `norm(...)`: calling the module would fire this hook again.
        return norm.forward(args[0] + self.adapter(output))


class _AddParallel:
    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        cap = self.capture
        x = cap.take()
        if not cap.adapter.adapter_enabled:
            return None
        if x is None:
            raise RuntimeError(
                f"parallel adapter on {type(module).__name__}: the sub-layer input was not seen; "
                "was this module called outside its transformer layer?"
            )
        return output + cap.adapter(x)


def add_after(layer: nn.Module, name: str, host: nn.Module, adapter: nn.Module) -> None:
    """host(x) = h becomes h + f(h): Houlsby's placement, before dropout / residual / norm."""
    _register(layer, name, adapter)
    host.register_forward_hook(_AddAfter(adapter))


def add_post_ln(layer: nn.Module, name: str, norm: nn.Module, adapter: nn.Module) -> None:
    """norm(z) with z = h + r becomes norm(z + f(norm(z))): Pfeiffer's placement on post-LN models."""
    _register(layer, name, adapter)
    norm.register_forward_hook(_PostLN(adapter))


def add_parallel(layer: nn.Module, name: str, src: nn.Module, host: nn.Module, adapter: nn.Module) -> None:
    """host's output h becomes h + f(x_in), x_in = the input of `src` (the sub-layer): He et al."""
    _register(layer, name, adapter)
    cap = Capture(adapter, "parallel adapter")
    src.register_forward_pre_hook(cap, with_kwargs=True)
    host.register_forward_hook(_AddParallel(cap))


def get_role(arch: Arch, i: int, role: str) -> nn.Module:
    m = arch.get(i, role)
    if m is None:
        raise ValueError(f"{arch.spec.family}: layer {i} has no {role!r} module in the architecture map")
    return m


def place_sequential(
    arch: Arch, prefix: str, layers: list[int], make, *, attn: bool, ffn: bool, post_ln_ffn: bool
) -> list[nn.Module]:
    """Houlsby (attn + ffn) and Pfeiffer (ffn; `post_ln_ffn` on post-LN models) placement.

    `make(host)` builds the adapter next to `host`, the frozen module whose weights it should
    match in device and dtype.
    """
    out = []
    for i in layers:
        layer = arch.layer(i)
        if attn:
            host = get_role(arch, i, "o")
            a = make(host)
            add_after(layer, f"{prefix}_attn", host, a)
            out.append(a)
        if ffn:
            host = get_role(arch, i, "ffn_out")
            a = make(host)
            if post_ln_ffn:
                add_post_ln(layer, f"{prefix}_ffn", get_role(arch, i, "ffn_norm"), a)
            else:
                add_after(layer, f"{prefix}_ffn", host, a)
            out.append(a)
    return out


__all__ = [
    "COMBINE",
    "COMBINE_HOWS",
    "NO_PEFT_REASON",
    "AdapterInit",
    "Bottleneck",
    "BottleneckOptions",
    "DenseBottleneckOptions",
    "NonLinearity",
    "add_after",
    "add_parallel",
    "add_post_ln",
    "adapted_layers",
    "bottleneck_dim",
    "dense_bottleneck",
    "dense_params",
    "factory_kwargs",
    "get_role",
    "init_dense",
    "place_sequential",
]
