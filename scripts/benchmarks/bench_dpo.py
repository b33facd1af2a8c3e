"""DPO with LoRA: peftcli's training loop against TRL's DPOTrainer with PEFT's LoRA, one machine,
the same pairs, model and settings; step time, peak memory and held-out preference accuracy.

    python scripts/benchmarks/bench_dpo.py                          # SmolLM2-135M-Instruct, the recipe's 60 steps
    python scripts/benchmarks/bench_dpo.py --steps 4 --train-size 32 --model /path/to/tiny   # checks the script

Both sides train `recipes/smollm2_dpo.yaml`'s model, LoRA (r 16, alpha 32, q k v o, no dropout),
β, learning rate, batch and schedule on the first `--train-size` pairs of `tweets_preference`,
the reference being the base model (adapter switched off) on both. TRL gets the pairs peftcli
reads, with the prompt already rendered by the chat template, so both tokenize the same text, in
the order peftcli's seeded shuffle gives them (TRL's sampler made sequential), and with peftcli's
learning-rate schedule, so that step k trains on the same batch at the same rate on both sides and
the two loss curves can be compared step by step.
Each side runs in a process of its own, one after the other, so that its peak memory is its own:
CUDA's `max_memory_allocated`, or on CPU the process's peak resident set, printed whole (it
includes the Python libraries each side imports: TRL's are the heavier) and above the resident set
both sides had once their libraries were imported, before the model was loaded (the model, the
data and training). Step time is the median over the
steps after the first two. Then both score the same held-out pairs: preference accuracy, and the
task accuracy of greedy answers to their prompts (the answer's first word against the chosen label),
decoded by the same greedy decoder on both sides.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train import _status_kb  # beside this file: on the path when the script is run
from torch.utils.data import SequentialSampler

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "smollm2_dpo.yaml"


def _recipe(args, out: Path):
    from peftcli.config.recipe import load_recipe

    return load_recipe(RECIPE, [f"model.name={args.model}", f"train.max_steps={args.steps}", "train.log_every=1",
                                f"train.eval_every={args.steps}", f"data.train_size={args.train_size}",
                                f"data.eval_size={args.eval_size}", "eval.generate_accuracy=false",
                                "eval.generate_samples=0", "eval.metric=accuracy", "train.progress=false", "output.plot=false",
                                f"output.dir={out}", "output.overwrite=true", "data.val_size=8"])


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_now() -> float:
    """The resident set now, MiB: the baseline the training memory sits on."""
    return _status_kb("VmRSS") / 1024


def run_peftcli(args) -> dict:
    from peftcli.runs.load import load_run
    from peftcli.runs.metrics import read_metrics
    from peftcli.training.loop import train

    out = Path(tempfile.mkdtemp()) / "run"
    rec = _recipe(args, out)
    libraries = _rss_now()
    summary = train(rec)
    steps = read_metrics(out).steps
    t = [r["elapsed_s"] for r in steps]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    peak = _peak(dev)  # before the greedy answers, which the TRL side also scores after its peak is read
    run, _ = load_run(out, torch.device(dev))
    return {"step_s": statistics.median([b - a for a, b in zip(t[1:], t[2:], strict=False)] or [t[-1]]),
            "peak_mib": peak, "above_libraries_mib": peak - libraries, "test_accuracy": summary["test"]["accuracy"],
            "losses": [r["loss"] for r in steps], "device": dev,
            **_greedy(run.model, run.tokenizer, _pairs(args)[1], dev)}


def _greedy(model, tok, rows: list[dict], device: str) -> dict:
    """The task accuracy of greedy answers to held-out prompts (the answer's first word against the
    chosen label), and the first answers themselves, to show what the accuracy counts."""
    from peftcli.inference.decode import generate_texts
    from peftcli.inference.evaluate import label_match

    model.eval()
    answers = generate_texts(model, tok, [r["prompt"] for r in rows], device=torch.device(device), max_new_tokens=3)
    hits = sum(label_match(a, r["chosen"]) for a, r in zip(answers, rows, strict=True))
    return {"task_accuracy": hits / max(len(rows), 1), "answers": answers[:4]}


def _pairs(args) -> tuple[list[dict], list[dict]]:
    """peftcli's training and held-out pairs with the prompt rendered as peftcli renders it."""
    from peftcli.data.batching import batches
    from peftcli.data.chat import format_prompt
    from peftcli.data.preference import load_preference_splits
    from peftcli.models.loading import load_tokenizer

    rec = _recipe(args, Path(tempfile.mkdtemp()))
    tok = load_tokenizer(rec.model.name)
    splits = load_preference_splits(rec.data, "dpo")

    def rows(part: list[dict]) -> list[dict]:
        return [{"prompt": format_prompt(tok, r["prompt"], True), "chosen": r["chosen"], "rejected": r["rejected"]}
                for r in part]

    train_rows = rows(splits.train)
    # The first epoch's order as the training loop draws it: peftcli's own batcher, over row indices.
    order = [i for batch in batches(list(range(len(train_rows))), 1, list, shuffle=True, seed=rec.train.seed)
             for i in batch]
    return [train_rows[i] for i in order], rows(splits.eval)


def run_trl(args) -> dict:
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftcli.models.loading import load_tokenizer, resolve_source
    from peftcli.training.loop import lr_schedule

    rec = _recipe(args, Path(tempfile.mkdtemp()))
    train_rows, test_rows = _pairs(args)
    path = resolve_source(rec.model.name).path
    tok = load_tokenizer(rec.model.name)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003
            times.append(time.perf_counter())

    class InOrder(DPOTrainer):
        """The rows in the order given (peftcli's), so that both sides train on the same batches, and
        peftcli's learning-rate schedule: transformers' linear warm-up starts at 0, so its first step
        would not move the weights, where peftcli's first step takes 1/warmup of the rate."""

        def _get_train_sampler(self, *a, **k):  # noqa: ANN002, ANN003
            return SequentialSampler(self.train_dataset)

        def create_scheduler(self, num_training_steps: int, optimizer=None):  # noqa: ANN001
            self.lr_scheduler = lr_schedule(optimizer or self.optimizer, rec.train, num_training_steps)
            return self.lr_scheduler

    cuda = torch.cuda.is_available()
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rec.train.batch_size,
                    per_device_eval_batch_size=rec.eval.batch_size, learning_rate=rec.train.lr, beta=rec.train.beta,
                    max_steps=args.steps, max_length=rec.data.max_length, logging_steps=1, save_strategy="no",
                    report_to=[], max_grad_norm=rec.train.max_grad_norm, bf16=cuda, use_cpu=not cuda, seed=rec.train.seed,
                    dataloader_num_workers=0, gradient_checkpointing=rec.model.gradient_checkpointing)
    lora = peft.LoraConfig(r=rec.method.r, lora_alpha=rec.method.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    libraries = _rss_now()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = InOrder(model=model, args=cfg, train_dataset=Dataset.from_list(train_rows), processing_class=tok,
                         peft_config=lora, callbacks=[Clock()])
    trainer.train()
    m = trainer.evaluate(Dataset.from_list(test_rows))
    dev = "cuda" if cuda else "cpu"
    peak = _peak(dev)
    steps = [b - a for a, b in zip(times[1:], times[2:], strict=False)] or [0.0]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"step_s": statistics.median(steps), "peak_mib": peak, "above_libraries_mib": peak - libraries,
            "test_accuracy": m["eval_rewards/accuracies"], "losses": losses, "device": dev,
            **_greedy(trainer.model, tok, test_rows, dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=["peftcli", "trl"], help="run one side in this process (used by the parent)")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-size", type=int, default=480)
    ap.add_argument("--eval-size", type=int, default=200)
    args = ap.parse_args()
    if args.side:
        res = (run_peftcli if args.side == "peftcli" else run_trl)(args)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for side in ("peftcli", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--steps", str(args.steps),
               "--train-size", str(args.train_size), "--eval-size", str(args.eval_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[len("RESULT "):])
    p, t = results["peftcli"], results["trl"]
    print(f"device {p['device']} · {args.model} · {args.steps} steps of {args.train_size} pairs")
    print(f"{'':10} {'s/step':>8} {'peak MiB':>9} {'above libs':>10} {'held-out pref. acc.':>20} "
          f"{'greedy task acc.':>17}")
    for name, r in results.items():
        print(f"{name:10} {r['step_s']:8.3f} {r['peak_mib']:9.0f} {r['above_libraries_mib']:10.0f} "
              f"{r['test_accuracy']:20.3f} {r['task_accuracy']:17.3f}")
    pl, tl = p["losses"], t["losses"]
    gaps = [abs(a - b) for a, b in zip(pl, tl, strict=False)]
    print("training loss, same batches: step " + " · ".join(
        f"{k + 1}: {a:.4f} / {b:.4f}" for k, (a, b) in enumerate(zip(pl, tl, strict=False)) if k < 3 or k % 10 == 9))
    if gaps:
        print(f"largest per-step loss gap {max(gaps):.4f} (step {gaps.index(max(gaps)) + 1} of {len(gaps)}); "
              f"first step {gaps[0]:.2e}")
    for name, r in results.items():
        print(f"{name} greedy answers: {r['answers']}")
    print(f"peftcli / TRL: step time {p['step_s'] / max(t['step_s'], 1e-9):.2f}x, "
          f"peak memory {p['peak_mib'] / max(t['peak_mib'], 1e-9):.2f}x, "
          f"above the libraries {p['above_libraries_mib'] / max(t['above_libraries_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
