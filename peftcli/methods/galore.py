"""GaLore (Zhao et al. 2024): full-rank weights, low-rank optimizer state.

Every targeted 2-D weight W (m × n) trains at full rank, but Adam never sees its gradient G:

    every T steps   P = U[:, :r]  from the SVD G = U S Vᵀ       (m ≤ n; otherwise P = V[:, :r])
                 (computed as the top-r eigenvectors of G Gᵀ, resp. Gᵀ G: the same vectors, faster)
    each step       R = Pᵀ G   (r × n)                          (otherwise R = G P, m × r)
                    m, v: Adam's moments of R (bias-corrected as AdamW's)
                    N = m̂ / (√v̂ + ε)
                    W ← W − lr · (wd · W + α · P N)              (otherwise α · N Pᵀ)

so the moments take r · max(m, n) numbers each instead of m · n, plus P's r · min(m, n). The
moments are kept across a refresh of P, as in the paper. Weights that are not targeted either stay
frozen (`others: frozen`, so that a checkpoint holds only the targeted weights and the task head)
or train with plain AdamW in the same optimizer (`others: adamw`).

The optimizer is this method's own (the spec's `optimizer` hook); its state is the name-keyed
tensors every optimizer saves, the projection included, so `--resume` continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.core.arch import Arch
from peftcli.methods.registry import register
from peftcli.methods.targets import LAYERS_HELP, method_layers, require_linears


@dataclass
class GaloreConfig:
    rank: int = field(default=128, metadata={"min": 1, "help": "r: rank of the projected gradient (capped at min(m, n))"})
    update_interval: int = field(default=200, metadata={"min": 1, "help": "T: recompute the projection every T steps"})
    scale: float = field(default=0.25, metadata={"help": "α: scale of the projected-back update"})
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "weights trained through the projection: roles (q, k, v, o, ffn_in, ffn_out), "
                          "'all-linear', or module-name patterns"},
    )
    layers: str | int | list[int] | None = field(default=None, metadata={"help": LAYERS_HELP})
    others: Literal["frozen", "adamw"] = field(
        default="frozen",
        metadata={"help": "every other weight (embeddings, norms, biases, LM head): frozen, or trained with plain AdamW"},
    )


def target_weights(model: nn.Module, arch: Arch, cfg: GaloreConfig) -> list[str]:
    """Parameter names of the weights trained through the projection."""
    paths = require_linears(model, arch, cfg.targets, method_layers(cfg, arch.num_layers))
    return [f"{p}.weight" for p in paths]


def attach(model: nn.Module, arch: Arch, cfg: GaloreConfig) -> None:
    names = target_weights(model, arch, cfg)
    if cfg.others == "adamw":
        model.requires_grad_(True)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)


def merge(model: nn.Module, arch: Arch, cfg: GaloreConfig) -> None:
    """The trained weights are the model's own; `merge` writes the model folder."""


def projected_shapes(shape: tuple[int, int], rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(moment shape, projection shape) of an m × n weight: the projection acts on the shorter side."""
    m, n = shape
    r = min(rank, m, n)
    return ((r, n), (m, r)) if m <= n else ((m, r), (n, r))


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose groups with a `rank` run Adam in GaLore's projected space.

    Groups without a rank (`rank: None`) are plain AdamW, step for step torch's single-tensor
    AdamW, so that `others: adamw` trains those weights exactly as `train.optimizer: adamw` would.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "rank": None, "update_interval": 200, "scale": 1.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                st["step"] += 1
                t = float(st["step"])
                galore = g["rank"] is not None and p.ndim == 2
                if galore:
                    if "proj" not in st or (t - 1) % g["update_interval"] == 0:
                        st["proj"] = self._basis(grad, g["rank"]).to(p.dtype)
                    grad = self._down(grad, st["proj"])
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
                if galore:
                    normed = exp_avg / denom / bc1
                    p.add_(self._up(normed, st["proj"], p.shape), alpha=-lr * g["scale"])
                else:
                    p.addcdiv_(exp_avg, denom, value=-lr / bc1)
        return loss

    @staticmethod
    def _basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """P: the top-r singular vectors of G on its shorter side.

        They are the top-r eigenvectors of the Gram matrix on that side (G Gᵀ for m ≤ n), which a
        symmetric eigensolver finds several times faster than an SVD of G on a CPU (a 576 × 1536
        gradient: about 0.2 s against 1 s). The Gram matrix is formed and solved in float64, so that
        squaring G's condition number costs no accuracy against a float32 SVD. Each vector's sign (free
        in any SVD) is fixed so that its largest entry is positive: the basis is a function of G.
        """
        m, n = grad.shape
        r = min(rank, m, n)
        g = grad.double()
        gram = g @ g.t() if m <= n else g.t() @ g
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
        p = vecs[:, -r:].flip(-1)
        peak = p[p.abs().argmax(dim=0), torch.arange(r)]
        p = p * torch.where(peak < 0, -1.0, 1.0).to(p.dtype)
        return p.float().contiguous()

    @staticmethod
    def _down(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        m, n = grad.shape
        return proj.t() @ grad if m <= n else grad @ proj

    @staticmethod
    def _up(normed: torch.Tensor, proj: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        m, n = shape
        return proj @ normed if m <= n else normed @ proj.t()


def build_optimizer(model: nn.Module, arch: Arch, cfg: GaloreConfig, tcfg: Any) -> torch.optim.Optimizer:
    """Projected targets in one group; the other trainable tensors as AdamW (decay on matrices)."""
    targets = set(target_weights(model, arch, cfg))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in targets], "weight_decay": tcfg.weight_decay,
         "rank": cfg.rank, "update_interval": cfg.update_interval, "scale": cfg.scale},
        {"params": [p for n, p in params if n not in targets and p.ndim >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for n, p in params if n not in targets and p.ndim < 2], "weight_decay": 0.0},
    ]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=tcfg.lr)


def optimizer_state(model: nn.Module, arch: Arch, cfg: GaloreConfig) -> dict[str, int]:
    """State elements per trainable tensor: two projected moments and P for targets, two moments else."""
    targets = set(target_weights(model, arch, cfg))
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n in targets and p.ndim == 2:
            (a, b), (c, d) = projected_shapes(tuple(p.shape), cfg.rank)
            out[n] = 2 * a * b + c * d
        else:
            out[n] = 2 * p.numel()
    return out


register(
    "galore",
    GaloreConfig,
    summary="full-rank training of chosen weights with Adam on the gradient projected to rank r; merge writes the model",
    combine_refusal="it trains the chosen weights themselves; combining two GaLore runs is merging whole models (merge each, then average outside peftcli)",
    merge=merge,
    positionwise=True,
    needs_dense_base="trains the base weights",
    no_peft_reason="GaLore trains the base weights themselves, which is no adapter; use the run folder or `peftcli merge`",
    as_lora_refusal=("GaLore trains the base weights themselves at full rank (with method.others: adamw every "
                     "weight, embeddings and norms included); `peftcli merge` writes the trained model instead"),
    optimizer=build_optimizer,
    optimizer_name="GaLore's projected AdamW",
    optimizer_state=optimizer_state,
)(attach)
