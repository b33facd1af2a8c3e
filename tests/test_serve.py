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
from multi_helpers import make_run

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`peftcli serve` in a child process; always stopped (SIGINT, then kill) by the fixture."""

    def __init__(self, runs: list[str], log: Path, timeout_s: float = 120) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peftcli.cli", "serve", *runs, "--port", str(self.port), "--device", "cpu",
             "--host", "127.0.0.1"],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
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

    def client(self):
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request(method, path, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
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
def tiny_server(tiny_gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    specs = {"a": {"name": "lora", "r": 2, "targets": ["q", "v"]},
             "b": {"name": "lora", "r": 8, "targets": ["all-linear"]},
             "c": {"name": "lora", "r": 4, "targets": ["ffn_in"], "rslora": True},
             "h": {"name": "houlsby", "reduction_factor": 8}}
    runs = [str(make_run(root, n, tiny_gpt2_dir, "causal_lm", m, seed=i + 1)) for i, (n, m) in enumerate(specs.items())]
    server = Server(runs, root / "server.log")
    yield server
    code = server.stop()
    assert code == 0, f"Ctrl-C exit code {code}: {server.log.read_text()}"
    assert "Traceback" not in server.log.read_text()


def concurrent_equals_single(server: Server, names: list[str], prompts: list[str], max_tokens: int) -> None:
    client = server.client()
    jobs = [(names[i % len(names)], prompts[i % len(prompts)] + f" {i}", 2 + i % max_tokens) for i in range(32)]

    def ask(job):
        name, prompt, n = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=n)

    before = server.get("/stats")[1]
    with cf.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, jobs))
    after = server.get("/stats")[1]
    # The 32 requests shared decode steps: more rows in one step than there are adapters.
    assert after["requests"] - before["requests"] == 32
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
        concurrent_equals_single(server, list(specs), ["What is the capital of France?", "Say hi."], 4)
        chat = server.client().chat.completions.create(
            model="a", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=5)
        assert chat.choices[0].message.content and chat.usage.prompt_tokens > 10  # the template was applied
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()
