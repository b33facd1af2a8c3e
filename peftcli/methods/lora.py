"""LoRA (Hu et al. 2021) with the rsLoRA scaling switch and DoRA (`use_dora`, further below).

    y = W x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is Kaiming-uniform(a=sqrt 5) and B is zero, so training starts exactly at the base model.
Parameter names follow HF PEFT (`lora_A.weight` [r, in], `lora_B.weight` [out, r]) so that
exporting to its format is a key rename.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import LayerAdapter, merge_layer_adapters
from peftcli.core.adapter_merging import (
    ELEMENTWISE,
    Combined,
    CombineError,
    CombineRequest,
    merge_tensors,
    rule_of,
    uses_svd,
    weighted_sum,
)
from peftcli.core.arch import Arch, dense_weight, is_conv1d, linear_dims, set_module
from peftcli.core.precision import float_dtype
from peftcli.methods.lora_kernel import lora_linear
from peftcli.methods.registry import PeftTwin, register
from peftcli.methods.targets import LAYERS_HELP, parse_layers, select_linears


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


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraLinear(LayerAdapter):
    """Wraps a frozen linear layer (nn.Linear or GPT-2's Conv1D) with a low-rank update.

    The one low-rank linear of peftcli: DoRA (`DoraLinear`, below) and UniPELT's gated LoRA
    (`methods.unipelt.GatedLoraLinear`) subclass it, so that they build, initialise, name and
    count A and B exactly as LoRA does, and change only what the forward does with B A x (and,
    for DoRA, how it merges).

    The forward goes through `methods.lora_kernel.lora_linear` (one autograd node with a
    hand-written backward) whenever the base is a plain nn.Linear or Conv1D; anything else
    (quantized bases, hooked modules, mixed dtypes outside autocast) takes the plain formula.
    Both compute the same numbers; `fast_path = False` on an instance or the class forces the
    plain one.
    """

    fast_path: bool = True
    # This module's tensors in HF PEFT's format, relative to the module (the same names here).
    peft_tensors: tuple[str, ...] = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(base)
        in_f, out_f = linear_dims(base)
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.scaling = lora_scaling(alpha, r, rslora)
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



# ------------------------------------------------------------------------------------ DoRA
# DoRA (Liu et al. 2024): LoRA with the direction and the magnitude of each weight row apart.
#
#     W' = m ⊙ (W + s·B A) / ‖W + s·B A‖    (norm of each output row; m is a learned [out] vector)
#
# m starts at the row norms of W, and B at zero, so training starts at the base model. As in PEFT the
# norm is treated as a constant in backward (the paper's memory-saving choice), so the forward is
#
#     y = b + (m / ‖W + s·B A‖) ⊙ (W x + s·B A x)
#
# with W x taken from the frozen layer's own output. Because the norm carries no gradient it needs
# no graph: it is computed without autograd and reused until A or B change, i.e. once per optimizer
# step rather than once per forward (PEFT rebuilds the whole B A product on every forward, which is
# most of why its DoRA runs about twice as slow as LoRA).
#
# Selected through LoRA's `use_dora: true`; the parameter names match PEFT's
# (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector` [out]).


class DoraLinear(LoraLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) with a DoRA update: LoRA's A and B
    (built and initialised as LoRA builds them) plus the magnitude vector."""

    peft_tensors = (*LoraLinear.peft_tensors, "lora_magnitude_vector")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        w = base.weight
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype))
        self._norm_cache: tuple[Any, torch.Tensor] | None = None
        if w.device.type != "meta":
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm().to(w.dtype))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row, in float32, without autograd."""
        key = (self.lora_A.weight.data_ptr(), self.lora_A.weight._version,
               self.lora_B.weight.data_ptr(), self.lora_B.weight._version, self.base.weight.data_ptr())
        if self._norm_cache is None or self._norm_cache[0] != key:
            w = dense_weight(self.base).float() + self.delta_weight().float()
            self._norm_cache = (key, w.norm(p=2, dim=1))
        return self._norm_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        m = self.lora_magnitude_vector
        scale = m / self.weight_norm().to(m.dtype)
        if self.fast_path and (isinstance(self.lora_dropout, nn.Identity) or not self.training):
            # Without dropout y = scale ⊙ (W x + s·B A x) + b: LoRA's fused linear (one node, no W
            # gradient) without the bias, then one scale and one add, instead of the base layer, two
            # skinny linears and four full-size element-wise ops.
            z = lora_linear(x, self.base, self.lora_A.weight, self.lora_B.weight, self.scaling, 0.0, self.training,
                            use_bias=False)
            if z is not None:
                y = z * scale.to(z.dtype)
                bias = getattr(self.base, "bias", None)
                return y.add_(bias.to(y.dtype)) if bias is not None else y
        y = self.base(x)
        scale = scale.to(y.dtype)
        dropped = self.lora_dropout(x)
        lora = self.low_rank(dropped).to(y.dtype) * self.scaling
        bias = getattr(self.base, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            wx = y - bias if bias is not None else y
        else:  # as PEFT: the base term sees the same dropped-out input as the low-rank term
            wx = F.linear(dropped.to(y.dtype), dense_weight(self.base).to(y.dtype))
        return y + (scale - 1) * wx + scale * lora

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The frozen layer with W' = m ⊙ (W + s·B A) / ‖W + s·B A‖ written into its weight."""
        base = self.base
        w = dense_weight(base).float() + self.delta_weight().float()
        merged = (self.lora_magnitude_vector.float() / w.norm(p=2, dim=1)).view(-1, 1) * w
        if is_conv1d(base):
            merged = merged.t()
        base.weight.copy_(merged.to(base.weight.dtype))
        return base


def check_dense(model: nn.Module, paths: list[str]) -> None:
    """DoRA takes row norms of the base weights, which a quantized layer does not hold."""
    for p in paths:
        if not model.get_submodule(p).weight.is_floating_point():
            raise ValueError(f"DoRA needs floating-point base weights to take row norms; {p} is quantized")



def attach(model: nn.Module, arch: Arch, cfg: LoraConfig) -> None:
    layers = parse_layers(cfg.layers, arch.num_layers)
    paths = select_linears(model, arch, cfg.targets, layers)
    if not paths:
        raise ValueError(f"method.targets {cfg.targets} matched no linear layer in this model")
    make = LoraLinear
    if cfg.use_dora:

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


def peft_layout(model: nn.Module, arch: Arch, cfg: LoraConfig, lay: fmt.Layout) -> None:
    """PEFT's tensors sit at our module paths: our wrappers replace the layer they adapt as PEFT's do."""
    wrapped = fmt.adapted_linears(model, LoraLinear, "lora")
    fmt.linear_targets(model, lay, wrapped)
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
        dropout=float(config.get("lora_dropout", 0.0)), targets=fmt.module_list(config, "target_modules"),
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


# ------------------------------------------------------------------ combining adapters

HOWS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
        "magnitude_prune", "magnitude_prune_svd")
_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"


def combine(req: CombineRequest) -> Combined:
    """LoRA adapters into one, with HF PEFT's `add_weighted_adapter` rules and numbers.

    Each adapter's scaling s_i = alpha_i / r_i (rsLoRA: / sqrt r_i) is folded into its tensors,
    and the result loads with alpha = r, rslora off: scaling 1.

    - linear, ties, dare_*, magnitude_prune merge A and B separately, A_i weighted by
      sign(w_i)·sqrt|w_i s_i| and B_i by sqrt|w_i s_i|, so B A holds cross terms B_i A_j; all
      ranks must agree.
    - cat stacks the factors: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 B_2 ...], rank sum r_i,
      so B A = sum_i w_i s_i B_i A_i exactly.
    - svd (and the rule_svd forms) merges the full updates s_i B_i A_i with the rule and keeps the
      top `rank` singular directions: B = U_k S_k, A = V_kᵀ (rank: --rank, else the largest r_i).

    DoRA's magnitude is not a product of factors: it combines as task arithmetic around the
    magnitude an untrained DoRA layer has, ‖W‖ per row: m = ‖W‖ + sum_i w_i (m_i - ‖W‖), whatever
    the rule (PEFT instead gives the combined adapter the untrained ‖W‖).

    Arithmetic is float32; tensors are stored back in the dtype the first run saved.
    """
    cfgs, runs = req.cfgs, req.runs
    for run, cfg in zip(runs[1:], cfgs[1:], strict=True):
        if cfg.use_dora != cfgs[0].use_dora:
            kinds = {True: "DoRA", False: "plain LoRA"}
            raise CombineError(
                f"{run} is {kinds[cfg.use_dora]} but {runs[0]} is {kinds[cfgs[0].use_dora]} (method.use_dora); "
                "a DoRA adapter's magnitude vector has no counterpart in plain LoRA, so combine runs of one kind"
            )
    how, rule = req.how, rule_of(req.how)
    ranks = [c.r for c in cfgs]
    if how != "cat" and not uses_svd(how) and len(set(ranks)) > 1:
        shown = ", ".join(f"{run} r={r}" for run, r in zip(runs, ranks, strict=True))
        raise CombineError(f"--how {how} merges A and B entry by entry, which needs one rank ({shown}); "
                           "use --how cat or --how svd for adapters of different ranks")
    scalings = [lora_scaling(c.alpha, c.r, c.rslora) for c in cfgs]
    modules = [k[: -len(_A)] for k in req.states[0] if k.endswith(_A)]
    if how == "cat":
        new_rank = sum(ranks)
    elif uses_svd(how):
        new_rank = req.rank or max(ranks)
    else:
        new_rank = ranks[0]
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        dtype = req.states[0][m + _A].dtype
        a, b = _combine_factors(req, m, rule, new_rank, scalings)
        out[m + _A], out[m + _B] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if cfgs[0].use_dora:
            out[m + _M] = _combine_magnitude(req, m)
    notes = []
    if any(c.rslora for c in cfgs):
        notes.append("rsLoRA's scaling alpha/sqrt(r) is folded into the tensors; the combined adapter loads with "
                     f"alpha = r = {new_rank} and rslora: false (scaling 1)")
    if rule in ELEMENTWISE and how not in ("cat",) and not uses_svd(how) and len(req.states) > 1:
        notes.append(f"--how {how} merges A and B separately, so the update holds cross terms B_i A_j; "
                     "cat (exact) or svd (exact up to the rank kept) combine the updates themselves")
    new_cfg = dataclasses.replace(cfgs[0], r=new_rank, alpha=float(new_rank), rslora=False)
    return Combined({k: out[k] for k in req.states[0] if k in out}, new_cfg, notes)


def _combine_factors(req: CombineRequest, m: str, rule: str, new_rank: int,
                     scalings: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined A and B of module `m`, in float32, by the request's `how`."""
    how = req.how
    a_s = [sd[m + _A].float() for sd in req.states]
    b_s = [sd[m + _B].float() for sd in req.states]
    if how == "cat":
        a = torch.cat([t * w * s for t, w, s in zip(a_s, req.weights, scalings, strict=True)], dim=0)
        b = torch.cat(b_s, dim=1)
    elif uses_svd(how):
        limit = min(b_s[0].shape[0], a_s[0].shape[1])
        if new_rank > limit:
            raise CombineError(f"--rank {new_rank} exceeds what {m} can hold ({b_s[0].shape[0]} × "
                               f"{a_s[0].shape[1]}: rank at most {limit}); choose --rank {limit} or less")
        deltas = [(b @ a) * s for a, b, s in zip(a_s, b_s, scalings, strict=True)]
        merged = merge_tensors(rule, deltas, torch.tensor(req.weights), density=req.density,
                               majority_sign=req.majority_sign, generator=req.generator)
        # Full matrices, as PEFT: the reduced SVD spans the same directions but rounds differently.
        u, sv, vh = torch.linalg.svd(merged, full_matrices=True)
        b = u[:, :new_rank] @ torch.diag(sv[:new_rank])
        a = vh[:new_rank, :]
    else:
        ws = [w * s for w, s in zip(req.weights, scalings, strict=True)]
        wa = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
        wb = torch.tensor([math.sqrt(abs(x)) for x in ws])
        kw = dict(density=req.density, majority_sign=req.majority_sign, generator=req.generator)
        a = merge_tensors(rule, a_s, wa, **kw)
        b = merge_tensors(rule, b_s, wb, **kw)
    return a, b


def _combine_magnitude(req: CombineRequest, module: str) -> torch.Tensor:
    """m = sum_i w_i m_i + (1 - sum_i w_i) ‖W‖: the row norms of the base weight are read only
    when the weights do not sum to 1."""
    mags = [sd[module + _M] for sd in req.states]
    m = weighted_sum(mags, req.weights).float()
    rest = 1.0 - sum(req.weights)
    if abs(rest) > 1e-12:
        if req.base_weight is None:
            raise CombineError("internal: DoRA needs the base weights to combine magnitudes")
        m = m + rest * req.base_weight(module).float().norm(p=2, dim=1)
    return m.to(mags[0].dtype)


register(
    "lora",
    LoraConfig,
    summary="low-rank update B·A beside chosen linear layers (rsLoRA, DoRA as options); mergeable",
    stacks_rows=lambda cfg: not cfg.use_dora,  # DoRA's per-row norm does not stack
    merge=merge,
    positionwise=True,
    needs_dense_base=needs_dense_base,
    combine=combine,
    combine_hows=HOWS,
    peft=PeftTwin(
        peft_type="LORA",
        layout=peft_layout,
        import_config=from_peft_config,
        settings=peft_settings,
        key_suffixes=(".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_embedding_A",
                      ".lora_embedding_B", ".lora_A.bias", ".lora_B.bias"),
    ),
)(attach)

__all__ = ["DoraLinear", "LoraConfig", "LoraLinear", "attach", "check_dense", "merge", "merge_into_base", "wrap_linears"]
