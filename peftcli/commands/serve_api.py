"""The OpenAI request schema of `peftcli serve`: parsing, validation and response bodies.

Plain functions over bytes, headers and dicts, so every refusal is testable without a server.
A request is refused (an `ApiError`, answered as OpenAI's error object) rather than guessed at:
a parameter this server does not implement is accepted only at its no-op value, and a name
OpenAI's API does not know is refused, as OpenAI refuses it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli.inference.decode import is_unicode
from peftcli.inference.engine import Sampling

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          421: "invalid_request_error"}


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------- the connection


def is_loopback_bind(host: str) -> bool:
    """Whether `--host` listens on this machine only (then no other machine can reach it)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host_header(value: str | None) -> None:
    """On a loopback bind, only loopback names: a page on another site that rebinds its own DNS
    name to 127.0.0.1 still sends its own name as Host, and is refused (DNS rebinding)."""
    name = (value or "").strip().lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    else:
        name = name.partition(":")[0]
    if name not in LOOPBACK_HOSTS:
        raise ApiError(421, f"Host {value!r} is not this server's: on a loopback address it answers only "
                            f"{', '.join(LOOPBACK_HOSTS)} (with any port)", code="misdirected_request")


def check_api_key(authorization: str | None, key: str) -> None:
    """`Authorization: Bearer KEY`, compared in constant time, as vLLM's --api-key does."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                            "the server was started with (--api-key or PEFTCLI_API_KEY)", code="invalid_api_key")


def check_content_type(value: str | None) -> None:
    """Only JSON: a web page may post text/plain or a form to a local server without asking first
    (no CORS preflight), but never application/json."""
    media, _, params = (value or "").partition(";")
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in params.split(";")
                    if p.strip().lower().startswith("charset=")), "utf-8")
    if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        raise ApiError(415, f"the body must be sent as 'Content-Type: application/json' (UTF-8), not {value!r}",
                       code="unsupported_media_type")


def check_body_size(content_length: str | None, limit: int) -> None:
    """Refuse a declared oversize body before reading it (a chunked one is counted as it comes)."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise ApiError(400, f"Content-Length {content_length!r} is not a number") from None
    if n > limit:
        raise body_too_large(limit)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
                    code="body_too_large")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; malformed, non-UTF-8, too deeply nested or lone-surrogate
    bodies are the client's error (400), never the server's."""
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply to be a request") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_strings(body)
    return body


def _check_strings(body: dict[str, Any]) -> None:
    """Every string encodable as UTF-8: JSON's \\ud800 escapes decode to lone surrogates."""
    todo: list[Any] = [body]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
        elif isinstance(x, str) and not is_unicode(x):
            raise ApiError(400, "the body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                                "send valid Unicode text")


# ------------------------------------------------------------------------------------ the request


@dataclass
class Params:
    """What both endpoints share, validated."""

    model: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None  # None: the endpoint's default
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens_key: str = "max_tokens"  # the key the request gave it under, for messages


# Parameters OpenAI defines that this server does not implement: accepted only at these values.
_NO_OP = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "stop": (None, [], ""),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, True, False),
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]),
}
_WHY = {"n": "one choice per request (send several requests: they are batched together)",
        "stop": "no stop sequences (generation ends at max_tokens or the end-of-sequence token)",
        "logprobs": "no log probabilities", "top_logprobs": "no log probabilities",
        "best_of": "one candidate per request", "echo": "no echo of the prompt"}
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "user"}
COMPLETION_KEYS = _COMMON | {"prompt", "n", "best_of", "echo", "stop", "logprobs", "presence_penalty",
                             "frequency_penalty", "logit_bias", "suffix"}
CHAT_KEYS = _COMMON | (set(_NO_OP) - {"best_of", "echo", "suffix"}) | {"messages", "max_completion_tokens"}


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > high or v < low or (low_open and v == low):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"'{key}' must be a number in {span}, not {v!r}", param=key)
    return float(v)


def _integer(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise ApiError(400, f"'{key}' must be an integer, not {v!r}", param=key)
    return v


def parse_sampling(body: dict[str, Any]) -> Sampling:
    """temperature, top_p and seed as OpenAI defines them, except that a request without a
    temperature decodes greedily (as `peftcli generate` does) instead of at temperature 1."""
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError(400, f"'seed' must fit in 64 bits, not {seed}", param="seed")
    if temperature == 0 and top_p < 1:
        raise ApiError(400, "'top_p' needs a 'temperature' above 0: at temperature 0 (the default here) decoding "
                            "is greedy and top_p would change nothing", param="top_p")
    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unrecognized request argument {key!r}", param=key)
    for key, values in _NO_OP.items():
        if key not in body or any(_same(body[key], v) for v in values):
            continue
        if key == "tool_choice" and body[key] == "auto" and not body.get("tools"):
            continue  # "auto" with no tools to choose from chooses none
        shown = " or ".join("null" if v is None else json.dumps(v) for v in values)
        why = _WHY.get(key, f"no {key} (it takes {shown} only)")
        raise ApiError(400, f"'{key}' = {json.dumps(body[key])} is not supported: this server has {why}", param=key)


def _same(a: Any, b: Any) -> bool:
    """A request's value equals a no-op value: numbers by value (clients send 0.0 for 0, 1.0 for
    1), anything else by type and value (false is not 0)."""
    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if number(a) and number(b):
        return a == b
    return a is b or (type(a) is type(b) and a == b)


def parse_common(body: dict[str, Any], chat: bool) -> Params:
    """The parameters both endpoints share; unknown and unsupported ones are refused."""
    _check_keys(body, CHAT_KEYS if chat else COMPLETION_KEYS)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required: the base model or an adapter name (GET /v1/models lists them)",
                       param="model")
    for k in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):  # each checked, even unused
        v = _integer(body, k)
        if v is not None and v < 1:
            raise ApiError(400, f"'{k}' must be a positive integer, not {v!r}", param=k)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}
                             or not isinstance(opts.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' is {\"include_usage\": true|false}, with 'stream': true",
                       param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user")
    return Params(model=name, stream=stream, include_usage=bool((opts or {}).get("include_usage")),
                  max_tokens=max_tokens, sampling=parse_sampling(body), max_tokens_key=key)


def parse_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be one string (send several prompts as several requests: "
                            "concurrent requests are batched together)", param="prompt")
    return prompt


def _content_text(content: Any) -> str | None:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    out: list[dict[str, str]] = []
    for m in msgs if isinstance(msgs, list) else []:
        text = _content_text(m.get("content")) if isinstance(m, dict) else None
        if text is None or not isinstance(m.get("role"), str):
            break
        out.append({"role": m["role"], "content": text})
    if not msgs or not isinstance(msgs, list) or len(out) != len(msgs):
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": \"text\"}",
                       param="messages")
    return out


def resolve_max_tokens(params: Params, n_prompt: int, *, context: int | None, cap: int, chat: bool,
                       param: str) -> int:
    """The request's token budget: refused when over the server's cap or, with the prompt, over
    the model's context (so a request that is accepted always fits in any batch)."""
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", param=param)
    room = None if context is None else context - n_prompt
    if room is not None and room < 1:
        raise ApiError(400, f"the prompt is {n_prompt} tokens, with no room left in the model's context of "
                            f"{context} tokens; shorten the prompt", param=param, code="context_length_exceeded")
    n = params.max_tokens
    if n is None:  # OpenAI's defaults: 16 for completions, as much as fits for chat
        return min(16 if not chat else cap, cap, room if room is not None else cap)
    if n > cap:
        raise ApiError(400, f"'{params.max_tokens_key}' is {n}, over this server's limit of {cap} (--max-tokens)",
                       param=params.max_tokens_key)
    if room is not None and n > room:
        raise ApiError(
            400, f"the prompt is {n_prompt} tokens and {params.max_tokens_key} is {n}: together more than the "
                 f"model's context of {context} tokens; shorten the prompt or lower {params.max_tokens_key}",
            param=param, code="context_length_exceeded")
    return n


# ----------------------------------------------------------------------------------- model names


def public_model_ids(base_name: str, adapters: list[str]) -> dict[str, str]:
    """{id shown to clients: name inside}. A base model loaded from a folder is shown by its
    folder's name, never its path; a hub id is shown as it is."""
    base_id = Path(base_name).name if Path(base_name).is_absolute() or Path(base_name).exists() else base_name
    while base_id in adapters or not base_id:
        base_id = f"base-{base_id}" if base_id else "base"
    return {base_id: base_name, **{a: a for a in adapters}}


def resolve_model(name: str, ids: dict[str, str], base_name: str) -> tuple[str, str]:
    """(public id, name inside) for a request's `model`; the base's own name is accepted too."""
    if name in ids:
        return name, ids[name]
    if name == base_name:
        return next(k for k, v in ids.items() if v == base_name), base_name
    raise ApiError(404, f"no model named {name!r}; this server has: {', '.join(ids)} (GET /v1/models)",
                   param="model", code="model_not_found")


# ------------------------------------------------------------------------------------- responses


def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def completion_body(rid: str, model: str, text: str, finish: str, n_prompt: int, n_completion: int,
                    chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(n_prompt, n_completion)}


def sse(obj: dict[str, Any] | str) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


def chunk_body(rid: str, model: str, delta: str | None, finish: str | None, chat: bool, *,
               role: bool = False) -> dict[str, Any]:
    if chat:
        d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
            {"content": delta} if delta is not None else {})
        c: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
    else:
        c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [c]}


def finish_reason(engine_reason: str) -> str:
    """OpenAI's finish reasons: an engine 'cancelled' only reaches a client that is gone anyway."""
    return "stop" if engine_reason == "stop" else "length"


__all__ = [
    "ApiError", "CHAT_KEYS", "COMPLETION_KEYS", "Params", "body_too_large", "check_api_key", "check_body_size",
    "check_content_type", "check_host_header", "chunk_body", "completion_body", "is_loopback_bind",
    "parse_common", "parse_json", "parse_messages", "parse_prompt", "parse_sampling", "public_model_ids",
    "resolve_max_tokens", "resolve_model", "sse", "usage",
]
