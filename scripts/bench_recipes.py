"""Train shipped recipes at full size, one after another, and print a results table.

The README's results table comes from this script. Runs are sequential on purpose: two trainings
sharing 2 cores would slow each other and make the times meaningless.

    python scripts/bench_recipes.py tweets_lora tweets_full tweets_bitfit
    python scripts/bench_recipes.py --table-only tweets_lora tweets_full   # re-read finished runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_dir(out: Path, name: str) -> Path:
    return out / name


def train(name: str, out: Path, extra: list[str]) -> float:
    recipe = ROOT / "recipes" / f"{name}.yaml"
    cmd = ["peftcli", "train", str(recipe), f"output.dir={run_dir(out, name)}", *extra]
    log = out / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - start
    print(f"{name}: exit {rc}, {wall:.0f} s wall (log: {log})", flush=True)
    return wall


def row(name: str, out: Path) -> str:
    summary_path = run_dir(out, name) / "summary.json"
    if not summary_path.exists():
        return f"| {name} | – | – | – | – | not finished |"
    s = json.loads(summary_path.read_text())
    key = "accuracy" if "accuracy" in s["final"] else "generate_accuracy"  # causal LMs: generated labels
    evals = [
        json.loads(line)["eval"][key]
        for line in (run_dir(out, name) / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    per_epoch = " / ".join(f"{100 * a:.2f}" for a in evals)
    pct = 100 * s["trainable"] / s["total"]
    final = 100 * s["final"][key]
    return f"| {name} | {s['trainable']:,} | {pct:.3f} % | {final:.2f} % | {per_epoch} | {s['train_time_s']:.0f} s |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "recipes", nargs="+", help="recipe names under recipes/ (without .yaml), then key=value overrides"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "full")
    ap.add_argument("--table-only", action="store_true", help="do not train; tabulate finished runs")
    args = ap.parse_args()
    extra = [a for a in args.recipes if "=" in a]
    args.recipes = [a for a in args.recipes if "=" not in a]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for name in args.recipes:
            if not (ROOT / "recipes" / f"{name}.yaml").exists():
                sys.exit(f"recipes/{name}.yaml: no such recipe")
            train(name, args.out, extra)
    print("| recipe | trainable | trainable % | held-out accuracy | accuracy per eval | train time |")
    print("|---|---|---|---|---|---|")
    for name in args.recipes:
        print(row(name, args.out))


if __name__ == "__main__":
    main()
