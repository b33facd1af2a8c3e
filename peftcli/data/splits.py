"""Train / validation / test rows of a recipe, checked against the recipe before any model is built.

Three splits. The held-out test rows follow one rule for every source without an eval split:
shuffle with random.Random(seed) and hold out the LAST eval_size (or eval_fraction) rows. Of the
rest (the training pool), the LAST val_size (or val_fraction) rows validate, unless the source has
its own val_split; then skip train_offset rows and train on the next train_size. Taking validation
from the end keeps a recipe's training rows the same whatever its validation size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from peftcli.config.recipe import DataConfig
from peftcli.core.errors import DataError
from peftcli.data.formats import detect_format, format_columns, is_missing, lm_row
from peftcli.data.sources import BUILTIN_COLUMNS, builtin_rows, load_table


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
    # Lines a run prints about its examples: those left out because truncation kept no trained token.
    notes: list[str] = field(default_factory=list)
    val_from: str = ""  # where the validation rows come from, for the start-up line


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
        gaps = [i for i, r in enumerate(rows) if is_missing(r.get(label_col))]
        if gaps and not keep_missing:
            raise DataError(
                f"data.label_column: {len(gaps)} row{'s' if len(gaps) != 1 else ''} of {where} have no "
                f"{label_col!r} value (first: data row {gaps[0] + 1}); fill them in or remove those rows"
            )
        values += [r[label_col] for r in rows if not is_missing(r.get(label_col))]
        nested = next((i for i, r in enumerate(rows) if isinstance(r.get(label_col), (list, dict))), None)
        if nested is not None:  # e.g. a JSON object of columns, read as one row of lists
            kind = type(rows[nested][label_col]).__name__
            raise DataError(
                f"data.label_column: {label_col!r} of {where} holds a {kind}, not a class name or id (data row "
                f"{nested + 1}); a file holds one example per row: a JSON list of objects, or one object per line")
    names = cfg.label_names
    ints = [i for i in (_as_int(v) for v in values) if i is not None]
    all_ids = len(ints) == len(values)
    if names is None and not all_ids:
        names = sorted({str(v) for v in values})
        if num_labels and len(names) != num_labels:
            # Fewer: the head would be sized by the names found, not by the recipe's number.
            more = "" if len(names) > num_labels else ", or list every class in data.label_names"
            raise DataError(
                f"model.num_labels: {src} has {len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) but model.num_labels is "
                f"{num_labels}; set model.num_labels: {len(names)} or null{more}"
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
        msg = (f"data.label_column: {_shown(too_big)} in {src} outside 0..{n - 1} ({key} gives {n} classes); "
               f"fix those rows, or set {key} to cover every class")
        raise UnknownLabels(msg, _shown(too_big), names, src) if names is not None else DataError(msg)
    if names is not None:
        known = set(names)
        unknown = sorted({str(v) for v in values if _as_int(v) is None and str(v) not in known})
        if unknown:
            raise UnknownLabels(
                f"data.label_names: {_shown(unknown)} of {src} not in data.label_names {names}; "
                "add them to data.label_names or fix those rows", _shown(unknown), names, src)
        return list(names), False
    top = max(ints, default=-1) + 1
    found = sorted(set(ints))
    if not num_labels and top > 2 * len(found):  # ids 0, 1, 1000000: a head of a million classes, most never seen
        raise DataError(
            f"data.label_column: the labels of {src} read as class ids up to {top - 1}, a head of {top:,} classes, "
            f"but only {len(found)} ids occur ({', '.join(map(str, found[:5]))}{', ...' if len(found) > 5 else ''}); "
            f"renumber them 0..{len(found) - 1}, or set model.num_labels: {top} if the head has that many classes")
    return [str(i) for i in range(max(top, num_labels or 0))], True


@dataclass
class _Columns:
    """The columns a source's rows are read from: the recipe's names, or a built-in source's own."""

    text: str
    label: str
    prompt: str | None
    response: str | None


def load_splits(cfg: DataConfig, task: str, num_labels: int | None = None) -> Splits:
    """Rows of the recipe's splits, checked against the recipe before any model is built.

    `num_labels` is the recipe's model.num_labels: integer labels must fit the head it sizes.
    """
    rows = builtin_rows(cfg.source)
    table = {"train": rows} if rows is not None else load_table(cfg)
    builtin = BUILTIN_COLUMNS.get(cfg.source, {})
    col = _Columns(text="text" if rows is not None else cfg.text_column,
                   label="label" if rows is not None else cfg.label_column,
                   prompt=cfg.prompt_column or builtin.get("prompt_column"),
                   response=cfg.response_column or builtin.get("response_column"))
    in_use = _splits_in_use(table, cfg)
    if task == "classification":
        for split_rows in in_use.values():
            if split_rows:
                _check_columns(list(split_rows[0]), cfg, task, col.text, col.label, col.prompt, col.response)
        # Built-in rows without a label (tweets with no recorded agreement) are kept until after the
        # split, so that derived tasks share the main task's train/held-out partition.
        label_names, ids = _label_names(in_use, cfg, col.label, num_labels, keep_missing=rows is not None)
        if len(label_names) < 2:  # trains to a constant: "100 % accuracy", nothing learnt
            found = f"one class ({label_names[0]!r})" if label_names else "no class"
            raise DataError(f"data.label_column: {cfg.source} has {found} in column {col.label!r}; a classifier "
                            "needs at least two: check data.label_column and the data")
        train, val, held = _partition(table, cfg)
        n_train = len(train)
        val_from = _val_from(cfg, len(val))
        malformed: list[tuple[str, int, str]] = []
        train = _class_rows(train, cfg.train_split, cfg, col, label_names, ids, malformed)
        val = _class_rows(val, cfg.val_split or cfg.train_split, cfg, col, label_names, ids, malformed)
        held = _class_rows(held, cfg.eval_split or cfg.train_split, cfg, col, label_names, ids, malformed)
        if not train:
            raise DataError(f"data: no training rows in {cfg.source}"
                            + (f" ({malformed_summary(malformed)})" if malformed else ""))
        return Splits(train=train, eval=held, val=val, label_names=label_names, val_from=val_from,
                      malformed=malformed, notes=_short_of(cfg, n_train))
    fmt = _lm_format(in_use, cfg, col)
    train, val, held = _partition(table, cfg)
    n_train = len(train)
    val_from = _val_from(cfg, len(val))
    malformed: list[tuple[str, int, str]] = []
    train = _lm_rows(train, cfg.train_split, fmt, cfg, col, malformed)
    held = _lm_rows(held, cfg.eval_split or cfg.train_split, fmt, cfg, col, malformed)
    val = _lm_rows(val, cfg.val_split or cfg.train_split, fmt, cfg, col, malformed)
    if not train:
        raise DataError(f"data: no training rows in {cfg.source}"
                        + (f" ({malformed_summary(malformed)})" if malformed else ""))
    return Splits(train=train, eval=held, val=val, label_names=None, format=fmt, malformed=malformed,
                  val_from=val_from, notes=_short_of(cfg, n_train))


def _short_of(cfg: DataConfig, n_train: int) -> list[str]:
    """The start-up note when data.train_size asks for more rows than the source has left for training."""
    if cfg.train_size and n_train < cfg.train_size:
        return [f"data.train_size {cfg.train_size}: {cfg.source} has {n_train} training rows once the held-out "
                "and validation rows are set apart; training on those"]
    return []


class UnknownLabels(DataError):
    """Labels outside the classes data.label_names gives; `shown`, `names` and `source` let a
    command that set those names itself (eval, from the run's meta.json) say so instead."""

    def __init__(self, message: str, shown: str, names: list[str], source: str) -> None:
        self.shown, self.names, self.source = shown, list(names), source
        super().__init__(message)


class MissingSplit(DataError):
    """A split the recipe names that the source does not have; `key` is the recipe key that names it,
    so that a command which set it from a flag (`eval --split`) can name the flag instead."""

    def __init__(self, key: str, split: str, cfg: DataConfig, table: dict[str, list[dict]]) -> None:
        self.key, self.split, self.where = key, split, f"{split!r} not in {cfg.source}; splits: {', '.join(table)}"
        super().__init__(f"{key}: {self.where}")


def _splits_in_use(table: dict[str, list[dict]], cfg: DataConfig) -> dict[str, list[dict]]:
    """The recipe's train / eval / val splits of the source, refused when one is missing or training has no rows."""
    for key, split in (("data.train_split", cfg.train_split), ("data.eval_split", cfg.eval_split),
                       ("data.val_split", cfg.val_split)):
        if split is not None and split not in table:
            raise MissingSplit(key, split, cfg, table)
    in_use = {cfg.train_split: table[cfg.train_split]}
    for split in (cfg.eval_split, cfg.val_split):
        if split is not None:
            in_use[split] = table[split]
    if not in_use[cfg.train_split]:
        raise DataError(f"data: no training rows in {cfg.source}")
    return in_use


def _lm_format(in_use: dict[str, list[dict]], cfg: DataConfig, col: _Columns) -> str:
    """The causal-LM row format, with every split in use checked for the columns it reads.

    Data whose columns are named prompt / response is read as such (`col` is updated).
    """
    first = list(in_use[cfg.train_split][0])
    if (cfg.format == "auto" and not (col.prompt or col.response) and col.text not in first
            and {"prompt", "response"} <= set(first)):
        col.prompt, col.response = "prompt", "response"  # columns named as prompt/response data names them
    fmt = detect_format(first, cfg, col.prompt, col.response, col.text)
    for split, split_rows in in_use.items():
        cols = list(split_rows[0]) if split_rows else []
        bad = [(key, c) for key, c in format_columns(fmt, cfg, col.prompt, col.response, col.text) if c not in cols]
        if split_rows and bad:
            key, c = bad[0]
            raise DataError(
                f"{key}: column {c!r} not in {cfg.source} (split {split!r}; format {fmt}); its columns are "
                f"{', '.join(cols) or '(none)'}; set {' or '.join(dict.fromkeys([key.split(':')[0], 'data.format']))} "
                "to match the data"
            )
    return fmt


Numbered = list[tuple[int, dict[str, Any]]]  # rows with their position in the source file


def _partition(table: dict[str, list[dict]], cfg: DataConfig) -> tuple[Numbered, Numbered, Numbered]:
    """(train, val, held-out test) rows, each with its file position, so a malformed one can be named."""
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
        if n_eval >= len(allrows):
            key = f"data.eval_size: {n_eval}" if cfg.eval_size else f"data.eval_fraction: {cfg.eval_fraction}"
            raise DataError(f"{key} held-out rows of {cfg.source}'s {len(allrows)} leave no training rows; "
                            "lower it")
        held, train = allrows[-n_eval:], allrows[:-n_eval]
    # Validation rows come off the END of the training pool, so that train_offset / train_size
    # select the same training rows with or without them (and shipped recipes keep their rows).
    if cfg.val_split is not None:
        val = list(enumerate(table[cfg.val_split]))[: cfg.val_size or None]
    else:
        n_val = val_count(len(train), cfg)
        if n_val >= len(train):
            raise DataError(
                f"data.val_size: {n_val} validation rows leave no training rows of {len(train)}; "
                "lower data.val_size / data.val_fraction"
            )
        val, train = (train[len(train) - n_val :], train[: len(train) - n_val]) if n_val else ([], train)
    if cfg.train_offset:
        if cfg.train_offset >= len(train):
            raise DataError(f"data.train_offset: {cfg.train_offset} skips all {len(train)} training rows of "
                            f"{cfg.source}; lower it")
        train = train[cfg.train_offset :]
    if cfg.train_size:
        train = train[: cfg.train_size]
    return train, val, held


# Bounds of the default validation split when data.train_size is set: enough rows for a choice that
# is not noise, few enough that scoring them stays a small part of a run.
VAL_MIN, VAL_MAX = 32, 2000


def val_count(pool: int, cfg: DataConfig) -> int:
    """Validation rows to hold out from a training pool of `pool` rows (no data.val_split).

    data.val_size, else data.val_fraction of the training rows: of data.train_size when it is set,
    bounded to VAL_MIN..VAL_MAX, so that a small run is scored on a few rows rather than a tenth of
    a large source; without train_size (training on the whole pool), of the pool. Never more than
    val_fraction of the pool, so that recipes which train on most of a small source keep their rows.
    """
    if cfg.val_size:
        return cfg.val_size
    if cfg.val_fraction <= 0:
        return 0
    of_pool = max(1, int(pool * cfg.val_fraction))
    if cfg.train_size is None:
        return of_pool
    return min(of_pool, max(VAL_MIN, min(VAL_MAX, int(cfg.train_size * cfg.val_fraction))))


def _val_from(cfg: DataConfig, n: int) -> str:
    """Where the validation rows come from, in words."""
    if cfg.val_split is not None:
        return f"split {cfg.val_split!r}" + (f", its first {cfg.val_size} rows" if cfg.val_size else "")
    if not n:
        return "none: data.val_fraction is 0"
    if cfg.val_size:
        return "data.val_size, held out from the training pool"
    pct = f"{100 * cfg.val_fraction:g} %"
    if cfg.train_size is None:
        return f"{pct} of the training pool (data.val_fraction)"
    return (f"{pct} of data.train_size within {VAL_MIN}-{VAL_MAX} rows, held out from the training pool "
            "(data.val_size sets it)")


def _class_rows(rows: Numbered, split: str, cfg: DataConfig, col: _Columns, label_names: list[str], ids: bool,
                malformed: list[tuple[str, int, str]]) -> list[dict]:
    """Classification rows as {text, label id (, text_pair)}; rows without a label are left out,
    rows whose text is missing, empty or not a string go to `malformed` (the tokenizer would
    otherwise train on "" or stop the run with its own words)."""
    name_to_id = {n: i for i, n in enumerate(label_names)}

    def to_id(v: Any) -> int:
        i = _as_int(v)
        return i if i is not None and (ids or cfg.label_names is not None) else name_to_id[str(v)]

    def bad_text(v: Any, column: str) -> str | None:
        if is_missing(v) or (isinstance(v, str) and not v.strip()):
            return f"no text in {column!r}"
        kind = type(v).__name__
        return None if isinstance(v, str) else f"{column!r} holds {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not text"

    out = []
    for i, r in rows:
        if is_missing(r.get(col.label)):
            continue
        columns = [("text", col.text)] + ([("text_pair", cfg.text_pair_column)] if cfg.text_pair_column else [])
        why = next((w for _, c in columns if (w := bad_text(r.get(c), c)) is not None), None)
        if why is not None:
            malformed.append((split, i + 1, why))
            continue
        row = {key: r[c] for key, c in columns}
        row["label"] = to_id(r[col.label])
        out.append(row)
    return out


def _lm_rows(rows: Numbered, split: str, fmt: str, cfg: DataConfig, col: _Columns,
             malformed: list[tuple[str, int, str]]) -> list[dict]:
    """Causal-LM rows in peftcli's shape, each with its data row number; malformed ones go to `malformed`."""
    out = []
    for i, r in rows:
        row = lm_row(r, fmt, cfg, col.prompt, col.response, col.text)
        if isinstance(row, str):
            malformed.append((split, i + 1, row))
        else:
            row["row"] = i + 1
            out.append(row)
    return out


def malformed_summary(malformed: list[tuple[str, int, str]], show: int = 5) -> str:
    """'3 malformed rows skipped: train row 4 (empty conversation), ...': enough to find them."""
    n = len(malformed)
    shown = ", ".join(f"{split} row {row} ({why})" for split, row, why in sorted(malformed)[:show])
    return f"{n} malformed row{'s' if n != 1 else ''} skipped: {shown}" + (f" and {n - show} more" if n > show else "")
