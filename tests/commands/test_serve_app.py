"""`peftcli serve`'s ASGI application driven in-process (no socket): time limits, client hang-ups
and unexpected failures, each answered as an OpenAI-shaped JSON error."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import torch
import yaml

pytest.importorskip("starlette")

from helpers.asgi import call, run_with  # noqa: E402

from peftcli.commands.serve import ServeOptions  # noqa: E402
from peftcli.inference.multi import MultiAdapter  # noqa: E402


@pytest.fixture(scope="module")
def base_only(tiny_gpt2_dir, tmp_path_factory) -> MultiAdapter:
    """The tiny GPT-2 served alone (no adapter): enough for the HTTP layer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from peftcli.config.recipe import load_recipe

    src = tmp_path_factory.mktemp("serve-app") / "recipe.yaml"
    src.write_text(yaml.safe_dump({"model": {"name": str(tiny_gpt2_dir), "task": "causal_lm"},
                                   "data": {"source": "unused.csv"}, "method": {"name": "lora"}}))
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    return MultiAdapter(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_gpt2_dir),
                        device=torch.device("cpu"), base_name=str(tiny_gpt2_dir), recipe=load_recipe(src))


def body(prompt: str = "hello there", **kw) -> bytes:
    return json.dumps({"model": "x", "prompt": prompt, **kw}).encode()


def test_request_timeout_is_504_and_frees_the_row(base_only, tiny_gpt2_dir):
    model = tiny_gpt2_dir.name

    async def work(app, state):
        status, got = await call(app, "POST", "/v1/completions", body(model=model, max_tokens=100))
        s_status, s_body = await call(app, "POST", "/v1/completions", body(model=model, max_tokens=100, stream=True))
        deadline = time.monotonic() + 30
        while state.engine.stats["cancelled"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return status, json.loads(got), s_status, s_body.decode(), state.engine.stats["cancelled"]

    status, got, s_status, s_body, cancelled = run_with(base_only, ServeOptions(request_timeout_s=1e-6), work)
    assert status == 504 and got["error"]["code"] == "timeout" and "--request-timeout" in got["error"]["message"]
    assert s_status == 200 and '"code": "timeout"' in s_body and "[DONE]" not in s_body
    assert cancelled == 2


def test_a_stalled_body_times_out_and_a_failed_engine_fails_health(base_only, tiny_gpt2_dir):
    """A client that stopped sending mid-body held its connection, and shutdown, for as long as it
    liked; an engine thread that had died still answered /health with ok."""
    async def work(app, state):
        stalled = await call(app, "POST", "/v1/completions", b'{"model":', stall=True)
        state.engine.failed = "OverflowError: timestamp out of range"
        return stalled, await call(app, "GET", "/health"), await call(app, "POST", "/v1/completions",
                                                                      body(model=tiny_gpt2_dir.name))

    (s1, b1), (s2, b2), (s3, b3) = run_with(base_only, ServeOptions(request_timeout_s=0.5), work)
    assert s1 == 408 and "did not arrive within" in json.loads(b1)["error"]["message"]
    assert s2 == 503 and json.loads(b2) == {"status": "error", "engine": "OverflowError: timestamp out of range"}
    assert s3 == 503 and "the decoding engine stopped" in json.loads(b3)["error"]["message"]


def test_hung_up_non_stream_request_is_cancelled(base_only, tiny_gpt2_dir):
    async def work(app, state):
        await call(app, "POST", "/v1/completions", body(model=tiny_gpt2_dir.name, max_tokens=100), hang_up=True)
        return state.engine.stats

    stats = run_with(base_only, ServeOptions(), work)
    assert stats["cancelled"] == 1


def test_unexpected_failure_is_json_500_in_one_log_line(base_only, tiny_gpt2_dir, caplog, monkeypatch):
    async def work(app, state):
        def broken(text: str) -> list[int]:
            raise ValueError("tokenizer exploded")

        monkeypatch.setattr(state, "_encode", broken)
        return await call(app, "POST", "/v1/completions", body(model=tiny_gpt2_dir.name))

    with caplog.at_level(logging.ERROR, logger="peftcli.serve"):
        status, got = run_with(base_only, ServeOptions(), work)
    assert status == 500 and json.loads(got) == {"error": {"message": "internal server error", "type": "server_error",
                                                            "param": None, "code": None}}
    assert [r.getMessage() for r in caplog.records] == ["POST /v1/completions failed: ValueError: tokenizer exploded"]
    assert all(r.exc_info is None for r in caplog.records)


def test_ok_request_and_models_in_process(base_only, tiny_gpt2_dir):
    async def work(app, state):
        a = await call(app, "POST", "/v1/completions", body(model=tiny_gpt2_dir.name, max_tokens=3))
        b = await call(app, "GET", "/v1/models")
        c = await call(app, "GET", "/v1/models", headers={"host": "attacker.example"})
        return a, b, c

    (s1, b1), (s2, b2), (s3, b3) = run_with(base_only, ServeOptions(), work)
    assert s1 == 200 and json.loads(b1)["usage"]["completion_tokens"] <= 3
    listed = json.loads(b2)["data"][0]

    async def retrieve(app, state):  # OpenAI's client: models.retrieve(id)
        return await call(app, "GET", f"/v1/models/{listed['id']}"), await call(app, "GET", "/v1/models/nope")

    (s4, b4), (s5, b5) = run_with(base_only, ServeOptions(), retrieve)
    assert s4 == 200 and {**json.loads(b4), "created": 0} == {**listed, "created": 0}  # another app: another start
    assert s5 == 404 and json.loads(b5)["error"]["code"] == "model_not_found"
    assert s2 == 200 and str(tiny_gpt2_dir) not in b2.decode()
    assert s3 == 421 and json.loads(b3)["error"]["code"] == "misdirected_request"


def test_context_length_keeps_to_a_sliding_window():
    from types import SimpleNamespace

    from peftcli.inference.decode import context_length

    def model(**cfg):
        return SimpleNamespace(config=SimpleNamespace(**cfg))

    assert context_length(model(n_positions=128)) == 128
    assert context_length(model(max_position_embeddings=32768, sliding_window=4096)) == 4096
    assert context_length(model(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False)) == 32768
    assert context_length(model(max_position_embeddings=8192, sliding_window=None)) == 8192
    assert context_length(model()) is None
