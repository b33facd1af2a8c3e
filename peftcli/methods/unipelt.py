"""UniPELT (Mao et al. 2022): LoRA + prefix tuning + a Pfeiffer adapter, each behind a learned gate.

    LoRA on q, v:      W x + g_L · s · B A x            g_L = mean_t σ(w_L · x_t + b_L)
    prefix (L = 10):   keys   [g_K · P_K ; K]           (g_K, g_V) = mean_t σ(W_P x_t + b_P)
                       values [g_V · P_V ; V]
    Pfeiffer (m = 48): f(a) → g_A · f(a)                g_A = mean_t σ(w_A · u_t + b_A)

One gate per module and example, in (0, 1): a sigmoid of a linear map of the gated sub-layer's
input, averaged over the real tokens of the sequence. The LoRA and prefix gates read the attention
sub-layer's input (which q and v also read); the adapter gate reads the FFN sub-layer's input
(`adapter_gate_input: sublayer`) or, as AdapterHub does, the adapter's own input. The prefix gate
has two outputs, one for keys and one for values, as AdapterHub's. Gate weights start N(0, 0.02²)
with zero bias, so every gate starts near 0.5.

The average skips padding: a pre-hook on the backbone keeps the batch's 2-D attention mask
(`SequenceMask`), so an example's output does not depend on how much padding its batch has.
AdapterHub averages over every position, padding included. During cached generation each step
sees only its new token, so the gates there average over that token alone (as in AdapterHub).

Built from the parts: `prefix.attach` (its attention mechanism, with each layer's LayerPrefix
replaced by a gated subclass), `LoraLinear` (subclassed for the gate) and the bottleneck
module and placement of `pfeiffer`. At step 0 LoRA (B = 0) and the adapter (W_up = 0) add nothing;
the prefix does change attention, so the model equals the base only with the prefix switched off.

AdapterHub's `UniPELTConfig` differs in sizes: Pfeiffer reduction factor 16 (m = 24 on a 384-wide
model) and LoRA alpha 2 with the gate replacing the alpha / r scale; here m = 48 as in the paper
and s = alpha / r = 1 by default, so the gate alone scales the update too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.core.adapter import AdapterModule
from peftcli.core.arch import Arch, linear_dims
from peftcli.core.hf_call import Capture, SequenceMask, sequence_mask
from peftcli.methods import prefix as prefix_method
from peftcli.methods.bottleneck import Bottleneck, NonLinearity, factory_kwargs, get_role, place_sequential
from peftcli.methods.lora import LoraLinear, wrap_linears
from peftcli.methods.registry import register
from peftcli.methods.targets import require_linears


@dataclass
class UniPeltConfig:
    lora_r: int = field(default=8, metadata={"min": 1, "help": "LoRA rank"})
    lora_alpha: float = field(default=8.0, metadata={"min": 0.0, "help": "LoRA scale s = alpha / r, times the gate"})
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "dropout on the LoRA input"})
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": "LoRA target roles"})
    num_virtual_tokens: int = field(default=10, metadata={"min": 1, "help": "prefix length L per layer"})
    prefix_bottleneck: int = field(default=512, metadata={"min": 1, "help": "width of the prefix reparameterisation MLP"})
    adapter_size: int = field(default=48, metadata={"min": 1, "help": "Pfeiffer bottleneck m"})
    adapter_non_linearity: NonLinearity = field(default="relu", metadata={"help": "Pfeiffer activation"})
    adapter_gate_input: Literal["sublayer", "adapter"] = field(
        default="sublayer",
        metadata={"help": "what the adapter gate reads: the FFN sub-layer input, or the adapter's own input (AdapterHub)"},
    )


# ------------------------------------------------------------------------ gates


class SequenceGate(nn.Module):
    """g = mean over real tokens of σ(W x_t + b): one value per example and output."""

    def __init__(self, hidden: int, outputs: int, mask: SequenceMask, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, outputs, device=device, dtype=dtype)
        self._mask = (mask,)
        self.last: torch.Tensor | None = None  # the latest gate values, for inspection
        if device.type != "meta":
            with torch.no_grad():
                nn.init.normal_(self.proj.weight, std=0.02)
                nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._mask[0].mean(torch.sigmoid(self.proj(x.to(self.proj.weight.dtype))))
        self.last = g.detach()
        return g


# ------------------------------------------------------------------------ gated parts


class GatedLoraLinear(LoraLinear):
    """LoRA whose update is multiplied by a gate read from the linear layer's own input."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, mask: SequenceMask) -> None:
        super().__init__(base, r, alpha, dropout, rslora=False)
        self.gate = SequenceGate(self.in_features, 1, mask, **factory_kwargs(self.lora_A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled or self.merged:
            return y
        h = self.low_rank(self.lora_dropout(x)) * self.scaling
        g = self.gate(x)  # [batch, 1]
        if h.dim() == 3:
            g = g.unsqueeze(1)
        return y + (h * g).to(y.dtype)


class GatedLayerPrefix(prefix_method.LayerPrefix):
    """A layer's prefix keys and values, scaled per example by (g_K, g_V)."""

    def __init__(self, inner: prefix_method.LayerPrefix, hidden: int, mask: SequenceMask) -> None:
        super().__init__(inner._store[0], inner.index, inner.inner, inner.additive_mask)
        ref = next(inner._store[0].parameters())
        self.gate = SequenceGate(hidden, 2, mask, device=ref.device, dtype=ref.dtype)
        self.capture = Capture(self, "UniPELT")  # a pre-hook on the attention sub-layer

    def kv(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().kv(batch, like)
        x = self.capture.take()
        if x is None:
            raise RuntimeError("UniPELT: the attention input was not seen before the prefix was needed")
        g = self.gate(x).to(k.dtype)  # [batch, 2]
        return k * g[:, 0].view(-1, 1, 1, 1), v * g[:, 1].view(-1, 1, 1, 1)


class GatedBottleneck(AdapterModule):
    """f(a) · g, g read from the FFN sub-layer input (captured by a pre-hook) or from a itself."""

    def __init__(self, adapter: Bottleneck, gate: SequenceGate, read_sublayer: bool) -> None:
        super().__init__()
        self.adapter = adapter
        self.gate = gate
        self.read_sublayer = read_sublayer
        self.capture = Capture(self, "UniPELT")  # a pre-hook on the FFN sub-layer, when read_sublayer

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        src = a
        if self.read_sublayer:
            src = self.capture.take()
            if src is None:
                raise RuntimeError("UniPELT: the FFN input was not seen before the adapter ran")
        g = self.gate(src)
        if a.dim() == 3:
            g = g.unsqueeze(1)
        return self.adapter(a) * g.to(a.dtype)


# ------------------------------------------------------------------------ attach


def attach(model: nn.Module, arch: Arch, cfg: UniPeltConfig) -> None:
    d = arch.hidden_size
    mask = sequence_mask(model)
    # Prefix first: it reads the q projection's weight for device and dtype, before LoRA wraps it.
    prefix_method.attach(
        model, arch,
        prefix_method.PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, reparameterize=True,
                                   bottleneck=cfg.prefix_bottleneck, shift_positions=False),
    )
    for i in range(arch.num_layers):
        attn = get_role(arch, i, "attn")
        gated = GatedLayerPrefix(getattr(attn, prefix_method.ATTR), d, mask)
        setattr(attn, prefix_method.ATTR, gated)
        attn.register_forward_pre_hook(gated.capture, with_kwargs=True)

    paths = require_linears(model, arch, cfg.lora_targets, key="method.lora_targets")
    wrap_linears(model, paths, lambda m: GatedLoraLinear(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, mask))

    read_sublayer = cfg.adapter_gate_input == "sublayer"

    def make(host: nn.Module) -> GatedBottleneck:
        fk = factory_kwargs(host)
        f = Bottleneck(d, cfg.adapter_size, non_linearity=cfg.adapter_non_linearity, init="near_identity", **fk)
        return GatedBottleneck(f, SequenceGate(d, 1, mask, **fk), read_sublayer)

    adapters = place_sequential(arch, "unipelt", list(range(arch.num_layers)), make,
                                attn=False, ffn=True, post_ln_ffn=arch.post_norm)
    if read_sublayer:
        for i, a in enumerate(adapters):
            get_role(arch, i, "ffn").register_forward_pre_hook(a.capture, with_kwargs=True)


def closed_form(hidden: int, num_layers: int, cfg: UniPeltConfig, lora_dims: list[tuple[int, int]],
                kv_width: int | None = None) -> int:
    """Prefix MLP + gated LoRA (r·(in + out) + in + 1 each) + gated adapters + prefix gates.
    kv_width = kv_heads · head_dim, which is hidden without grouped-query attention."""
    L, m, b = cfg.num_virtual_tokens, cfg.adapter_size, cfg.prefix_bottleneck
    width = num_layers * 2 * (kv_width or hidden)
    prefix = L * hidden + (hidden * b + b) + (b * width + width)
    lora = sum(cfg.lora_r * (i + o) + i + 1 for i, o in lora_dims)
    adapter = num_layers * (2 * m * hidden + m + hidden + hidden + 1)
    prefix_gates = num_layers * (2 * hidden + 2)
    return prefix + lora + adapter + prefix_gates


def gate_values(model: nn.Module) -> dict[str, Any]:
    """The latest per-example gate values of every module, averaged over the batch."""
    return {n: m.last.float().mean(0).tolist() for n, m in model.named_modules()
            if isinstance(m, SequenceGate) and m.last is not None}


def budget(model: nn.Module, arch: Arch, cfg: UniPeltConfig) -> int:
    dims = [linear_dims(m.base) for m in model.modules() if isinstance(m, GatedLoraLinear)]
    return closed_form(arch.hidden_size, arch.num_layers, cfg, dims, arch.num_kv_heads * arch.head_dim)


register(
    "unipelt",
    UniPeltConfig,
    summary="UniPELT: gated LoRA (q, v) + gated prefix (L 10) + gated Pfeiffer adapter (m 48)",
    merge_refusal="UniPELT's prefix and adapter are not weight deltas, and its LoRA gate depends on the input",
    as_lora_refusal=("its prefix and bottleneck adapter are not weight deltas, and the gate in front of its LoRA "
                     "depends on the input, so not even that part is a fixed B·A"),
    combine_refusal="its prefix part cannot be averaged (see prefix), and its gates are trained per task",
    export_state=prefix_method.export_state,
    load_state=prefix_method.load_state,
    # Not positionwise: every gate averages over the whole sequence, so the last layer's outputs at
    # the position the head reads depend on every other position's FFN input.
    no_peft_reason=(
        "HF PEFT has no UniPELT (LoRA, prefix tuning and a bottleneck adapter, each behind a learned gate); "
        "use the run folder with peftcli"
    ),
    budget=budget,
)(attach)

__all__ = [
    "GatedBottleneck", "GatedLayerPrefix", "GatedLoraLinear", "SequenceGate", "SequenceMask", "UniPeltConfig",
    "attach", "closed_form", "gate_values", "sequence_mask",
]
