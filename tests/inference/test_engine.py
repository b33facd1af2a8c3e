"""The continuous-batching engine: rows join and leave between decode steps, each row within its
own context, with the same tokens as decoding it alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from peftcli.inference.decode import eos_ids, greedy_ids
from peftcli.inference.engine import Engine, GenRequest, Sampling, pick_token
from peftcli.inference.multi import MultiAdapter, load_runs


def make_run(root: Path, name: str, model_dir: Path, method: dict, seed: int) -> Path:
    """A run folder as `peftcli train` leaves it, with random adapter weights."""
    from peftcli.config.recipe import load_recipe, recipe_yaml
    from peftcli.methods.attach import pick_device
    from peftcli.runs.checkpoint import save_adapter
    from peftcli.runs.load import build

    run = root / name
    src = root / f"{name}.yaml"
    src.write_text(yaml.safe_dump({"model": {"name": str(model_dir), "task": "causal_lm"},
                                   "data": {"source": "unused.csv"}, "method": method, "output": {"dir": str(run)}}))
    recipe = load_recipe(src)
    built = build(recipe, pick_device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(run / "adapter", built.model, built.spec, built.arch, recipe.method,
                 {"base_model": str(model_dir), "task": "causal_lm", "label_names": None})
    (run / "recipe.yaml").write_text(recipe_yaml(recipe))
    return run


@pytest.fixture(scope="module")
def multi(tiny_gpt2_dir, tmp_path_factory) -> MultiAdapter:
    root = tmp_path_factory.mktemp("engine-runs")
    runs = [make_run(root, "lora", tiny_gpt2_dir, {"name": "lora", "r": 4, "targets": ["q", "v"]}, 1),
            make_run(root, "prompt", tiny_gpt2_dir, {"name": "prompt", "num_virtual_tokens": 4}, 2),
            make_run(root, "houlsby", tiny_gpt2_dir, {"name": "houlsby", "reduction_factor": 8}, 3)]
    return load_runs([str(r) for r in runs], torch.device("cpu"))


class Collector:
    """Events of many requests; `wait` until every one has ended."""

    def __init__(self, n: int) -> None:
        self.ends: dict[int, tuple[str, object]] = {}
        self.order: list[int] = []
        self.all_done = threading.Event()
        self.n = n

    def sink(self, i: int):
        def on_event(kind: str, value: object) -> None:
            if kind in ("done", "error"):
                self.ends[i] = (kind, value)
                self.order.append(i)
                if len(self.ends) == self.n:
                    self.all_done.set()
        return on_event

    def wait(self, timeout: float = 300) -> None:
        assert self.all_done.wait(timeout), f"only {len(self.ends)} of {self.n} requests ended"


def alone(multi: MultiAdapter, name: str, ids: list[int], max_tokens: int) -> list[int]:
    (model, _, _), = multi.groups([name])
    with multi.routed(model, [name]):
        return greedy_ids(model, [ids], [max_tokens], pad_id=0, eos=eos_ids(model, multi.tokenizer),
                          device=multi.device)[0]


def run_all(multi: MultiAdapter, jobs: list[tuple[str, list[int], int]], **engine_kw) -> list[GenRequest]:
    engine = Engine(multi, **engine_kw)
    engine.start()
    got = Collector(len(jobs))
    reqs = [GenRequest(adapter=n, ids=ids, max_tokens=m, on_event=got.sink(i)) for i, (n, ids, m) in enumerate(jobs)]
    try:
        for r in reqs:
            engine.submit(r)
        got.wait()
    finally:
        engine.stop()
    assert all(kind == "done" for kind, _ in got.ends.values()), got.ends
    return reqs


@pytest.mark.slow
def test_long_prompts_and_long_generations_at_once_all_fit(multi):
    """The bug: left padding to the longest prompt plus the largest max_tokens ran past GPT-2's
    128 positions. Each request here fits alone; together they must all succeed, as alone."""
    g = torch.Generator().manual_seed(0)
    names = [multi.base_name, "lora", "prompt", "houlsby"]
    jobs = []
    for i in range(16):
        long = i % 2 == 0
        n, m = (100, 8 + i) if long else (2 + i % 3, 120)
        if names[i % 4] == "prompt":
            n = min(n, 120 - m)  # prompt tuning's 4 virtual tokens take no positions of the prompt
        jobs.append((names[i % 4], torch.randint(1000, 20000, (n,), generator=g).tolist(), m))
    assert max(len(ids) for _, ids, _ in jobs) + max(m for *_, m in jobs) > 128
    reqs = run_all(multi, jobs, max_batch=16)
    for job, r in zip(jobs, reqs, strict=True):
        assert r.tokens == run_all(multi, [job])[0].tokens, job[0]
    # The engine alone decodes as `generate` does (HF's generate is slow here: only the short ones).
    for (name, ids, m), r in list(zip(jobs, reqs, strict=True))[:8:2]:
        assert r.tokens == alone(multi, name, ids, m), name


def test_short_request_does_not_wait_for_long_streams(multi):
    g = torch.Generator().manual_seed(1)
    engine = Engine(multi, max_batch=16)
    started = threading.Semaphore(0)
    running_when_short_ended: list[int] = []

    def long_sink(kind: str, value: object) -> None:
        if kind == "token":
            started.release()

    longs = [GenRequest(adapter="lora", ids=torch.randint(1000, 20000, (5,), generator=g).tolist(), max_tokens=120,
                        on_event=long_sink) for _ in range(8)]

    def short_sink(kind: str, value: object) -> None:
        if kind in ("done", "error"):
            running_when_short_ended.append(sum(not r.finished for r in longs))

    engine.start()
    try:
        for r in longs:
            engine.submit(r)
        for _ in range(8):  # every long request is decoding
            assert started.acquire(timeout=60)
        engine.submit(GenRequest(adapter="houlsby", ids=[2000, 3000], max_tokens=2, on_event=short_sink))
        deadline = time.monotonic() + 60
        while not running_when_short_ended and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        engine.stop()
    # The 2-token request joined between steps and ended while the long ones still ran.
    assert running_when_short_ended and running_when_short_ended[0] > 0


def test_cancelled_row_leaves_the_batch(multi):
    engine = Engine(multi, max_batch=4)
    engine.start()
    ends: list[tuple[str, object]] = []
    first = threading.Event()

    def on_event(kind: str, value: object) -> None:
        first.set()
        if kind in ("done", "error"):
            ends.append((kind, value))

    req = GenRequest(adapter="lora", ids=[1000, 2000, 3000], max_tokens=120, on_event=on_event)
    try:
        engine.submit(req)
        assert first.wait(60)
        req.cancel()
        deadline = time.monotonic() + 30
        while engine.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active() == 0 and len(req.tokens) < 120
    finally:
        engine.stop()
    assert ends in ([("done", "cancelled")], [("done", "stop")])


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(multi):
    ids = [1000, 2000, 3000]
    s = Sampling(temperature=1.5, top_p=0.95, seed=7)
    a, b = (Engine(multi), Engine(multi))
    one = [GenRequest(adapter="prompt", ids=ids, max_tokens=30, on_event=lambda *a: None, sampling=s)
           for _ in range(2)]
    for engine, req in zip((a, b), one, strict=True):
        engine.start()
        engine.submit(req)
        deadline = time.monotonic() + 60
        while not req.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.stop()
    assert one[0].tokens == one[1].tokens and one[0].finished
    jobs = [(n, ids, 30) for n in ("lora", "houlsby")]
    for _ in range(2):
        engine = Engine(multi)
        engine.start()
        got = Collector(4)
        reqs = [GenRequest(adapter=n, ids=i, max_tokens=m, on_event=got.sink(k), sampling=s)
                for k, (n, i, m) in enumerate(jobs + jobs)]
        try:
            for r in reqs:
                engine.submit(r)
            got.wait()
        finally:
            engine.stop()
        # The same seed gives the same text in the same batch, and the same text again in the next.
        assert reqs[0].tokens == reqs[2].tokens and reqs[1].tokens == reqs[3].tokens
        if _ == 0:
            first = [r.tokens for r in reqs]
    assert [r.tokens for r in reqs] == first
    other = GenRequest(adapter="lora", ids=ids, max_tokens=30, on_event=lambda *a: None,
                       sampling=Sampling(temperature=1.5, seed=8))
    engine = Engine(multi)
    engine.start()
    try:
        engine.submit(other)
        deadline = time.monotonic() + 60
        while not other.finished and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert other.tokens != first[0]  # a random model at temperature 1.5: another seed, other tokens


def test_pick_token():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert pick_token(logits, Sampling(), g) == 1
    assert {pick_token(logits, Sampling(temperature=1.0, top_p=0.01), g) for _ in range(50)} == {1}
    seen = {pick_token(logits, Sampling(temperature=2.0), g) for _ in range(200)}
    assert seen == {0, 1, 2, 3}
    assert pick_token(logits, Sampling(temperature=1.0, top_p=0.6), torch.Generator().manual_seed(3)) in (1, 3)
    # Values inside OpenAI's ranges that under- or overflow float32 sample the top token; they
    # answered 503 "probability tensor contains either inf, nan or element < 0".
    for tiny in (1e-38, 1e-300, 5e-324):
        assert pick_token(logits, Sampling(temperature=tiny), g) == 1
        assert pick_token(logits, Sampling(temperature=1.0, top_p=tiny), g) == 1


def test_an_engine_that_fails_outside_a_step_fails_every_request_at_once(multi, monkeypatch):
    """The thread died (a batch window too long for time.sleep) and every request then waited out
    its timeout while /health said ok: now waiting requests get an error, new ones are refused, and
    `failed` says why."""
    from peftcli.inference.engine import EngineStopped

    engine = Engine(multi)
    got = Collector(1)
    engine.submit(GenRequest(adapter="lora", ids=[5, 6, 7], max_tokens=2, on_event=got.sink(0)))
    monkeypatch.setattr(engine, "_admit", lambda: (_ for _ in ()).throw(OverflowError("timestamp out of range")))
    engine.start()
    got.wait(30)
    assert got.ends[0] == ("error", "the decoding engine stopped (OverflowError: timestamp out of range)")
    assert engine.failed == "OverflowError: timestamp out of range"
    with pytest.raises(EngineStopped, match="restart the server"):
        engine.submit(GenRequest(adapter="lora", ids=[5], max_tokens=1, on_event=lambda *a: None))
