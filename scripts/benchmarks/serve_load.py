"""Load test of `peftcli serve`: many concurrent clients, and a short request behind long streams.

Two measurements against a server started here on 127.0.0.1 (nothing else is contacted):

    crowd     N concurrent clients (default 200), each one request with a mixed prompt length
              (a few words to a few hundred) and a mixed max_tokens; every one must succeed.
    fairness  the latency of a 2-token request sent alone, then sent while 16 long streams are
              decoding; with continuous batching it waits for one decode step, not for the streams.
              The target is p99 behind the streams <= 5x p99 alone.

The server serves one LoRA run on the embedded SmolLM2-135M-Instruct (B = 0: the base model's
numbers), made in a temporary folder; `--tiny` uses a tiny random GPT-2 instead (seconds, for
checking the script), `--run DIR` an existing run. Every request has a timeout and every loop a
bound in count and time.

    python scripts/benchmarks/serve_load.py                    # SmolLM2, 200 clients, 16 streams
    python scripts/benchmarks/serve_load.py --tiny --clients 50
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree and "
         "count the stars above the quiet river").split()


def make_run(root: Path, tiny: bool) -> Path:
    """A LoRA run folder as `peftcli train` leaves it, with B = 0 (the base model's outputs)."""
    import torch
    import yaml

    from peftcli.config.recipe import load_recipe, recipe_yaml
    from peftcli.methods.attach import pick_device
    from peftcli.runs.checkpoint import save_adapter
    from peftcli.runs.load import build

    model = SMOLLM2
    if tiny:
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        from peftcli.models.loading import resolve_source

        model = str(root / "tiny-gpt2")
        tok = AutoTokenizer.from_pretrained(resolve_source("sentence-transformers/all-MiniLM-L6-v2").path)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)).save_pretrained(model)
        tok.eos_token = tok.sep_token
        tok.save_pretrained(model)
    run = root / "run"
    src = root / "recipe.yaml"
    src.write_text(yaml.safe_dump({"model": {"name": model, "task": "causal_lm"}, "data": {"source": "unused.csv"},
                                   "method": {"name": "lora", "r": 8, "targets": ["q", "v"]},
                                   "output": {"dir": str(run)}}))
    recipe = load_recipe(src)
    built = build(recipe, pick_device("cpu"))
    save_adapter(run / "adapter", built.model, built.spec, built.arch, recipe.method,
                 {"base_model": model, "task": "causal_lm", "label_names": None})
    (run / "recipe.yaml").write_text(recipe_yaml(recipe))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log: Path, max_batch: int, threads: int | None,
                 timeout_s: float = 600) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "peftcli.cli", "serve", str(run), "--port", str(port),
                             "--host", "127.0.0.1", "--device", "cpu", "--max-batch", str(max_batch),
                             "--max-tokens", "2048", "--request-timeout", "1800"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if post(port, "GET", "/health", None, 5)[0] == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start in {timeout_s:.0f} s:\n{log.read_text()}")


def post(port: int, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def crowd(port: int, clients: int, seed: int, timeout: float) -> dict:
    """`clients` requests at once, mixed prompt lengths and max_tokens; all must succeed."""
    rng = random.Random(seed)
    jobs = [(prompt(rng, rng.choice([3, 20, 80, 300])), rng.choice([1, 4, 16, 64])) for _ in range(clients)]
    barrier = threading.Barrier(clients, timeout=timeout)

    def one(job: tuple[str, int]) -> tuple[int, float, int]:
        barrier.wait()
        t = time.perf_counter()
        status, body = post(port, "POST", "/v1/completions", {"model": "run", "prompt": job[0],
                                                              "max_tokens": job[1]}, timeout)
        tokens = body.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
        return status, time.perf_counter() - t, tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in res)
    return {"clients": clients, "ok": sum(r[0] == 200 for r in res), "statuses": sorted({r[0] for r in res}),
            "wall_s": round(wall, 1), "tokens": sum(r[2] for r in res),
            "tokens_per_s": round(sum(r[2] for r in res) / wall, 1),
            "latency_p50_s": round(quantile(lat, 0.5), 2), "latency_p99_s": round(quantile(lat, 0.99), 2)}


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def short_latencies(port: int, n: int, timeout: float) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        status, body = post(port, "POST", "/v1/completions", {"model": "run", "prompt": f"Say hi {i}.",
                                                              "max_tokens": 2}, timeout)
        if status != 200:
            raise SystemExit(f"a 2-token request failed: {status} {body}")
        out.append(time.perf_counter() - t)
    return out


def long_stream(port: int, stop: threading.Event, started: threading.Semaphore, timeout: float, i: int,
                tokens: int) -> int:
    """Streams long generations one after another until `stop`; then hangs up (which cancels
    the row). Returns how many streams it opened (bounded by the deadline)."""
    deadline, opened = time.monotonic() + timeout, 0
    while not stop.is_set() and time.monotonic() < deadline:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/v1/completions", body=json.dumps(
            {"model": "run", "prompt": f"Story {i}: " + " ".join(WORDS), "max_tokens": tokens, "stream": True}),
            headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            stop.set()
            raise SystemExit(f"a long stream was refused: {r.status} {r.read()[:300]!r}")
        opened += 1
        first = True
        while not stop.is_set() and time.monotonic() < deadline:
            line = r.fp.readline()
            if first and line.startswith(b"data: "):
                started.release()
                first = False
            if not line or line.startswith(b"data: [DONE]"):
                break
        c.close()
    return opened


def fairness(port: int, streams: int, samples: int, timeout: float, tokens: int) -> dict:
    alone = short_latencies(port, samples, timeout)
    stop, started = threading.Event(), threading.Semaphore(0)
    with cf.ThreadPoolExecutor(streams) as pool:
        futs = [pool.submit(long_stream, port, stop, started, timeout, i, tokens) for i in range(streams)]
        try:
            for _ in range(streams):
                if not started.acquire(timeout=timeout) or stop.is_set():
                    raise SystemExit("the long streams did not start")
            deadline = time.monotonic() + 60
            while (active := post(port, "GET", "/stats", None, timeout)[1]["active"]) < streams \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            behind = short_latencies(port, samples, timeout)
            active_after = post(port, "GET", "/stats", None, timeout)[1]["active"]
        finally:
            stop.set()
        opened = sum(f.result() for f in futs)
    p99a, p99b = quantile(alone, 0.99), quantile(behind, 0.99)
    return {"streams": streams, "samples": samples, "rows_active_before": active, "rows_active_after": active_after,
            "streams_opened": opened, "alone_p50_s": round(quantile(alone, 0.5), 3), "alone_p99_s": round(p99a, 3),
            "behind_p50_s": round(quantile(behind, 0.5), 3), "behind_p99_s": round(p99b, 3),
            "p99_ratio": round(p99b / p99a, 2), "target_met": p99b <= 5 * p99a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random GPT-2 instead of SmolLM2-135M-Instruct")
    ap.add_argument("--run", type=Path, help="serve this run folder instead of a fresh one")
    ap.add_argument("--clients", type=int, default=200, help="0: skip the crowd")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=900, help="max_tokens of each long stream")
    ap.add_argument("--samples", type=int, default=30, help="2-token requests timed alone and behind the streams")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds any one request or phase may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS of the server (1 on a crowded machine: "
                                                          "spinning OpenMP threads there cost 20x)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftcli-serve-load-") as tmp:
        root = Path(tmp)
        run = args.run or make_run(root, args.tiny)
        port = free_port()
        proc = start_server(run, port, root / "server.log", args.max_batch, args.server_threads)
        try:
            report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "model": "tiny-gpt2" if args.tiny
                      else SMOLLM2, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                      "server_threads": args.server_threads or _threads(), "max_batch": args.max_batch, "stream_tokens": args.stream_tokens}
            if args.clients:
                report["crowd"] = crowd(port, args.clients, args.seed, args.timeout)
                print(json.dumps(report["crowd"]), flush=True)
            report["fairness"] = fairness(port, args.streams, args.samples, args.timeout, args.stream_tokens)
            report["server"] = post(port, "GET", "/stats", None, 60)[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(json.dumps(report, indent=2))
        if args.clients and report["crowd"]["ok"] != args.clients:
            raise SystemExit(f"{args.clients - report['crowd']['ok']} of {args.clients} requests failed")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
