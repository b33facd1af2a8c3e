"""Full FT (AdamW and 8-bit AdamW), LoRA, GaLore, LISA and sparse at one step budget: held-out
metric, trainable parameters, optimizer-state bytes and peak memory. The README's memory table
comes from here.

Each run is a fresh `peftcli train` process, one after another (two runs sharing 2 cores would
slow each other down). The figures:

- optimizer state: the bytes of every optimizer tensor in the run's last checkpoint
  (`last/trainer_state.safetensors`, keys `opt/...`): exactly what the optimizer held at the end
  (bitsandbytes' two code books, which every 8-bit parameter's state shares, are stored once).
  `--check` compares it with what `peftcli count-params` predicts for the same recipe.
- peak memory: the process's maximum resident set size (`wait4` rusage of that child), so it
  includes the Python interpreter, torch and the tokenizer (the same for every run), the data,
  weights, gradients, optimizer state and activations. CPU only: a GPU run would read
  torch.cuda.max_memory_allocated instead.

    python scripts/benchmarks/bench_memory.py smollm2          # SmolLM2-135M-Instruct on tweets_instruct
    python scripts/benchmarks/bench_memory.py minilm           # all-MiniLM-L6-v2 on tweets
    python scripts/benchmarks/bench_memory.py minilm --table-only
    python scripts/benchmarks/bench_memory.py smollm2 --only full "full adamw_8bit" --check   # the 8-bit ratio
    python scripts/benchmarks/bench_memory.py smollm2 --only full "full adamw_8bit" --check \\
        --set model.dtype=bfloat16 train.max_steps=1 --out runs/bench_memory_bf16  # bf16 weights
    python scripts/benchmarks/bench_memory.py smollm2 --choose-lr    # GaLore's and LoRA's lr, chosen on validation

`--choose-lr` runs `peftcli sweep` over the learning rate of GaLore r 128 and of LoRA all-linear
r 16, both at the suite's step budget, choosing each on the recipes' 100 validation rows; only the
chosen trial's held-out loss is then read. That is the clean form of the "GaLore at or below
LoRA" comparison: no learning rate is picked by looking at the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]

COMMON = ["train.num_threads=1", "train.progress=false", "output.plot=false", "output.overwrite=true",
          "train.seed=0"]
# SmolLM2: 400 rows without the chat template (its system prompt would double every row), at most
# 96 tokens (the longest row is 93), batch 4, 20 steps; held-out loss (response tokens) on 64 rows.
SMOL = ["data.train_size=400", "data.eval_size=64", "data.max_length=96", "data.chat_template=false",
        "train.batch_size=4", "train.max_steps=20", "train.eval_every=20", "eval.metric=loss",
        "eval.generate_accuracy=false", "eval.generate_samples=0", "train.warmup_ratio=0.1", "train.log_every=5"]
# MiniLM: 2,000 rows, one epoch (63 steps of 32), accuracy on 2,000 held-out rows.
MINI = ["data.train_size=2000", "data.eval_size=2000", "data.max_length=64", "train.epochs=1",
        "train.batch_size=32", "train.log_every=10"]

SUITES: dict[str, list[tuple[str, str, list[str]]]] = {
    "smollm2": [
        ("full", "smollm2_lisa", ["train.lisa_layers=0", "train.lr=5e-5"]),
        ("full adamw_8bit", "smollm2_lisa", ["train.lisa_layers=0", "train.lr=5e-5", "train.optimizer=adamw_8bit"]),
        ("lora all-linear r16", "smollm2_lora", ["method.targets=[all-linear]", "train.lr=1e-3"]),
        ("galore r128 lr 1e-4", "smollm2_galore", ["train.lr=1e-4"]),
        ("galore r128 lr 4e-4", "smollm2_galore", ["train.lr=4e-4"]),
        ("lisa 2 layers", "smollm2_lisa", ["train.lr=5e-5"]),
        ("sparse 0.5%", "smollm2_galore", ["method={name: sparse, density: 0.005, calibration_batches: 8}",
                                           "train.lr=1e-3"]),
    ],
    "minilm": [
        ("full", "tweets_full", []),
        ("full adamw_8bit", "tweets_full", ["train.optimizer=adamw_8bit"]),
        ("lora q,v r8", "tweets_lora", []),
        ("galore r64", "tweets_galore", []),
        ("lisa 2 layers", "tweets_full", ["train.lisa_layers=2", "train.lisa_interval=10"]),
        ("sparse 0.5%", "tweets_sparse", []),
    ],
}


# --choose-lr: (name, recipe, fixed overrides, learning rates swept)
LR_SWEEPS = [
    ("galore r128", "smollm2_galore", [], "2e-4,4e-4,8e-4,1.6e-3,3.2e-3"),
    ("lora all-linear r16", "smollm2_lora", ["method.targets=[all-linear]", "method.r=16", "method.alpha=32"],
     "2.5e-4,5e-4,1e-3,2e-3"),
]


def choose_lr(out: Path, *, run: bool, only: list[str] | None = None) -> str:
    """Sweep each method's lr on validation, then show every trial's validation loss and the
    chosen trial's held-out loss (the held-out figure of the other trials is not shown)."""
    from peftcli.commands.sweep import pick_best, read_records

    lines = ["| method | lr: validation loss | chosen (on validation) | its held-out loss |", "|---|---|---|---|"]
    for name, recipe, extra, lrs in LR_SWEEPS:
        folder = out / "smollm2-lr" / slug(name)
        if run and (not only or name in only):
            common = [c for c in COMMON if not c.startswith("output.overwrite")]  # the sweep owns its folders
            cmd = [sys.executable, "-c", "from peftcli.cli import main; main()", "sweep",
                   str(ROOT / "recipes" / f"{recipe}.yaml"), f"train.lr={lrs}", *common, *SMOL, *extra,
                   "--out", str(folder)]
            print(" ".join(cmd[3:]), flush=True)
            subprocess.call(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        recs = read_records(folder)
        best = pick_best(recs, "loss")
        cells = ", ".join(f"{r['settings']['train.lr']:g}: " + (f"{r['value']:.4f}" if r.get("status") == "done"
                                                               else r.get("status", "?")) for r in recs)
        held = "–"
        if best is not None:
            summary = json.loads((Path(best["run"]) / "summary.json").read_text())
            held = f"{summary['test']['loss']:.4f}"
        chosen = f"lr {best['settings']['train.lr']:g}" if best else "–"
        lines.append(f"| {name} | {cells} | {chosen} | {held} |")
    return "\n".join(lines)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(suite: str, name: str, recipe: str, extra: list[str], out: Path, overrides: list[str]) -> dict:
    folder = out / suite / slug(name)
    sizes = SMOL if suite == "smollm2" else MINI
    cmd = [sys.executable, "-c", "from peftcli.cli import main; main()", "train", str(ROOT / "recipes" / f"{recipe}.yaml"),
           *COMMON, *sizes, *extra, *overrides, f"output.dir={folder}"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{slug(name)}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    record = {"name": name, "rc": rc, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}
    (folder.parent / f"{slug(name)}.json").write_text(json.dumps(record))
    print(f"{suite}/{name}: exit {rc}, {wall:.0f} s (log {log})", flush=True)
    return record


def optimizer_bytes(folder: Path, *, scalars: bool = True) -> int:
    """Bytes of the optimizer tensors in the run's last checkpoint; `scalars=False` leaves out
    the 0-d `step` counters torch keeps per parameter, which count-params does not size."""
    total = 0
    with safe_open(str(folder / "last" / "trainer_state.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("opt/"):
                t = f.get_tensor(k)
                if scalars or t.ndim > 0:
                    total += t.numel() * t.element_size()
    return total


def estimated_bytes(folder: Path) -> tuple[str, float]:
    """(optimizer, state bytes) `peftcli count-params` predicts for the recipe the run saved, with
    the run's number of classes, in the row of the weights' dtype: fp32 (what `model.dtype: auto`
    gives on CPU) or bf16 (`--set model.dtype=bfloat16`, the CUDA default)."""
    from peftcli.config.recipe import load_recipe
    from peftcli.training.budget import GIB, budget

    meta = json.loads((folder / "last" / "meta.json").read_text())
    labels = meta.get("label_names") or []
    r = load_recipe(folder / "recipe.yaml", [f"model.num_labels={len(labels)}"] if labels else [])
    b = budget(r)
    row = "bf16 mixed" if r.model.dtype == "bfloat16" else "fp32"
    return b["optimizer"], {m["precision"]: m for m in b["memory"]}[row]["optimizer_gib"] * GIB


def check(suite: str, out: Path) -> str:
    lines = ["| run | optimizer | measured state (no `step` scalars) | count-params | difference |",
             "|---|---|---|---|---|"]
    for name, _, _ in SUITES[suite]:
        folder = out / suite / slug(name)
        if not (folder / "summary.json").exists():
            continue
        measured = optimizer_bytes(folder, scalars=False)
        optimizer, est = estimated_bytes(folder)
        lines.append(f"| {name} | {optimizer} | {measured:,} B | {est:,.0f} B | {measured - est:+,.0f} B |")
    return "\n".join(lines)


def table(suite: str, out: Path) -> str:
    key = "loss" if suite == "smollm2" else "accuracy"
    lines = [f"| run | held-out {key} | trainable | optimizer state | vs full | peak RSS | wall |",
             "|---|---|---|---|---|---|---|"]
    full_state = None
    for name, _, _ in SUITES[suite]:
        folder = out / suite / slug(name)
        rec_path = folder.parent / f"{slug(name)}.json"
        if not (folder / "summary.json").exists() or not rec_path.exists():
            lines.append(f"| {name} | – | – | – | – | – | not finished |")
            continue
        s = json.loads((folder / "summary.json").read_text())
        rec = json.loads(rec_path.read_text())
        state = optimizer_bytes(folder)
        full_state = full_state or state
        metric = s["test"][key]
        shown = f"{metric:.4f}" if key == "loss" else f"{100 * metric:.2f} %"
        lines.append(f"| {name} | {shown} | {s['trainable']:,} | {state / 2**20:.1f} MiB | "
                     f"{100 * state / full_state:.1f} % | {rec['peak_rss_mib']:.0f} MiB | {rec['wall_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_memory")
    ap.add_argument("--only", nargs="*", help="run names to (re)run; default: all")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--check", action="store_true", help="also compare each run's state with count-params")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every run, e.g. model.dtype=bfloat16 train.max_steps=1 (use another --out)")
    ap.add_argument("--choose-lr", action="store_true",
                    help="smollm2: choose GaLore's and LoRA's lr on validation with peftcli sweep (see above)")
    a = ap.parse_args()
    if a.choose_lr:
        if a.suite != "smollm2":
            sys.exit("--choose-lr: only the smollm2 suite has it")
        print(choose_lr(a.out, run=not a.table_only, only=a.only))
        return
    if not a.table_only:
        for name, recipe, extra in SUITES[a.suite]:
            if a.only and name not in a.only:
                continue
            run(a.suite, name, recipe, extra, a.out, a.set)
    print(table(a.suite, a.out))
    if a.check:
        print(check(a.suite, a.out))


if __name__ == "__main__":
    main()
