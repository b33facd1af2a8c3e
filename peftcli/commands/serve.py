"""`peftcli serve`: an OpenAI-compatible HTTP server over several runs of one base model.

Local tools that talk to OpenAI's API (its Python client, editors, chat front-ends) can use
trained adapters unchanged: `model` names the adapter (or the base model), `/v1/completions` takes
raw text, `/v1/chat/completions` applies the chat template as the run's training data did, and
`stream: true` sends server-sent events.

Decoding runs in one engine thread with continuous batching (peftcli/inference/engine.py):
requests of any mix of adapters join the running batch between decode steps and leave it when
done. Tokenizing and detokenizing run in one tokenizer thread (a fast tokenizer is not safe to
share between threads), so the event loop only moves bytes. The request schema and every
refusal live in serve_api.py; this module wires them to HTTP: the guard (Host header, API key),
the body limit, time limits, and a client that goes away cancelling its row.

Starlette + uvicorn are the `serve` extra: `pip install 'peftcli[serve]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from peftcli.commands.serve_api import (
    ApiError,
    Params,
    body_too_large,
    check_api_key,
    check_body_size,
    check_content_type,
    check_host_header,
    chunk_body,
    completion_body,
    finish_reason,
    is_loopback_bind,
    parse_common,
    parse_json,
    parse_messages,
    parse_prompt,
    public_model_ids,
    resolve_max_tokens,
    resolve_model,
    sse,
    usage,
)
from peftcli.core.errors import BadInput
from peftcli.inference.decode import context_length
from peftcli.inference.engine import Engine, EngineStopped, GenRequest
from peftcli.inference.multi import MultiAdapter

log = logging.getLogger("peftcli.serve")


class ServeUnavailable(BadInput, RuntimeError):
    pass


class ServeAddressError(BadInput, OSError):
    """The address cannot be listened on (a port in use, an address not on this machine)."""


def require_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeUnavailable(
            f"peftcli serve needs Starlette and uvicorn ({e.name} is missing); install them with "
            "pip install 'peftcli[serve]'") from None


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 64
    window_ms: float = 5.0
    max_tokens: int = 512
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20


def error_response(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


class Guard:
    """ASGI middleware run before routing: Host header on a loopback bind, then the API key.
    `/health` stays open to probes; every other path, unknown ones included, needs the key."""

    def __init__(self, app: Any, *, api_key: str | None, check_host: bool) -> None:
        self.app, self.api_key, self.check_host = app, api_key, check_host

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                if self.check_host:
                    check_host_header(headers.get("host"))
                if self.api_key and scope.get("path") != "/health":
                    check_api_key(headers.get("authorization"), self.api_key)
            except ApiError as e:
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def json_errors(handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """Refusals as OpenAI error objects; an unexpected failure as a 500 of the same shape with
    one log line (the client learns nothing of the server's insides)."""

    async def wrapped(request: Any) -> Any:
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
            return error_response(ApiError(500, "internal server error"))

    return wrapped


class _Events:
    """The engine thread's events for one request, delivered on the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def __call__(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def next(self, deadline: float) -> tuple[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return await asyncio.wait_for(self.queue.get(), timeout=left)


@dataclass
class _Job:
    """One accepted request on its way through the engine."""

    req: GenRequest
    events: _Events
    public: str
    rid: str
    chat: bool
    deadline: float


class ServeApp:
    """The handlers of one server, around one engine and one tokenizer thread."""

    def __init__(self, multi: MultiAdapter, opts: ServeOptions) -> None:
        self.multi, self.opts = multi, opts
        self.engine = Engine(multi, max_batch=opts.max_batch, window_s=opts.window_ms / 1000)
        self.tok = multi.tokenizer
        self.tok_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftcli-tokenizer")
        self.ctx = context_length(multi.model)
        self.ids = public_model_ids(multi.base_name, multi.names)
        self.created = int(time.time())

    async def on_tok_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.tok_thread, fn, *args)

    async def read_json(self, request: Any) -> dict[str, Any]:
        """The body as a JSON object, refused by type and size before it is all read."""
        check_content_type(request.headers.get("content-type"))
        limit = self.opts.max_body_bytes
        check_body_size(request.headers.get("content-length"), limit)
        parts: list[bytes] = []

        async def read() -> None:
            size = 0
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise body_too_large(limit)
                parts.append(part)

        try:  # a client that stops sending mid-body would otherwise hold its connection (and shutdown) forever
            await asyncio.wait_for(read(), timeout=self.opts.request_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within this server's limit of "
                                f"{self.opts.request_timeout_s:g} s (--request-timeout)", code="timeout") from None
        return parse_json(b"".join(parts))

    # ------------------------------------------------------------------------------ endpoints

    async def completions(self, request: Any) -> Any:
        body = await self.read_json(request)
        params = parse_common(body, chat=False)
        prompt = parse_prompt(body)
        resolve_model(params.model, self.ids, self.multi.base_name)
        ids = await self.on_tok_thread(self._encode, prompt)
        return await self._generate(request, params, ids, chat=False, param="prompt")

    async def chat_completions(self, request: Any) -> Any:
        body = await self.read_json(request)
        params = parse_common(body, chat=True)
        msgs = parse_messages(body)
        _, name = resolve_model(params.model, self.ids, self.multi.base_name)
        ids = await self.on_tok_thread(self._encode_chat, name, msgs)
        return await self._generate(request, params, ids, chat=True, param="messages")

    def _model_objects(self) -> list[dict[str, Any]]:
        base = next(k for k, v in self.ids.items() if v == self.multi.base_name)
        data = [{"id": base, "object": "model", "created": self.created, "owned_by": "peftcli"}]
        data += [{"id": n, "object": "model", "created": self.created, "owned_by": "peftcli", "parent": base,
                  "method": a.recipe.method_name} for n, a in self.multi.adapters.items()]
        return data

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": self._model_objects()})

    async def model(self, request: Any) -> Any:
        """GET /v1/models/{id}: what OpenAI's client calls `models.retrieve`."""
        from starlette.responses import JSONResponse

        public, _ = resolve_model(request.path_params["model"], self.ids, self.multi.base_name)
        return JSONResponse(next(m for m in self._model_objects() if m["id"] == public))

    async def stats(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({**self.engine.stats, "waiting": self.engine.inbox.qsize()})

    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if self.engine.failed:  # a probe restarts a server whose engine can no longer decode
            return JSONResponse({"status": "error", "engine": self.engine.failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    # ------------------------------------------------------------------------------ tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _encode_chat(self, name: str, msgs: list[dict[str, str]]) -> list[int]:
        """As the run's training data was formatted: its chat template, or the plain prompt format."""
        from peftcli.data.chat import format_prompt

        if self.multi.recipe_of(name).data.chat_template and getattr(self.tok, "chat_template", None):
            try:
                text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001  (the template refuses these messages, e.g. a role it lacks)
                raise ApiError(400, f"the chat template refuses these messages: {e}", param="messages") from None
        else:
            text = format_prompt(self.tok, "\n".join(m["content"] for m in msgs), False)
        return self._encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------ generation

    async def _generate(self, request: Any, params: Params, ids: list[int], *, chat: bool, param: str) -> Any:
        public, name = resolve_model(params.model, self.ids, self.multi.base_name)
        n = resolve_max_tokens(params, len(ids), context=self.ctx, cap=self.opts.max_tokens, chat=chat, param=param)
        events = _Events()
        req = GenRequest(adapter=name, ids=ids, max_tokens=n, on_event=events, sampling=params.sampling)
        try:
            self.engine.submit(req)
        except EngineStopped as e:
            raise ApiError(503, str(e)) from None
        job = _Job(req=req, events=events, public=public, rid=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                   chat=chat, deadline=time.monotonic() + self.opts.request_timeout_s)
        if params.stream:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._stream(job, params.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, job)

    def _timeout_error(self) -> ApiError:
        return ApiError(504, f"the request ran longer than this server's limit of {self.opts.request_timeout_s:g} s "
                             "(--request-timeout)", code="timeout")

    async def _complete(self, request: Any, job: _Job) -> Any:
        """Wait for the whole answer; a client that hangs up first cancels its row."""
        from starlette.responses import JSONResponse

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.req.cancel()

        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, value = await job.events.next(job.deadline)
                if kind == "error":
                    raise ApiError(503, value)
                if kind == "done":
                    break
        except TimeoutError:
            raise self._timeout_error() from None
        finally:
            job.req.cancel()
            watcher.cancel()
        tokens = list(job.req.tokens)
        text = await self.on_tok_thread(self._decode, tokens)
        return JSONResponse(completion_body(job.rid, job.public, text, finish_reason(value), len(job.req.ids),
                                            len(tokens), job.chat))

    async def _stream(self, job: _Job, include_usage: bool):
        """Server-sent events: text as it forms (a half multi-byte character waits for the rest,
        unless the stream ends there: then the chunks add up to the non-stream text)."""
        sent, tokens = "", []
        try:
            if job.chat:
                yield sse(chunk_body(job.rid, job.public, None, None, True, role=True))
            while True:
                try:
                    kind, value = await job.events.next(job.deadline)
                except TimeoutError:
                    yield sse(self._timeout_error().body())
                    return
                if kind == "error":
                    yield sse(ApiError(503, value).body())
                    return
                if kind == "token":
                    tokens.append(value)
                text = await self.on_tok_thread(self._decode, list(tokens))
                if len(text) > len(sent) and (kind == "done" or not text.endswith("\ufffd")):
                    yield sse(chunk_body(job.rid, job.public, text[len(sent):], None, job.chat))
                    sent = text
                if kind == "done":
                    yield sse(chunk_body(job.rid, job.public, None, finish_reason(value), job.chat))
                    if include_usage:
                        yield sse({"id": job.rid, "object": "chat.completion.chunk" if job.chat else "text_completion",
                                   "created": int(time.time()), "model": job.public, "choices": [],
                                   "usage": usage(len(job.req.ids), len(tokens))})
                    yield sse("[DONE]")
                    return
        finally:  # the client went away (the generator is closed) or the stream ended
            job.req.cancel()


def build_app(multi: MultiAdapter, opts: ServeOptions | None = None):
    """The ASGI application serving `multi` (its engine started and stopped with its lifespan)."""
    require_stack()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    opts = opts or ServeOptions()
    app = ServeApp(multi, opts)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        app.engine.start()
        try:
            yield
        finally:
            app.engine.stop()
            app.tok_thread.shutdown(wait=False, cancel_futures=True)

    async def http_error(request: Any, exc: HTTPException) -> Any:
        msg = {404: f"no route {request.url.path}; this server answers /v1/completions, /v1/chat/completions, "
                    "/v1/models and /health",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, msg))

    star = Starlette(routes=[
        Route("/v1/completions", json_errors(app.completions), methods=["POST"]),
        Route("/v1/chat/completions", json_errors(app.chat_completions), methods=["POST"]),
        Route("/v1/models", json_errors(app.models), methods=["GET"]),
        Route("/v1/models/{model:path}", json_errors(app.model), methods=["GET"]),
        Route("/stats", json_errors(app.stats), methods=["GET"]),
        Route("/health", json_errors(app.health), methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={HTTPException: http_error})
    star.state.serve = app
    return Guard(star, api_key=opts.api_key, check_host=is_loopback_bind(opts.host))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so a port in use is one line and exit 2."""
    addr = host.strip("[]")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeAddressError(f"port {port} on {host} is in use (another server?); pick another with --port") from None
        raise ServeAddressError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class Stop:
    """How the server stopped: the first signal's name (None: it stopped on its own), and whether a
    second signal ended the requests in flight early."""

    signal: str | None
    forced: bool = False


def serve(multi: MultiAdapter, opts: ServeOptions, *, on_ready: Any = None) -> Stop:
    """Run the server until SIGINT or SIGTERM; then it stops accepting and lets the requests in
    flight finish (up to --request-timeout). A second signal ends them at once, each with a 503 in
    OpenAI's shape (uvicorn's own second Ctrl-C cancels them mid-response: a plain-text 500 and
    tracebacks)."""
    require_stack()
    import signal

    import uvicorn

    sock = bind(opts.host, opts.port)
    app = build_app(multi, opts)
    config = uvicorn.Config(app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=max(int(opts.request_timeout_s) + 5, 5))
    server = uvicorn.Server(config)
    signals: list[int] = []
    orig_startup, orig_shutdown = server.startup, server.shutdown

    async def startup(sockets: Any = None) -> None:
        await orig_startup(sockets=sockets)
        if server.started and on_ready is not None:
            on_ready()

    async def shutdown(sockets: Any = None) -> None:
        await orig_shutdown(sockets=sockets)
        caught = getattr(server, "_captured_signals", [])
        signals.extend(caught)
        caught.clear()  # drained already: uvicorn need not re-raise the signal and kill the process

    forced: list[int] = []
    orig_exit = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        if not server.should_exit:
            orig_exit(sig, frame)
            return
        forced.append(sig)  # the requests in flight fail now; the shutdown under way then ends
        app.app.state.serve.engine.stop(timeout_s=1)

    server.startup = startup  # type: ignore[method-assign]
    server.shutdown = shutdown  # type: ignore[method-assign]
    server.handle_exit = handle_exit  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return Stop(signal.Signals(signals[0]).name if signals else None, forced=bool(forced))


__all__ = ["ServeAddressError", "ServeOptions", "ServeUnavailable", "Stop", "build_app", "require_stack", "serve"]
