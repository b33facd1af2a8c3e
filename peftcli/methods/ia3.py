"""IA³ (Liu et al. 2022): learned vectors, initialised to 1, that rescale activations.

Attention targets scale their output (keys, values): y = l ⊙ (W x + b), PEFT's `ia3_l` [out, 1].
"Feed-forward" targets scale their input, which for the FFN down-projection is the intermediate
activation: y = W (l ⊙ x) + b, PEFT's `ia3_l` [1, in]. Both are diagonal rescalings of a linear map,
so merging multiplies rows (and the bias) or columns of W and leaves a plain layer.

GPT-2 computes q, k and v with one fused projection. There only the rows of the targeted roles
get a learned scale (`ia3_l` [rows, 1], `ia3_rows` says which), the others stay exactly 1 and
are not trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import LayerAdapter, merge_layer_adapters
from peftcli.core.adapter_merging import WEIGHTED, averaging
from peftcli.core.arch import QKV, Arch, dense_weight, is_conv1d, linear_dims, set_module
from peftcli.methods.registry import PeftTwin, register
from peftcli.methods.targets import LAYERS_HELP, TargetError, parse_layers, require_linears, select_linears


@dataclass
class IA3Config:
    targets: list[str] = field(
        default_factory=lambda: ["k", "v", "ffn_out"],
        metadata={"help": "roles (q, k, v, o, ffn_in, ffn_out) or module-name patterns to rescale"},
    )
    feedforward: list[str] = field(
        default_factory=lambda: ["ffn_out"],
        metadata={"help": "targets whose input is scaled (PEFT feedforward_modules); the others scale their output"},
    )
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})


class IA3Linear(LayerAdapter):
    """A frozen linear layer whose input or output is rescaled by a learned vector."""

    def __init__(self, base: nn.Module, scale_input: bool, rows: list[int] | None = None) -> None:
        super().__init__(base)
        self.scale_input = scale_input
        in_f, out_f = linear_dims(base)
        self.in_features, self.out_features = in_f, out_f
        w = base.weight
        if scale_input:
            shape = (1, in_f)
        else:
            shape = (len(rows) if rows is not None else out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))
        self.ia3_rows: torch.Tensor | None
        if rows is not None and not scale_input:
            self.register_buffer("ia3_rows", torch.tensor(rows, dtype=torch.long, device=w.device), persistent=False)
        else:
            self.ia3_rows = None

    def output_scale(self) -> torch.Tensor:
        """The full [out] scale vector (1 on rows that are not trained)."""
        vec = self.ia3_l.view(-1)
        if self.ia3_rows is None:
            return vec
        return torch.ones(self.out_features, device=vec.device, dtype=vec.dtype).index_copy(0, self.ia3_rows, vec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        if self.scale_input:
            return self.base(x * self.ia3_l.view(-1).to(x.dtype))
        y = self.base(x)
        return y * self.output_scale().to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(out, in) change of W, float32: W·diag(l − 1) when the input is scaled (columns),
        diag(l − 1)·W when the output is (rows; the bias changes too, see delta_bias)."""
        w = dense_weight(self.base).float()
        if self.scale_input:
            return w * (self.ia3_l.view(1, -1).float() - 1)
        return (self.output_scale().float() - 1).view(-1, 1) * w

    @torch.no_grad()
    def delta_bias(self) -> torch.Tensor | None:
        """Scaling the output scales the bias too: (l − 1) ⊙ b. Scaling the input leaves it alone."""
        bias = getattr(self.base, "bias", None)
        if self.scale_input or bias is None:
            return None
        return (self.output_scale().float() - 1) * bias.float()

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        base = self.base
        conv = is_conv1d(base)  # weight stored (in, out)
        w = base.weight
        if self.scale_input:
            vec = self.ia3_l.view(-1).to(torch.float32)
            w.copy_((w.float() * (vec.view(-1, 1) if conv else vec.view(1, -1))).to(w.dtype))
            return base
        s = self.output_scale().to(torch.float32)
        w.copy_((w.float() * (s.view(1, -1) if conv else s.view(-1, 1))).to(w.dtype))
        if getattr(base, "bias", None) is not None:
            base.bias.copy_((base.bias.float() * s).to(base.bias.dtype))
        return base


def plan(model: nn.Module, arch: Arch, cfg: IA3Config) -> dict[str, tuple[bool, list[int] | None]]:
    """path -> (scale input?, rows of a fused projection or None)."""
    layers = parse_layers(cfg.layers, arch.num_layers)
    paths = require_linears(model, arch, cfg.targets, layers)
    ff = set(select_linears(model, arch, cfg.feedforward, layers)) if cfg.feedforward else set()
    stray = sorted(ff - set(paths))
    if stray:
        raise TargetError(f"method.feedforward: {stray[0]} is not one of method.targets {cfg.targets} (IA³ scales a "
                          "feed-forward layer's input, so it must be adapted); add its role to method.targets, "
                          "or set method.feedforward: []")
    out: dict[str, tuple[bool, list[int] | None]] = {p: (p in ff, None) for p in paths}
    if arch.spec.fused_qkv:
        qkv_roles = [t for t in cfg.targets if t in QKV]
        other = [t for t in cfg.targets if t not in QKV]
        # A fused projection named only through q/k/v roles gets per-row scales.
        by_other = set(select_linears(model, arch, other, layers)) if other else set()
        for i in layers if layers is not None else range(arch.num_layers):
            path = arch.path(i, "q")
            if path in out and path not in by_other and not out[path][0]:
                out[path] = (False, arch.fused_qkv_rows(set(qkv_roles)))
    return out


def attach(model: nn.Module, arch: Arch, cfg: IA3Config) -> None:
    for path, (scale_input, rows) in plan(model, arch, cfg).items():
        set_module(model, path, IA3Linear(model.get_submodule(path), scale_input, rows))


def merge(model: nn.Module, arch: Arch, cfg: IA3Config) -> None:
    merge_layer_adapters(model, IA3Linear)


# ------------------------------------------------------------------ HF PEFT's IA3 type


def peft_layout(model: nn.Module, arch: Arch, cfg: IA3Config, lay: fmt.Layout) -> None:
    """As LoRA's, plus which targets scale their input (feedforward_modules) and, for GPT-2's fused
    q/k/v with only some roles targeted, the rows our shorter vector fills in PEFT's full one."""
    wrapped = fmt.adapted_linears(model, IA3Linear, "ia3")
    ff = [n for n, m in wrapped if m.scale_input]
    suffix = fmt.linear_targets(model, lay, wrapped, ff)
    lay.config["feedforward_modules"] = sorted({suffix[n] for n in ff})
    lay.feedforward = {f"{n}.ia3_l" for n in ff}
    lay.config["init_ia3_weights"] = True
    for n, m in wrapped:
        key = f"base_model.model.{n}.ia3_l"
        lay.to_peft[f"{n}.ia3_l"] = key
        lay.module_of[key] = n
        if m.ia3_rows is not None:
            lay.rows[f"{n}.ia3_l"] = (_fused_rows(arch, cfg), m.out_features)


def _fused_rows(arch: Arch, cfg: IA3Config) -> list[int]:
    """Rows of GPT-2's fused [q; k; v] output that IA³ scales when only some of q/k/v are targeted."""
    rows = arch.fused_qkv_rows({t for t in cfg.targets if t in QKV})
    if rows is None:
        raise fmt.PeftFormatError("internal: IA³ row subset without a q/k/v role in method.targets")
    return rows


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    return {"targets": fmt.module_list(config, "target_modules"),
            "feedforward": fmt.module_list(config, "feedforward_modules")}


def check_peft_tensor(key: str, name: str, t: torch.Tensor, lay: fmt.Layout, where: str,
                      config: dict[str, Any]) -> None:
    """A vector scales its layer's input in PEFT when it is [1, in], its output when [out, 1]; the
    recipe's method.feedforward must say the same of each target."""
    if not name.endswith(".ia3_l"):
        return
    scales_input = t.ndim == 2 and t.shape[0] == 1 and t.shape[1] > 1
    if scales_input != (name in lay.feedforward):
        theirs, ours = ("input", "output") if scales_input else ("output", "input")
        raise fmt.PeftFormatError(
            f"{where}: {lay.module_of[key]} scales its {theirs} in the adapter (feedforward_modules: "
            f"{config.get('feedforward_modules')}) but its {ours} under the recipe; set method.feedforward to match"
        )


register(
    "ia3",
    IA3Config,
    summary="IA³: learned vectors (init 1) rescaling keys, values and the FFN activation; mergeable",
    merge=merge,
    positionwise=True,
    # GPT-2's fused q/k/v vectors hold the rows of the targeted roles, so equal shapes are not
    # enough: every option must agree.
    combine=averaging((), "a negative weight makes negative scales, which flip the activations they scale "
                          "rather than undo a task"),
    combine_hows=(WEIGHTED,),
    peft=PeftTwin(
        peft_type="IA3",
        layout=peft_layout,
        import_config=from_peft_config,
        check_tensor=check_peft_tensor,
        key_suffixes=(".ia3_l",),
    ),
)(attach)

__all__ = ["IA3Config", "IA3Linear", "attach", "merge"]
