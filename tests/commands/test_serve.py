"""`peftcli serve`: a real server process on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import warm_cli
from helpers.adapter_runs import make_run

pytestmark = pytest.mark.slow  # a real server process per module: the fast lane has test_serve_api and test_serve_app

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`peftcli serve` in a process of its own (forked warm: tests/helpers/warm_cli.py); always
    stopped (SIGINT, then kill) by the fixture."""

    def __init__(self, runs: list[str], log: Path, timeout_s: float = 120, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.runs = runs
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               **(env or {})}
        self.log = log
        self.headers = {"Content-Type": "application/json"}
        if "PEFTCLI_API_KEY" in env:
            self.headers["Authorization"] = f"Bearer {env['PEFTCLI_API_KEY']}"
        self.proc = warm_cli.start(["serve", *runs, "--port", str(self.port), "--device", "cpu",
                                    "--host", "127.0.0.1", *extra], log, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {log.read_text()}")
            try:
                if self.get("/v1/models")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise AssertionError(f"server not up in {timeout_s} s: {log.read_text()}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str = "unused"):
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request(method, path, body=body, headers=self.headers if headers is None else headers)
            r = c.getresponse()
            assert r.getheader("Content-Type", "").startswith("application/json"), r.getheader("Content-Type")
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def stop(self) -> int:
        """Ctrl-C, as a user would; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tiny_runs(tiny_gpt2_dir, tmp_path_factory) -> list[str]:
    """Four adapter runs on the tiny GPT-2. Tests that start a server of their own take these, not
    `tiny_server`: on a worker where no test asked for it, that would start a server for nothing."""
    root = tmp_path_factory.mktemp("serve-runs")
    specs = {"a": {"name": "lora", "r": 2, "targets": ["q", "v"]},
             "b": {"name": "lora", "r": 8, "targets": ["all-linear"]},
             "c": {"name": "lora", "r": 4, "targets": ["ffn_in"], "rslora": True},
             "h": {"name": "houlsby", "reduction_factor": 8}}
    return [str(make_run(root, n, tiny_gpt2_dir, "causal_lm", m, seed=i + 1)) for i, (n, m) in enumerate(specs.items())]


@pytest.fixture(scope="module")
def tiny_server(tiny_runs, tmp_path_factory):
    server = Server(tiny_runs, tmp_path_factory.mktemp("serve") / "server.log")
    yield server
    code = server.stop()
    assert code == 0, f"Ctrl-C exit code {code}: {server.log.read_text()}"
    assert "Traceback" not in server.log.read_text()


def concurrent_equals_single(server: Server, names: list[str], prompts: list[str], max_tokens: int,
                             clients: int = 32) -> None:
    client = server.client()
    jobs = [(names[i % len(names)], prompts[i % len(prompts)] + f" {i}", 2 + i % max_tokens) for i in range(clients)]

    def ask(job):
        name, prompt, n = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=n)

    before = server.get("/stats")[1]
    with cf.ThreadPoolExecutor(clients) as pool:
        together = list(pool.map(ask, jobs))
    after = server.get("/stats")[1]
    # The requests shared decode steps: more rows in one step than there are adapters.
    assert after["requests"] - before["requests"] == clients
    assert after["largest_batch"] > len(names)
    for job, res in zip(jobs, together, strict=True):
        alone = ask(job)
        assert res.choices[0].text == alone.choices[0].text, job
        assert res.model == job[0] and res.usage.completion_tokens <= job[2]


def test_models_lists_base_and_adapters(tiny_server, tiny_gpt2_dir):
    # The base model loaded from a folder is shown by the folder's name, never its path.
    ids = [m.id for m in tiny_server.client().models.list().data]
    assert ids == [tiny_gpt2_dir.name, "a", "b", "c", "h"]
    assert str(tiny_gpt2_dir) not in json.dumps(tiny_server.get("/v1/models")[1])


def test_32_concurrent_clients_4_adapters_equal_single(tiny_server):
    concurrent_equals_single(tiny_server, ["a", "b", "c", "h"], ["the film was", "hello", "a much longer prompt"], 5)


def test_stream_and_chat(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model="b", prompt="the film was", max_tokens=6).choices[0].text
    parts = list(client.completions.create(model="b", prompt="the film was", max_tokens=6, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full
    assert parts[-1].choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(model="h", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    deltas = client.chat.completions.create(model="h", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            stream=True)
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    # Without a chat template the run's training format applies: the prompt plus a newline.
    plain = client.completions.create(model="h", prompt="hi\n", max_tokens=4).choices[0].text
    assert plain == chat.choices[0].message.content


def test_bad_requests_get_4xx_and_server_keeps_serving(tiny_server):
    client = tiny_server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "no model named 'nope'" in str(e.value)
    status, body = tiny_server.request("POST", "/v1/completions", b'{"model": "a", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="word " * 200, max_tokens=4)
    assert "context of 128 tokens" in str(e.value)
    # A client reading one event of a long stream, then hanging up.
    c = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps(
        {"model": "a", "prompt": "go on", "max_tokens": 100, "stream": True}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.read(6) == b"data: "
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    ok = client.completions.create(model="c", prompt="still there?", max_tokens=3)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert tiny_server.proc.poll() is None


@pytest.mark.slow
def test_smollm2_server(tmp_path):
    from peftcli.models.loading import resolve_source

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if not resolve_source(name).embedded:
        pytest.skip("the embedded SmolLM2 is not installed")
    specs = {"a": {"name": "lora", "r": 4, "targets": ["q", "v"]},
             "b": {"name": "lora", "r": 8, "targets": ["o"], "layers": "0-10"},
             "c": {"name": "lora", "r": 2, "targets": ["ffn_out"], "rslora": True},
             "d": {"name": "lora", "r": 16, "alpha": 8.0, "targets": ["k"]}}
    runs = [str(make_run(tmp_path, n, name, "causal_lm", m, seed=i + 1, scale=0.02)) for i, (n, m) in enumerate(specs.items())]
    server = Server(runs, tmp_path / "server.log", timeout_s=300)
    try:
        # 16 clients, not the tiny model's 32: each answer is asked again alone, on a 135M model
        concurrent_equals_single(server, list(specs), ["What is the capital of France?", "Say hi."], 4, clients=16)
        chat = server.client().chat.completions.create(
            model="a", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=5)
        assert chat.choices[0].message.content and chat.usage.prompt_tokens > 10  # the template was applied
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()


# ------------------------------------------------------------------------- exposure and fairness


def is_openai_error(body: dict) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                                                        "code"}


def test_long_prompts_and_long_generations_together(tiny_server):
    """Issue 28: four 118-word prompts (max_tokens 8) and four 'hi' (max_tokens 120) at once ran
    past GPT-2's 128 positions when padded into one batch; each fits alone, so all succeed."""
    client = tiny_server.client()
    jobs = [("word " * 118, 8)] * 4 + [("hi", 120)] * 4
    with cf.ThreadPoolExecutor(8) as pool:
        res = list(pool.map(lambda j: client.completions.create(model="a", prompt=j[0], max_tokens=j[1]), jobs))
    for (_, n), r in zip(jobs, res, strict=True):
        assert r.usage.prompt_tokens + n <= 128 and r.usage.completion_tokens <= n


def test_errors_are_openai_json(tiny_server, tiny_gpt2_dir):
    s = tiny_server
    cases = [
        ("GET", "/nope", None, s.headers, 404), ("GET", "/v1/completions", None, s.headers, 405),
        ("POST", "/v1/models", b"{}", s.headers, 405),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x"}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x"}', {}, 415),
        ("POST", "/v1/completions", b"[" * 100_000, s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "\\ud800"}', s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x", "temperature": "hot"}', s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x", "logprobs": 1}', s.headers, 400),
        ("POST", "/v1/chat/completions", b'{"model": "a", "messages": [{"role": "user", "content": "x"}], '
                                         b'"logprobs": true}', s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x", "n": 3}', s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x", "top_p": 0.5}', s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": 100000}', s.headers, 400),
        ("POST", "/v1/completions", b'{"model": "nope", "prompt": "x"}', s.headers, 404),
        ("POST", "/v1/completions", b"x" * (1 << 20 + 1), s.headers, 413),
        ("GET", "/v1/models", None, {**s.headers, "Host": "rebind.example:8000"}, 421),
    ]
    for method, path, body, headers, want in cases:
        status, got = s.request(method, path, body, headers)
        assert status == want and is_openai_error(got), (method, path, status, got)
        assert str(tiny_gpt2_dir) not in json.dumps(got), got
    assert s.request("GET", "/v1/models", None, {"Host": f"localhost:{s.port}"})[0] == 200
    assert s.request("GET", "/health", None, {"Host": "[::1]"}) == (200, {"status": "ok"})


def test_seeded_sampling_reproducible(tiny_server):
    client = tiny_server.client()

    def ask(seed: int) -> str:
        return client.completions.create(model="b", prompt="the film was", max_tokens=20, temperature=1.5,
                                         top_p=0.95, seed=seed).choices[0].text

    first = ask(11)
    assert ask(11) == first
    assert any(ask(seed) != first for seed in (12, 13, 14))  # a random model at temperature 1.5
    greedy = client.completions.create(model="b", prompt="the film was", max_tokens=20, temperature=0)
    assert greedy.choices[0].text == client.completions.create(model="b", prompt="the film was",
                                                               max_tokens=20).choices[0].text


def test_disconnected_non_stream_request_is_cancelled(tiny_server):
    before = tiny_server.get("/stats")[1]["cancelled"]
    c = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps({"model": "a", "prompt": "go", "max_tokens": 126}),
              headers=tiny_server.headers)
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.monotonic() + 30
    while tiny_server.get("/stats")[1]["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny_server.get("/stats")[1]["cancelled"] == before + 1


def fuzz_cases(rng, valid: dict) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """Malformed requests, each invalid by construction: (method, path, body, headers)."""
    import random as _random

    assert isinstance(rng, _random.Random)
    json_ct = {"Content-Type": "application/json"}
    wrong = {  # per field, values OpenAI's API refuses there
        "model": [None, True, -1, 2.5, "", [], {}, ["a"], "nope"],
        "prompt": [None, True, -1, 2.5, "", [], {}, [1, "a"], ["a", "b"], {"text": "x"}],
        "max_tokens": [True, -1, 0, 2.5, "x", [], {}, 1e308, 10**30],
        "temperature": [True, -1, 2.5, "x", "hot", [], {}, 1e308, -1e308],
        "top_p": [True, -1, 0, 2.5, "x", [], {}, 0.5],
        "seed": [True, 2.5, "x", [], {}, 2**64, -(2**63) - 1],
        "stream": [1, 0, "x", [], {}, "true"],
        "n": [0, 2, True, "x", 2.5, []],
    }
    wrong_values = [v for vs in wrong.values() for v in vs]
    out = []
    for _ in range(160):
        kind = rng.randrange(10)
        body = dict(valid)
        if kind == 0:  # random bytes that start with a byte no JSON text starts with
            raw = b"\x00" + rng.randbytes(rng.randrange(0, 3000))
        elif kind == 1:  # valid JSON cut short
            raw = json.dumps(body).encode()[: rng.randrange(1, len(json.dumps(body)) - 1)]
        elif kind == 2:  # a field of the wrong type or range
            key = rng.choice(list(wrong))
            body[key] = rng.choice(wrong[key])
            raw = json.dumps(body).encode()
        elif kind == 3:  # a key OpenAI's API does not have
            body["".join(rng.choices("abcdefghij_", k=8))] = rng.choice(wrong_values)
            raw = json.dumps(body).encode()
        elif kind == 4:  # nested to depth 10..100000
            depth = 10 ** rng.randrange(1, 6)
            raw = rng.choice([b"[", b'{"a":']) * depth
        elif kind == 5:  # lone surrogates
            raw = json.dumps({**body, "prompt": "ab\ud800cd"}).encode("utf-8", "surrogatepass").replace(
                b"\xed\xa0\x80", b"\\ud800")
        elif kind == 6:  # another encoding
            raw = json.dumps({**body, "prompt": "caf\u00e9 \u00fcber"}, ensure_ascii=False).encode(
                rng.choice(["utf-16", "latin-1", "utf-32"]))
        elif kind == 7:  # not JSON as the content type
            raw = json.dumps(body).encode()
            out.append(("POST", "/v1/completions", raw, {"Content-Type": rng.choice(
                ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=latin-1"])}))
            continue
        elif kind == 8:  # over the body limit
            raw = json.dumps({**body, "prompt": "x" * ((1 << 20) + rng.randrange(1, 1000))}).encode()
        else:  # wrong paths and methods
            out.append((rng.choice(["GET", "PUT", "DELETE", "PATCH"]), rng.choice(
                ["/v1/completions", "/v1/chat/completions", "/v1/../etc/passwd", "/%00", "/v1/models/x", "/admin"]),
                b"{}", json_ct))
            continue
        out.append(("POST", rng.choice(["/v1/completions", "/v1/chat/completions"]) if kind != 2 else
                    "/v1/completions", raw, json_ct))
    return out


def test_request_fuzzer(tiny_server):
    """Every malformed request gets a 4xx OpenAI-shaped JSON error; the server serves on."""
    import random

    rng = random.Random(28)
    valid = {"model": "a", "prompt": "hello", "max_tokens": 2}
    deadline = time.monotonic() + 120
    statuses = set()
    for method, path, raw, headers in fuzz_cases(rng, valid):
        assert time.monotonic() < deadline, "the fuzzer ran out of time"
        status, body = tiny_server.request(method, path, raw, headers)
        assert 400 <= status < 500 and is_openai_error(body), (method, path, raw[:80], headers, status, body)
        statuses.add(status)
    assert {400, 404, 405, 413, 415} <= statuses
    ok = tiny_server.client().completions.create(**valid)
    assert ok.choices[0].finish_reason in ("length", "stop") and tiny_server.proc.poll() is None


@pytest.fixture(scope="module")
def keyed_server(tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-keyed")
    run = tiny_runs[0]
    server = Server([run], root / "server.log", env={"PEFTCLI_API_KEY": "s3cret"},
                    extra=("--max-body-bytes", "4096", "--max-tokens", "20"))
    yield server
    assert server.stop() == 0, server.log.read_text()


def test_api_key(keyed_server):
    s = keyed_server
    body = json.dumps({"model": "a", "prompt": "hi", "max_tokens": 2}).encode()
    for auth in (None, "Bearer wrong", "s3cret", "Basic s3cret"):
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/nope"), ("GET", "/stats")):
            status, got = s.request(method, path, body if method == "POST" else None, headers)
            assert status == 401 and got["error"]["code"] == "invalid_api_key", (auth, path, got)
    assert s.request("GET", "/health", None, {}) == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    assert s.client("s3cret").completions.create(model="a", prompt="hi", max_tokens=2).choices
    status, got = s.request("POST", "/v1/completions", json.dumps({"model": "a", "prompt": "x" * 5000}).encode())
    assert status == 413 and "4096" in got["error"]["message"]
    status, got = s.request("POST", "/v1/completions", json.dumps({"model": "a", "prompt": "x",
                                                                   "max_tokens": 21}).encode())
    assert status == 400 and "--max-tokens" in got["error"]["message"]
    chat = s.client("s3cret").chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
    assert chat.usage.completion_tokens <= 20  # the chat default is the cap


def test_port_in_use_and_exposed_host_warning(tiny_runs):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        env.pop("PEFTCLI_API_KEY", None)
        # 0.0.0.0 on a port held on 127.0.0.1: warned, then refused before anything listens.
        res = subprocess.run([sys.executable, "-m", "peftcli.cli", "serve", tiny_runs[0], "--port", str(port),
                              "--host", "0.0.0.0", "--device", "cpu"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "without --api-key" in lines[0] and "in use" in lines[-1] and "Errno" not in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("flag,value,words", [
    ("--batch-window-ms", "inf", "Invalid value for '--batch-window-ms'"),
    ("--request-timeout", "inf", "Invalid value for '--request-timeout'"),
    ("--request-timeout", "nan", "Invalid value for '--request-timeout'"),
])
def test_time_flags_out_of_range_are_refused_before_loading(flag, value, words):
    """inf killed the engine thread at the first request (time.sleep overflows) or failed after
    the model loaded with exit 1."""
    from typer.testing import CliRunner

    from peftcli.cli import app

    res = CliRunner().invoke(app, ["serve", "no/such/run", flag, value])
    assert res.exit_code == 2 and words in res.output and "no/such/run" not in res.output, res.output


def test_a_second_signal_ends_requests_in_flight_with_503(tiny_runs, tmp_path):
    """uvicorn's second Ctrl-C cancelled them mid-response: a plain-text 500, tracebacks in the
    log, and exit 0 as if the server had drained."""
    server = Server([tiny_runs[0]], tmp_path / "server.log", env={"PEFTCLI_SLOW_AT": "decode:0.05"})
    try:
        body = json.dumps({"model": "a", "prompt": "go on", "max_tokens": 100}).encode()
        with cf.ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(server.request, "POST", "/v1/completions", body) for _ in range(2)]
            deadline = time.monotonic() + 30
            while server.get("/stats")[1]["active"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            server.proc.send_signal(signal.SIGINT)
            answers = [f.result(timeout=120) for f in futs]
        code = server.proc.wait(timeout=60)
    finally:
        server.kill()
    log = server.log.read_text()
    assert code == 130 and "a second signal ended the requests in flight" in log and "Traceback" not in log, log
    assert [status for status, _ in answers] == [503, 503], answers  # 100 steps of 0.05 s: still running
    assert all(got["error"]["message"] == "the server is shutting down" for _, got in answers), answers


def test_sigterm_while_loading_says_so_and_exits_143(monkeypatch):
    """SIGTERM before the server listened killed it without a word; Ctrl-C spoke of checkpoints."""
    import signal
    import time

    from typer.testing import CliRunner

    import peftcli.inference.multi as multi_mod
    from peftcli.cli import app

    def load_runs(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the load")

    monkeypatch.setattr(multi_mod, "load_runs", load_runs)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    res = CliRunner().invoke(app, ["serve", "any-run", "--port", str(port)])
    assert res.exit_code == 143 and "interrupted before the server started" in res.output, res.output
    assert "checkpoints" not in res.output


def test_sigterm_drains_streams(tiny_runs, tmp_path):
    server = Server([tiny_runs[0]], tmp_path / "server.log")
    try:
        client = server.client()

        def stream(i: int) -> tuple[str, str | None]:
            parts = list(client.completions.create(model="a", prompt=f"go on {i}", max_tokens=100, stream=True))
            return "".join(p.choices[0].text for p in parts), parts[-1].choices[0].finish_reason

        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(stream, i) for i in range(4)]
            deadline = time.monotonic() + 30
            while server.get("/stats")[1]["active"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futs]
        assert all(reason in ("length", "stop") for _, reason in results)
        code = server.proc.wait(timeout=60)
    finally:
        server.kill()
    log = server.log.read_text()
    assert code == 0 and "server stopped (SIGTERM)" in log and "Traceback" not in log, log
