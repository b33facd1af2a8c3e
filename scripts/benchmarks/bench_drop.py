"""AdapterDrop inference benchmark: N task adapters on one batch, with and without dropping the lowest layers.

Setting (AdapterDrop's "parallel" inference, Rücklé et al. 2021, §4): one input batch of B
sentences must be labelled for N tasks, each task with its own Pfeiffer adapter in every layer.
The N task copies are stacked in the batch dimension, so one forward pass serves all tasks:

    no drop       the batch is replicated N times before layer 0: every layer runs on N·B rows
    drop k        layers 0..k-1 carry no adapters, so they run once on the B rows (shared by all
                  tasks); the hidden states are replicated N times in front of layer k and the
                  upper layers run on N·B rows with task t's adapter on rows t·B..(t+1)·B-1

Replication is a forward pre-hook on layer k (it also repeats the attention mask for the layers
above); the adapters use peftcli's Bottleneck module and Pfeiffer placement. Each setting is
checked against running the model once per task with only that task's adapters (same outputs),
then timed: the settings are measured in turns, `--repeats` times, and the median is reported,
because the machine may be shared with other processes.

    python scripts/benchmarks/bench_drop.py                              # MiniLM (6 layers) + BERT-base shape (12)
    python scripts/benchmarks/bench_drop.py --models minilm --tasks 8 --batch 2 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from peftcli.core.adapter import AdapterModule
from peftcli.core.arch import Arch, resolve
from peftcli.methods.bottleneck import Bottleneck, add_post_ln, factory_kwargs, get_role


class TaskAdapters(AdapterModule):
    """N bottlenecks at one site; row block t of the batch goes through adapter t.

    With `single` set, every row goes through that one adapter (the per-task reference run)."""

    def __init__(self, hidden: int, m: int, tasks: int, like: nn.Module) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(Bottleneck(hidden, m, init="bert", **factory_kwargs(like)) for _ in range(tasks))
        self.single: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single is not None:
            return self.tasks[self.single](x)
        chunks = x.chunk(len(self.tasks), dim=0)
        return torch.cat([a(c) for a, c in zip(self.tasks, chunks, strict=True)], dim=0)


class Replicate:
    """Pre-hook: repeat the hidden states N times at the first adapted layer, and the attention
    mask wherever the hidden states already are N times the mask's batch."""

    def __init__(self, n: int, first: bool) -> None:
        self.n, self.first = n, first

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        h = args[0] if args else kwargs["hidden_states"]
        if self.first:
            h = h.repeat(self.n, 1, 1)
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None and mask.shape[0] * self.n == h.shape[0]:
            mask = mask.repeat(self.n, *([1] * (mask.dim() - 1)))
        args = (h, mask, *args[2:]) if len(args) > 1 else (h, *args[1:])
        if len(args) == 1 and "attention_mask" in kwargs:
            kwargs = {**kwargs, "attention_mask": mask}
        return args, kwargs


def attach_tasks(model: nn.Module, arch: Arch, tasks: int, m: int) -> list[TaskAdapters]:
    sites = []
    torch.manual_seed(1)
    for i in range(arch.num_layers):
        host = get_role(arch, i, "ffn_out")
        site = TaskAdapters(arch.hidden_size, m, tasks, host)
        add_post_ln(arch.layer(i), "bench_tasks", get_role(arch, i, "ffn_norm"), site)
        sites.append(site)
    return sites


def configure(model: nn.Module, arch: Arch, sites: list[TaskAdapters], dropped: int, tasks: int | None,
              handles: list) -> None:
    """Drop the lowest `dropped` layers; tasks=N stacks N copies at layer `dropped`, None = one task."""
    for h in handles:
        h.remove()
    handles.clear()
    for i, s in enumerate(sites):
        s.adapter_enabled = i >= dropped
    if tasks is not None and dropped < arch.num_layers:
        for i in range(dropped, arch.num_layers):
            handles.append(arch.layer(i).register_forward_pre_hook(Replicate(tasks, i == dropped), with_kwargs=True))


def load(name: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    if name == "minilm":
        from peftcli.models.loading import load_base_model

        return load_base_model("sentence-transformers/all-MiniLM-L6-v2", "classification", num_labels=3,
                               dtype=torch.float32)
    torch.manual_seed(0)  # BERT-base shape with random weights: the timing does not depend on them
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     num_labels=3)
    return BertForSequenceClassification(cfg)


@torch.no_grad()
def check(model, arch, sites, inputs, tasks: int, dropped: int) -> float:
    """Max |difference| between the stacked run and N single-task runs."""
    handles: list = []
    configure(model, arch, sites, dropped, tasks, handles)
    stacked = model(**inputs).logits
    configure(model, arch, sites, dropped, None, handles)
    worst = 0.0
    b = inputs["input_ids"].shape[0]
    for t in range(tasks):
        for s in sites:
            s.single = t
        one = model(**inputs).logits
        worst = max(worst, float((stacked[t * b : (t + 1) * b] - one).abs().max()))
    for s in sites:
        s.single = None
    return worst


@torch.no_grad()
def bench(name: str, tasks: int, batch: int, seq: int, drops: list[int], repeats: int, m: int) -> dict:
    model = load(name).eval()
    arch = resolve(model)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    inputs["attention_mask"][-1, seq // 2 :] = 0  # one padded row, so the mask is real
    plain_times = []
    sites = attach_tasks(model, arch, tasks, m)
    drops = [d for d in drops if 0 <= d < arch.num_layers]
    diffs = {d: check(model, arch, sites, inputs, tasks, d) for d in drops}
    handles: list = []
    times: dict[int, list[float]] = {d: [] for d in drops}
    for d in drops:  # warm-up
        configure(model, arch, sites, d, tasks, handles)
        model(**inputs)
    for _ in range(repeats):
        for d in drops:
            configure(model, arch, sites, d, tasks, handles)
            t = time.perf_counter()
            model(**inputs)
            times[d].append(time.perf_counter() - t)
        # the same batch through the plain model once per task, no adapters at all (for scale)
        configure(model, arch, sites, arch.num_layers, None, handles)
        t = time.perf_counter()
        for _ in range(tasks):
            model(**inputs)
        plain_times.append(time.perf_counter() - t)
    base = statistics.median(times[drops[0]])
    rows = []
    for d in drops:
        med = statistics.median(times[d])
        rows.append({"dropped_layers": d, "seconds": med, "sentences_x_tasks_per_s": batch * tasks / med,
                     "faster_than_no_drop_pct": 100 * (base / med - 1), "time_saved_pct": 100 * (1 - med / base),
                     "max_diff_vs_single_task_runs": diffs[d]})
    return {"model": name, "layers": arch.num_layers, "hidden": arch.hidden_size, "tasks": tasks, "batch": batch,
            "seq": seq, "bottleneck": m, "repeats": repeats, "rows": rows,
            "plain_model_n_passes_seconds": statistics.median(plain_times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="sentences per batch (each labelled for every task)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--drops", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bottleneck", type=int, default=48, help="adapter width m (Pfeiffer: hidden / 16 on BERT-base)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (shared machine: timings are noisy)")
    results = []
    for name in args.models:
        r = bench(name, args.tasks, args.batch, args.seq, args.drops, args.repeats, args.bottleneck)
        results.append(r)
        print(f"\n{name}: {r['layers']} layers, hidden {r['hidden']}, {r['tasks']} tasks × {r['batch']} sentences × "
              f"{r['seq']} tokens, adapters m = {r['bottleneck']}, median of {r['repeats']}")
        print(f"{'dropped':>8} {'seconds':>9} {'rows/s':>9} {'faster':>8} {'saved':>7} {'max |Δ| vs per-task':>20}")
        for row in r["rows"]:
            print(f"{row['dropped_layers']:>8} {row['seconds']:>9.3f} {row['sentences_x_tasks_per_s']:>9.1f} "
                  f"{row['faster_than_no_drop_pct']:>7.1f}% {row['time_saved_pct']:>6.1f}% "
                  f"{row['max_diff_vs_single_task_runs']:>20.1e}")
        print(f"  (for scale: {r['tasks']} separate passes of the plain model, no adapters: "
              f"{r['plain_model_n_passes_seconds']:.3f} s)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
