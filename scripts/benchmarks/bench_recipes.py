"""Train shipped recipes at full size, one after another, and print a results table.

The README's results tables come from this script. Runs are sequential on purpose: two trainings
sharing 2 cores would slow each other and make the times meaningless. With `--seeds` each recipe
is trained once per `train.seed` (the data split, `data.seed`, stays put) and the table gives the
mean and spread of the test accuracy beside the peers' reference figure. Finished runs are kept
and not re-run, so an interrupted call picks up where it stopped.

    python scripts/benchmarks/bench_recipes.py tweets_lora tweets_full tweets_bitfit
    python scripts/benchmarks/bench_recipes.py --seeds 0,1,2 tweets_lora tweets_ia3
    python scripts/benchmarks/bench_recipes.py --table-only --seeds 0,1,2 tweets_lora   # re-read finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Held-out accuracy the peers reach on the same rows (HF PEFT / AdapterHub, constant lr, 2 epochs):
# see ../shared/EMBEDDED.md and the README's results section.
REFERENCE = {
    "tweets_full": 78.9, "tweets_lora": 77.7, "tweets_ia3": 74.6, "tweets_prefix": 74.5, "tweets_houlsby": 78.7,
    "tweets_pfeiffer": 78.0, "tweets_parallel": 76.5, "tweets_compacter": 75.5, "tweets_compacterpp": 73.0,
    "tweets_mam": 77.2, "tweets_unipelt": 78.4,
}


def run_dir(out: Path, name: str, seed: int | None = None) -> Path:
    return out / name if seed is None else out / name / f"seed-{seed}"


def train(name: str, out: Path, extra: list[str], seed: int | None = None) -> float:
    folder = run_dir(out, name, seed)
    if (folder / "summary.json").exists():
        print(f"{folder}: finished earlier, kept", flush=True)
        return 0.0
    recipe = ROOT / "recipes" / f"{name}.yaml"
    seeded = [f"train.seed={seed}"] if seed is not None else []
    cmd = ["peftcli", "train", str(recipe), f"output.dir={folder}", "output.overwrite=true", *seeded, *extra]
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - start
    print(f"{folder}: exit {rc}, {wall:.0f} s wall (log: {log})", flush=True)
    return wall


def _summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def row(name: str, out: Path) -> str:
    from peftcli.runs.metrics import read_metrics

    s = _summary(run_dir(out, name))
    if s is None:
        return f"| {name} | – | – | – | – | – | not finished |"
    key = "accuracy" if "accuracy" in s["test"] else "generate_accuracy"  # causal LMs: generated labels
    vals = [e["eval"][key] for e in read_metrics(run_dir(out, name)).evals]
    per_epoch = " / ".join(f"{100 * a:.2f}" for a in vals)
    pct = 100 * s["trainable"] / s["total"]
    return (f"| {name} | {s['trainable']:,} | {pct:.3f} % | {100 * s['test'][key]:.2f} % | {per_epoch} | "
            f"{s['train_time_s']:.0f} s |")


def seeds_row(name: str, out: Path, seeds: list[int]) -> str:
    """Mean and spread (min–max) of the test accuracy over seeds, beside the reference figure."""
    done = [s for s in (_summary(run_dir(out, name, seed)) for seed in seeds) if s is not None]
    if not done:
        return f"| {name} | – | – | – | – | – | – | not finished |"
    test = [100 * s["test"]["accuracy"] for s in done]
    val = [100 * s["val"]["accuracy"] for s in done]
    mean = statistics.mean(test)
    ref = REFERENCE.get(name)
    gap = f"{mean - ref:+.2f}" if ref is not None else "–"
    pct = 100 * done[0]["trainable"] / done[0]["total"]
    return (f"| {name} | {done[0]['trainable']:,} ({pct:.2f} %) | **{mean:.2f}** | {min(test):.2f}–{max(test):.2f} | "
            f"{statistics.mean(val):.2f} | {ref if ref is not None else '–'} | {gap} | "
            f"{len(done)} of {len(seeds)} seeds, {statistics.mean(s['train_time_s'] for s in done):.0f} s each |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "recipes", nargs="+", help="recipe names under recipes/ (without .yaml), then key=value overrides"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "full")
    ap.add_argument("--seeds", default=None, help="comma-separated train.seed values, e.g. 0,1,2")
    ap.add_argument("--table-only", action="store_true", help="do not train; tabulate finished runs")
    args = ap.parse_args()
    extra = [a for a in args.recipes if "=" in a]
    args.recipes = [a for a in args.recipes if "=" not in a]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for name in args.recipes:
            if not (ROOT / "recipes" / f"{name}.yaml").exists():
                sys.exit(f"recipes/{name}.yaml: no such recipe")
        # Seed-major order: every recipe gets its first seed before any gets a second.
        for seed in seeds or [None]:
            for name in args.recipes:
                train(name, args.out, extra, seed)
    if seeds:
        print("| recipe | trainable | test accuracy, mean | spread (min–max) | val accuracy, mean | reference | "
              "vs reference | runs |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.recipes:
            print(seeds_row(name, args.out, seeds))
        return
    print("| recipe | trainable | trainable % | test accuracy | val accuracy per eval | train time |")
    print("|---|---|---|---|---|---|")
    for name in args.recipes:
        print(row(name, args.out))


if __name__ == "__main__":
    main()
