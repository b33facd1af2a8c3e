"""LoRA's starting points (`method.init`) and per-module ranks (`rank_pattern` / `alpha_pattern`).

The starts follow HF PEFT 0.21.2's `init_lora_weights`, operation for operation, so that the same
base weights (and, for `pissa_niter_K`, the same random state) give the same tensors:

- `default`: A Kaiming-uniform (a = sqrt 5), B = 0: training starts at the base model.
- `gaussian`: A ~ N(0, 1/r) (standard deviation 1/r, PEFT's choice), B = 0.
- `pissa` (Meng et al. 2024): W = U S Vᵀ; with S_r the top r singular values divided by the
  scaling s, A = sqrt(S_r) V_rᵀ and B = U_r sqrt(S_r), so that s·B A is W's best rank-r part.
  `pissa_niter_K` takes the top r from torch.svd_lowrank with K subspace iterations (random).
- `olora` (Büyükakyüz 2024): W = Q R; A = R[:r], B = Q[:, :r].

PiSSA and OLoRA move s·B0 A0 out of the frozen weight: the base keeps the residual W − s·B0 A0
(computed in float32 as PEFT does) and the adapter starts at B0, A0, so the model still computes
W x at step 0. The starts always decompose the dense (out, in) weight; PEFT's OLoRA decomposes
GPT-2's Conv1D weight as stored, (in, out), which gives A and B the wrong shapes there.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from peftcli.core.arch import ROLES, Arch

INITS_HELP = ("starting point of A and B: default (Kaiming A, zero B), gaussian (A normal, std 1/r; zero B), pissa (top-r "
              "singular vectors of W, residual left in the frozen weight), pissa_niter_K (the same by a randomized "
              "SVD with K iterations), olora (QR of W)")
_NITER = re.compile(r"pissa_niter_(\d+)")


def init_problem(init: str) -> str | None:
    """Why `init` is not one of the starts, or None."""
    if init in ("default", "gaussian", "pissa", "olora") or _NITER.fullmatch(init):
        return None
    return (f"method.init: unknown start {init!r}; use default, gaussian, pissa, pissa_niter_K (K a whole number "
            "of subspace iterations, e.g. pissa_niter_4) or olora")


def moves_base(init: str) -> bool:
    """PiSSA and OLoRA leave a residual in the frozen weight."""
    return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None


def is_random_start(init: str) -> bool:
    """A start that draws random numbers from the base weight (a randomized SVD)."""
    return _NITER.fullmatch(init) is not None


@torch.no_grad()
def reset_factors(a: torch.Tensor, b: torch.Tensor, init: str) -> None:
    """A and B of a start that leaves the base alone (also the placeholder of PiSSA/OLoRA until
    their start is taken: B = 0 keeps the model at the base)."""
    if init == "gaussian":
        nn.init.normal_(a, std=1 / a.shape[0])
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


@torch.no_grad()
def start_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) in float32 from a dense (out, in) weight, as PEFT's pissa_init /
    olora_init compute them."""
    w = weight.to(torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    m = _NITER.fullmatch(init)
    if m:
        vr, sr, ur = torch.svd_lowrank(w, r, niter=int(m.group(1)))
        sr /= scaling
        uhr = ur.t()
    else:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r], uh[:r]
        sr /= scaling
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def residual(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scaling: float) -> torch.Tensor:
    """W − s·B0 A0 in float32, in PEFT's order of operations ((s·B0) A0)."""
    return weight.to(torch.float32) - scaling * b0.to(torch.float32) @ a0.to(torch.float32)


# ------------------------------------------------------------------------------ per-module ranks


def pattern_problem(pattern: Any, key: str, number: type) -> str | None:
    """Why a `rank_pattern` / `alpha_pattern` mapping is malformed, or None."""
    if not isinstance(pattern, dict):
        return f"method.{key}: expected a mapping of role or module pattern to a value, got {pattern!r}"
    for k, v in pattern.items():
        if not isinstance(k, str) or not k:
            return f"method.{key}: key {k!r} is not a role or module-name pattern"
        if k not in ROLES:
            try:
                re.compile(k)
            except re.error as e:
                return f"method.{key}: key {k!r} is not a regular expression ({e}); escape it or use a role ({', '.join(ROLES)})"
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or (number is int and not isinstance(v, int))
        if bad or (number is int and v < 1) or (number is float and (v < 0 or not math.isfinite(v))):
            want = "a whole number >= 1" if number is int else "a number >= 0"
            return f"method.{key}: {k!r} maps to {v!r}; give {want}"
    return None


def pattern_matches(key: str, path: str, role_paths: dict[str, set[str]]) -> bool:
    """A role names the modules the architecture map gives it; anything else is matched as PEFT's
    get_pattern_key does: the key, as a regular expression, must end the module path after a dot."""
    if key in ROLES:
        return path in role_paths[key]
    return re.match(rf"(.*\.)?({key})$", path) is not None


def module_options(arch: Arch | None, paths: list[str], r: int, alpha: float, rank_pattern: dict[str, int],
                   alpha_pattern: dict[str, float]) -> dict[str, tuple[int, float]]:
    """(rank, alpha) of each adapted module: the first key of each pattern that matches it, in
    the order written (PEFT's rule), else method.r / method.alpha. Role keys need `arch`."""
    used = [k for k in (*rank_pattern, *alpha_pattern) if k in ROLES]
    if used and arch is None:
        raise ValueError("internal: role keys in rank_pattern/alpha_pattern need the architecture map")
    roles = {k: set(arch.role_paths([k])) for k in dict.fromkeys(used)} if used else {}
    out = {}
    for p in paths:
        rk = next((k for k in rank_pattern if pattern_matches(k, p, roles)), None)
        ak = next((k for k in alpha_pattern if pattern_matches(k, p, roles)), None)
        out[p] = (rank_pattern[rk] if rk is not None else r, float(alpha_pattern[ak]) if ak is not None else alpha)
    return out


def unmatched_keys(options_paths: list[str], arch: Arch | None, pattern: dict[str, Any]) -> list[str]:
    """Keys of a pattern that match none of the adapted modules (most likely a typo)."""
    roles = {k: set(arch.role_paths([k])) for k in pattern if k in ROLES} if arch is not None else {}
    return [k for k in pattern if not any(pattern_matches(k, p, roles) for p in options_paths)]


__all__ = [
    "INITS_HELP", "init_problem", "is_random_start", "module_options", "moves_base", "pattern_matches",
    "pattern_problem", "reset_factors", "residual", "start_factors", "unmatched_keys",
]
