"""Per-layer torch.compile of a base model: a speed lever the training loop pulls once, on CUDA."""

from __future__ import annotations

from typing import Any

from torch import nn


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
