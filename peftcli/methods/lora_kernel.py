"""Speed paths for training: a fused LoRA linear, trimming unread positions, per-layer compile.

Why a hand-written backward for LoRA. Written as plain modules, y = W x + b + s · B A drop(x) makes
autograd record five or six nodes per adapted layer (base linear, dropout, two skinny linears, a
scale, an add), keep the dropout output alive, produce the input gradient as two full-size
tensors that are then summed, and compute dL/dB as dyᵀ h, a skinny product with a layout that
BLAS handles badly. One Function does the same arithmetic with:

- the low-rank product added into the base output in place (one addmm, no extra full-size tensor);
- saved for backward only x (shared with every other consumer of x), the r × N projection h and,
  with dropout, a 1-byte mask instead of the dropped-out copy of x;
- no gradient for the frozen W or b, and dx = dy W + (s · dy B) A as one GEMM plus one addmm
  into its output;
- every skinny product in the operand layout BLAS is fast at (on a 2-core CPU, dL/dB from hᵀ dy
  costs about a ninth of dyᵀ h).

The other two helpers act on the whole model and are called once by the training loop:
`trim_unread_positions` (classification with a BERT-family head) and `compile_layers` (CUDA).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.core.arch import is_conv1d
from peftcli.core.precision import autocast_dtype as _autocast_dtype  # old name, kept for importers


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
        # s · (dy B)ᵀ, (r, N): the gradient reaching h, shared by dA and dx.
        ght = torch.mm(b.t(), g2.t()).mul_(s) if (need_x or need_a) else None
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
) -> torch.Tensor | None:
    """The fused LoRA linear, or None when `base`/dtypes are outside what it handles (the caller
    then uses the plain formula). Under autocast, every operand is cast to the autocast dtype the
    way autocast would cast F.linear's, and the Function runs with autocast off so that forward
    and backward see the same dtypes."""
    if type(base) is nn.Linear:
        conv1d = False
    elif is_conv1d(base):
        conv1d = True
    else:
        return None
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None  # someone (hooks, accelerate's device maps) expects base.forward to run
    w, bias = base.weight, base.bias
    dev = x.device.type
    dt = _autocast_dtype(dev)
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


# ---------------------------------------------------------------------------------------------
# Whole-model helpers the training loop can call.


def compile_layers(model: nn.Module, arch: Any, mode: str | None = None) -> int:
    """torch.compile each transformer layer in place (`module.compile()`); returns how many.

    Per layer rather than the whole model: every layer has the same shapes, so one graph is
    compiled and reused, compile time stays flat in depth, and the embedding, loss and optimizer
    stay eager. Norms, activations, residual adds and RoPE get fused around the GEMMs, and fused
    kernels keep fewer intermediates alive for backward (on an H100, a 1B Llama LoRA step: about
    12 % faster and 1.5 GiB smaller). Only with the KV cache off, as the training loop runs: a
    cache's per-layer state is guarded, so each layer would recompile until dynamo's recompile
    limit leaves the rest eager. On CPU (inductor's C++ kernels, torch 2.13, 2 cores) a
    compiled MiniLM step measured slower than eager, so callers should compile on CUDA only.
    `mode` is torch.compile's (None = default; "reduce-overhead" adds CUDA graphs).
    """
    n = 0
    for layer in arch.layers:
        layer.compile(dynamic=False, mode=mode)
        n += 1
    return n


# Families whose sequence-classification head reads one position of the last layer's output
# (BERT's pooler, RoBERTa's and ELECTRA's heads all take position 0).
_HEAD_READS_POSITION = {"bert": 0}


class _KeepPosition:
    """Forward pre-hook: slice the listed positional arguments to sequence position `pos`."""

    def __init__(self, args: tuple[int, ...], pos: int) -> None:
        self.args, self.pos = args, pos

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        out = list(args)
        for i in self.args:
            if i < len(out) and isinstance(out[i], torch.Tensor) and out[i].dim() >= 3:
                out[i] = out[i][:, self.pos : self.pos + 1]
        return tuple(out)


class _QueryAtPosition:
    """Pre- and forward hook on the last layer's query projection: project one position only.

    The attention still sees a full-length query (the one row repeated, so the modeling
    code's reshapes hold), but the rows other than `pos` only feed outputs that
    `_KeepPosition` drops; their gradient is exactly zero, so dL/dq at `pos` is unchanged.
    """

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.length: int | None = None

    def pre(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            self.length = None
            return None
        self.length = x.shape[1]
        return (x[:, self.pos : self.pos + 1], *args[1:])

    def post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.length is None or not isinstance(output, torch.Tensor):
            return None
        n, self.length = self.length, None
        # A real copy, not the stride-0 view: attention code that scales q in place must not
        # write to one element through many positions.
        return output.expand(output.shape[0], n, *output.shape[2:]).contiguous()


def trim_unread_positions(model: nn.Module, arch: Any, positionwise: bool, task: str) -> list:
    """Run the last layer only where the classification head reads it.

    A BERT-family classifier reads position 0 of the last layer. Everything in that layer after
    the attention (output projection, norm, FFN: five sixths of the layer's FLOPs, forward and
    backward) is position by position, so the other positions feed nothing; the same holds for
    the query projection, since other positions' queries only make attention rows nobody reads
    (keys and values still need every position). The head's logits are unchanged (same values
    up to float reordering), and so is every gradient; only dropout draws fewer random numbers.
    Returns the hook handles (remove them to undo); an empty list where the model, task or
    method is not one this is known to be exact for (`positionwise`: the method's spec says so,
    each checked against the untrimmed model in tests/test_lora_fast.py).
    """
    pos = _HEAD_READS_POSITION.get(arch.spec.family)
    if (
        task != "classification"
        or pos is None
        or not positionwise
        or not type(model).__name__.endswith("ForSequenceClassification")
        or arch.spec.attn_out_block is None
    ):
        return []
    block = arch.get(arch.num_layers - 1, "attn_out_block")
    if block is None:
        return []
    # The block computes LN(dropout(dense(attention output)) + residual): slice both inputs.
    # prepend: run before any other hook on it, so that every hook sees one sequence length.
    handles = [block.register_forward_pre_hook(_KeepPosition((0, 1), pos), prepend=True)]
    q = arch.get(arch.num_layers - 1, "q")
    if q is not None:
        hook = _QueryAtPosition(pos)
        handles.append(q.register_forward_pre_hook(hook.pre, prepend=True))
        handles.append(q.register_forward_hook(hook.post, prepend=True))
    return handles


def idle_cpu_threads() -> int:
    """Intra-op threads for CPU training: the cores that other processes are not keeping busy.

    torch starts one thread per core. When other processes already load those cores, every
    parallel op ends in a barrier that waits for a descheduled thread: on a 2-core machine with a
    load average of 7, a MiniLM LoRA step took 3-4× longer with 2 threads than with 1 (either
    library). Reads the 1-minute load average, so call it before training starts.
    """
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        return n
    return max(1, min(n, round(n - busy)))
