"""LoRA (Hu et al. 2021) with the rsLoRA scaling switch and DoRA (`use_dora`, further below).

    y = W x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is Kaiming-uniform(a=sqrt 5) and B is zero, so training starts exactly at the base model; the
other starts (`method.init`: gaussian, PiSSA, OLoRA) and per-module ranks (`rank_pattern`,
`alpha_pattern`) are in methods/lora_init.py, LoRA-FA is `freeze_a` (A frozen at its start).
Parameter names follow HF PEFT (`lora_A.weight` [r, in], `lora_B.weight` [out, r]) so that
exporting to its format is a key rename.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core import peft_layout as fmt
from peftcli.core.adapter import LayerAdapter, copy_into_params, merge_layer_adapters
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
from peftcli.core.arch import ROLES, Arch, dense_weight, is_conv1d, linear_dims, set_module
from peftcli.core.errors import BadInput, CheckpointError
from peftcli.core.precision import float_dtype
from peftcli.methods.lora_init import (
    INITS_HELP,
    init_problem,
    is_random_start,
    module_options,
    moves_base,
    pattern_problem,
    reset_factors,
    residual,
    start_factors,
    unmatched_keys,
)
from peftcli.methods.lora_kernel import lora_linear
from peftcli.methods.registry import PeftTwin, register
from peftcli.methods.targets import LAYERS_HELP, parse_layers, require_linears


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
    init: str = field(default="default", metadata={"help": INITS_HELP})
    freeze_a: bool = field(default=False, metadata={
        "help": "LoRA-FA: A keeps its start and is not trained (no gradient, no optimizer state); only B learns"})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={
        "help": "rank per module: {role or module pattern: r}, e.g. {v: 16, ffn_out: 4}; a pattern "
                "is matched as HF PEFT matches it (a regex ending the module path); the first matching key wins; "
                "other modules take method.r"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={
        "help": "alpha per module, keyed like rank_pattern; other modules take method.alpha"})

    def __post_init__(self) -> None:
        problems = [p for p in (init_problem(self.init), pattern_problem(self.rank_pattern, "rank_pattern", int),
                                pattern_problem(self.alpha_pattern, "alpha_pattern", float)) if p]
        if not problems and self.use_dora and moves_base(self.init):
            problems.append(f"method.init {self.init} with method.use_dora: DoRA's magnitude starts at the row norms "
                            "of the weight that PiSSA/OLoRA change; use one of them (method.init: default, or "
                            "use_dora: false)")
        if problems:  # every one at once: the recipe loader shows them together
            raise ValueError("; ".join(problems))
        self.alpha_pattern = {k: float(v) for k, v in self.alpha_pattern.items()}


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

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool,
                 init: str = "default", freeze_a: bool = False) -> None:
        super().__init__(base)
        in_f, out_f = linear_dims(base)
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha = r, float(alpha)
        self.scaling = lora_scaling(alpha, r, rslora)
        w = base.weight
        dtype = float_dtype(base)  # a 4-bit base stores uint8; the adapter takes its compute dtype
        self.lora_A = nn.Linear(in_f, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init = init
        if moves_base(init):
            # The start B0, A0 (float32), saved with the adapter: the frozen weight holds W − s·B0 A0 once
            # `take_start` ran, and a saved run rebuilds exactly that residual from them (`load_start`).
            self.register_buffer("lora_A0", torch.zeros(r, in_f, device=w.device, dtype=torch.float32))
            self.register_buffer("lora_B0", torch.zeros(out_f, r, device=w.device, dtype=torch.float32))
        self.base_moved = False
        if w.device.type != "meta":
            reset_factors(self.lora_A.weight, self.lora_B.weight, init)
        if freeze_a:
            self.lora_A.weight.requires_grad_(False)
        self.merged = False

    @torch.no_grad()
    def take_start(self) -> None:
        """PiSSA / OLoRA: A, B from the frozen weight, and the residual left in it."""
        a0, b0 = start_factors(dense_weight(self.base), self.r, self.scaling, self.init)
        self.load_start(a0, b0)

    @torch.no_grad()
    def load_start(self, a0: torch.Tensor, b0: torch.Tensor, trained: bool = False) -> None:
        """Make the frozen weight W − s·B0 A0 for this start, W being the layer's own weight; with
        `trained` False A and B are set to the start too. Taking a second start first adds the
        previous one back (exact only up to rounding; a run never does that with a different start)."""
        a0 = a0.to(self.lora_A0.device, torch.float32)
        b0 = b0.to(self.lora_B0.device, torch.float32)
        if self.base_moved and torch.equal(a0, self.lora_A0) and torch.equal(b0, self.lora_B0):
            return
        base = self.base
        if not base.weight.is_floating_point():
            raise ValueError(f"method.init {self.init}: the frozen weight is quantized; PiSSA/OLoRA decompose a "
                             "dense weight (train on a float base, model.quantization: none)")
        w = dense_weight(base)
        if self.base_moved:
            w = w.float() + self.scaling * self.lora_B0 @ self.lora_A0
        res = residual(w, a0, b0, self.scaling).to(base.weight.dtype)
        base.weight.copy_(res.t() if is_conv1d(base) else res)
        self.lora_A0.copy_(a0)
        self.lora_B0.copy_(b0)
        self.base_moved = True
        if not trained:
            self.lora_A.weight.copy_(a0.to(self.lora_A.weight.dtype))
            self.lora_B.weight.copy_(b0.to(self.lora_B.weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        """s · B A as an (out, in) matrix."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def low_rank(self, dropped: torch.Tensor) -> torch.Tensor:
        """B A x for an already dropped-out x, unscaled, in the adapter's dtype."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return F.linear(F.linear(dropped.to(a.dtype), a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled or self.merged:
            y = self.base(x)
            if self.base_moved and not self.merged:
                # Switched off (AdapterDrop), a PiSSA/OLoRA layer is the original layer again: the start
                # it moved out of the frozen weight goes back in, W x = (W − s·B0 A0) x + s·B0 A0 x.
                start = F.linear(F.linear(x.to(self.lora_A0.dtype), self.lora_A0), self.lora_B0)
                y = y + (start * self.scaling).to(y.dtype)
            return y
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

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool,
                 init: str = "default", freeze_a: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, rslora, init, freeze_a)
        w = base.weight
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype))
        self._norm_cache: tuple[Any, torch.Tensor] | None = None
        if w.device.type != "meta":
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm().to(w.dtype))

    @torch.no_grad()
    def weight_norm(self, cache: bool = True) -> torch.Tensor:
        """‖W + s·B A‖ per output row, in float32, without autograd.

        Cached for inference (keyed on A's and B's version counters). A training forward passes
        `cache=False` and drops the cache: the optimizer step after it may be fused (torch's fused
        AdamW), which updates A and B in place without bumping their version counters."""
        key = (self.lora_A.weight.data_ptr(), self.lora_A.weight._version,
               self.lora_B.weight.data_ptr(), self.lora_B.weight._version, self.base.weight.data_ptr())
        if not cache:
            self._norm_cache = None
        elif self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        norm = (dense_weight(self.base).float() + super().delta_weight().float()).norm(p=2, dim=1)
        if cache:
            self._norm_cache = (key, norm)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        m = self.lora_magnitude_vector
        scale = m / self.weight_norm(cache=not torch.is_grad_enabled()).to(m.dtype)
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
    def delta_weight(self) -> torch.Tensor:
        """DoRA's whole effect W' − W = (k − 1) ⊙ W + k ⊙ s·B A with k = m / ‖W + s·B A‖ per row, float32:
        the same terms the forward adds, so that no large W is subtracted from a nearly equal W'."""
        w = dense_weight(self.base).float()
        low_rank = super().delta_weight().float()
        k = (self.lora_magnitude_vector.float() / (w + low_rank).norm(p=2, dim=1)).view(-1, 1)
        return (k - 1) * w + k * low_rank

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The frozen layer with W' = m ⊙ (W + s·B A) / ‖W + s·B A‖ written into its weight."""
        base = self.base
        w = dense_weight(base).float() + super().delta_weight().float()
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



def adapted_paths(model: nn.Module, arch: Arch, cfg: LoraConfig) -> list[str]:
    """The linear layers the recipe's targets and layers choose."""
    layers = parse_layers(cfg.layers, arch.num_layers)
    return require_linears(model, arch, cfg.targets, layers)


def options_of(arch: Arch, paths: list[str], cfg: LoraConfig) -> dict[str, tuple[int, float]]:
    """(rank, alpha) per adapted module; refuses a pattern key that adapts nothing (a typo PEFT
    would silently ignore)."""
    for key, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        idle = unmatched_keys(paths, arch, pattern)
        if idle:
            raise ValueError(f"method.{key}: {idle[0]!r} matches none of the {len(paths)} adapted modules (e.g. "
                             f"{paths[0]}); use a role among method.targets or a pattern ending a module path")
    return module_options(arch, paths, cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern)


def attach(model: nn.Module, arch: Arch, cfg: LoraConfig) -> None:
    paths = adapted_paths(model, arch, cfg)
    make = LoraLinear
    if cfg.use_dora:
        check_dense(model, paths)
        make = DoraLinear
    for path, (r, alpha) in options_of(arch, paths, cfg).items():
        set_module(model, path, make(model.get_submodule(path), r, alpha, cfg.dropout, cfg.rslora, cfg.init,
                                     cfg.freeze_a))


def merge(model: nn.Module, arch: Arch, cfg: LoraConfig) -> None:
    merge_layer_adapters(model, LoraLinear)


def needs_dense_base(cfg: LoraConfig) -> str:
    if moves_base(cfg.init):
        return (f"with method.init: {cfg.init}: PiSSA/OLoRA decompose the dense base weight and leave a residual in "
                "it, which a 4-bit base does not hold; use method.init: default (or gaussian), or train on a float "
                "base (model.quantization: none)")
    if not cfg.use_dora:
        return ""
    return ("with method.use_dora: DoRA normalises the dense base weight, which a 4-bit base does not hold; "
            "use plain LoRA (method.use_dora: false)")


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def take_starts(model: nn.Module, arch: Arch, cfg: LoraConfig, losses: Any = None) -> None:
    """PiSSA / OLoRA: decompose each adapted weight before the first step of a new run (the
    registry's `calibrate` hook: never on resume or with init_from, whose files hold the start).
    The randomized SVD of pissa_niter_K draws from a generator seeded with the run's seed, so
    every rank of a distributed run takes the same start, whatever it drew before."""
    if not moves_base(cfg.init):
        return
    mods = lora_modules(model)
    if any(hasattr(m.base.weight, "device_mesh") for _, m in mods):
        raise LoraOptionError(f"method.init {cfg.init}: under train.distributed: fsdp each rank holds a shard of a "
                              "weight, and PiSSA/OLoRA decompose whole weights; use train.distributed: ddp")
    devices = sorted({m.base.weight.device for _, m in mods if m.base.weight.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch.initial_seed())
        for _, m in mods:
            m.take_start()


def export_state(model: nn.Module, arch: Arch, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Every trained tensor, and every adapted layer's A even when frozen (LoRA-FA), and the
    PiSSA/OLoRA start (lora_A0, lora_B0), from which a saved run rebuilds the residual base."""
    keep = {f"{n}.lora_A.weight" for n, _ in lora_modules(model)}
    sd = {n: p for n, p in model.named_parameters() if p.requires_grad or n in keep}
    for n, m in lora_modules(model):
        if moves_base(m.init):
            sd[f"{n}.lora_A0"], sd[f"{n}.lora_B0"] = m.lora_A0, m.lora_B0
    return sd


def load_state(model: nn.Module, arch: Arch, cfg: LoraConfig, sd: dict[str, torch.Tensor]) -> None:
    """The inverse of export_state. A PiSSA/OLoRA adapter's residual base is rebuilt from its saved
    start, W − s·B0 A0 exactly as training computed it; a file without the start (an HF PEFT
    folder saved with init_lora_weights pissa or olora) gets it decomposed from this base, as
    PEFT's own from_pretrained does."""
    starts = {k for k in sd if k.endswith((".lora_A0", ".lora_B0"))}
    if starts and not moves_base(cfg.init):
        raise CheckpointError(f"the adapter holds a PiSSA/OLoRA start ({sorted(starts)[0]}) but method.init is "
                              f"{cfg.init}; set method.init to the start it was trained with (pissa or olora)")
    params = dict(model.named_parameters())
    rest = {k: v for k, v in sd.items() if k not in starts}
    unknown = [k for k in rest if k not in params]
    if unknown:
        raise CheckpointError(f"adapter has {len(unknown)} tensors this model lacks (e.g. {unknown[0]}); "
                              "was it trained with another base model or method?")
    keep = {f"{n}.lora_A.weight" for n, _ in lora_modules(model)}
    missing = [n for n, p in params.items() if (p.requires_grad or n in keep) and n not in rest]
    if missing:
        raise CheckpointError(f"adapter is missing {len(missing)} trained tensors (e.g. {missing[0]})")
    for n, m in lora_modules(model):
        if not moves_base(m.init):
            continue
        if f"{n}.lora_A0" in sd:
            m.load_start(sd[f"{n}.lora_A0"], sd[f"{n}.lora_B0"], trained=True)
        elif is_random_start(m.init):
            raise CheckpointError(f"{n}: a {m.init} adapter without its start: its residual base came from random "
                                  "draws that cannot be repeated; have PEFT convert it to a plain LoRA "
                                  "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        elif not m.base_moved:
            m.take_start()
    copy_into_params(params, rest)


def budget(model: nn.Module, arch: Arch, cfg: LoraConfig) -> int:
    """Σ over adapted layers of r_i·(in + out), less r_i·in for a frozen A, plus out for DoRA."""
    total = 0
    for _, m in lora_modules(model):
        in_f, out_f = linear_dims(m.base)
        total += m.r * (0 if cfg.freeze_a else in_f) + m.r * out_f + (out_f if cfg.use_dora else 0)
    return total


def site_scalings(model: nn.Module, cfg: LoraConfig, paths: list[str]) -> dict[str, float]:
    """Each adapted module's scaling on a plain base model (mixed-adapter batches), from its rank
    and alpha under the recipe's patterns."""
    from peftcli.core.arch import resolve

    arch = resolve(model) if any(k in ROLES for k in (*cfg.rank_pattern, *cfg.alpha_pattern)) else None
    opts = module_options(arch, paths, cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern)
    return {p: lora_scaling(alpha, r, cfg.rslora) for p, (r, alpha) in opts.items()}


class LoraOptionError(BadInput, ValueError):
    """A LoRA option that cannot apply to this run (exit 2)."""


# ------------------------------------------------------------------ HF PEFT's LORA type


def peft_layout(model: nn.Module, arch: Arch, cfg: LoraConfig, lay: fmt.Layout) -> None:
    """PEFT's tensors sit at our module paths: our wrappers replace the layer they adapt as PEFT's do.

    Per-module ranks and alphas go to rank_pattern / alpha_pattern, keyed by the shortest escaped
    path suffix that selects exactly their modules under PEFT's matching rule. A PiSSA/OLoRA run
    is written as PEFT writes one with `path_initial_model_for_weight_conversion`: the plain LoRA
    of rank 2r whose update B'A' = B A − B0 A0 applies to the original, unmoved base.
    """
    wrapped = fmt.adapted_linears(model, LoraLinear, "lora")
    fmt.linear_targets(model, lay, wrapped)
    for n, m in wrapped:
        for t in m.peft_tensors:
            lay.to_peft[f"{n}.{t}"] = f"base_model.model.{n}.{t}"
            lay.module_of[f"base_model.model.{n}.{t}"] = n
    convert = moves_base(cfg.init)
    # PEFT's conversion doubles r and keeps each scaling: alpha x 2, or x sqrt 2 under rsLoRA.
    rank_x, alpha_x = (2, 2 ** 0.5 if cfg.rslora else 2) if convert else (1, 1)
    r, alpha = cfg.r * rank_x, cfg.alpha * alpha_x
    ranks = {n: m.r * rank_x for n, m in wrapped}
    alphas = {n: m.alpha * alpha_x for n, m in wrapped}
    lay.config.update({
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.use_dora,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern(ranks, r),
        "alpha_pattern": _pattern(alphas, alpha),
    })
    if convert:
        lay.transform = _plain_lora
        lay.notes.append(f"method.init {cfg.init}: written as the plain LoRA of rank 2r relative to the original "
                         f"{lay.config.get('base_model_name_or_path')} (A' = [A; A0], B' = [B, -B0]), as PEFT's "
                         "path_initial_model_for_weight_conversion writes it")


def _pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """{escaped path suffix: value} for the modules whose value is not the default."""
    out: dict[str, Any] = {}
    names = list(values)
    for v in dict.fromkeys(x for x in values.values() if x != default):
        chosen = [n for n in names if values[n] == v]
        for suffix in dict.fromkeys(fmt.shortest_suffixes(chosen, names).values()):
            out[re.escape(suffix)] = v
    return out


def _plain_lora(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PiSSA/OLoRA adapter as the LoRA it is relative to the original base: ΔW = B A − B0 A0
    = [B, −B0] [A; A0] (PEFT's subtract_mutated_init)."""
    out = {k: v for k, v in sd.items() if not k.endswith((".lora_A0", ".lora_B0"))}
    for k in [k for k in sd if k.endswith(".lora_A0")]:
        n = k[: -len(".lora_A0")]
        a, b = sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"]
        out[f"{n}.lora_A.weight"] = torch.cat([a, sd[k].to(a.dtype)], dim=0)
        out[f"{n}.lora_B.weight"] = torch.cat([b, -sd[f"{n}.lora_B0"].to(b.dtype)], dim=1)
    return out


def _peft_init(config: dict[str, Any]) -> Any:
    """A PEFT init_lora_weights as method.init where peftcli has it; other values unchanged."""
    init = config.get("init_lora_weights", True)
    if init is True or init is False or init is None:
        return "default"
    return init.lower() if isinstance(init, str) and init.lower() in ("gaussian", "olora") else init


def from_peft_config(config: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = dict(
        r=config.get("r", 8), alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)), targets=fmt.module_list(config, "target_modules"),
        rslora=bool(config.get("use_rslora", False)), use_dora=bool(config.get("use_dora", False)),
    )
    init = _peft_init(config)
    if isinstance(init, str) and init_problem(init) is None and init != "default":
        block["init"] = init
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            block[key] = dict(config[key])
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
        ("rank_pattern", "rank_pattern", dict(config.get("rank_pattern") or {}), cfg.rank_pattern),
        ("alpha_pattern", "alpha_pattern", {k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
         cfg.alpha_pattern),
    ]
    problems = []
    init = _peft_init(config)
    if not isinstance(init, str) or init_problem(init) is not None:
        problems.append(
            f"adapter_config.json has init_lora_weights: {config.get('init_lora_weights')!r}, a start peftcli does "
            "not have: such an adapter is only valid on the modified base weights it was saved with; have PEFT "
            "convert it to a plain LoRA adapter first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    elif is_random_start(init):
        problems.append(
            f"adapter_config.json has init_lora_weights: {init!r}: its residual base weights came from a randomized "
            "SVD whose draws cannot be repeated; have PEFT convert it to a plain LoRA adapter first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    elif moves_base(init) or moves_base(cfg.init):
        pairs.append(("init_lora_weights", "init", init, cfg.init))
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
    # A PiSSA/OLoRA run enters as the plain LoRA it is relative to the original base (rank 2r, same scaling).
    req = dataclasses.replace(req, states=[_plain_lora(sd) for sd in req.states])
    how, rule = req.how, rule_of(req.how)
    modules = [k[: -len(_A)] for k in req.states[0] if k.endswith(_A)]
    ranks = {m: [sd[m + _A].shape[0] for sd in req.states] for m in modules}
    if how != "cat" and not uses_svd(how):
        for m, rs in ranks.items():
            if len(set(rs)) > 1:
                shown = ", ".join(f"{run} r={r}" for run, r in zip(runs, rs, strict=True))
                raise CombineError(f"--how {how} merges A and B entry by entry, which needs one rank ({m}: {shown}); "
                                   "use --how cat or --how svd for adapters of different ranks")
    scalings = _module_scalings(req, modules)
    new_ranks = {m: sum(rs) if how == "cat" else (req.rank or max(rs)) if uses_svd(how) else rs[0]
                 for m, rs in ranks.items()}
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        dtype = req.states[0][m + _A].dtype
        a, b = _combine_factors(req, m, rule, new_ranks[m], scalings[m])
        out[m + _A], out[m + _B] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if cfgs[0].use_dora:
            out[m + _M] = _combine_magnitude(req, m)
    new_cfg = _combined_config(cfgs[0], new_ranks)
    notes = []
    if any(c.rslora for c in cfgs):
        notes.append("rsLoRA's scaling alpha/sqrt(r) is folded into the tensors; the combined adapter loads with "
                     f"alpha = r = {new_cfg.r} and rslora: false (scaling 1)")
    if any(moves_base(c.init) for c in cfgs):
        notes.append("PiSSA/OLoRA runs enter as their plain LoRA relative to the original base (A' = [A; A0], "
                     "B' = [B, -B0]); the combined adapter applies to the unmoved base (method.init: default)")
    if rule in ELEMENTWISE and how not in ("cat",) and not uses_svd(how) and len(req.states) > 1:
        notes.append(f"--how {how} merges A and B separately, so the update holds cross terms B_i A_j; "
                     "cat (exact) or svd (exact up to the rank kept) combine the updates themselves")
    return Combined({k: out[k] for k in req.states[0] if k in out}, new_cfg, notes)


def _module_scalings(req: CombineRequest, modules: list[str]) -> dict[str, list[float]]:
    """Each module's scaling in each run, under that run's rank and alpha patterns."""
    per_run = []
    for cfg in req.cfgs:
        opts = module_options(req.arch, modules, cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern)
        per_run.append({m: lora_scaling(alpha, r, cfg.rslora) for m, (r, alpha) in opts.items()})
    return {m: [run[m] for run in per_run] for m in modules}


def _combined_config(first: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """Scaling 1 everywhere (alpha = r per module), the most common rank as method.r, per-module
    ranks as patterns; a plain start with a trainable A (the result is an adapter, not a start)."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    rank_pattern = _pattern(ranks, r)
    return dataclasses.replace(first, r=r, alpha=float(r), rslora=False, init="default", freeze_a=False,
                               rank_pattern=rank_pattern, alpha_pattern={k: float(v) for k, v in rank_pattern.items()})


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
    summary="low-rank update B·A beside chosen linear layers (rsLoRA, DoRA, PiSSA/OLoRA starts, LoRA-FA, per-module "
            "ranks as options); mergeable",
    # DoRA's per-row norm does not stack, nor does a PiSSA/OLoRA run's moved base weight.
    stacks_rows=lambda cfg: not cfg.use_dora and not moves_base(cfg.init),
    merge=merge,
    export_state=export_state,
    load_state=load_state,
    saves_own_tensors=True,
    calibrate=take_starts,
    budget=budget,
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

__all__ = [
    "DoraLinear", "LoraConfig", "LoraLinear", "LoraOptionError", "attach", "check_dense", "export_state", "load_state",
    "lora_modules", "merge", "merge_into_base", "site_scalings", "take_starts", "wrap_linears",
]
