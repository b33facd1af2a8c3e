"""Preference data: chosen / rejected pairs (DPO, IPO, hinge, ORPO, SimPO) and unpaired rows
labelled desirable or not (KTO), from rows to padded batches.

Rows follow TRL's column names. Pairs: `prompt`, `chosen`, `rejected`, each plain text or chat
turns (`prompt` as the turns before the answer, `chosen` / `rejected` as the assistant turns; or
`chosen` / `rejected` as whole conversations sharing their first turns, which are then the
prompt). Unpaired: `prompt`, `completion`, `label` (true = desirable). A prompt is rendered as for
supervised fine-tuning (`peftcli.data.chat`): plain prompts with the chat template's generation
prompt when `data.chat_template` allows, conversations by the template; the loss and every
log-prob cover the completion's tokens only.

A batch of pairs is one forward pass: the chosen rows, then the rejected rows in the same order.
A KTO batch is its rows, then as many mismatched rows (each prompt with the previous row's
completion) whose log-probs estimate the KL term, as TRL builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftcli.config.recipe import DataConfig
from peftcli.core.errors import DataError
from peftcli.data.batching import Collator
from peftcli.data.chat import ChatRenderError, chat_segments, chat_template_of, format_prompt
from peftcli.data.formats import ROLES, is_missing
from peftcli.data.sources import builtin_rows, load_table
from peftcli.data.splits import Splits, _partition, _splits_in_use, _val_from, malformed_summary
from peftcli.data.tokenize import Untrained, _first_trained
from peftcli.models.losses import IGNORE

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
KTO_COLUMNS = ("prompt", "completion", "label")
_TRUE = {"true", "1", "yes", "desirable"}
_FALSE = {"false", "0", "no", "undesirable"}


def _turns(value: Any, what: str) -> list[dict[str, str]] | str:
    """Chat turns as role/content messages, or why they are not."""
    if not isinstance(value, list) or not value:
        return f"{what} is neither text nor a list of turns"
    out = []
    for k, t in enumerate(value, 1):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            return f"{what} turn {k} is not a role/content mapping with a known role"
        out.append({"role": t["role"], "content": t["content"]})
    return out


def _text_or_turns(value: Any, what: str) -> str | list[dict[str, str]] | None:
    """Text, or chat turns; None when it is neither (`_turns` says why)."""
    if isinstance(value, str):
        return value
    turns = _turns(value, what)
    return None if isinstance(turns, str) else turns


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Whole conversations: the turns both share are the prompt (TRL's implicit prompt)."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def pair_row(r: dict, prompt_col: str) -> dict | str:
    """One pair in peftcli's shape ({prompt, chosen, rejected}, text or turns), or why it is malformed."""
    sides = {}
    for c in ("chosen", "rejected"):
        if is_missing(r.get(c)) or (isinstance(r.get(c), list) and not r[c]):
            return f"no {c} completion"
        sides[c] = _text_or_turns(r[c], c)
        if sides[c] is None:
            return _turns(r[c], c)
    chosen, rejected = sides["chosen"], sides["rejected"]
    prompt = r.get(prompt_col)
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
    if is_missing(prompt) or (isinstance(prompt, list) and not prompt):
        return "no prompt"
    if _text_or_turns(prompt, "prompt") is None:
        return _turns(prompt, "prompt")
    prompt = _text_or_turns(prompt, "prompt")
    if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
        prompt, chosen, rejected = (_as_turns(prompt, "user"), _as_turns(chosen, "assistant"),
                                    _as_turns(rejected, "assistant"))
        if not any(m["role"] == "assistant" for m in chosen) or not any(m["role"] == "assistant" for m in rejected):
            return "a completion without an assistant turn"
    if chosen == rejected:  # every preference loss is flat on it: a pair that teaches nothing
        return "chosen and rejected are the same completion"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _as_turns(value: str | list[dict], role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _desirable(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    return None


def kto_row(r: dict, prompt_col: str) -> dict | str:
    """One unpaired row ({prompt, completion, desirable}), or why it is malformed."""
    prompt, completion = r.get(prompt_col), r.get("completion")
    if is_missing(prompt) or is_missing(completion) or (isinstance(completion, list) and not completion):
        return "no prompt or no completion"
    good = _desirable(r.get("label"))
    if good is None:
        return f"label {r.get('label')!r} is not true / false"
    for value, what in ((prompt, "prompt"), (completion, "completion")):
        if _text_or_turns(value, what) is None:
            return _turns(value, what)
    prompt, completion = _text_or_turns(prompt, "prompt"), _text_or_turns(completion, "completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt, completion = _as_turns(prompt, "user"), _as_turns(completion, "assistant")
    out = {"prompt": prompt, "completion": completion, "desirable": good}
    if isinstance(r.get("answer"), str):
        out["answer"] = r["answer"]
    return out


def load_preference_splits(cfg: DataConfig, objective: str) -> Splits:
    """Train / validation / held-out rows of preference data, split by the rule every source follows
    (peftcli.data.splits); malformed rows are listed, not fatal (data.strict refuses them later)."""
    rows = builtin_rows(cfg.source)
    table = {"train": rows} if rows is not None else load_table(cfg)
    in_use = _splits_in_use(table, cfg)
    prompt_col = cfg.prompt_column or "prompt"
    needed = (prompt_col, "completion", "label") if objective == "kto" else ("chosen", "rejected")
    for split, split_rows in in_use.items():
        cols = list(split_rows[0]) if split_rows else []
        missing = [c for c in needed if c not in cols]
        if split_rows and missing:
            shape = ("prompt / completion / label rows" if objective == "kto"
                     else "prompt / chosen / rejected rows (or chosen / rejected conversations)")
            raise DataError(f"data.source: {cfg.source} (split {split!r}) has no column {', '.join(map(repr, missing))}; "
                            f"train.objective {objective} reads {shape}; its columns are {', '.join(cols) or '(none)'}")
    train, val, held = _partition(table, cfg)
    parse = kto_row if objective == "kto" else pair_row
    malformed: list[tuple[str, int, str]] = []
    parts = []
    for numbered, split in ((train, cfg.train_split), (val, cfg.val_split or cfg.train_split),
                            (held, cfg.eval_split or cfg.train_split)):
        out = []
        for i, r in numbered:
            row = parse(r, prompt_col)
            if isinstance(row, str):
                malformed.append((split, i + 1, row))
            else:
                out.append({**row, "row": i + 1})
        parts.append(out)
    if not parts[0]:
        raise DataError(f"data: no training rows in {cfg.source}"
                        + (f" ({malformed_summary(malformed)})" if malformed else ""))
    return Splits(train=parts[0], eval=parts[2], val=parts[1], label_names=None, format=objective,
                  malformed=malformed, val_from=_val_from(cfg, len(val)))


# ------------------------------------------------------------------------------------ tokens


@dataclass
class _Renderer:
    """A prompt and a completion as token ids and labels (IGNORE outside the completion)."""

    tokenizer: Any
    cfg: DataConfig

    def __call__(self, prompt: str | list[dict], completion: str | list[dict]) -> tuple[list[int], list[int], int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            p = tok(format_prompt(tok, prompt, self.cfg.chat_template), add_special_tokens=False)["input_ids"]
            c = tok(completion + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            return p + c, [IGNORE] * len(p) + c, len(p)
        pieces = chat_segments(tok, prompt + completion, chat_template_of(tok, self.cfg))
        skip = sum(m["role"] == "assistant" for m in prompt)  # the prompt's own replies are not trained
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = None
        for text, trained in pieces:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            if trained and skip:
                skip, trained = skip - 1, False
            if trained and prompt_len is None:
                prompt_len = len(ids)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels, len(ids) if prompt_len is None else prompt_len


def _reply(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else next((m["content"] for m in value if m["role"] == "assistant"), "")


def _fits(labels: list[int], max_length: int) -> bool:
    first = _first_trained(labels)
    return first is not None and first < max_length


def tokenize_preference(rows: list[dict], tokenizer, cfg: DataConfig, *, split: str,
                        malformed: list[tuple[str, int, str]] | None,
                        untrained: list[Untrained] | None) -> list[dict[str, Any]]:
    """Token ids and labels of each pair (or KTO row), cut to data.max_length from the end as TRL
    cuts them. A row whose chat cannot be rendered goes to `malformed` (refused when None); one
    with a completion left without a trained token to `untrained` (kept when None)."""
    render = _Renderer(tokenizer, cfg)
    n = cfg.max_length
    out = []
    for r in rows:
        try:
            if "completion" in r:
                sides = [render(r["prompt"], r["completion"])]
            else:
                sides = [render(r["prompt"], r["chosen"]), render(r["prompt"], r["rejected"])]
        except ChatRenderError as e:
            if malformed is None:
                raise DataError(f"{cfg.source}: {split} row {r.get('row', '?')}: {e}") from None
            malformed.append((split, r.get("row", 0), str(e)))
            continue
        bad = next((s for s in sides if not _fits(s[1], n)), None)
        if bad is not None and untrained is not None:
            untrained.append(Untrained(row=r.get("row", 0), prompt_tokens=_first_trained(bad[1]), tokens=len(bad[0])))
            continue
        (ids, labels, plen) = sides[0]
        e: dict[str, Any] = {"input_ids": ids[:n], "labels": labels[:n], "prompt_len": min(plen, n), "row": r.get("row", 0)}
        if "completion" in r:
            e["desirable"] = int(r["desirable"])
            # the reference answer generation is scored against: never an undesirable completion
            e["response"] = r.get("answer") or (_reply(r["completion"]) if e["desirable"] else None)
        else:
            e["rejected_ids"], e["rejected_labels"] = sides[1][0][:n], sides[1][1][:n]
            e["response"] = _reply(r["chosen"])
        out.append(e)
    return out


# ------------------------------------------------------------------------------------ batches


class PairCollator:
    """A batch of pairs as one padded batch: the chosen rows, then the rejected rows. Cached
    reference log-probs (`ref`: chosen, rejected) come along as `ref_logps`."""

    second = ("rejected_ids", "rejected_labels")  # the keys of each example's second row

    def __init__(self, pad_id: int) -> None:
        self.pad = Collator(pad_id, "causal_lm")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = self.second
        rows = ([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
                + [{"input_ids": e[ids], "labels": e[labels]} for e in examples])
        out = self.pad(rows)
        if "ref" in examples[0]:
            out["ref_logps"] = torch.tensor([e["ref"][0] for e in examples] + [e["ref"][1] for e in examples],
                                            dtype=torch.float32)
        return out


class KTOCollator(PairCollator):
    """A KTO batch: its rows, then each row's mismatched row (`kl_ids`, see `add_mismatched`) for the
    KL estimate; `desirable` says which rows are; cached reference log-probs (`ref`: the row's, its
    mismatched row's) come along as `ref_logps`."""

    second = ("kl_ids", "kl_labels")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        out = super().__call__(examples)
        out["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
        return out


def add_mismatched(examples: list[dict], max_length: int) -> None:
    """Give each KTO example its mismatched row: its prompt with the previous example's completion
    (the last example's for the first). TRL pairs each row with the previous row of its batch
    under sequential sampling; a fixed partner keeps the estimate the same under any batch order
    and lets the reference log-probs of these rows be cached with the others."""
    for i, e in enumerate(examples):
        o = examples[i - 1]
        p = e["input_ids"][: e["prompt_len"]]
        e["kl_ids"] = (p + o["input_ids"][o["prompt_len"] :])[:max_length]
        e["kl_labels"] = ([IGNORE] * len(p) + o["labels"][o["prompt_len"] :])[:max_length]
