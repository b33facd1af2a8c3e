"""Continuous batching: requests join and leave the running batch between decode steps.

A batch formed once and decoded to its longest request makes a short request wait behind a
long one, and left-padding every prompt to the longest plus the largest `max_tokens` can run
past a model's position table although each request fits alone. Here each request is prefilled
alone (its own KV cache, positions 0..n-1), then merged into the running batch of its model: the
caches are left-padded to the widest row at that moment and every row is fed its own position
ids, so no row ever sees a position past its own prompt plus its own `max_tokens`. Rows that
finish leave at once and the padding no row needs any more is cut away, so the batch is never
wider than its longest row. Between two decode steps waiting requests are prefilled (within a
token budget) and join; a 2-token request behind many long streams waits one step, not for them.

Runs whose adapter stacks per row (LoRA) share the base model's batch; every other run decodes
in a batch of its own model (`MultiAdapter.groups`). A method that puts virtual tokens in front
of the prompt (prompt tuning) is handled by padding after them: they are measured at prefill
as the cache entries beyond the prompt.

The engine runs in one thread and knows nothing of HTTP: a request reports its tokens through
`on_event(kind, value)` from that thread ("token", id), ("done", "stop" | "length" |
"cancelled") or ("error", message); exactly one "done" or "error" ends every request.
"""

from __future__ import annotations

import inspect
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.core.faults import kill_point
from peftcli.inference.decode import eos_ids
from peftcli.inference.multi import MultiAdapter

log = logging.getLogger("peftcli.serve")

EventSink = Callable[[str, Any], None]


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy decoding; otherwise softmax(logits / temperature) within top_p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenRequest:
    adapter: str
    ids: list[int]
    max_tokens: int
    on_event: EventSink
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        """From any thread: the engine drops the row before its next step."""
        self.cancelled = True

    def finish(self, kind: str, value: Any) -> None:
        if not self.finished:
            self.finished = True
            self.on_event(kind, value)


class EngineStopped(RuntimeError):
    pass


@dataclass
class _Row:
    req: GenRequest
    rng: torch.Generator
    length: int  # real tokens in the row's cache (virtual ones not counted)
    next_id: int = 0  # the sampled token the next step feeds


@dataclass
class _Batch:
    """The rows decoding together on one model, and their left-padded KV cache."""

    model: nn.Module
    eos: set[int]
    virt: int = 0  # cache entries the model puts before the prompt itself
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None

    @property
    def width(self) -> int:
        """Cache columns that hold real tokens or padding (after the virtual ones)."""
        return self.cache.layers[0].keys.shape[-2] - self.virt if self.cache is not None else 0


def _roomy_layer() -> Any:
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A cache layer whose keys and values are views into buffers with spare columns: a
        decode step writes its column in place, where concatenating would copy every row's
        whole cache on every step (a third of a step's time on a CPU)."""

        _kbuf: torch.Tensor | None = None
        _vbuf: torch.Tensor | None = None

        def set_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            n = keys.shape[-2]
            room = n + max(64, n // 4)
            self._kbuf = keys.new_empty((*keys.shape[:2], room, keys.shape[-1]))
            self._vbuf = values.new_empty((*values.shape[:2], room, values.shape[-1]))
            self._kbuf[:, :, :n] = keys
            self._vbuf[:, :, :n] = values
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
            self.is_initialized, self.device = True, keys.device

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized or self._kbuf is None:
                self.set_kv(key_states, value_states)
                return self.keys, self.values
            n, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
            if end > self._kbuf.shape[-2]:
                self.set_kv(torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2))
                return self.keys, self.values
            self._kbuf[:, :, n:end] = key_states
            self._vbuf[:, :, n:end] = value_states
            self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
            return self.keys, self.values

    return RoomyLayer


_ROOMY: list[Any] = []


def new_cache() -> Any:
    """An empty KV cache for one prefill, built of RoomyLayers."""
    from transformers import DynamicCache

    if not _ROOMY:
        _ROOMY.append(_roomy_layer())
    cache = DynamicCache()
    cache.layer_class_to_replicate = _ROOMY[0]
    return cache


def _map_kv(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in cache.layers:
        layer.set_kv(fn(layer.keys), fn(layer.values))


def _pad_at(t: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """n zero columns inserted at sequence index `at` of a [batch, heads, seq, dim] tensor."""
    if n <= 0:
        return t
    shape = (*t.shape[:2], n, t.shape[-1])
    return torch.cat([t[:, :, :at], t.new_zeros(shape), t[:, :, at:]], dim=2)


def _cut_at(t: torch.Tensor, at: int, n: int) -> torch.Tensor:
    if n <= 0:
        return t
    return torch.cat([t[:, :, :at], t[:, :, at + n:]], dim=2)


def pick_token(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator) -> int:
    """One token from one row's last logits, as OpenAI's temperature and top_p define it."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    # In float64, shifted so the top logit is 0: a temperature as small as 1e-300 divides into
    # -inf for the others (probability 0), never into inf - inf = NaN.
    x = logits.double().cpu()
    probs = torch.softmax((x - x.max()) / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        p, order = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < sampling.top_p  # the smallest head whose mass reaches top_p
        keep[0] = True  # the top token always: a top_p that rounds below its mass keeps it alone
        probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


class Engine:
    """One worker thread decoding every request of a `MultiAdapter` with continuous batching."""

    def __init__(self, multi: MultiAdapter, *, max_batch: int = 64, prefill_tokens: int = 2048,
                 window_s: float = 0.0) -> None:
        self.multi = multi
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.window_s = window_s
        self.inbox: queue.Queue[GenRequest] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="peftcli-engine", daemon=True)
        self.batches: dict[int, _Batch] = {}
        self.stats = {"requests": 0, "steps": 0, "largest_batch": 0, "active": 0, "cancelled": 0}
        self.failed: str | None = None  # why the engine thread stopped on its own
        self._cache_arg: dict[int, str] = {}
        self._keep_last: dict[int, bool] = {}

    # ------------------------------------------------------------------------------ the outside

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout_s: float = 10) -> None:
        """Ends the thread; requests still running or waiting get an error event."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=timeout_s)
        self._fail_all("the server is shutting down")

    def _fail_all(self, why: str) -> None:
        for b in self.batches.values():
            for r in b.rows:
                r.req.finish("error", why)
        self.batches.clear()
        while True:
            try:
                self.inbox.get_nowait().finish("error", why)
            except queue.Empty:
                break

    def submit(self, req: GenRequest) -> None:
        if self.failed:
            raise EngineStopped(f"the decoding engine stopped ({self.failed}); restart the server")
        if self.stopping.is_set():
            raise EngineStopped("the server is shutting down")
        self.inbox.put(req)

    def active(self) -> int:
        return sum(len(b.rows) for b in self.batches.values())

    # ------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        """The loop; should it ever fail outside a batch's step (which `_guarded` contains), every
        request gets an error at once and `failed` says why, instead of waiting out its timeout
        behind a dead thread while /health answers ok."""
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001
            self.failed = f"{type(e).__name__}: {e}"
            log.error("the decoding engine stopped: %s", self.failed)
            self.stopping.set()
            self._fail_all(f"the decoding engine stopped ({self.failed})")

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self._admit()
            self.stats["active"] = self.active()
            for key in list(self.batches):
                batch = self.batches[key]
                self._guarded(batch, self._drop_finished)
                if not batch.rows:
                    del self.batches[key]
                    continue
                self._guarded(batch, self._step)
            self.stats["active"] = self.active()

    def _guarded(self, batch: _Batch, work: Callable[[_Batch], None]) -> None:
        """One failing step fails its rows only; the server keeps serving."""
        try:
            work(batch)
        except Exception as e:  # noqa: BLE001
            for r in batch.rows:
                r.req.finish("error", f"generation failed: {type(e).__name__}: {e}")
            batch.rows.clear()
            batch.cache = None

    def _admit(self) -> None:
        """Prefill waiting requests (within the token budget) and merge them into their batches."""
        budget = self.prefill_tokens
        idle = self.active() == 0
        while self.active() < self.max_batch and (budget > 0 or idle):
            try:
                req = self.inbox.get(timeout=0.1) if idle else self.inbox.get_nowait()
            except queue.Empty:
                return
            if idle and self.window_s > 0:
                time.sleep(self.window_s)  # let a burst arrive before the first step
            idle = False
            if req.cancelled:
                self.stats["cancelled"] += 1
                req.finish("done", "cancelled")
                continue
            self.stats["requests"] += 1
            budget -= len(req.ids)
            try:
                self._prefill(req)
            except Exception as e:  # noqa: BLE001  (one request's failure is its own)
                req.finish("error", f"generation failed: {type(e).__name__}: {e}")

    def _batch_for(self, req: GenRequest) -> _Batch:
        (model, _, _), = self.multi.groups([req.adapter])
        batch = self.batches.get(id(model))
        if batch is None:
            batch = self.batches[id(model)] = _Batch(model=model, eos=eos_ids(model, self.multi.tokenizer))
        return batch

    def _forward(self, model: nn.Module, names: list[str], **kw: Any) -> torch.Tensor:
        key = id(model)
        if key not in self._cache_arg:
            params = inspect.signature(model.forward).parameters
            self._cache_arg[key] = "cache" if "cache" in params else "past_key_values"
            self._keep_last[key] = "logits_to_keep" in params
        kw[self._cache_arg[key]] = kw.pop("cache")
        if self._keep_last[key]:
            kw["logits_to_keep"] = 1
        with self.multi.routed(model, names):
            out = model(**kw, use_cache=True)
        return out.logits[:, -1]

    @torch.no_grad()
    def _prefill(self, req: GenRequest) -> None:
        batch = self._batch_for(req)
        dev = self.multi.device
        n = len(req.ids)
        cache = new_cache()
        logits = self._forward(
            batch.model, [req.adapter], input_ids=torch.tensor([req.ids], device=dev),
            attention_mask=torch.ones(1, n, dtype=torch.long, device=dev),
            position_ids=torch.arange(n, device=dev).unsqueeze(0), cache=cache)
        seed = req.sampling.seed if req.sampling.seed is not None else random.SystemRandom().getrandbits(63)
        row = _Row(req=req, rng=torch.Generator().manual_seed(seed), length=n)
        if not self._take(batch, row, pick_token(logits[0], req.sampling, row.rng)):
            return
        virt = cache.layers[0].keys.shape[-2] - n
        if batch.cache is None:
            batch.virt, batch.cache, batch.rows = virt, cache, [row]
            return
        if virt != batch.virt:
            raise RuntimeError(f"the model put {virt} virtual tokens before this prompt, {batch.virt} before others")
        grow, at = n - batch.width, batch.virt
        for mine, new in zip(batch.cache.layers, cache.layers, strict=True):
            mine.set_kv(torch.cat([_pad_at(mine.keys, at, grow), _pad_at(new.keys, at, -grow)]),
                        torch.cat([_pad_at(mine.values, at, grow), _pad_at(new.values, at, -grow)]))
        batch.rows.append(row)

    def _take(self, batch: _Batch, row: _Row, token: int) -> bool:
        """Hand a sampled token to its request; False once the request is done."""
        req = row.req
        if token in batch.eos:
            req.finish("done", "stop")
            return False
        req.tokens.append(token)
        req.on_event("token", token)
        if len(req.tokens) >= req.max_tokens:
            req.finish("done", "length")
            return False
        row.next_id = token
        return True

    def _drop_finished(self, batch: _Batch) -> None:
        """Remove finished and cancelled rows, then the padding columns no remaining row needs."""
        for r in batch.rows:
            if (r.req.cancelled or self.stopping.is_set()) and not r.req.finished:
                self.stats["cancelled"] += 1
                r.req.finish("done", "cancelled")
        keep = [i for i, r in enumerate(batch.rows) if not r.req.finished]
        if len(keep) == len(batch.rows):
            return
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            batch.cache = None
            return
        spare = batch.width - max(r.length for r in batch.rows)
        idx = torch.tensor(keep, device=batch.cache.layers[0].keys.device)
        _map_kv(batch.cache, lambda t: _cut_at(t.index_select(0, idx), batch.virt, spare))

    @torch.no_grad()
    def _step(self, batch: _Batch) -> None:
        """One decode step of every row of a batch: each row's own position, its padding masked."""
        kill_point("decode")  # tests slow decoding down here (PEFTCLI_SLOW_AT=decode:0.05)
        dev = self.multi.device
        rows, width = batch.rows, batch.width
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.active())
        mask = torch.zeros(len(rows), width + 1, dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, width - r.length:] = 1
        logits = self._forward(
            batch.model, [r.req.adapter for r in rows],
            input_ids=torch.tensor([[r.next_id] for r in rows], device=dev), attention_mask=mask.to(dev),
            position_ids=torch.tensor([[r.length] for r in rows], device=dev), cache=batch.cache)
        for i, r in enumerate(rows):
            r.length += 1
            if not r.req.finished:
                self._take(batch, r, pick_token(logits[i], r.req.sampling, r.rng))


__all__ = ["Engine", "EngineStopped", "GenRequest", "Sampling", "pick_token"]
