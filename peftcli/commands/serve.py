"""`peftcli serve`: an OpenAI-compatible HTTP server over several runs of one base model.

Local tools that talk to OpenAI's API (its Python client, editors, chat front-ends) can use
trained adapters unchanged: `model` names the adapter (or the base model), `/v1/completions` takes
raw text, `/v1/chat/completions` applies the chat template as the run's training data did, and
`stream: true` sends server-sent events.

Requests arriving within a few milliseconds of each other, for any mix of adapters, become one
batch of `decode.greedy_ids` (one base pass per batch, each row with its own adapter; see
peftcli/inference/multi.py). Model work runs in one worker thread, so the event loop keeps accepting
requests, and tokenizing and detokenizing stay on the event loop (a fast tokenizer is not safe to
share between threads). Decoding is greedy; a request stops at its `max_tokens` or at the end of
sequence token. A client that goes away mid-stream has its row stopped at the next decode step.

Starlette + uvicorn are the `serve` extra: `pip install 'peftcli[serve]'`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from peftcli.core.errors import BadInput
from peftcli.inference.decode import eos_ids, greedy_ids
from peftcli.inference.multi import MultiAdapter, MultiAdapterError


class ServeUnavailable(BadInput, RuntimeError):
    pass


def require_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeUnavailable(
            f"peftcli serve needs Starlette and uvicorn ({e.name} is missing); install them with "
            "pip install 'peftcli[serve]'") from None


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI's error object with a 4xx status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    adapter: str
    ids: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False

    def send(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


class Engine:
    """The worker thread: collects concurrent requests into mixed batches and decodes them."""

    def __init__(self, multi: MultiAdapter, *, max_batch: int = 64, window_s: float = 0.005) -> None:
        self.multi = multi
        self.max_batch = max_batch
        self.window_s = window_s
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="peftcli-serve-engine", daemon=True)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0}
        tok = multi.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        while True:  # requests still queued are told the server is going away
            try:
                self.inbox.get_nowait().send("error", "the server is shutting down")
            except queue.Empty:
                break

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down")
        self.inbox.put(job)

    def _collect(self) -> list[Job]:
        try:
            first = self.inbox.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return [j for j in jobs if not j.cancelled]

    def _run(self) -> None:
        while not self.stopping.is_set():
            jobs = self._collect()
            if not jobs:
                continue
            self.stats["batches"] += 1
            self.stats["rows"] += len(jobs)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
            try:
                self._decode(jobs)
            except Exception as e:  # noqa: BLE001  (one failing batch must not stop the server)
                for j in jobs:
                    if not j.finished:
                        j.finished = True
                        j.send("error", f"generation failed: {type(e).__name__}: {e}")

    def _decode(self, jobs: list[Job]) -> None:
        multi = self.multi
        names = [j.adapter for j in jobs]
        for model, pos, _ in multi.groups(names):
            group = [jobs[i] for i in pos]
            eos = eos_ids(model, multi.tokenizer)

            def on_step(tokens: list[int], group: list[Job] = group, eos: set[int] = eos) -> None:
                for job, t in zip(group, tokens, strict=True):
                    if job.finished:
                        continue
                    if t in eos:
                        job.finished = True
                        job.send("done", "stop")
                        continue
                    job.tokens.append(t)
                    job.send("token", t)
                    if len(job.tokens) >= job.max_tokens:
                        job.finished = True
                        job.send("done", "length")

            with multi.routed(model, [j.adapter for j in group]):
                greedy_ids(model, [j.ids for j in group], [j.max_tokens for j in group], pad_id=self.pad_id,
                           eos=eos, device=multi.device, on_step=on_step,
                           stop_row=lambda i, group=group: group[i].finished or group[i].cancelled
                           or self.stopping.is_set())
            for j in group:  # rows the batch left without an event (stopped before their first step)
                if not j.finished:
                    j.finished = True
                    j.send("done", "length")


# ------------------------------------------------------------------------------------- the HTTP API


def context_length(model: Any) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def build_app(multi: MultiAdapter, *, max_batch: int = 64, window_ms: float = 5.0):
    """The Starlette application serving `multi` (started and stopped with its lifespan)."""
    require_stack()
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from peftcli.data.chat import format_prompt

    engine = Engine(multi, max_batch=max_batch, window_s=window_ms / 1000)
    tok = multi.tokenizer
    ctx = context_length(multi.model)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def common(body: dict[str, Any]) -> tuple[str, int, bool]:
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "'model' is required: the base model or an adapter name (GET /v1/models lists them)",
                           param="model")
        try:
            multi.adapter(name)
        except MultiAdapterError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = 16 if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"'max_tokens' must be a positive integer, not {max_tokens!r}", param="max_tokens")
        if body.get("n", 1) != 1:
            raise ApiError(400, "'n' must be 1: decoding is greedy, every choice would be the same", param="n")
        if body.get("stop") is not None:
            raise ApiError(400, "'stop' sequences are not supported; generation stops at max_tokens or the end of "
                                "sequence token", param="stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        return name, max_tokens, stream

    def check_length(ids: list[int], max_tokens: int, param: str) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if ctx is not None and len(ids) + max_tokens > ctx:
            raise ApiError(
                400, f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}: together more than the "
                     f"model's context of {ctx} tokens; shorten the prompt or lower max_tokens",
                param=param, code="context_length_exceeded")

    async def run_job(name: str, ids: list[int], max_tokens: int, stream: bool, chat: bool):
        job = Job(adapter=name, ids=ids, max_tokens=max_tokens, loop=asyncio.get_running_loop())
        engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": len(job.tokens),
                    "total_tokens": len(ids) + len(job.tokens)}

        if not stream:
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "error":
                        return JSONResponse({"error": {"message": value, "type": "server_error", "param": None,
                                                       "code": None}}, status_code=503)
                    if kind == "done":
                        break
            finally:
                job.cancelled = True
            text = tok.decode(job.tokens, skip_special_tokens=True)
            choice: dict[str, Any] = {"index": 0, "finish_reason": value, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": name,
                                 "choices": [choice], "usage": usage()})

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": delta} if delta is not None else {})
                c: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
                o = "chat.completion.chunk"
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
                o = "text_completion"
            return "data: " + json.dumps({"id": rid, "object": o, "created": int(time.time()), "model": name,
                                          "choices": [c]}) + "\n\n"

        async def events():
            sent = ""
            try:
                if chat:
                    yield chunk(None, None, role=True)
                while True:
                    kind, value = await job.events.get()
                    if kind == "error":
                        yield "data: " + json.dumps({"error": {"message": value, "type": "server_error"}}) + "\n\n"
                        return
                    if kind == "token":
                        text = tok.decode(job.tokens, skip_special_tokens=True)
                        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                            continue
                        if len(text) > len(sent):
                            yield chunk(text[len(sent):], None)
                            sent = text
                        continue
                    text = tok.decode(job.tokens, skip_special_tokens=True)
                    if len(text) > len(sent):
                        yield chunk(text[len(sent):], None)
                    yield chunk(None, value)
                    yield "data: [DONE]\n\n"
                    return
            finally:  # the client went away (the task is cancelled) or the stream ended
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request):
        try:
            body = await body_of(request)
            name, max_tokens, stream = common(body)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be one string (send several prompts as several requests: "
                                    "concurrent requests are batched together)", param="prompt")
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            check_length(ids, max_tokens, "prompt")
            return await run_job(name, ids, max_tokens, stream, chat=False)
        except ApiError as e:
            return error(e)

    async def chat_completions(request: Request):
        try:
            body = await body_of(request)
            name, max_tokens, stream = common(body)
            msgs = body.get("messages")
            if (not isinstance(msgs, list) or not msgs
                    or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                               for m in msgs)):
                raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": \"text\"}",
                               param="messages")
            use = multi.recipe_of(name).data.chat_template and getattr(tok, "chat_template", None)
            if use:
                text = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                               tokenize=False, add_generation_prompt=True)
            else:  # as the run's training data was formatted without a template
                text = format_prompt(tok, "\n".join(m["content"] for m in msgs), False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            check_length(ids, max_tokens, "messages")
            return await run_job(name, ids, max_tokens, stream, chat=True)
        except ApiError as e:
            return error(e)

    async def models(request: Request):
        data = [{"id": multi.base_name, "object": "model", "created": created, "owned_by": "peftcli"}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "peftcli", "parent": multi.base_name,
                  "method": a.recipe.method_name} for n, a in multi.adapters.items()]
        return JSONResponse({"object": "list", "data": data})

    async def stats(request: Request):
        return JSONResponse(dict(engine.stats))

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ], lifespan=lifespan)


def serve(multi: MultiAdapter, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          window_ms: float = 5.0, on_ready: Any = None) -> None:
    """Run the server until Ctrl-C (SIGINT) or SIGTERM; uvicorn finishes open responses first."""
    require_stack()
    import uvicorn

    app = build_app(multi, max_batch=max_batch, window_ms=window_ms)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    if on_ready is not None:
        orig = server.startup

        async def startup(sockets: Any = None) -> None:
            await orig(sockets=sockets)
            if server.started:
                on_ready()

        server.startup = startup  # type: ignore[method-assign]
    server.run()


__all__ = ["ApiError", "Engine", "ServeUnavailable", "build_app", "require_stack", "serve"]
