"""End to end: `peftcli train` against a plain HF PEFT training loop, on the same examples, in one run.

The `cpu-decoder` case of bench_train.py taken through whole training steps: SmolLM2-135M (the
embedded default), LoRA r 8, alpha 16 on every linear layer, examples of exactly `--seq` tokens
(plain text, every token trained), batch 8, one epoch, AdamW at lr 1e-3 with a linear schedule
after 6 % warm-up and gradient clipping at 1.0, fp32, `--threads` torch threads on both sides.

- peftcli: `peftcli.training.loop.train` on a recipe (what `peftcli train RECIPE` runs), with a
  few validation rows (the kept adapter is the last either way); its time is the training loop's
  own (`elapsed_s` of its last metrics line: steps, optimizer, schedule, clipping; no loading,
  no final evaluation).
- HF PEFT: `get_peft_model` on the same base and modules, the same tokenized examples in batches
  of the same size, `torch.optim.AdamW` as its users create it, the same schedule and clipping,
  the model's own loss (`labels=`) with `use_cache=False`; timed over its loop alone.

Both held-out losses come from peftcli's `evaluate` on the same held-out examples: equal up to
the sides' own LoRA initialisation and data order, they show that both sides trained alike.

    python scripts/benchmarks/bench_e2e.py --threads 2                       # 800 examples: about 7 min idle
    python scripts/benchmarks/bench_e2e.py --threads 2 --rounds 2            # A B B A: drift weighs on both sides
    python scripts/benchmarks/bench_e2e.py --threads 2 --examples 64 --tiny  # checks the script (timings mean nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train import SMOLLM2, tiny_smollm2  # beside this file: on the path when the script is run

WORDS = ("the model learns a small update to every layer while its weights stay frozen and the loss falls "
         "slowly over many steps of data from a long list of short sentences about trains rivers cities "
         "numbers colours weather music and food").split()


def write_rows(path: Path, n: int, seed: int) -> None:
    """`n` rows of plain text, each longer than any `--seq` used here, so every example is cut to
    exactly `--seq` tokens."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(160))}) + "\n")


def recipe(args, out: Path, rows: Path):
    from peftcli.config.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"name": args.model, "task": "causal_lm"},
        "data": {"source": str(rows), "format": "text", "text_column": "text", "max_length": args.seq,
                 "train_size": args.examples, "val_size": 16, "eval_size": args.eval_rows, "eval_fraction": 0.2},
        "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
        "train": {"epochs": 1, "batch_size": args.batch, "lr": args.lr, "seed": args.seed, "progress": False,
                  "log_every": 100000, "num_threads": args.threads, "precision": "fp32"},
        "eval": {"metric": "loss", "batch_size": 16, "generate_samples": 0},
        "output": {"dir": str(out / "peftcli"), "plot": False, "overwrite": True},
    }, "bench-e2e")


def run_peftcli(args, out: Path, rows: Path) -> dict:
    from rich.console import Console

    from peftcli.runs.metrics import read_metrics
    from peftcli.training.loop import train

    summary = train(recipe(args, out, rows), console=Console(stderr=True, quiet=True))
    last = [r for r in read_metrics(out / "peftcli").steps if "tokens_per_s" in r][-1]  # the last step's line
    return {"side": "peftcli train", "steps": summary["steps"], "train_s": last["elapsed_s"],
            "eval_loss": summary["test"]["loss"]}


def run_peft(args, train_ex: list[dict], eval_ex: list[dict], tok) -> dict:
    """The loop a PEFT user writes: get_peft_model, AdamW, a linear schedule, clipping."""
    from peft import LoraConfig, get_peft_model

    from peftcli.data.batching import Collator
    from peftcli.inference.evaluate import evaluate
    from peftcli.models.loading import load_base_model

    torch.manual_seed(args.seed)
    model = load_base_model(args.model, "causal_lm", dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = list(range(len(train_ex)))
    random.Random(args.seed).shuffle(order)
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    total, warmup = len(batches), math.ceil(0.06 * len(batches))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, total - warmup)))
    collate = Collator(tok.pad_token_id, "causal_lm")
    t = time.perf_counter()
    for idx in batches:
        b = collate([train_ex[i] for i in idx])
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t
    m = evaluate(model, eval_ex, collate, task="causal_lm", device=torch.device("cpu"), batch_size=16)
    return {"side": "HF PEFT loop", "steps": total, "train_s": train_s, "eval_loss": m["loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=800, help="training examples (one epoch)")
    ap.add_argument("--eval-rows", type=int, default=64, help="held-out examples")
    ap.add_argument("--seq", type=int, default=64, help="tokens per example")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default="peftcli,peft", help="comma list of peftcli, peft, in the order run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the sides this many times, the order reversed every other round (A B B A ...): "
                         "a machine that drifts during the run then weighs on both sides alike")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model with SmolLM2's tokenizer: checks the script")
    ap.add_argument("--out", default=None, help="folder for the data and the peftcli run (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    from peftcli.core.quiet import quiet_command
    from peftcli.models.loading import load_tokenizer
    from peftcli.runs.load import prepare_data

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-e2e-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "rows.jsonl"
    # Enough rows for the training, validation and held-out splits at the eval fraction.
    write_rows(rows, math.ceil((args.examples + 16) / 0.8) + args.eval_rows + 8, args.seed)
    results = []
    with quiet_command():
        args.model = tiny_smollm2(out) if args.tiny else SMOLLM2
        tok = load_tokenizer(args.model)
        _, train_ex, _, eval_ex = prepare_data(recipe(args, out, rows), tok)
        sides = args.sides.split(",")
        for k in range(args.rounds):
            for side in sides if k % 2 == 0 else sides[::-1]:
                res = run_peftcli(args, out, rows) if side == "peftcli" else run_peft(args, train_ex, eval_ex, tok)
                results.append({**res, "round": k})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    where = (f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
             f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    model = "a 2-layer Llama (--tiny: timings mean nothing)" if args.tiny else SMOLLM2
    print(f"\n## end to end: {model}, LoRA r 8 all-linear, {len(train_ex)} examples × {args.seq} tokens, "
          f"batch {args.batch}, 1 epoch · {where}\n")
    print("| side | steps | train s (mean of rounds) | each round | examples/s | × HF PEFT loop | held-out loss |\n"
          "|---|---|---|---|---|---|---|")
    by_side: dict[str, list[dict]] = {}
    for r in results:
        by_side.setdefault(r["side"], []).append(r)
    mean = {side: sum(r["train_s"] for r in rs) / len(rs) for side, rs in by_side.items()}
    base = mean.get("HF PEFT loop")
    for side, rs in by_side.items():
        vs = f"{base / mean[side]:.2f}×" if base else "n/a"
        each = ", ".join(f"{r['train_s']:.1f}" for r in rs)
        print(f"| {side} | {rs[0]['steps']} | {mean[side]:.1f} | {each} | {len(train_ex) / mean[side]:.2f} | {vs} | "
              f"{rs[-1]['eval_loss']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
