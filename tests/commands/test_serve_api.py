"""`peftcli serve`'s request schema without a server: every refusal is an OpenAI-shaped 4xx."""

from __future__ import annotations

import json

import pytest

from peftcli.commands.serve_api import (
    ApiError,
    Params,
    check_api_key,
    check_body_size,
    check_content_type,
    check_host_header,
    is_loopback_bind,
    parse_common,
    parse_json,
    parse_messages,
    parse_prompt,
    public_model_ids,
    resolve_max_tokens,
    resolve_model,
)
from peftcli.inference.engine import Sampling


def refused(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args, **kwargs)
    body = e.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return e.value


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe{}", b'{"a": NaN}', b'{"a": Infinity}', b"[" * 100_000,
    b'{"prompt": "\\ud800"}', b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', b'{"\\ud83d": 1}',
])
def test_malformed_bodies_are_400(raw):
    assert refused(parse_json, raw).status == 400


def test_valid_body_with_real_surrogate_pair():
    assert parse_json(b'{"prompt": "\\ud83d\\ude00 ok"}')["prompt"] == "\U0001f600 ok"


@pytest.mark.parametrize("ct", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                "application/json; charset=latin-1", "application/jsonp"])
def test_only_json_content_type(ct):
    assert refused(check_content_type, ct).status == 415


@pytest.mark.parametrize("ct", ["application/json", "Application/JSON; charset=UTF-8", "application/json;charset=utf8"])
def test_json_content_type_accepted(ct):
    check_content_type(ct)


def test_body_size():
    check_body_size("100", 100)
    check_body_size(None, 100)
    assert refused(check_body_size, "101", 100).status == 413
    assert refused(check_body_size, "lots", 100).status == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_binds(host):
    assert is_loopback_bind(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.4", "example.com"])
def test_exposed_binds(host):
    assert not is_loopback_bind(host)


@pytest.mark.parametrize("value", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "[::1]", "LOCALHOST"])
def test_loopback_host_headers(value):
    check_host_header(value)


@pytest.mark.parametrize("value", [None, "", "evil.example", "evil.example:8000", "127.0.0.1.nip.io",
                                   "localhost.evil.example", "[::2]:80", "10.0.0.1"])
def test_other_host_headers_refused(value):
    assert refused(check_host_header, value).status == 421


def test_api_key():
    check_api_key("Bearer s3cret", "s3cret")
    check_api_key("bearer s3cret", "s3cret")
    for bad in [None, "", "s3cret", "Bearer", "Bearer wrong", "Basic s3cret", "Bearer s3cret2"]:
        e = refused(check_api_key, bad, "s3cret")
        assert e.status == 401 and e.code == "invalid_api_key"


def test_parse_common_defaults():
    p = parse_common({"model": "a", "prompt": "x"}, chat=False)
    assert p == Params(model="a", stream=False, include_usage=False, max_tokens=None, sampling=Sampling())
    p = parse_common({"model": "a", "messages": [], "max_completion_tokens": 5, "stream": True,
                      "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9, "seed": 3,
                      "n": 1, "stop": None, "logprobs": False, "user": "me"}, chat=True)
    assert p.max_tokens == 5 and p.stream and p.include_usage
    assert p.sampling == Sampling(temperature=0.7, top_p=0.9, seed=3)


@pytest.mark.parametrize("extra,param", [
    ({"model": 3}, "model"), ({"model": ""}, "model"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": 1, "top_p": 0}, "top_p"), ({"temperature": 1, "top_p": 1.5}, "top_p"),
    ({"top_p": 0.5}, "top_p"), ({"seed": 1.5}, "seed"), ({"seed": "1"}, "seed"), ({"seed": 2**64}, "seed"),
    ({"n": 2}, "n"), ({"n": True}, "n"), ({"stop": "\n"}, "stop"), ({"stop": ["a"]}, "stop"),
    ({"logprobs": 1}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"user": 5}, "user"),
    ({"max_tokns": 4}, "max_tokns"), ({"messages": []}, "messages"),
])
def test_completion_params_refused(extra, param):
    e = refused(parse_common, {"model": "a", "prompt": "x", **extra}, chat=False)
    assert e.status == 400 and e.param == param


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x"}, "prompt"), ({"echo": False}, "echo"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_completion_tokens": 2, "max_tokens": "x"}, "max_tokens"),  # the unused one is checked too
])
def test_chat_params_refused(extra, param):
    e = refused(parse_common, {"model": "a", "messages": [{"role": "user", "content": "x"}], **extra}, chat=True)
    assert e.status == 400 and e.param == param


def test_no_op_values_are_accepted_as_clients_send_them():
    """OpenAI clients send presence_penalty: 0.0 and n: 1.0, and tool_choice "auto" with no tools;
    each was refused because 0.0 is not the int 0 (with a garbled "this server has 'x' is not")."""
    msgs = [{"role": "user", "content": "x"}]
    for extra in ({"presence_penalty": 0.0, "frequency_penalty": 0.0}, {"n": 1.0}, {"tool_choice": "auto"},
                  {"tool_choice": "auto", "tools": []}, {"top_logprobs": 0.0}):
        parse_common({"model": "a", "messages": msgs, **extra}, chat=True)
    e = refused(parse_common, {"model": "a", "messages": msgs, "presence_penalty": 0.5}, chat=True)
    assert e.message == "'presence_penalty' = 0.5 is not supported: this server has no presence_penalty (it takes null or 0 only)"
    assert refused(parse_common, {"model": "a", "messages": msgs, "n": True}, chat=True).param == "n"  # true is not 1


def test_prompt_and_messages():
    assert parse_prompt({"prompt": "hi"}) == "hi" and parse_prompt({"prompt": ["hi"]}) == "hi"
    for bad in [None, 3, ["a", "b"], [1], {"text": "x"}]:
        assert refused(parse_prompt, {"prompt": bad}).param == "prompt"
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    assert parse_messages({"messages": msgs}) == [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "hello"}]
    for bad in [None, [], "hi", [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ["x"]]:
        assert refused(parse_messages, {"messages": bad}).param == "messages"


def test_max_tokens_fit_the_context_and_the_cap():
    p = Params(model="a")
    assert resolve_max_tokens(p, 10, context=128, cap=512, chat=False, param="prompt") == 16
    assert resolve_max_tokens(p, 10, context=128, cap=512, chat=True, param="messages") == 118
    assert resolve_max_tokens(p, 10, context=None, cap=40, chat=True, param="messages") == 40
    assert resolve_max_tokens(Params(model="a", max_tokens=118), 10, context=128, cap=512, chat=False,
                              param="prompt") == 118
    e = refused(resolve_max_tokens, Params(model="a", max_tokens=119), 10, context=128, cap=512, chat=False,
                param="prompt")
    assert e.code == "context_length_exceeded" and "context of 128 tokens" in e.message
    e = refused(resolve_max_tokens, Params(model="a", max_tokens=100), 10, context=4096, cap=64, chat=False,
                param="prompt")
    assert "--max-tokens" in e.message and e.param == "max_tokens"
    e = refused(resolve_max_tokens, Params(model="a", max_tokens=100, max_tokens_key="max_completion_tokens"), 10,
                context=4096, cap=64, chat=True, param="messages")
    assert e.message.startswith("'max_completion_tokens' is 100") and e.param == "max_completion_tokens"
    assert refused(resolve_max_tokens, p, 128, context=128, cap=512, chat=True, param="messages").status == 400
    assert refused(resolve_max_tokens, p, 0, context=128, cap=512, chat=False, param="prompt").status == 400


def test_model_ids_show_no_paths(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    ids = public_model_ids(str(base), ["a", "b"])
    assert list(ids) == ["my-base", "a", "b"] and str(tmp_path) not in json.dumps(list(ids))
    assert resolve_model("my-base", ids, str(base)) == ("my-base", str(base))
    assert resolve_model(str(base), ids, str(base)) == ("my-base", str(base))
    assert resolve_model("a", ids, str(base)) == ("a", "a")
    e = refused(resolve_model, "nope", ids, str(base))
    assert e.status == 404 and str(tmp_path) not in e.message
    assert list(public_model_ids("org/model", ["x"])) == ["org/model", "x"]
    assert list(public_model_ids(str(tmp_path / "a"), ["a"]))[0] == "base-a"


def test_error_body_shape():
    body = ApiError(404, "gone", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "gone", "type": "not_found_error", "param": "model",
                              "code": "model_not_found"}}
    assert ApiError(503, "busy").body()["error"]["type"] == "server_error"
