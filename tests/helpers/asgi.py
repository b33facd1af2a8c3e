"""`peftcli serve`'s ASGI application driven in-process, with no socket and no HTTP client library:
one request at a time through the app's own interface."""

from __future__ import annotations

import asyncio

from peftcli.commands.serve import ServeOptions, build_app
from peftcli.inference.multi import MultiAdapter


async def call(app, method: str, path: str, body: bytes = b"", *, hang_up: bool = False, stall: bool = False,
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP request through the ASGI app; `hang_up`: the client is gone once the body is sent;
    `stall`: the client sends `body` as the first part of a longer one and then nothing more."""
    headers = {"host": "localhost:8000", "content-type": "application/json", **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    gone = asyncio.Event()
    if hang_up:
        gone.set()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": stall}
        if stall:
            await asyncio.Event().wait()  # the rest never comes
        await gone.wait()
        return {"type": "http.disconnect"}

    out: dict = {"status": None, "body": b""}

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    await asyncio.wait_for(app(scope, receive, send), timeout=120)
    gone.set()
    return out["status"], out["body"]


def run_with(multi: MultiAdapter, opts: ServeOptions, work):
    """Start the engine, run `work(app, serve_state)` on an event loop, stop the engine."""
    app = build_app(multi, opts)
    state = app.app.state.serve
    state.engine.start()
    try:
        return asyncio.run(work(app, state))
    finally:
        state.engine.stop()


