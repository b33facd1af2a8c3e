"""The fused LoRA linear: one autograd Function with a hand-written backward.

Why a hand-written backward for LoRA. Written as plain modules, y = W x + b + s · B A drop(x) makes
autograd record five or six nodes per adapted layer (base linear, dropout, two skinny linears, a
scale, an add), keep the dropout output alive, produce the input gradient as two full-size
tensors that are then summed, and compute dL/dB as dyᵀ h, a skinny product with a layout that
BLAS handles badly. One Function does the same arithmetic with:

- the low-rank product added into the base output in place (one addmm, no extra full-size tensor);
- saved for backward only x (shared with every other consumer of x), the r × N projection h and,
  with dropout, a 1-byte mask instead of the dropped-out copy of x;
- no gradient for the frozen W or b, nor for A when LoRA-FA freezes it (`method.freeze_a`: autograd
  asks for none, so dA's GEMM is skipped), and dx = dy W + (s · dy B) A as one GEMM plus one addmm
  into its output;
- every skinny product in the operand layout BLAS is fast at (on a 2-core CPU, dL/dB from hᵀ dy
  costs about a ninth of dyᵀ h, and dy B from a contiguous Bᵀ a third of B's transposed view).

The speed levers that act on the whole base model live beside it in models/: `models.trim`
(the last layer run only where a classifier's head reads) and `models.compile` (per-layer
torch.compile).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core.arch import is_conv1d
from peftcli.core.precision import autocast_dtype


class _LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ with W stored (out, in), or (in, out) when `conv1d`.

    `keep` is the dropout keep-mask (bool, shape of x) or None; dropped inputs are scaled by
    1 / (1 - p) exactly as nn.Dropout does.
    """

    @staticmethod
    def forward(ctx: Any, x, w, bias, a, b, scaling: float, keep, p: float, conv1d: bool):
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)
        xd = x2 * _keep_scale(keep.reshape(-1, in_f), p, x2.dtype) if keep is not None else x2
        # h is kept transposed, (r, N): every skinny product below then has the operand layout
        # BLAS is fast at (on CPU, dB from (r, N) h took a ninth of the time of the (N, r) layout).
        ht = torch.mm(a, xd.t())
        if conv1d:
            y = torch.addmm(bias, x2, w) if bias is not None else torch.mm(x2, w)
        else:
            y = F.linear(x2, w, bias)
        y.addmm_(ht.t(), b.t(), alpha=scaling)
        ctx.save_for_backward(x, w, a, b, ht, keep)
        ctx.scaling, ctx.p, ctx.conv1d, ctx.has_bias = scaling, p, conv1d, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, gy):
        x, w, a, b, ht, keep = ctx.saved_tensors
        s, p, conv1d = ctx.scaling, ctx.p, ctx.conv1d
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        in_f, out_f = x.shape[-1], gy.shape[-1]
        g2 = gy.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f)
        scale = _keep_scale(keep.reshape(-1, in_f), p, x2.dtype) if keep is not None else None
        gx = gw = gbias = ga = gb = None
        ght = None
        if need_x or need_a:
            # s · (dy B)ᵀ, (r, N): the gradient reaching h, shared by dA and dx. From s · Bᵀ as a
            # contiguous (r, out) copy: from B's own transposed view the CPU GEMM took up to three
            # times as long (369 against 104 µs at out 1536, N 512, 2 threads: bench_lora_layer --ops).
            bt = b.t().clone(memory_format=torch.contiguous_format).mul_(s)  # a copy even when r is 1
            ght = torch.mm(bt, g2.t())
        if need_b:
            gb = torch.mm(ht, g2).mul_(s).t()
        if need_a:
            ga = torch.mm(ght, x2 * scale if scale is not None else x2)
        if need_x:
            gx = torch.mm(g2, w.t()) if conv1d else torch.mm(g2, w)
            if scale is None:
                gx.addmm_(ght.t(), a)
            else:
                gx.add_(torch.mm(ght.t(), a).mul_(scale))
            gx = gx.view(x.shape)
        if need_w:
            gw = torch.mm(x2.t(), g2) if conv1d else torch.mm(g2.t(), x2)
        if need_bias and ctx.has_bias:
            gbias = g2.sum(0)
        return gx, gw, gbias, ga, gb, None, None, None, None


def _keep_scale(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    # Same values nn.Dropout multiplies by: 1.0 / (1 - p) computed in the tensor's dtype.
    return keep.to(dtype).div_(1.0 - p)


def lora_linear(
    x: torch.Tensor,
    base: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    use_bias: bool = True,
) -> torch.Tensor | None:
    """The fused LoRA linear, or None when `base`/dtypes are outside what it handles (the caller
    then uses the plain formula). Under autocast, every operand is cast to the autocast dtype the
    way autocast would cast F.linear's, and the Function runs with autocast off so that forward
    and backward see the same dtypes. `use_bias=False` leaves the base's bias out (DoRA scales
    W x + s·B A x and adds the bias after)."""
    if type(base) is nn.Linear:
        conv1d = False
    elif is_conv1d(base):
        conv1d = True
    else:
        return None
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None  # someone (hooks, accelerate's device maps) expects base.forward to run
    w, bias = base.weight, (base.bias if use_bias else None)
    dev = x.device.type
    dt = autocast_dtype(dev)
    if dt is not None and x.is_floating_point():
        x, w, a, b = x.to(dt), w.to(dt), a.to(dt), b.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if not (x.dtype == w.dtype == a.dtype == b.dtype) or (bias is not None and bias.dtype != x.dtype):
        return None
    keep = None
    p = float(dropout_p) if training else 0.0
    if p >= 1.0:  # everything dropped: an all-False mask; any p < 1 keeps the scale finite
        keep = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        p = 0.5
    elif p > 0.0:
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    # Nothing to differentiate (evaluation, generation): the same arithmetic without the
    # Function's bookkeeping, which costs more than the math at small shapes.
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w, bias, a, b)
    )
    fn = _LoraLinearFn.apply if grad else _lora_forward
    if dt is not None:
        with torch.autocast(dev, enabled=False):
            return fn(x, w, bias, a, b, scaling, keep, p, conv1d)
    return fn(x, w, bias, a, b, scaling, keep, p, conv1d)


def _lora_forward(x, w, bias, a, b, scaling: float, keep, p: float, conv1d: bool) -> torch.Tensor:
    return _LoraLinearFn.forward(_NoCtx(), x, w, bias, a, b, scaling, keep, p, conv1d)


class _NoCtx:
    """Stands in for autograd's ctx when the forward runs outside a Function."""

    def save_for_backward(self, *tensors: Any) -> None:
        pass
