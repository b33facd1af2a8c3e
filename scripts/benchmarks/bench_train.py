"""Training-step benchmark: peftcli's LoRA path against HF PEFT and against a free adapter, on the same model and batch.

Every side gets the same base model (same seed, same weights), the same adapted modules (peftcli's
targets resolved to module paths and handed to PEFT verbatim), the same trainable head, the same
batch, the same AdamW (fused on CPU and CUDA, as the training loop builds it) and the same autocast.
Sides (`--sides`, comma list; `auto` = peftcli,peft,floor; `levers` = each lever on its own):

- `peft`: `get_peft_model` (`peft-bf16`: with autocast_adapter_dtype=False; `peft+compile`: compiled
  as `+compile` below is).
- `floor`: a free adapter: a zero bias added in place to the output of every adapted linear layer,
  trained like LoRA's factors. Backward must still reach every adapted layer, but the adapter costs
  nothing: no LoRA path can train faster on the same model and batch.
- `plain`: peftcli's LoRA path (`methods.attach.attach_method`) and nothing else; `+trim`,
  `+compile`, `+chunked`: one lever each on top of it (`models.trim.trim_unread_positions`: BERT-family
  classifiers; `models.compile.compile_layers`; the chunked loss from hidden states of
  `models.losses`: causal LMs). A lever that does not apply to the case drops its side.
- `peftcli`: what `peftcli train` runs by default: trim and the chunked loss where they apply,
  compile on CUDA (--no-trim, --compile change it).

Every side but the chunked-loss ones takes the model's own loss (`labels=`; F.cross_entropy on a
classifier's logits, which is what its head computes) and causal LMs run with use_cache=False, so
that `plain` and `floor` differ by the adapter path alone. "× PEFT" is PEFT's median step over a
side's, "/ floor" a side's over the floor's. "first loss" is each side's loss at initialisation with
dropout off: equal values show that every side trains the same function.

    python scripts/benchmarks/bench_train.py --case cpu-minilm --threads 2 --sides levers --steps 20
    python scripts/benchmarks/bench_train.py --case cpu-decoder --threads 2 --sides levers --steps 10
    python scripts/benchmarks/bench_train.py --case cpu-decoder --threads 1 --profile 30   # where each side's time goes
    python scripts/benchmarks/bench_train.py --case gpu-bert
    python scripts/benchmarks/bench_train.py --case gpu-llama1b
    python scripts/benchmarks/bench_train.py --case gpu-llama1b --tiny     # checks the script on a CPU-only machine
    python scripts/benchmarks/bench_train.py --case cpu-sft                # whole SFT runs: padded, grouped, packed (2 ways), HF
    python scripts/benchmarks/bench_train.py --case cpu-minilm --option pissa   # one LoRA option on both sides

`--option` switches one of LoRA's options on, on both sides alike: `pissa` / `olora` (the start
taken on both), `freeze_a` (LoRA-FA: A frozen on both), `rank_pattern` (twice the rank on v), or
`lora_plus` (B at 16 x lr: peftcli's `train.lora_plus_ratio` groups against PEFT's
`create_loraplus_optimizer`).

On a CPU shared with other processes, use --threads 1 (or auto): with torch's default of one
thread per core, every op waits at a barrier for a descheduled thread, and step times swing by 2×
from one step to the next whatever the library. "CPU s/step" (process CPU time) is then the
steadier figure to compare.

Timing. CPU: sides alternate step by step (the order flips every round) so that load from other
processes on a shared machine hits both alike; the figure is the median of the timed steps. CUDA:
each side runs alone (build, warm up, time, free) so that `torch.cuda.max_memory_allocated` is
that side's whole footprint (weights, adapter, gradients, optimizer state, activations); steps
are timed with a device synchronise on both ends.

Memory. CUDA: peak allocated bytes over the timed steps. CPU has no allocator statistics, so two
figures are printed, both labelled: "saved" = bytes of the distinct tensors autograd keeps for
backward in one step (measured with saved-tensor hooks, in a separate untimed step; excludes
weights and short-lived temporaries), and "rss+" = rise of the process's peak resident set over
one step (kernel high-water mark, reset before the step; the allocator may reuse memory freed
earlier, so this under-reads and is only indicative).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# --option: (peftcli's LoraConfig options, PEFT's LoraConfig options); rank_pattern's are set per case (2r on v).
OPTIONS = {
    "none": ({}, {}),
    "pissa": ({"init": "pissa"}, {"init_lora_weights": "pissa"}),
    "olora": ({"init": "olora"}, {"init_lora_weights": "olora"}),
    "freeze_a": ({"freeze_a": True}, {}),
    "rank_pattern": ({}, {}),
    "lora_plus": ({}, {}),
}
LORA_PLUS = 16.0
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

CASES = {
    "cpu-minilm": dict(device="cpu", batch=32, seq=64, task="classification", targets=["q", "v"], r=8, alpha=16,
                       lr=1e-3, dtype="float32"),
    "cpu-decoder": dict(device="cpu", batch=8, seq=64, task="causal_lm", targets=["all-linear"], r=8, alpha=16,
                        lr=1e-3, dtype="float32"),
    "gpu-bert": dict(device="cuda", batch=32, seq=128, task="classification", targets=["q", "v"], r=8, alpha=16,
                     lr=1e-3, dtype="bfloat16"),
    "gpu-llama1b": dict(device="cuda", batch=8, seq=1024, task="causal_lm",
                        targets=["q", "k", "v", "o", "ffn_in", "ffn_out"], r=16, alpha=32, lr=2e-4,
                        dtype="bfloat16"),
}


# ------------------------------------------------------------------------------------- models


def base_model(
    case: str, seed: int, attn: str, tiny: bool, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """The same frozen base for every side: a fixed seed before any weight (or head) is drawn.

    `tiny` keeps each case's architecture and code path but shrinks its shapes, to check this
    script on a machine without the case's device.
    """
    from peftcli.models.loading import load_base_model, model_from_config

    torch.manual_seed(seed)
    if case == "cpu-minilm" and not tiny:
        return load_base_model(
            "sentence-transformers/all-MiniLM-L6-v2", "classification", num_labels=3, dtype=dtype,
            attn_implementation=attn,
        ).to(device)
    if case in ("cpu-minilm", "gpu-bert"):
        from transformers import BertConfig

        # BERT-base: 768 hidden, 12 layers, 12 heads, FFN 3072, vocab 30522
        cfg = BertConfig(**(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, vocab_size=1000) if tiny else {}))
        cfg._attn_implementation = attn
        return model_from_config(cfg, "classification", num_labels=3).to(device=device, dtype=dtype)
    if case == "cpu-decoder" and not tiny:
        return load_base_model(SMOLLM2, "causal_lm", dtype=dtype, attn_implementation=attn).to(device)
    if case in ("gpu-llama1b", "cpu-decoder"):
        from transformers import LlamaConfig

        shape = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, intermediate_size=8192, vocab_size=128256)
        if tiny:
            shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=256, vocab_size=1000)
        cfg = LlamaConfig(
            **shape, tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )
        cfg._attn_implementation = attn
        # Random weights drawn directly in bf16 on the device: no fp32 copy of 1.2 B weights, and
        # RoPE's inverse frequencies stay float32 as they do after from_pretrained(dtype=bf16).
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                return model_from_config(cfg, "causal_lm")
        finally:
            torch.set_default_dtype(prev)
    raise ValueError(case)


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@dataclass
class Side:
    name: str
    model: torch.nn.Module
    loss: Callable[[], torch.Tensor]  # forward + loss under the case's autocast
    opt: torch.optim.Optimizer
    notes: str = ""
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time per timed step
    peak: float | None = None  # bytes (CUDA: max allocated; CPU: rss high-water rise)
    saved: float | None = None  # bytes autograd kept for backward in one step
    first_loss: float | None = None  # at initialisation, dropout off: must agree across sides

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def init_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            v = float(self.loss())
        self.model.train()
        return v


def make_batch(case: str, cfg: dict, vocab: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg["task"] == "classification":
        b["labels"] = torch.randint(0, 3, (cfg["batch"],), generator=g)
    else:
        b["labels"] = ids.clone()
    return {k: v.to(device) for k, v in b.items()}


def autocast(device: torch.device, cfg: dict):
    from peftcli.core.precision import autocast_ctx

    return autocast_ctx(device, "auto" if cfg["dtype"] == "bfloat16" else "fp32")


def optimizer_for(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the training loop builds it (fused on CPU and CUDA), the same on every side."""
    from peftcli.training.optim import fused_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, fused=fused_adamw(device))


def causal_inputs(batch: dict) -> dict:
    """What every causal-LM side passes: no KV cache (as the training loop runs), HF's own loss."""
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def hf_loss(model: torch.nn.Module, cfg: dict, batch: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    """The model's own loss: F.cross_entropy on the classifier's logits (what BERT's head computes
    from `labels=`), or the causal LM's `labels=` loss. Every side but the chunked-loss ones uses it."""

    def loss() -> torch.Tensor:
        with autocast(device, cfg):
            if cfg["task"] == "classification":
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return F.cross_entropy(out.logits.float(), batch["labels"])
            return model(**causal_inputs(batch), labels=batch["labels"]).loss

    return loss


def compile_sides_layers(model: torch.nn.Module, args) -> str:
    """torch.compile for a side, the same scope on every side: each layer, or the whole model."""
    from peftcli.core.arch import resolve
    from peftcli.models.compile import compile_layers

    if args.compile_scope == "model":  # one region: one guard check per step instead of one per layer
        model.compile(dynamic=False, mode=args.compile_mode)
    else:
        compile_layers(model, resolve(model), mode=args.compile_mode)
    return f"compiled {args.compile_scope}" + (f" ({args.compile_mode})" if args.compile_mode else "")


@dataclass
class Levers:
    """Which of peftcli's speed levers a peftcli side pulls (the LoRA path itself is always on)."""

    trim: bool = False
    compile: bool = False
    chunked: bool = False


# Each peftcli side: its levers, or None for `peftcli`, the default `peftcli train` path (trim and the
# chunked loss where they apply, compile on CUDA; --no-trim and --compile change it).
PEFTCLI_SIDES = {
    "peftcli": None,
    "plain": Levers(),
    "+trim": Levers(trim=True),
    "+compile": Levers(compile=True),
    "+chunked": Levers(chunked=True),
}


def default_levers(cfg: dict, args, device: torch.device) -> Levers:
    return Levers(trim=not args.no_trim, chunked=cfg["task"] == "causal_lm",
                  compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"))


def build_peftcli(case: str, cfg: dict, args, device: torch.device, batch: dict, name: str) -> Side | None:
    """A peftcli LoRA side; None when its one lever does not apply to the case (trim on a causal LM,
    the chunked loss on a classifier): that side would be `plain` again."""
    from peftcli.methods import get_method
    from peftcli.methods.attach import attach_method
    from peftcli.methods.lora import LoraConfig
    from peftcli.models.losses import chunked_causal_lm_loss, hidden_states_out
    from peftcli.models.trim import trim_unread_positions

    lev = PEFTCLI_SIDES[name] or default_levers(cfg, args, device)
    if name == "+chunked" and cfg["task"] != "causal_lm":
        return None
    model = base_model(case, args.seed, args.attn, args.tiny, device, dtype_of(cfg["dtype"]))
    extra = dict(OPTIONS[args.option][0])
    if args.option == "rank_pattern":
        extra["rank_pattern"] = {"v": 2 * cfg["r"]}
    lcfg = LoraConfig(r=cfg["r"], alpha=cfg["alpha"], dropout=args.lora_dropout, targets=cfg["targets"],
                      rslora=args.rslora, use_dora=args.dora, **extra)
    torch.manual_seed(args.seed + 1)
    arch, spec = attach_method(model, "lora", lcfg)
    spec.calibrate(model, arch, lcfg, None)  # the PiSSA / OLoRA start, as a new run takes it
    model.to(device)
    notes = []
    if args.grad_ckpt:  # as peftcli.runs.load.build does for model.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        notes.append("grad-ckpt")
    if lev.trim:
        if trim_unread_positions(model, arch, get_method("lora").positionwise, cfg["task"]):
            notes.append("trim: last layer's query and post-attention part at the head's position only")
        elif name == "+trim":
            return None
    if lev.compile:
        notes.append(compile_sides_layers(model, args))
    model.train()
    if args.option == "lora_plus":
        from peftcli.training.optim import fused_adamw, lora_plus_groups

        opt = torch.optim.AdamW(lora_plus_groups(model, cfg["lr"], LORA_PLUS, 0.0, "lora"), lr=cfg["lr"],
                                fused=fused_adamw(device))
    else:
        opt = optimizer_for(model, cfg["lr"], device)
    head_path = arch.spec.lm_head
    cuda_graphs = args.compile_mode == "reduce-overhead"
    plain = hf_loss(model, cfg, batch, device)
    if lev.chunked:
        notes.append("chunked loss from hidden states")

    def loss() -> torch.Tensor:
        if cuda_graphs:  # a new step: graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if not lev.chunked:
            return plain()
        with autocast(device, cfg), hidden_states_out(model, head_path) as head:  # as peftcli.training.loop
            out = model(**causal_inputs(batch))
            return chunked_causal_lm_loss(out.logits, head, batch["labels"])[0]

    return Side(name, model, loss, opt, "; ".join(notes))


def build_peft(case: str, cfg: dict, args, device: torch.device, batch: dict, name: str) -> Side:
    """HF PEFT on the very modules peftcli adapts; `peft-bf16`: autocast_adapter_dtype=False;
    `peft+compile`: torch.compile with the peftcli sides' scope (one line for PEFT's users)."""
    from peft import LoraConfig, get_peft_model

    from peftcli.core.arch import resolve
    from peftcli.methods.targets import select_linears

    model = base_model(case, args.seed, args.attn, args.tiny, device, dtype_of(cfg["dtype"]))
    arch = resolve(model)
    paths = select_linears(model, arch, cfg["targets"])  # the very modules peftcli adapts
    task_type = "SEQ_CLS" if cfg["task"] == "classification" else "CAUSAL_LM"
    extra = dict(OPTIONS[args.option][1])
    if args.option == "rank_pattern":  # the same modules as peftcli's role key, by escaped path
        import re

        extra["rank_pattern"] = {re.escape(p): 2 * cfg["r"] for p in select_linears(model, arch, ["v"])}
    pcfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=args.lora_dropout,
                      target_modules=paths, task_type=task_type, use_rslora=args.rslora, use_dora=args.dora,
                      **extra)
    torch.manual_seed(args.seed + 1)
    autocast_adapter = name != "peft-bf16"
    model = get_peft_model(model, pcfg, autocast_adapter_dtype=autocast_adapter)
    if args.option == "freeze_a":
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    notes = ["fp32 adapters (default)"] if autocast_adapter and cfg["dtype"] != "float32" else []
    if not autocast_adapter:
        notes = ["autocast_adapter_dtype=False"]
    if name == "peft+compile":
        notes.append(compile_sides_layers(model.get_base_model(), args))
    model.train()
    if args.option == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        from peftcli.training.optim import fused_adamw

        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg["lr"], loraplus_lr_ratio=LORA_PLUS,
                                        fused=fused_adamw(device))
    else:
        opt = optimizer_for(model, cfg["lr"], device)
    return Side(name, model, hf_loss(model, cfg, batch, device), opt, "; ".join(notes))


def add_free_bias(layer: torch.nn.Module) -> None:
    """The floor's adapter on one linear layer: a trainable zero bias added in place to its output."""
    from peftcli.core.arch import linear_dims

    w = layer.weight
    layer.free_bias = torch.nn.Parameter(torch.zeros(linear_dims(layer)[1], dtype=w.dtype, device=w.device))
    layer.register_forward_hook(lambda m, _inp, out: out.add_(m.free_bias))


def build_floor(case: str, cfg: dict, args, device: torch.device, batch: dict, name: str) -> Side:
    """The free adapter: a zero bias added in place to the output of every adapted linear layer,
    trained by the same optimizer, beside the same trainable head and with the same loss.

    Backward must still reach every adapted layer (each bias needs dL/dy there, so dL/dx flows
    down to the first adapted layer, as it does for LoRA), but the adapter itself costs one
    in-place add forward and one column sum backward: no LoRA path can train faster on the same
    model and batch.
    """
    from peftcli.core.arch import resolve
    from peftcli.methods.attach import freeze
    from peftcli.methods.targets import select_linears

    model = base_model(case, args.seed, args.attn, args.tiny, device, dtype_of(cfg["dtype"]))
    arch = resolve(model)
    freeze(model)
    for _, head in arch.head_modules():
        head.requires_grad_(True)
    for path in select_linears(model, arch, cfg["targets"]):
        add_free_bias(model.get_submodule(path))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = optimizer_for(model, cfg["lr"], device)
    return Side(name, model, hf_loss(model, cfg, batch, device), opt, "zero bias on each adapted layer's output")


def builder(name: str) -> Callable[..., Side | None]:
    if name in PEFTCLI_SIDES:
        return build_peftcli
    if name in ("peft", "peft-bf16", "peft+compile"):
        return build_peft
    if name == "floor":
        return build_floor
    raise SystemExit(f"--sides: unknown side {name!r}; choose from {', '.join(ALL_SIDES)}")


ALL_SIDES = (*PEFTCLI_SIDES, "peft", "peft-bf16", "peft+compile", "floor")
# --sides levers: each lever on its own beside the plain path, PEFT with and without compile, the floor.
LEVER_SIDES = ("peft", "peft+compile", "floor", "plain", "+trim", "+compile", "+chunked", "peftcli")


# ------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(side: Side, device: torch.device) -> float:
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    loss = side.step()
    _sync(device)
    side.times.append(time.perf_counter() - t)
    side.cpu_times.append(time.process_time() - c)
    return loss


def saved_bytes(side: Side) -> float:
    """Bytes of distinct storages autograd saves for backward during one step."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in side.model.parameters()}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # sparse / opaque tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        side.step()
    return float(sum(seen.values()))


def _rss_hwm_reset() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_peak_rise(side: Side) -> float | None:
    base = _rss_hwm_reset()
    if base is None:
        return None
    side.step()
    return float(max(0, _status_kb("VmHWM") - base) * 1024)


def profile(side: Side, rows: int, device: torch.device) -> None:
    """Where one side's step time goes: the ops with the most self time over two steps (device
    time on CUDA, CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch_profile(activities=acts) as prof:
        for _ in range(2):
            side.step()
        _sync(device)
    print(f"\n### profile: {side.name} (2 steps)\n")
    key = "cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70))


def run_cpu(sides_fns: list[Callable[[], Side | None]], args, device: torch.device) -> list[Side]:
    sides = [s for s in (fn() for fn in sides_fns) if s is not None]
    for s in sides:
        s.first_loss = s.init_loss()
    for _ in range(args.warmup):
        for s in sides:
            s.step()
    for s in sides:
        if not args.no_memory:
            s.saved = saved_bytes(s)
            s.peak = cpu_peak_rise(s)
    for i in range(args.steps):
        order = sides if i % 2 == 0 else sides[::-1]
        for s in order:
            timed(s, device)
    if args.profile:
        for s in sides:
            profile(s, args.profile, device)
    return sides


def run_cuda(sides_fns: list[Callable[[], Side | None]], args, device: torch.device) -> list[Side]:
    done = []
    for fn in sides_fns:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        s = fn()
        if s is None:
            continue
        s.first_loss = s.init_loss()
        for _ in range(args.warmup):
            s.step()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            timed(s, device)
        s.peak = float(torch.cuda.max_memory_allocated())
        if args.profile:
            profile(s, args.profile, device)
        s.model = s.opt = s.loss = None  # free weights and optimizer state before the next side
        torch._dynamo.reset()  # and compiled graphs, which hold on to the modules
        done.append(s)
    return done


# ------------------------------------------------------------------------------------- cpu-sft



def tiny_smollm2(out: Path) -> str:
    """--tiny: a 2-layer Llama with SmolLM2's tokenizer and chat template, to check the case's code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.models.loading import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out / "tiny-model")
    tok.save_pretrained(out / "tiny-model")
    return str(out / "tiny-model")


def sft_recipe(args, out: Path, name: str, batch_size: int, **data) -> object:
    from peftcli.config.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"name": args.model, "task": "causal_lm"},
        # A few validation rows: the runs' kept adapter is the last either way (one evaluation).
        "data": {"source": "tweets_chat", "train_size": args.rows, "eval_size": args.eval_rows, "val_size": 16,
                 "max_length": args.max_length, **data},
        "method": {"name": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
        "train": {"epochs": 1, "batch_size": batch_size, "lr": 1e-3, "seed": args.seed, "progress": False,
                  "log_every": 1000, "group_by_length": name == "grouped"},
        "eval": {"metric": "loss", "batch_size": 16, "generate_samples": 0},
        "output": {"dir": str(out / name), "plot": False, "overwrite": True},
    }, f"cpu-sft/{name}")


def run_peftcli_sft(args, out: Path, name: str, batch_size: int, **data) -> dict:
    """One peftcli training run; tokens/s from its last metrics line (the training loop alone)."""
    from rich.console import Console

    from peftcli.runs.metrics import read_metrics
    from peftcli.training.loop import train

    summary = train(sft_recipe(args, out, name, batch_size, **data), console=Console(stderr=True, quiet=True))
    last = [r for r in read_metrics(out / name).steps if "tokens_per_s" in r][-1]
    return {"side": name, "batch": f"{batch_size} {'rows' if data.get('packing') is True else 'examples'}"
            + (" packed" if data.get("packing") == "batch" else ""),
            "steps": summary["steps"], "tokens_per_s": last["tokens_per_s"], "train_s": last["elapsed_s"],
            "eval_loss": summary["test"]["loss"]}


def run_hf_trainer_sft(args, out: Path, batch_size: int, train_ex: list[dict], eval_ex: list[dict]) -> dict:
    """HF PEFT LoRA trained by transformers' Trainer with a dynamic-padding collator, as its users do;
    held-out loss measured with peftcli's evaluate on the same examples."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftcli.data.batching import Collator
    from peftcli.inference.evaluate import evaluate
    from peftcli.methods.lora import LoraConfig
    from peftcli.models.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(args.model)
    torch.manual_seed(args.seed)
    model = load_base_model(args.model, "causal_lm", dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 lora_dropout=LoraConfig().dropout, task_type="CAUSAL_LM"))
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
            for e in train_ex]
    targs = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=1e-3,
        lr_scheduler_type="linear", warmup_steps=int(0.06 * -(-len(rows) // batch_size)),  # as peftcli's
        weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    res = trainer.train()
    tokens = sum(len(e["input_ids"]) for e in train_ex)
    m = evaluate(model, eval_ex, Collator(tok.pad_token_id, "causal_lm"), task="causal_lm",
                 device=torch.device("cpu"), batch_size=16)
    return {"side": "HF PEFT + Trainer", "batch": f"{batch_size} examples", "steps": res.global_step,
            "tokens_per_s": tokens / res.metrics["train_runtime"], "train_s": res.metrics["train_runtime"],
            "eval_loss": m["loss"]}


SFT_SIDES = ("padded", "grouped", "packed", "packed-batch", "hf")


def cpu_sft(args) -> int:
    """Padded, length-grouped and packed peftcli runs beside HF PEFT + Trainer on the same chat data.

    tokens/s counts real (non-padding) tokens of the training examples per second of training
    loop; every side sees the same examples once. Packed rows (`data.packing: true`) hold about as
    many tokens per step as a padded batch of `--batch` examples, so the runs take similar numbers
    of similar steps; `packed-batch` (`data.packing: batch`) takes the padded side's very batches,
    each packed, so its steps and losses are the padded side's up to dropout's masks.
    """
    import tempfile

    from peftcli.core.quiet import quiet_command
    from peftcli.models.loading import load_tokenizer
    from peftcli.runs.load import prepare_data

    sides = args.sft_sides.split(",")
    if unknown := [x for x in sides if x not in SFT_SIDES]:
        print(f"--sft-sides: unknown side(s) {', '.join(unknown)}; choose from {', '.join(SFT_SIDES)}", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-sft-"))
    with quiet_command():
        args.model = tiny_smollm2(out) if args.tiny else SMOLLM2
        tok = load_tokenizer(args.model)
        _, train_ex, _, eval_ex = prepare_data(sft_recipe(args, out, "padded", args.batch), tok)
        mean_len = sum(len(e["input_ids"]) for e in train_ex) / len(train_ex)
        rows = max(1, round(args.batch * mean_len / args.max_length))
        results = []
        for side in sides:
            if side == "padded" or side == "grouped":
                results.append(run_peftcli_sft(args, out, side, args.batch))
            elif side == "packed":
                results.append(run_peftcli_sft(args, out, side, rows, packing=True))
            elif side == "packed-batch":  # the padded side's batches, each packed: its steps, without padding
                results.append(run_peftcli_sft(args, out, side, args.batch, packing="batch"))
            elif side == "hf":
                results.append(run_hf_trainer_sft(args, out, args.batch, train_ex, eval_ex))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    where = f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    model = "a 2-layer Llama with SmolLM2's tokenizer (--tiny: timings mean nothing)" if args.tiny else SMOLLM2
    print(f"\n## cpu-sft: {model}, LoRA r 16 all-linear, tweets_chat ({len(train_ex)} train / "
          f"{len(eval_ex)} held-out conversations, mean {mean_len:.0f} tokens, max_length {args.max_length}), "
          f"1 epoch · {where} · torch {torch.__version__}\n")
    print("| side | batch | steps | tokens/s | × padded | × HF | train s | held-out loss |\n|---|---|---|---|---|---|---|---|")
    base = {r["side"]: r["tokens_per_s"] for r in results}
    for r in results:
        vs = [f"{r['tokens_per_s'] / base[k]:.2f}×" if k in base else "n/a" for k in ("padded", "HF PEFT + Trainer")]
        print(f"| {r['side']} | {r['batch']} | {r['steps']} | {r['tokens_per_s']:.0f} | {vs[0]} | {vs[1]} | "
              f"{r['train_s']:.0f} | {r['eval_loss']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"case": "cpu-sft", "device": where, "results": results}, indent=2))
    return 0


# ------------------------------------------------------------------------------------- report


def arithmetic_bound(sides: list[Side], cfg: dict) -> str | None:
    """LoRA's own products against the floor's GEMMs, from the floor side's model.

    Per adapted layer LoRA adds six rank-r products (A x and the update forward; dy B, dB, dA and
    the update of dx backward), 6·N·r·(in + out) FLOPs; the floor's step is mostly its linear
    maps, 4·N·in·out each (forward and dx: the frozen weight takes no dW). Their ratio is how close
    to the floor a LoRA path could come if its rank-r products ran at the base GEMMs' rate per FLOP.
    Attention, norms and the loss are left out of the floor's count, so the bound is a little loose.
    """
    floor = next((s for s in sides if s.name == "floor"), None)
    if floor is None:
        return None
    from peftcli.core.arch import is_conv1d, linear_dims, resolve

    arch = resolve(floor.model)
    n, r = cfg["batch"] * cfg["seq"], cfg["r"]
    base = lora = 0
    for layer in arch.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear) or is_conv1d(m):
                i, o = linear_dims(m)
                base += 4 * n * i * o
                if hasattr(m, "free_bias"):
                    lora += 6 * n * r * (i + o)
    what = "the layers' linear maps"
    if cfg["task"] == "causal_lm":
        i, o = linear_dims(floor.model.get_submodule(arch.spec.lm_head))
        base += 4 * n * i * o
        what += " and the LM head"
    return (f"LoRA's own products: {lora / 1e9:.2f} GFLOP a step against {base / 1e9:.1f} GFLOP in the floor's GEMMs "
            f"({what}, forward and dx): at the base GEMMs' rate per FLOP a LoRA path would still be "
            f"{1 + lora / base:.3f}× the floor.")


def report(sides: list[Side], cfg: dict, args, device: torch.device) -> str:
    """One row per side: its step time, and its ratios to HF PEFT and to the floor.

    "× PEFT" is PEFT's median step over this side's (a speed-up: above 1 is faster than PEFT);
    "/ floor" is this side's median step over the free adapter's (the floor is 1.00; what a side
    spends above 1 is what its adapter path costs).
    """
    n_samples = cfg["batch"]
    n_tokens = cfg["batch"] * cfg["seq"]
    cuda = device.type == "cuda"
    gib, mib = 2**30, 2**20
    med = {s.name: statistics.median(s.times) for s in sides}
    cpu = {s.name: statistics.median(s.cpu_times) for s in sides}
    peft, floor = med.get("peft"), med.get("floor")
    head = ("| side | step ms (median) | min | samples/s | tokens/s | × PEFT | / floor | "
            + ("peak alloc GiB |" if cuda else "CPU s/step (median) | saved MiB | rss+ MiB |")
            + " first loss | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in sides:
        m = med[s.name]
        if cuda:
            mem = f" {s.peak / gib:.2f} |" if s.peak is not None else " n/a |"
        else:
            saved = f"{s.saved / mib:.1f}" if s.saved is not None else "n/a"
            rss = f"{s.peak / mib:.0f}" if s.peak is not None else "n/a"
            mem = f" {cpu[s.name]:.3f} | {saved} | {rss} |"
        vs_peft = f"{peft / m:.3f}×" if peft else "n/a"
        vs_floor = f"{m / floor:.3f}×" if floor else "n/a"
        lines.append(f"| {s.name} | {m * 1e3:.1f} | {min(s.times) * 1e3:.1f} | {n_samples / m:.2f} | "
                     f"{n_tokens / m:.0f} | {vs_peft} | {vs_floor} |{mem} {s.first_loss:.4f} | {s.notes} |")
    if peft and floor:
        lines += ["", f"PEFT / floor = {peft / floor:.3f}×: the most any LoRA path could gain over PEFT here."]
    if (bound := arithmetic_bound(sides, cfg)) is not None:
        lines += ["", bound]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted([*CASES, "cpu-sft"]), default="cpu-minilm")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side; the median is reported")
    ap.add_argument("--sides", default="auto",
                    help=f"comma list of {', '.join(ALL_SIDES)}; auto = peftcli,peft,floor (+ peft-bf16 for bf16 "
                         f"cases); levers = {','.join(LEVER_SIDES)}")
    ap.add_argument("--rslora", action="store_true", help="LoRA sides: rsLoRA scaling")
    ap.add_argument("--dora", action="store_true", help="LoRA sides: DoRA")
    ap.add_argument("--threads", default=None,
                    help="torch intra-op threads for the whole process (both sides): a number, or auto = "
                         "peftcli.core.threads.idle_cpu_threads(); default: torch's own")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel, both sides")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--option", choices=sorted(OPTIONS), default="none",
                    help="one of LoRA's options on both sides (rank_pattern: 2r on v, lora_plus: ratio 16)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="peftcli side: compile each layer (auto = on for CUDA)")
    ap.add_argument("--no-trim", action="store_true",
                    help="peftcli side: keep every position in the last layer (see models.trim.trim_unread_positions)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on both sides")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the two memory probe steps")
    ap.add_argument("--tiny", action="store_true",
                    help="same case and code path with shrunk shapes, on CPU when the case's device is absent "
                         "(checks the script; its timings mean nothing)")
    ap.add_argument("--compile-scope", choices=["layers", "model"], default="layers",
                    help="peftcli side: compile each layer (as train.compile does) or the whole model")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile (e.g. reduce-overhead)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after timing, profile two steps per side and print the ROWS costliest ops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    ap.add_argument("--rows", type=int, default=256, help="cpu-sft: training conversations")
    ap.add_argument("--eval-rows", type=int, default=64, help="cpu-sft: held-out conversations")
    ap.add_argument("--batch", type=int, default=16, help="cpu-sft: examples per padded batch")
    ap.add_argument("--max-length", type=int, default=512, help="cpu-sft: packed row length and truncation")
    ap.add_argument("--sft-sides", default="padded,grouped,packed,packed-batch,hf", help="cpu-sft: sides to run, in order")
    ap.add_argument("--out", default=None, help="cpu-sft: folder for the runs (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.case == "cpu-sft":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.threads:
            torch.set_num_threads(int(args.threads))
        return cpu_sft(args)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = dict(CASES[args.case])
    if args.tiny:
        cfg.update(batch=4, seq=32)
        if not torch.cuda.is_available():
            cfg["device"] = "cpu"
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print(f"--case {args.case} needs a CUDA device; none is visible here (--tiny checks the script on CPU).",
              file=sys.stderr)
        return 2
    device = torch.device(cfg["device"])
    if args.threads == "auto":
        from peftcli.core.threads import idle_cpu_threads

        torch.set_num_threads(idle_cpu_threads())
    elif args.threads:
        torch.set_num_threads(int(args.threads))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.sides == "auto":
        names = ["peftcli", "peft", "floor"] + (["peft-bf16"] if cfg["dtype"] == "bfloat16" else [])
    elif args.sides == "levers":
        names = list(LEVER_SIDES)
    else:
        names = [s.strip() for s in args.sides.split(",")]

    vocab = 1000 if args.tiny else {"cpu-minilm": 30522, "gpu-bert": 30522, "gpu-llama1b": 128256,
                                     "cpu-decoder": 49152}[args.case]
    batch = make_batch(args.case, cfg, vocab, device, args.seed)
    fns = [lambda n=n: builder(n)(args.case, cfg, args, device, batch, n) for n in names]
    sides = (run_cuda if device.type == "cuda" else run_cpu)(fns, args, device)

    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    kind = "DoRA" if args.dora else "rsLoRA" if args.rslora else "LoRA"
    print(f"\n## {args.case}: {cfg['batch']} × {cfg['seq']} tokens, {cfg['dtype']}, {kind} r {cfg['r']} on "
          f"{','.join(cfg['targets'])}, attn {args.attn}, {args.warmup} warm-up + {args.steps} timed steps per side"
          f" · {where} · torch {torch.__version__}\n")
    print(report(sides, cfg, args, device))
    if args.json:
        args.json.write_text(json.dumps({
            "case": args.case, "device": where, "args": {k: str(v) for k, v in vars(args).items()},
            "sides": [{"name": s.name, "times_s": s.times, "peak_bytes": s.peak, "saved_bytes": s.saved,
                       "first_loss": s.first_loss, "notes": s.notes} for s in sides],
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
