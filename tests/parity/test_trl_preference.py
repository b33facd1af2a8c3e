"""Preference objectives against TRL 1.x: the same batch and weights give the same loss and reward
statistics (1e-5, float32).

One tiny Llama carries our LoRA; a copy carries HF PEFT's LoRA with the same tensors, and TRL's
own code computes on it: DPOTrainer's loss (sigmoid, ipo, hinge), including its concatenated
forward through the fused LM head and its reference taken with PEFT's adapter switched off or,
for a run started from an SFT adapter, PEFT's "ref" adapter; CPOTrainer's simpo loss and its
`get_batch_logps`; ORPOTrainer's odds-ratio loss; KTOTrainer's loss with its KL estimate. TRL's
trainers are heavy to build, so their loss methods are called on a namespace that holds just
the attributes those methods read.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from peftcli.config.recipe import recipe_from_dict
from peftcli.methods.attach import attach_method
from peftcli.methods.lora import LoraConfig
from peftcli.models.losses import IGNORE
from peftcli.training.preference import Objective, PrefStats, Reference, batch_logps

peft = pytest.importorskip("peft")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected")


def _jiggle(model, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _ours_to_peft(ours, theirs, adapter: str, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy our LoRA tensors (or `tensors`, named as ours) into PEFT's adapter `adapter`."""
    src = tensors if tensors is not None else {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    n = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if f".{adapter}." not in name + ".":
                continue
            key = name.removeprefix("base_model.model.").replace(f".{adapter}", "")
            if key in src:
                p.copy_(src[key].view(p.shape))
                n += 1
    assert n == len(src) == 8  # A and B of q and v in two layers


def _models(sft_start: bool):
    """(ours, PEFT twin, our reference) with the policy away from the reference either way."""
    m = tiny_model("llama", "causal_lm")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    twin = copy.deepcopy(m)
    attach_method(m, "lora", LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    add_fused_lm_head(twin, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    theirs = peft.get_peft_model(twin, cfg)
    if sft_start:  # the SFT adapter: the reference, and where the policy starts
        _jiggle(m, seed=1)
        theirs.add_adapter("ref", cfg)
        _ours_to_peft(m, theirs, "ref")
    return m, theirs


def _recipe(objective: str, sft_start: bool = False, **train):
    raw = {"model": {"name": "tiny", "task": "causal_lm"}, "method": {"name": "lora"},
           "train": {"objective": objective, "batch_size": 3, **train}}
    if sft_start:
        raw["init_from"] = "runs/sft"
    return recipe_from_dict(raw)


def _pairs(b: int = 3, seed: int = 3) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: prompts of 3-5 tokens, completions of 2-6."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(2 * b):
        p, c = 3 + (i * 7) % 3, 2 + (i * 5) % 5
        ids = torch.randint(1, 100, (p + c,), generator=g).tolist()
        rows.append((ids, [IGNORE] * p + ids[p:]))
    n = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def unwrap_model(self, m):
        return m


def _trl_self(model, **kw) -> SimpleNamespace:
    return SimpleNamespace(accelerator=_Acc(), model=model, ref_model=None, aux_loss_enabled=False,
                           precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                           ld_alpha=None, f_divergence_type="reverse_kl", loss_weights=[1.0], label_smoothing=0.0,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1, use_weighting=False, **kw)


def _ours(objective: str, sft_start: bool, batch, **train):
    """Our loss and statistics on the batch, with the policy moved away from its start."""
    ours, theirs = _models(sft_start)
    recipe = _recipe(objective, sft_start, **train)
    ref = Reference(recipe, ours)
    assert ref.mode == ("initial" if sft_start else ("none" if objective in ("orpo", "simpo") else "off"))
    _jiggle(ours, seed=2)
    _ours_to_peft(ours, theirs, "default")
    stats = PrefStats()
    ours.train()
    loss = Objective(recipe, ref, None, torch.device("cpu")).loss(ours, batch, stats)
    return loss, stats.metrics(), ours, theirs


@pytest.mark.parametrize("sft_start", [False, True], ids=["adapter-off", "sft-adapter"])
@pytest.mark.parametrize("objective,loss_type", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_dpo_family_equals_trl(objective, loss_type, sft_start):
    batch = _pairs()
    loss, m, ours, theirs = _ours(objective, sft_start, batch, beta=0.2)
    theirs.train()
    if sft_start:
        theirs.set_adapter("default")
    fake = _trl_self(theirs, beta=0.2, loss_types=[loss_type])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE).long()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss = DPOTrainer._compute_loss(fake, theirs, inputs, False)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    got = fake._metrics["train"]
    assert abs(got["rewards/chosen"][0]) > 1e-3  # the policy has moved off its reference
    for k in STATS:
        torch.testing.assert_close(torch.tensor(m[k]), torch.tensor(got[k][0]), **TOL)
    if sft_start:
        assert theirs.active_adapter == "default"


def test_per_sequence_logps_equal_trl_get_batch_logps():
    """Our summed completion log-probs, plain logits and chunked hidden states, against TRL's."""
    batch = _pairs(b=4, seed=5)
    ours, _ = _models(False)
    _jiggle(ours, seed=2)
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs_sum = CPOTrainer.get_batch_logps(logits, batch["labels"].clone())
        theirs_avg = CPOTrainer.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True)
        plain, n = batch_logps(ours, batch, head_path=None, device=torch.device("cpu"), precision="fp32")
        chunked, _ = batch_logps(ours, batch, head_path="lm_head", device=torch.device("cpu"), precision="fp32")
    torch.testing.assert_close(plain, theirs_sum, **TOL)
    torch.testing.assert_close(chunked, theirs_sum, **TOL)
    torch.testing.assert_close(plain / n, theirs_avg, **TOL)


def test_dpo_label_smoothing_is_trl_conservative_sigmoid():
    """Conservative DPO: TRL's smoothed sigmoid (CPOTrainer's, on log-ratios; TRL 1.x's DPOTrainer
    dropped it from `sigmoid`)."""
    batch = _pairs()
    loss, m, ours, theirs = _ours("dpo", False, batch, beta=0.2, label_smoothing=0.1)
    with torch.no_grad():
        pol, _ = batch_logps(ours, batch, head_path=None, device=torch.device("cpu"), precision="fp32")
        with Reference(_recipe("dpo"), ours).active(ours):
            ref, _ = batch_logps(ours, batch, head_path=None, device=torch.device("cpu"), precision="fp32")
    lc, lr = (pol - ref).chunk(2)
    fake = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.1, simpo_gamma=0.0,
                           accelerator=_Acc())
    losses, _, _ = CPOTrainer.cpo_loss(fake, lc, lr)
    torch.testing.assert_close(loss.detach(), losses.mean(), **TOL)
    torch.testing.assert_close(torch.tensor(m["rewards/chosen"]), (0.2 * lc).mean(), **TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_simpo(smoothing):
    batch = _pairs()
    loss, m, ours, _ = _ours("simpo", False, batch, beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    with torch.no_grad():
        logits = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        avg = CPOTrainer.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True)
    ac, ar = avg.chunk(2)
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, label_smoothing=smoothing, simpo_gamma=0.7,
                           accelerator=_Acc())
    losses, cr, rr = CPOTrainer.cpo_loss(fake, ac, ar)
    torch.testing.assert_close(loss.detach(), losses.mean(), **TOL)  # SimPO: CPO's loss with cpo_alpha 0
    for k, v in (("rewards/chosen", cr.mean()), ("rewards/rejected", rr.mean()), ("rewards/margins", (cr - rr).mean()),
                 ("rewards/accuracies", (cr > rr).float().mean()), ("logps/chosen", ac.mean()),
                 ("logps/rejected", ar.mean())):
        torch.testing.assert_close(torch.tensor(m[k]), v, **TOL)


def test_orpo_equals_trl_odds_ratio():
    """ORPO: TRL's odds-ratio term and rewards; the NLL term covers the chosen completion (TRL's
    covers the prompt too: the one difference, see docs/preference.md)."""
    batch = _pairs()
    loss, m, ours, _ = _ours("orpo", False, batch, orpo_lambda=0.25)
    with torch.no_grad():
        logits = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        avg = ORPOTrainer.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True)
    b = batch["input_ids"].shape[0] // 2
    nll = F.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:b, 1:].reshape(-1),
                          ignore_index=IGNORE)
    fake = SimpleNamespace(beta=0.25, accelerator=_Acc())
    losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(fake, *avg.chunk(2))
    torch.testing.assert_close(loss.detach(), nll - losses.mean(), **TOL)
    for k, v in (("rewards/chosen", cr.mean()), ("rewards/rejected", rr.mean()),
                 ("rewards/accuracies", (cr > rr).float().mean())):
        torch.testing.assert_close(torch.tensor(m[k]), v, **TOL)


def _kto_batch():
    """Four rows (desirable, undesirable, desirable, undesirable), then their mismatched rows."""
    rows = _pairs(b=4, seed=9)
    b = 4
    prompt_len = [int((rows["labels"][i] == IGNORE).logical_and(rows["attention_mask"][i] == 1).sum()) for i in range(b)]
    kl = []
    for i in range(b):
        o = (i - 1) % b
        ids = rows["input_ids"][i, : prompt_len[i]].tolist()
        comp = rows["input_ids"][o][(rows["labels"][o] != IGNORE)].tolist()
        kl.append((ids + comp, [IGNORE] * len(ids) + comp))
    n = max(rows["input_ids"].shape[1], max(len(x) for x, _ in kl))
    ids = torch.zeros(2 * b, n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    w = rows["input_ids"].shape[1]
    ids[:b, :w], mask[:b, :w], labels[:b, :w] = rows["input_ids"][:b], rows["attention_mask"][:b], rows["labels"][:b]
    for i, (x, y) in enumerate(kl):
        ids[b + i, : len(x)], mask[b + i, : len(x)], labels[b + i, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "desirable": torch.tensor([True, False, True, False])}


@pytest.mark.parametrize("sft_start", [False, True], ids=["adapter-off", "sft-adapter"])
def test_kto_equals_trl(sft_start):
    batch = _kto_batch()
    loss, m, ours, theirs = _ours("kto", sft_start, batch, beta=0.3, batch_size=4, kto_desirable_weight=1.5,
                                  kto_undesirable_weight=0.7)
    theirs.train()
    if sft_start:
        theirs.set_adapter("default")
    b = 4
    cm = (batch["labels"] != IGNORE).long()
    inputs = {"input_ids": batch["input_ids"][:b], "attention_mask": batch["attention_mask"][:b],
              "completion_mask": cm[:b], "label": batch["desirable"].long(),
              "KL_input_ids": batch["input_ids"][b:], "KL_attention_mask": batch["attention_mask"][b:],
              "KL_completion_mask": cm[b:]}
    fake = _trl_self(theirs, beta=0.3, loss_type="kto", calculate_KL=True, desirable_weight=1.5,
                     undesirable_weight=0.7)
    fake._compute_kl_logps = lambda model, bt: KTOTrainer._compute_kl_logps(fake, model, bt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss = KTOTrainer._compute_loss(fake, theirs, inputs, False)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    got = fake._metrics["train"]
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(torch.tensor(m[k]), torch.tensor(float(got[k][0])), **TOL)
