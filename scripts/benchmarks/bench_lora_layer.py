"""One adapted layer at a time: peftcli's fused LoRA linear against the floor's free adapter.

bench_train.py times whole steps, where the LoRA path costs a few percent of a step and this
machine's run-to-run spread is as large. This script isolates that cost. For every distinct
(in, out) shape among a case's adapted layers it times forward + backward of one layer on the
case's N = batch × seq tokens: the floor (the frozen linear with bench_train's `add_free_bias`)
and the same linear wrapped by peftcli's `LoraLinear`, the two in random order at every
repetition. It reports the median of the paired differences (LoRA minus floor)
per layer, and that difference weighted by how many layers of the shape the case adapts: what the
LoRA path adds to a step, apart from everything else. `--ops` also times each of LoRA's six rank-r
products alone (warm caches), in the layouts `methods.lora_kernel` uses, beside the base GEMM.

    python scripts/benchmarks/bench_lora_layer.py --case cpu-decoder --threads 2
    python scripts/benchmarks/bench_lora_layer.py --case cpu-minilm --threads 2 --ops
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from bench_train import (  # beside this file: on the path when the script is run
    CASES,
    add_free_bias,
    base_model,
)
from torch import nn


def adapted_shapes(case: str, cfg: dict) -> Counter:
    """(in, out) of every layer the case adapts, counted."""
    from peftcli.core.arch import linear_dims, resolve
    from peftcli.methods.targets import select_linears

    model = base_model(case, 0, "sdpa", False, torch.device("cpu"), torch.float32)
    arch = resolve(model)
    return Counter(linear_dims(model.get_submodule(p)) for p in select_linears(model, arch, cfg["targets"]))


def layer_pair(in_f: int, out_f: int, r: int, alpha: float) -> tuple[nn.Module, nn.Module]:
    """(floor, LoRA) on the same frozen weight; B drawn so that every product is non-trivial."""
    from peftcli.methods.lora import LoraLinear

    base = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    floor = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    floor.weight.copy_(base.weight)
    add_free_bias(floor)
    lora = LoraLinear(base, r, alpha, 0.0, False).train()
    nn.init.normal_(lora.lora_B.weight, std=0.02)
    return floor, lora


def paired_extra(floor: nn.Module, lora: nn.Module, x: torch.Tensor, gy: torch.Tensor, reps: int) -> tuple[float, float]:
    """(median floor fwd + bwd, median of LoRA's minus the floor's at the same repetition), seconds."""
    sides = {"floor": floor, "lora": lora}
    for _ in range(5):
        for m in sides.values():
            m(x).backward(gy)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        order = list(sides)
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            sides[k](x).backward(gy)
            times[k].append(time.perf_counter() - t)
    diffs = [a - b for a, b in zip(times["lora"], times["floor"], strict=True)]
    return statistics.median(times["floor"]), statistics.median(diffs)


def products(n: int, in_f: int, out_f: int, r: int) -> dict[str, Callable[[], object]]:
    """Each of LoRA's products as `methods.lora_kernel` lays out its operands, beside the base GEMM,
    and dy B from B's transposed view (what it read before the contiguous copy)."""
    x, w = torch.randn(n, in_f), torch.randn(out_f, in_f)
    a, b = torch.randn(r, in_f), torch.randn(out_f, r)
    y, gy, gx = torch.randn(n, out_f), torch.randn(n, out_f), torch.randn(n, in_f)
    bt = b.t().contiguous()
    ht, ght = a @ x.t(), bt @ gy.t()
    return {
        "W x (base)": lambda: torch.nn.functional.linear(x, w),
        "h = A x": lambda: torch.mm(a, x.t()),
        "y += s B h": lambda: y.addmm_(ht.t(), b.t(), alpha=0.5),
        "dy B (contiguous Bᵀ)": lambda: torch.mm(bt, gy.t()),
        "dy B (B's view)": lambda: torch.mm(b.t(), gy.t()),
        "dB = h dy": lambda: torch.mm(ht, gy),
        "dA = g x": lambda: torch.mm(ght, x),
        "dx += g A": lambda: gx.addmm_(ght.t(), a),
    }


def op_times(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """µs per call of each, alone, with warm caches."""
    out = {}
    for name, f in calls.items():
        for _ in range(10):
            f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        out[name] = (time.perf_counter() - t) / reps * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=[c for c in CASES if c.startswith("cpu-")], default="cpu-decoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200, help="paired repetitions per shape")
    ap.add_argument("--ops", action="store_true", help="also time each rank-r product alone")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = CASES[args.case]
    n, r = cfg["batch"] * cfg["seq"], cfg["r"]
    shapes = adapted_shapes(args.case, cfg)
    print(f"## {args.case}: one adapted layer, fwd + bwd on {n} tokens, LoRA r {r}, fp32, "
          f"{torch.get_num_threads()} threads, {args.reps} paired repetitions · torch {torch.__version__}\n")
    print("| in × out | layers | floor µs | LoRA − floor µs | × floor | a step, ms |\n|---|---|---|---|---|---|")
    total_floor = total_extra = 0.0
    for (in_f, out_f), count in sorted(shapes.items()):
        torch.manual_seed(args.seed)
        floor, lora = layer_pair(in_f, out_f, r, cfg["alpha"])
        x, gy = torch.randn(n, in_f, requires_grad=True), torch.randn(n, out_f)
        f, extra = paired_extra(floor, lora, x, gy, args.reps)
        total_floor += f * count
        total_extra += extra * count
        print(f"| {in_f} × {out_f} | {count} | {f * 1e6:.0f} | {extra * 1e6:.0f} | {(f + extra) / f:.3f}× | "
              f"{extra * count * 1e3:.1f} |")
    print(f"\nThe LoRA path adds {total_extra * 1e3:.1f} ms a step to {total_floor * 1e3:.0f} ms of the floor's "
          f"adapted layers ({(total_floor + total_extra) / total_floor:.3f}× on those layers alone).")
    if args.ops:
        rows = {(in_f, out_f): op_times(products(n, in_f, out_f, r), 300) for in_f, out_f in sorted(shapes)}
        names = list(next(iter(rows.values())))
        print("\n| in × out | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for (in_f, out_f), t in rows.items():
            print(f"| {in_f} × {out_f} | " + " | ".join(f"{v:.0f}" for v in t.values()) + " |")
        print("\n(µs per call, each product alone with warm caches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
