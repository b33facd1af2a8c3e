"""Every method through the real commands on a CUDA device: bf16 autocast, activation checkpointing, sdpa.

The test suite runs on CPU only (CI has no GPU), so this script is the GPU half of the check: for
each registered method on a tiny BERT classifier and on tiny GPT-2 and Llama causal LMs (random
weights, the embedded MiniLM word-piece tokenizer), it runs `peftcli train` with
`train.device=cuda train.precision=bf16 model.gradient_checkpointing=true`, then `peftcli eval`,
`peftcli generate` (causal LMs, KV cache), `peftcli merge` (mergeable methods; merged logits
compared with the adapted model's inside the command), AdapterFusion over two trained bottleneck
runs with `peftcli fuse`, `peftcli drop` on it, and one `train.compile=true` run per architecture.
Each row of the printed table is one command with its exit code and wall time.

Two steps, because the tokenizer lives in an installed package that the GPU machine may lack:

    python tests/harness/gpu_check.py prepare .gpucheck       # here: tiny models, tokenizer, toy csv
    python tests/harness/gpu_check.py run .gpucheck           # on the CUDA machine
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback
from pathlib import Path

import yaml

ARCHS = ("bert", "gpt2", "llama")
# Fusion needs trained source runs: it runs after the others, over two of them.
SKIP = {"fusion"}


def prepare(root: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from peftcli.models.loading import resolve_source

    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve_source("sentence-transformers/all-MiniLM-L6-v2").path)
    tok.eos_token = tok.sep_token
    v = tok.vocab_size
    torch.manual_seed(0)
    models = {
        "bert": BertForSequenceClassification(BertConfig(
            vocab_size=v, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, num_labels=2)),
        "gpt2": GPT2LMHeadModel(GPT2Config(
            vocab_size=v, n_embd=64, n_layer=4, n_head=4, n_positions=128, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)),
        "llama": LlamaForCausalLM(LlamaConfig(
            vocab_size=v, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)),
    }
    for name, m in models.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "toy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label", "prompt", "response"])
        for i in range(96):
            pos = i % 2 == 0
            word = ["great", "lovely", "superb", "fine"][i % 4] if pos else ["awful", "bad", "sad", "poor"][i % 4]
            lab = "positive" if pos else "negative"
            w.writerow([f"the film was {word} today {i}", lab, f"review: the film was {word}", lab])
    print(f"prepared {root}")


DEVICE = "cuda"


def recipe(root: Path, arch: str, method: dict, out: Path, **extra) -> Path:
    causal = arch != "bert"
    data = {"source": str(root / "toy.csv"), "eval_size": 16, "max_length": 32}
    data.update({"prompt_column": "prompt", "response_column": "response"} if causal else {"text_column": "sentence"})
    r = {
        "model": {"name": str(root / arch), "task": "causal_lm" if causal else "classification",
                  "gradient_checkpointing": True, **extra.get("model", {})},
        "data": data,
        "method": method,
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "device": DEVICE,
                  "precision": "bf16" if DEVICE == "cuda" else "fp32",
                  "progress": False, "log_every": 1, **extra.get("train", {})},
        "eval": {"metric": "loss" if causal else "accuracy", "generate_samples": 1, "max_new_tokens": 4},
        "output": {"dir": str(out), "overwrite": True, "plot": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def run(root: Path, work: Path) -> int:
    import torch
    from typer.testing import CliRunner

    import peftcli.methods  # noqa: F401  (fills the registry)
    from peftcli.cli import app
    from peftcli.methods.registry import REGISTRY

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible (--device cpu checks this script on CPU)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    runner = CliRunner()
    rows: list[tuple[str, str, int, float, str]] = []

    def cli(label: str, arch: str, *args) -> int:
        t = time.perf_counter()
        try:
            res = runner.invoke(app, [str(a) for a in args])
            code, out = res.exit_code, res.output
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                out += "".join(traceback.format_exception(res.exception))
        except Exception:  # noqa: BLE001  (a crash is a row in the table, not the end of the check)
            code, out = 99, traceback.format_exc()
        dt = time.perf_counter() - t
        note = "" if code == 0 else out.strip().splitlines()[-1][:160] if out.strip() else "no output"
        rows.append((label, arch, code, dt, note))
        if code != 0:
            with (work / "failures.log").open("a") as f:
                f.write(f"==== {label} {arch} ({' '.join(map(str, args))})\n{out}\n")
        print(f"{code:3d} {dt:6.1f}s {arch:6s} {label}", flush=True)
        return code

    methods = [m for m in REGISTRY if m not in SKIP]
    # Compacter's PHM layers need the bottleneck to be a multiple of phm_dim (4): 64 / 4 = 16.
    variants: list[tuple[str, dict]] = [
        (m, {"name": m, "reduction_factor": 4} if m.startswith("compacter") else {"name": m}) for m in methods
    ]
    variants += [("lora+dora", {"name": "lora", "use_dora": True}), ("lora+rslora", {"name": "lora", "rslora": True})]
    for arch in ARCHS:
        for label, method in variants:
            if arch == "llama" and label == "bitfit":
                continue  # Llama has no bias terms: bitfit refuses it (a CPU test checks the message)
            out = work / f"{arch}-{label}"
            r = recipe(root, arch, method, out)
            if cli(f"train {label}", arch, "train", r) != 0:
                continue
            cli(f"eval {label}", arch, "eval", out)
            if arch != "bert":
                cli(f"generate {label}", arch, "generate", out, "review: the film was great", "--max-new-tokens", "4")
            spec = REGISTRY[method["name"]]
            if spec.merge is not None:
                cli(f"merge {label}", arch, "merge", out, work / f"{arch}-{label}-merged", "--force")
        out = work / f"{arch}-lora-compiled"
        cli("train lora compile=true", arch, "train",
            recipe(root, arch, {"name": "lora"}, out, train={"compile": True}))
    # AdapterFusion over two Pfeiffer runs (the one above, one more with another seed), then
    # AdapterDrop on the fused run.
    for arch in ARCHS:
        second = work / f"{arch}-pfeiffer-seed1"
        cli("train pfeiffer seed 1", arch, "train",
            recipe(root, arch, {"name": "pfeiffer"}, second, train={"seed": 1}))
        sources = [work / f"{arch}-pfeiffer", second]
        if not all((s / "summary.json").exists() for s in sources):
            continue
        out = work / f"{arch}-fusion"
        r = recipe(root, arch, {"name": "fusion", "adapters": [str(s) for s in sources]}, out)
        if cli("fuse 2 × pfeiffer", arch, "fuse", r) == 0:
            cli("eval fusion", arch, "eval", out)
            cli("drop --lowest 2 (fusion)", arch, "drop", out, "--lowest", "2", "--out", work / f"{arch}-fusion-drop",
                "--force")
            cli("drop --prune-fusion 1", arch, "drop", out, "--prune-fusion", "1", "--out",
                work / f"{arch}-fusion-prune", "--force")

    ok = sum(r[2] == 0 for r in rows)
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"\n## gpu_check · {where} · torch {torch.__version__}: {ok}/{len(rows)} commands "
          "exited 0\n")
    print("| command | arch | exit | s | note |\n|---|---|---|---|---|")
    for label, arch, code, dt, note in rows:
        print(f"| {label} | {arch} | {code} | {dt:.1f} | {note} |")
    return 0 if ok == len(rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("root", type=Path, help="folder with the tiny models and data")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: ROOT/runs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: check the script itself")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.step == "prepare":
        prepare(args.root)
        return 0
    return run(args.root, args.work or args.root / "runs")


if __name__ == "__main__":
    raise SystemExit(main())
