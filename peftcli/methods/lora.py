"""LoRA (Hu et al. 2021) with the rsLoRA scaling switch.

    y = W x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is Kaiming-uniform(a=sqrt 5) and B is zero, so training starts exactly at the base model.
Parameter names follow HF PEFT (`lora_A.weight` [r, in], `lora_B.weight` [out, r]) so that
exporting to its format is a key rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import peft_format
from ..arch import Arch, dense_weight, is_conv1d, linear_dims, set_module
from ..core.adapter import LayerAdapter, merge_layer_adapters
from ..fast import lora_linear
from ..quant import float_dtype
from ..registry import LAYERS_HELP, PeftTwin, parse_layers, register, select_linears


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"min": 1, "help": "rank of the update B·A"})
    alpha: float = field(default=16.0, metadata={"min": 0.0, "help": "scaling numerator: s = alpha / r"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "dropout on the adapter input"})
    targets: list[str] = field(
        default_factory=lambda: ["q", "v"],
        metadata={"help": "roles (q, k, v, o, ffn_in, ffn_out), 'all-linear', or module-name patterns"},
    )
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) (rank-stabilised LoRA)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: learn a magnitude vector per output"})


class LoraLinear(LayerAdapter):
    """Wraps a frozen linear layer (nn.Linear or GPT-2's Conv1D) with a low-rank update.

    The one low-rank linear of peftcli: DoRA (`dora.DoraLinear`) and UniPELT's gated LoRA subclass
    it, so that they build, initialise, name and count A and B exactly as LoRA does, and change
    only what the forward does with B A x (and, for DoRA, how it merges).

    The forward goes through `peftcli.fast.lora_linear` (one autograd node with a hand-written
    backward) whenever the base is a plain nn.Linear or Conv1D; anything else (quantized bases,
    hooked modules, mixed dtypes outside autocast) takes the plain formula. Both compute the same
    numbers; `fast_path = False` on an instance or the class forces the plain one.
    """

    fast_path: bool = True
    # This module's tensors in HF PEFT's format, relative to the module (the same names here).
    peft_tensors: tuple[str, ...] = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(base)
        in_f, out_f = linear_dims(base)
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = base.weight
        dtype = float_dtype(base)  # a 4-bit base stores uint8; the adapter takes its compute dtype
        self.lora_A = nn.Linear(in_f, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s · B A as an (out, in) matrix."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def low_rank(self, dropped: torch.Tensor) -> torch.Tensor:
        """B A x for an already dropped-out x, unscaled, in the adapter's dtype."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return F.linear(F.linear(dropped.to(a.dtype), a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled or self.merged:
            return self.base(x)
        a = self.lora_A.weight
        b = self.lora_B.weight
        if self.fast_path:
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            y = lora_linear(x, self.base, a, b, self.scaling, p, self.training)
            if y is not None:
                return y
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The formula as written, term by term (HF PEFT's order of operations)."""
        y = self.base(x)
        return y + (self.low_rank(self.lora_dropout(x)) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        return merge_into_base(self.base, self.delta_weight())


def wrap_linears(model: nn.Module, paths: list[str], make) -> list[nn.Module]:
    out = []
    for p in paths:
        m = make(model.get_submodule(p))
        set_module(model, p, m)
        out.append(m)
    return out


def merge_into_base(base: nn.Module, delta: torch.Tensor) -> nn.Module:
    """Add an (out, in) delta to a linear layer's weight in its own storage convention."""
    with torch.no_grad():
        w = base.weight
        d = delta.to(torch.float32)
        if is_conv1d(base):
            d = d.t()
        w.copy_((w.to(torch.float32) + d).to(w.dtype))
    return base


def attach(model: nn.Module, arch: Arch, cfg: LoraConfig) -> None:
    layers = parse_layers(cfg.layers, arch.num_layers)
    paths = select_linears(model, arch, cfg.targets, layers)
    if not paths:
        raise ValueError(f"method.targets {cfg.targets} matched no linear layer in this model")
    make = LoraLinear
    if cfg.use_dora:
        from .dora import DoraLinear, check_dense

        check_dense(model, paths)
        make = DoraLinear
    wrap_linears(model, paths, lambda m: make(m, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))


def merge(model: nn.Module, arch: Arch, cfg: LoraConfig) -> None:
    merge_layer_adapters(model, LoraLinear)


def needs_dense_base(cfg: LoraConfig) -> str:
    if not cfg.use_dora:
        return ""
    return ("with method.use_dora: DoRA normalises the dense base weight, which a 4-bit base does not hold; "
            "use plain LoRA (method.use_dora: false)")


# ------------------------------------------------------------------ HF PEFT's LORA type


def peft_layout(model: nn.Module, arch: Arch, cfg: LoraConfig, lay: peft_format.Layout) -> None:
    """PEFT's tensors sit at our module paths: our wrappers replace the layer they adapt as PEFT's do."""
    wrapped = peft_format.adapted_linears(model, LoraLinear, "lora")
    peft_format.linear_targets(model, lay, wrapped)
    for n, m in wrapped:
        for t in m.peft_tensors:
            lay.to_peft[f"{n}.{t}"] = f"base_model.model.{n}.{t}"
            lay.module_of[f"base_model.model.{n}.{t}"] = n
    lay.config.update({
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.use_dora,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    })


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = dict(
        r=config.get("r", 8), alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)), targets=peft_format.module_list(config, "target_modules"),
        rslora=bool(config.get("use_rslora", False)), use_dora=bool(config.get("use_dora", False)),
    )
    layers = config.get("layers_to_transform")
    if layers is not None:
        block["layers"] = ",".join(str(i) for i in ([layers] if isinstance(layers, int) else layers))
    return block


def peft_settings(config: dict[str, Any], cfg: LoraConfig) -> tuple[list[tuple[str, str, Any, Any]], list[str]]:
    pairs = [
        ("r", "r", config.get("r", 8), cfg.r),
        ("lora_alpha", "alpha", float(config.get("lora_alpha", 8)), float(cfg.alpha)),
        ("use_rslora", "rslora", bool(config.get("use_rslora", False)), cfg.rslora),
        ("use_dora", "use_dora", bool(config.get("use_dora", False)), cfg.use_dora),
    ]
    problems = []
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("adapter_config.json sets rank_pattern/alpha_pattern (a rank or alpha per layer), "
                        "which peftcli's LoRA does not have")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "eva")):
        problems.append(
            f"adapter_config.json has init_lora_weights: {init!r}: such an adapter is only valid on the modified "
            "base weights it was saved with; have PEFT convert it to a plain LoRA adapter first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"adapter_config.json trains biases (bias: {config.get('bias')!r}, lora_bias: "
                        f"{config.get('lora_bias')}), which peftcli's LoRA does not")
    return pairs, problems


register(
    "lora",
    LoraConfig,
    summary="low-rank update B·A beside chosen linear layers (rsLoRA, DoRA as options); mergeable",
    merge=merge,
    positionwise=True,
    needs_dense_base=needs_dense_base,
    peft=PeftTwin(
        peft_type="LORA",
        layout=peft_layout,
        import_config=from_peft_config,
        settings=peft_settings,
        key_suffixes=(".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_embedding_A",
                      ".lora_embedding_B", ".lora_A.bias", ".lora_B.bias"),
    ),
)(attach)

__all__ = ["LoraConfig", "LoraLinear", "attach", "merge", "merge_into_base", "wrap_linears", "dense_weight"]
