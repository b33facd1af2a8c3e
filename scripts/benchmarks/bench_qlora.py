"""QLoRA against LoRA on a bf16 base: peak GPU memory and time per training step.

The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192,
vocabulary 128256, tied embeddings) with random weights: memory and speed depend on shapes, not
values. It is saved once in bf16, then each side loads it the way `peftcli train` does
(`peftcli.models.loading.load_base_model`, with `quantization="nf4"` for QLoRA), attaches LoRA r=16 on
all 7 projections (`peftcli.methods.attach.attach_method`), and trains on 8 sequences of 1024 tokens with
AdamW, bf16 autocast and the chunked cross-entropy of the training loop.

Each side runs in its own process, so `torch.cuda.max_memory_allocated` is that side's whole
footprint: weights, adapter, gradients, AdamW state and activations. Steps are timed between
device synchronisations after warm-up; the figure is the median.

    python scripts/benchmarks/bench_qlora.py                 # both sides, then the ratios
    python scripts/benchmarks/bench_qlora.py --grad-ckpt     # with gradient checkpointing

On a machine without CUDA it says so and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_32_1B = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=2048,
    rope_theta=500000.0,
)
TARGETS = ["q", "k", "v", "o", "ffn_in", "ffn_out"]  # q k v o gate up down: all 7 projections
GIB = 1024**3


def save_model(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def measure(folder: Path, quant: str, *, batch: int, seq: int, steps: int, warmup: int, grad_ckpt: bool) -> dict:
    """One side, in this process: load, attach LoRA, train, and report memory and time."""
    from peftcli.methods.attach import attach_method
    from peftcli.methods.lora import LoraConfig
    from peftcli.models.loading import load_base_model
    from peftcli.models.losses import chunked_causal_lm_loss, hidden_states_out

    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = load_base_model(str(folder), "causal_lm", dtype=torch.bfloat16, quantization=quant)
    model.to(dev)
    arch, _ = attach_method(model, "lora", LoraConfig(r=16, alpha=32, targets=TARGETS))
    model.to(dev)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights_bytes = torch.cuda.memory_allocated()
    opt = torch.optim.AdamW(trainable, lr=2e-4, fused=True)
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, LLAMA_32_1B["vocab_size"], (batch, seq), device=dev, generator=g)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16), hidden_states_out(model, arch.spec.lm_head) as head:
            out = model(input_ids=ids)
            loss, _ = chunked_causal_lm_loss(out.logits, head, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        "side": "QLoRA (nf4 base)" if quant == "nf4" else "LoRA (bf16 base)",
        "quantization": quant,
        "trainable": sum(p.numel() for p in trainable),
        "lora_dtype": str(trainable[0].dtype),
        "weights_gib": weights_bytes / GIB,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "step_s": med,
        "tokens_per_s": batch * seq / med,
        "loss": loss,
        "device": torch.cuda.get_device_name(),
    }


def estimate(folder: Path) -> dict[str, float]:
    """peftcli count-params' weight estimate for the same model and adapter, to set beside the measurement."""
    from peftcli.config.recipe import recipe_from_dict
    from peftcli.training.budget import budget

    r = recipe_from_dict({"model": {"name": str(folder), "task": "causal_lm"},
                          "method": {"name": "lora", "r": 16, "alpha": 32, "targets": TARGETS}}, "bench")
    rows = {m["precision"]: m for m in budget(r)["memory"]}
    return {"none": rows["bf16 mixed"]["total_gib"], "nf4": rows["nf4 QLoRA"]["total_gib"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", choices=["none", "nf4"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_qlora.py needs a CUDA GPU (bitsandbytes 4-bit kernels); none is visible here, nothing measured.")
        return 0
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        print("bench_qlora.py needs bitsandbytes: pip install 'peftcli[qlora]'")
        return 1
    kw = dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup, grad_ckpt=args.grad_ckpt)
    if args.child:
        print("RESULT " + json.dumps(measure(args.model_dir, args.child, **kw)), flush=True)
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as tmp:
        folder = Path(tmp) / "llama-3.2-1b-shaped"
        save_model(folder)
        est = estimate(folder)
        for quant in ("none", "nf4"):
            cmd = [sys.executable, __file__, "--child", quant, "--model-dir", str(folder),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq", str(args.seq)] + (["--grad-ckpt"] if args.grad_ckpt else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if res.returncode != 0 or line is None:
                print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                print(f"the {quant} side failed (exit {res.returncode})")
                return 1
            results[quant] = json.loads(line[len("RESULT "):])
            results[quant]["estimate_gib"] = est[quant]

    lo, q = results["none"], results["nf4"]
    print(f"Llama-3.2-1B-shaped model, LoRA r=16 on 7 projections, {args.batch} x {args.seq} tokens, "
          f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}, {lo['device']}")
    print(f"{'side':<18} {'weights+adapter GiB':>20} {'count-params GiB':>17} {'peak GiB':>9} {'step s':>8} {'tokens/s':>9}")
    for r in (lo, q):
        print(f"{r['side']:<18} {r['weights_gib']:>20.2f} {r['estimate_gib']:>17.2f} {r['peak_gib']:>9.2f} "
              f"{r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f}")
    ratios = {
        "peak_memory_qlora_over_lora": q["peak_gib"] / lo["peak_gib"],
        "weights_qlora_over_lora": q["weights_gib"] / lo["weights_gib"],
        "step_time_qlora_over_lora": q["step_s"] / lo["step_s"],
    }
    print(f"peak memory  QLoRA / LoRA = {ratios['peak_memory_qlora_over_lora']:.3f}")
    print(f"weights      QLoRA / LoRA = {ratios['weights_qlora_over_lora']:.3f}")
    print(f"step time    QLoRA / LoRA = {ratios['step_time_qlora_over_lora']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in kw.items()}, "results": results,
                                         "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
