"""Mix-and-match adapter (He et al. 2022): prefix tuning on attention + a scaled parallel adapter on the FFN.

    attention:  keys [P_K ; K], values [P_V ; V], L = 30 per layer (prefix tuning, MLP-reparameterised)
    FFN:        h' = h + s · f(x_in),  m = 512, s = 4       (scaled parallel adapter, f = W_up relu(W_down ·))

Built from the two methods it combines: `prefix.attach` and `parallel.attach_scaled`. The
adapter's up-projection starts at zero, so at step 0 it adds nothing; the prefix does change
attention (its keys and values come out of a randomly initialised MLP), so a fresh MAM model
equals the base model only with the prefix switched off (`adapter_enabled = False` on every
layer's prefix) and `shift_positions: false`, the default here: AdapterHub's MAM does not move
BERT's position ids either, whereas PEFT-style prefix tuning does.

Sizes: the paper's m = 512 and L = 30, prefix MLP width 512. AdapterHub's `mam` config uses a
prefix MLP of 800 and a parallel adapter of reduction factor 2 (m = hidden / 2); set
`prefix_bottleneck: 800` and `bottleneck_size: 192` to match it on a 384-wide model.
Saved as prefix tuning saves (the MLP's output table plus the MLP), the adapter as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods import prefix as prefix_method
from peftcli.methods.bottleneck import NonLinearity, dense_params
from peftcli.methods.parallel import ScaledParallelConfig, attach_scaled
from peftcli.methods.registry import register


@dataclass
class MamConfig:
    num_virtual_tokens: int = field(default=30, metadata={"min": 1, "help": "prefix length L per layer"})
    prefix_bottleneck: int = field(default=512, metadata={"min": 1, "help": "width of the prefix reparameterisation MLP"})
    reparameterize: bool = field(default=True, metadata={"help": "train the prefix through its MLP (saved as the MLP output)"})
    shift_positions: bool = field(
        default=False, metadata={"help": "real tokens take positions L.. behind the prefix (PEFT style); false as AdapterHub"}
    )
    bottleneck_size: int = field(default=512, metadata={"min": 1, "help": "parallel adapter bottleneck m"})
    scale: float = field(default=4.0, metadata={"help": "s in h + s · f(x_in)"})
    learned_scale: bool = field(default=False, metadata={"help": "train s (one scalar per layer, starts at `scale`)"})
    non_linearity: NonLinearity = field(default="relu", metadata={"help": "parallel adapter activation"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "help": "dropout on the adapter output"})


def parts(cfg: MamConfig) -> tuple[prefix_method.PrefixConfig, ScaledParallelConfig]:
    return (
        prefix_method.PrefixConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, reparameterize=cfg.reparameterize,
            bottleneck=cfg.prefix_bottleneck, shift_positions=cfg.shift_positions,
        ),
        ScaledParallelConfig(
            bottleneck_size=cfg.bottleneck_size, scale=cfg.scale, learned_scale=cfg.learned_scale,
            non_linearity=cfg.non_linearity, dropout=cfg.dropout, init="lora", attn=False,
        ),
    )


def attach(model: nn.Module, arch: Arch, cfg: MamConfig) -> None:
    pcfg, acfg = parts(cfg)
    prefix_method.attach(model, arch, pcfg)
    attach_scaled(model, arch, acfg)


def closed_form(hidden: int, num_layers: int, cfg: MamConfig, kv_width: int | None = None) -> int:
    """Prefix MLP (or table) + one parallel adapter per layer. kv_width = kv_heads · head_dim."""
    w = num_layers * 2 * (kv_width or hidden)
    L, b = cfg.num_virtual_tokens, cfg.prefix_bottleneck
    prefix = L * hidden + hidden * b + b + b * w + w if cfg.reparameterize else L * w
    return prefix + num_layers * (dense_params(hidden, cfg.bottleneck_size) + int(cfg.learned_scale))


def budget(model: nn.Module, arch: Arch, cfg: MamConfig) -> int:
    return closed_form(arch.hidden_size, arch.num_layers, cfg, arch.num_kv_heads * arch.head_dim)


register(
    "mam",
    MamConfig,
    summary="MAM adapter: prefix tuning (L 30) on attention + scaled parallel adapter (m 512, s 4) on the FFN",
    merge_refusal="MAM's prefix adds keys and values and its adapter is non-linear; neither folds into a weight",
    as_lora_refusal=("its prefix adds keys and values to attention and its parallel adapter is non-linear; "
                     "neither is a change of a weight matrix, which is all a LoRA can carry"),
    combine_refusal="its prefix half cannot be averaged (see prefix); combine parallel-adapter runs instead",
    export_state=prefix_method.export_state,
    load_state=prefix_method.load_state,
    positionwise=True,
    no_peft_reason=(
        "HF PEFT has no MAM adapter (prefix tuning together with a parallel bottleneck adapter); "
        "exporting the prefix alone would not reproduce the model, so use the run folder with peftcli"
    ),
    budget=budget,
)(attach)

__all__ = ["MamConfig", "attach", "closed_form", "parts"]
