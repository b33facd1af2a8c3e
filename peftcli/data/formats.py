"""Causal-LM row formats: what a row's columns mean, and each row in peftcli's shape.

Causal-LM rows come in five shapes (`data.format`, auto-detected from the columns by default):
`messages` (role / content turns), ShareGPT `conversations` (from / value), alpaca
(instruction / input / output), prompt / response, and plain text. Conversations are rendered with
the tokenizer's chat template (`peftcli.data.chat`) and the loss covers every assistant turn and nothing else.
"""

from __future__ import annotations

import json
import math
from typing import Any

from peftcli.config.recipe import DataConfig
from peftcli.core.errors import DataError

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


def format_columns(fmt: str, cfg: DataConfig, pcol: str | None, rcol: str | None,
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
        if role == "assistant" and not content.strip():  # it would train the end-of-turn marker alone
            return f"turn {k}: an empty assistant answer"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return "no assistant turn to train on"
    return out


def lm_row(r: dict, fmt: str, cfg: DataConfig, pcol: str | None, rcol: str | None, text_col: str) -> dict | str:
    """One causal-LM row in peftcli's shape (text / prompt+response / messages), or why it is malformed."""
    if fmt in ("messages", "sharegpt"):
        col = cfg.messages_column or ("messages" if fmt == "messages" else "conversations")
        conv = _conversation(r.get(col))
        return conv if isinstance(conv, str) else {"messages": conv}
    if fmt == "alpaca":
        instruction, extra, output = r.get("instruction"), r.get("input"), r.get("output")
        if is_missing(instruction) or is_missing(output):
            return "alpaca row without instruction or output"
        prompt = str(instruction) + (f"\n\n{extra}" if not is_missing(extra) else "")
        return {"prompt": prompt, "response": str(output)}
    if fmt == "prompt_response":
        if is_missing(r.get(pcol)) or is_missing(r.get(rcol)):  # as alpaca's: an empty response trains nothing
            return "no prompt or no response"
        return {"prompt": r[pcol], "response": str(r[rcol])}
    if not isinstance(r.get(text_col), str):
        return f"{text_col!r} is not text"
    return {"text": r[text_col]}


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
