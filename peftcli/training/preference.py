"""Preference objectives (DPO, IPO, hinge, ORPO, SimPO, KTO) for any method that trains a causal LM.

The definitions are TRL 1.x's (DPOTrainer's sigmoid / ipo / hinge, CPOTrainer's simpo, ORPOTrainer's
odds ratio, KTOTrainer's kto), so a loss and its reward statistics read the same in both; where
peftcli differs, docs/preference.md says so. `tests/parity/test_trl_preference.py` holds the two
to 1e-5 on the same batch and weights.

The reference policy costs no second model. Without `init_from` it is the same model with every
adapter module switched off (`peftcli.core.switch`), which is the base model; with `init_from`
(an SFT run), or for a method that has no off switch (one that trains base weights, or prompt
tuning), it is the weights training started from, swapped into the trainable tensors for the
reference pass and out again (a copy of the trainable tensors, not of the model).
`train.precompute_reference` computes the reference log-probs once and caches them in the run
folder, so that a step runs the policy alone and `--resume` reads the very same numbers back.
ORPO and SimPO have no reference and run none.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from peftcli.config.recipe import REFERENCE_FREE, Recipe, TrainConfig
from peftcli.core.adapter_files import load_tensors
from peftcli.core.errors import DataError
from peftcli.core.files import atomic_file_write
from peftcli.core.precision import autocast_ctx, forward_inputs
from peftcli.core.switch import flags, set_flags
from peftcli.data.batching import batches
from peftcli.models.losses import hidden_states_out, sequence_logps

CACHE_FILE = "reference_logps.safetensors"
AVERAGED = ("orpo", "simpo")  # objectives that score a completion by its mean token log-prob


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ------------------------------------------------------------------------------------ losses


@dataclass
class PairOut:
    """One batch of pairs: the loss, and per pair the rewards and the log-probs TRL logs."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def pair_loss(t: TrainConfig, logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None) -> PairOut:
    """The objective's loss over a batch of pairs.

    `logps` / `tokens` hold the summed completion log-probs and completion lengths of the chosen
    rows then the rejected rows (2B,); `ref` the reference's summed log-probs in the same order,
    None for ORPO and SimPO.
    """
    obj, beta = t.objective, t.beta
    pc, pr = logps.chunk(2)
    nc, nr = tokens.to(logps.dtype).clamp(min=1).chunk(2)
    if obj in AVERAGED:
        ac, ar = pc / nc, pr / nr
        if obj == "simpo":
            z = beta * (ac - ar - t.simpo_gamma / beta)
            losses = -F.logsigmoid(z) * (1 - t.label_smoothing) - F.logsigmoid(-z) * t.label_smoothing
            loss = losses.mean()
            scale = beta
        else:  # orpo: the chosen completion's NLL (mean over its tokens) minus lambda * log sigmoid(log odds)
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            nll = -pc.sum() / nc.sum()
            loss = nll - (t.orpo_lambda * F.logsigmoid(log_odds)).mean()
            scale = t.orpo_lambda
        return PairOut(loss, scale * ac.detach(), scale * ar.detach(), ac.detach(), ar.detach())
    assert ref is not None
    rc, rr = ref.chunk(2)
    lc, lr = pc - rc, pr - rr
    if obj == "dpo":
        z = beta * (lc - lr)
        losses = -F.logsigmoid(z) * (1 - t.label_smoothing) - F.logsigmoid(-z) * t.label_smoothing
    elif obj == "hinge":
        losses = torch.relu(1 - beta * (lc - lr))
    elif obj == "ipo":  # per-token log-ratios, as TRL (and the IPO authors' runs) normalise them
        losses = (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"not a pairwise objective: {obj}")
    return PairOut(losses.mean(), beta * lc.detach(), beta * lr.detach(), pc.detach(), pr.detach())


@dataclass
class KTOOut:
    loss: torch.Tensor
    rewards: torch.Tensor  # per row, beta * log-ratio
    logps: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor


def kto_loss(t: TrainConfig, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor) -> KTOOut:
    """KTO over a batch: `logps` / `ref` hold the rows' summed completion log-probs, then their
    mismatched rows' (2B,); the KL estimate is the mean policy-minus-reference log-ratio of the
    mismatched rows, clamped at 0 and detached, as TRL estimates it."""
    p, p_kl = logps.chunk(2)
    r, r_kl = ref.chunk(2)
    kl = (p_kl - r_kl).mean().detach().clamp(min=0)
    ratio = p - r
    good = 1 - torch.sigmoid(t.beta * (ratio - kl))
    bad = 1 - torch.sigmoid(t.beta * (kl - ratio))
    losses = torch.where(desirable, t.kto_desirable_weight * good, t.kto_undesirable_weight * bad)
    return KTOOut(losses.mean(), t.beta * ratio.detach(), p.detach(), desirable, kl)


# ------------------------------------------------------------------------------------ statistics


@dataclass
class PrefStats:
    """Sums over pairs (or KTO rows), so that micro-batches, log windows and evaluation batches add
    up: the metrics are means over everything added. Stored in the trainer state as a dict."""

    sums: dict[str, float] = field(default_factory=dict)

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def add_pairs(self, out: PairOut) -> None:
        n = len(out.chosen_rewards)
        self._add("n", n)
        self._add("loss", float(out.loss.detach()) * n)
        self._add("n_chosen", n)
        self._add("n_rejected", n)
        self._add("rewards/chosen", out.chosen_rewards.sum())
        self._add("rewards/rejected", out.rejected_rewards.sum())
        self._add("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).float().sum())
        self._add("logps/chosen", out.chosen_logps.sum())
        self._add("logps/rejected", out.rejected_logps.sum())

    def add_kto(self, out: KTOOut) -> None:
        n, d = len(out.rewards), out.desirable
        self._add("n", n)
        self._add("loss", float(out.loss.detach()) * n)
        self._add("kl", float(out.kl) * n)
        self._add("n_chosen", d.sum())
        self._add("n_rejected", (~d).sum())
        self._add("rewards/chosen", out.rewards[d].sum())
        self._add("rewards/rejected", out.rewards[~d].sum())
        # A row counts as right when its implied reward has the sign its label asks for (TRL logs no accuracy for KTO).
        self._add("rewards/accuracies", torch.where(d, out.rewards > 0, out.rewards < 0).float().sum())
        self._add("logps/chosen", out.logps[d].sum())
        self._add("logps/rejected", out.logps[~d].sum())

    def metrics(self) -> dict[str, float]:
        """Means: `loss`, `accuracy` (= rewards/accuracies, what eval.metric ranks), TRL's names."""
        s = self.sums
        n = s.get("n", 0.0)
        if not n:
            return {}
        out = {"loss": s["loss"] / n}
        for side in ("chosen", "rejected"):
            k = s.get(f"n_{side}", 0.0)
            if k:
                out[f"rewards/{side}"] = s[f"rewards/{side}"] / k
                out[f"logps/{side}"] = s[f"logps/{side}"] / k
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["rewards/accuracies"] = s["rewards/accuracies"] / n
        out["accuracy"] = out["rewards/accuracies"]
        if "kl" in s:
            out["kl"] = s["kl"] / n
        return out


# ------------------------------------------------------------------------------------ reference


class Reference:
    """How the reference log-probs of a batch are taken: `off` (adapters switched off), `initial`
    (the starting weights swapped in), or `none` (ORPO, SimPO)."""

    def __init__(self, recipe: Recipe, model: nn.Module) -> None:
        obj = recipe.train.objective
        self.initial: dict[str, torch.Tensor] = {}
        if obj == "sft" or obj in REFERENCE_FREE:
            self.mode = "none"
        elif not recipe.init_from and flags(model):
            self.mode = "off"
        else:
            self.mode = "initial"
            self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def describe(self) -> str:
        return {"none": "no reference model", "off": "reference: the base model (adapters switched off)",
                "initial": "reference: the starting weights, frozen (swapped in for the reference pass)"}[self.mode]

    def release(self) -> None:
        """Cached reference log-probs make the starting weights unneeded."""
        self.initial = {}

    def _swap(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, t in self.initial.items():
            p = params[n]
            p.data, self.initial[n] = t, p.data

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """The model computes the reference inside (in evaluation mode, without gradients)."""
        was_training = model.training
        model.eval()
        state = flags(model)
        if self.mode == "off":
            set_flags(model, dict.fromkeys(state, False))
        elif self.mode == "initial":
            self._swap(model)
        try:
            with torch.no_grad():
                yield
        finally:
            if self.mode == "off":
                set_flags(model, state)
            elif self.mode == "initial":
                self._swap(model)
            model.train(was_training)


def batch_logps(model: nn.Module, batch: dict[str, torch.Tensor], *, head_path: str | None, device: torch.device,
                precision: str, forward: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs, completion tokens) of every row of a batch. `forward` is the
    module to call (the DDP wrapper while training); `head_path` set computes the log-probs from
    hidden states chunk by chunk (no full-vocabulary logits)."""
    forward = forward or model
    inputs = forward_inputs(batch, "causal_lm")
    with autocast_ctx(device, precision):
        if head_path:
            with hidden_states_out(model, head_path) as head:
                out = forward(**inputs)
                return sequence_logps(out.logits, batch["labels"], head)
        out = forward(**inputs)
        return sequence_logps(out.logits, batch["labels"])


@dataclass
class Objective:
    """What the training loop needs for a preference objective, built once per run."""

    recipe: Recipe
    reference: Reference
    head_path: str | None
    device: torch.device

    @property
    def t(self) -> TrainConfig:
        return self.recipe.train

    def ref_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.reference.mode == "none":
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with self.reference.active(model):
            return batch_logps(model, batch, head_path=self.head_path, device=self.device,
                               precision=self.t.precision)[0]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], stats: PrefStats,
             forward: nn.Module | None = None) -> torch.Tensor:
        """The batch's loss (with gradients through the policy); its statistics added to `stats`."""
        ref = self.ref_logps(model, batch)
        if self.t.objective == "kto":
            out = kto_loss(self.t, self._kto_logps(model, batch, forward), ref, batch["desirable"])
            stats.add_kto(out)
            return out.loss
        logps, tokens = batch_logps(model, batch, head_path=self.head_path, device=self.device,
                                    precision=self.t.precision, forward=forward)
        pair = pair_loss(self.t, logps, tokens, ref)
        stats.add_pairs(pair)
        return pair.loss

    def _kto_logps(self, model: nn.Module, batch: dict[str, torch.Tensor], forward: nn.Module | None) -> torch.Tensor:
        """The rows' log-probs with gradients, then their mismatched rows' without (the KL estimate is
        detached, so those rows keep no activations), as TRL computes them."""
        b = len(batch["desirable"])
        rows = [{k: batch[k][part] for k in ("input_ids", "attention_mask", "labels")}
                for part in (slice(0, b), slice(b, None))]
        kw = dict(head_path=self.head_path, device=self.device, precision=self.t.precision)
        logps = batch_logps(model, rows[0], forward=forward, **kw)[0]
        with torch.no_grad():
            kl = batch_logps(model, rows[1], **kw)[0]
        return torch.cat([logps, kl])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], collate, batch_size: int) -> dict[str, Any]:
        """Preference metrics of `examples` (validation or held-out), in evaluation mode."""
        was_training = model.training
        model.eval()
        stats = PrefStats()
        try:
            for b in batches(examples, batch_size, collate, shuffle=False):
                self.loss(model, {k: v.to(self.device) for k, v in b.items()}, stats)
        finally:
            model.train(was_training)
        m = stats.metrics()
        if not m:
            raise DataError("nothing to score: no preference examples")
        return {**m, "examples": len(examples)}

    @torch.no_grad()
    def precompute(self, model: nn.Module, parts: dict[str, list[dict]], collate, batch_size: int,
                   run_dir: Path | None) -> str:
        """Put each example's reference log-probs into it (`ref`), read from the run folder's cache
        when it holds the same examples, else computed and (with `run_dir`) cached; returns a line
        saying which. Afterwards the starting weights are dropped: no step needs them again."""
        cache = run_dir / CACHE_FILE if run_dir is not None else None
        saved = load_tensors(cache) if cache is not None and cache.exists() else {}
        lengths = {k: _lengths(ex) for k, ex in parts.items()}
        if saved and all(k in saved and torch.equal(saved[f"{k}/lengths"], lengths[k]) for k in parts):
            tensors, how = saved, f"reference log-probs read from {cache}"
        else:
            tensors = {}
            for k, ex in parts.items():
                tensors[k] = self._reference_of(model, ex, collate, batch_size)
                tensors[f"{k}/lengths"] = lengths[k]
            if cache is not None:
                atomic_file_write(cache, save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
            how = "reference log-probs computed once" + (f" and cached in {cache}" if cache is not None else "")
        for k, ex in parts.items():
            for e, (c, r) in zip(ex, tensors[k].tolist(), strict=True):
                e["ref"] = (c, r)
        self.reference.release()
        return how

    def _reference_of(self, model: nn.Module, examples: list[dict], collate, batch_size: int) -> torch.Tensor:
        """(examples, 2): each example's reference log-probs (chosen and rejected, or KTO row and mismatched row)."""
        rows = []
        for b in batches(examples, batch_size, collate, shuffle=False):
            b = {k: v.to(self.device) for k, v in b.items() if k != "ref_logps"}
            with self.reference.active(model):
                lp = batch_logps(model, b, head_path=self.head_path, device=self.device, precision=self.t.precision)[0]
            rows.append(torch.stack(lp.float().cpu().chunk(2), dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 2))


def _lengths(examples: list[dict]) -> torch.Tensor:
    """A fingerprint of a split's examples (lengths and token-id sums of both sides): a cache is used
    only for the examples it was computed on."""
    rows = []
    for e in examples:
        other = e.get("rejected_ids", e.get("kl_ids", []))
        rows.append([len(e["input_ids"]), sum(e["input_ids"]), len(other), sum(other)])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def reference_for_run(run: Path, device: torch.device, *, trust_remote_code: bool = False) -> tuple[Any, Reference]:
    """A preference run rebuilt for scoring, with the reference it trained against: its adapter
    switched off, or its starting weights (the `init_from` adapter, or the method's seeded fresh
    weights), read before the trained adapter goes in."""
    from peftcli.core.adapter_files import ADAPTER_FILE
    from peftcli.core.switch import apply_recorded
    from peftcli.runs.checkpoint import load_adapter_state
    from peftcli.runs.load import build, open_run

    saved = open_run(run, trust_remote_code=trust_remote_code)
    recipe = saved.recipe
    recipe.init_from = saved.init_from
    torch.manual_seed(recipe.train.seed)  # fresh adapter weights as the run drew them
    built = build(recipe, device, label_names=saved.meta.get("label_names"), trust_remote_code=trust_remote_code)
    reference = Reference(recipe, built.model)
    recipe.init_from = None
    load_adapter_state(built.model, built.spec, built.arch, recipe.method, saved.state,
                       saved.adapter_dir / ADAPTER_FILE)
    apply_recorded(built.model, saved.meta)
    return built, reference
