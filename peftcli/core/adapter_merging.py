"""Combining trained adapters into one: the request a method's `combine` hook answers, and the
merge rules the hooks share.

A method decides how its adapters combine (`MethodSpec.combine`); this module holds what does
not depend on the method: the request (tensors, weights, the rule and its options), the answer
(tensors, the method config that rebuilds them, notes for the user), and the element-wise merge
rules of task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024)
and magnitude pruning. The rules compute the same numbers as HF PEFT's merge utilities, random
draws included: DARE draws one Bernoulli mask per task tensor, in the order the tensors are
given, from the request's generator, which is seeded as torch's global generator would be.

The command above it is `peftcli combine` (commands/combine.py). "Merging" here is the
literature's word for these rules (HF PEFT's merge_utils); baking one adapter into the base
weights, `peftcli merge`, is commands/merge.py and each method's `merge` hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peftcli.core.errors import BadInput

# Rules that merge element-wise; the `_svd` forms apply them to each module's full update and
# factor the result back to a rank with a truncated SVD.
ELEMENTWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
ELECTS_SIGN = frozenset({"ties", "dare_ties"})
RANDOM = frozenset({"dare_linear", "dare_ties"})
# Parameter averaging (AdapterHub's `average_adapter`): sum_i w_i theta_i over every tensor.
WEIGHTED = "weighted"


class CombineError(BadInput, ValueError):
    """Adapters that cannot be combined as asked: bad input, exit 2 at the command line."""


def rule_of(how: str) -> str:
    """The element-wise rule a `how` applies (`svd` is task arithmetic before the SVD)."""
    if how == "svd":
        return "linear"
    return how.removesuffix("_svd")


def uses_svd(how: str) -> bool:
    return how == "svd" or how.endswith("_svd")


def needs_density(how: str) -> bool:
    return rule_of(how) in NEEDS_DENSITY


def elects_sign(how: str) -> bool:
    return rule_of(how) in ELECTS_SIGN


def is_random(how: str) -> bool:
    return rule_of(how) in RANDOM


@dataclass
class CombineRequest:
    """What a method's `combine` hook is asked: run i's method tensors `states[i]` (task heads
    removed, in the model's parameter order) weighted by `weights[i]`, under the rule `how`."""

    states: list[dict[str, torch.Tensor]]
    weights: list[float]
    how: str
    cfgs: list[Any]  # each run's method config
    runs: list[str]  # each run's folder, for messages
    method: str = ""  # the registered name, for messages
    density: float | None = None
    majority_sign: str = "total"
    rank: int | None = None
    generator: torch.Generator | None = None
    # The frozen base layer's weight as (out, in) float32, by module path; loads the base model
    # the first time it is called, so a hook that never needs it costs no model load.
    base_weight: Callable[[str], torch.Tensor] | None = None
    # The architecture map of the head run's model (built on the meta device), for options that
    # name modules by role (LoRA's rank_pattern / alpha_pattern).
    arch: Any = None


@dataclass
class Combined:
    state: dict[str, torch.Tensor]
    config: Any  # the method config that builds modules these tensors load into
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ merge rules


def _per_task(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """[n] weights viewed to multiply a stack of n task tensors."""
    return weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density · numel) entries of largest magnitude."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def keep_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's drop: keep each entry with probability `density` and divide the kept by it, so the
    expected tensor is unchanged. No draw is made at density 1."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election: per entry, the sign of the summed values (`total`) or of the summed
    signs (`frequency`), ties going to +; True where a task agrees with it (zeros never do)."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return sign == elected


def merge_tensors(rule: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, *, density: float | None = None,
                  majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One merged tensor from same-shaped task tensors under an element-wise rule.

    Pruning (magnitude or random) acts on each task tensor before weighting, and TIES elects the
    sign on the pruned, unweighted tensors, then averages the weighted entries that agree with it
    (each entry divided by how many tasks agreed, at least 1).
    """
    if rule not in ELEMENTWISE:
        raise ValueError(f"unknown merge rule {rule!r}")
    if rule in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif rule in RANDOM:
        tensors = [keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    weighted = stacked * _per_task(weights, stacked)
    if rule not in ELECTS_SIGN:
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


# ------------------------------------------------------------------------------ shared checks


def check_same_options(req: CombineRequest, method: str, free: Sequence[str] = ()) -> None:
    """Refuse runs whose method options differ anywhere the combined function would depend on;
    `free` names options that do not (dropout, initialisation)."""
    first = dataclasses.asdict(req.cfgs[0])
    for run, cfg in zip(req.runs[1:], req.cfgs[1:], strict=True):
        for key, value in dataclasses.asdict(cfg).items():
            if key not in free and value != first.get(key):
                raise CombineError(
                    f"{run}/recipe.yaml has method.{key}: {value!r} but {req.runs[0]} has {first.get(key)!r}; "
                    f"{method} adapters combine only when they were built alike (retrain one with the other's "
                    f"method.{key})"
                )


def check_same_shapes(req: CombineRequest) -> None:
    ref = req.states[0]
    for run, sd in zip(req.runs[1:], req.states[1:], strict=True):
        for k, t in sd.items():
            if tuple(t.shape) != tuple(ref[k].shape):
                raise CombineError(
                    f"{run}: tensor {k} has shape {tuple(t.shape)}, {req.runs[0]} has {tuple(ref[k].shape)}; "
                    "the adapters were built with different sizes and cannot be combined"
                )


def weight_note(weights: Sequence[float], what: str) -> list[str]:
    total = sum(weights)
    if abs(total - 1) < 1e-9:
        return []
    return [f"the weights sum to {total:g}, not 1: {what}"]


def averaging(method_free: Sequence[str], negative: str) -> Callable[[CombineRequest], Combined]:
    """A `combine` hook that averages parameters, theta = sum_i w_i theta_i (AdapterHub's
    `average_adapter`, HF PEFT's IA³ `add_weighted_adapter`), for methods whose options other
    than `method_free` must agree. `negative` tells the user what a negative weight does."""

    def combine(req: CombineRequest) -> Combined:
        if req.how != WEIGHTED:
            raise CombineError(f"--how {req.how}: {req.method} adapters combine only by '{WEIGHTED}' (parameter "
                               "averaging)")
        check_same_options(req, req.method, method_free)
        check_same_shapes(req)
        state = {k: weighted_sum([sd[k] for sd in req.states], req.weights) for k in req.states[0]}
        notes = weight_note(req.weights, "averaged parameters scale with it; weights summing to 1 keep them in range")
        if any(w < 0 for w in req.weights):
            notes.append(negative)
        return Combined(state, req.cfgs[0], notes)

    return combine


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i in float32, accumulated in order from zero (HF PEFT's IA³ order), in the
    first tensor's dtype."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights, strict=True):
        out += t.float() * w
    return out.to(tensors[0].dtype)


__all__ = [
    "ELECTS_SIGN", "ELEMENTWISE", "NEEDS_DENSITY", "RANDOM", "WEIGHTED", "CombineError", "CombineRequest", "Combined",
    "averaging", "check_same_options", "check_same_shapes", "elects_sign", "is_random", "keep_largest",
    "keep_random", "majority_sign_mask", "merge_tensors", "needs_density", "rule_of", "uses_svd", "weight_note",
    "weighted_sum",
]
