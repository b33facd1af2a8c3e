"""A markdown table of finished `peftcli sweep` folders, for the README.

    python scripts/tools/sweep_report.py runs/sweeps/smollm2_lora runs/sweeps/smollm2_chat,runs/sweeps/smollm2_chat_up ...

One row per sweep (folders joined by a comma are one row: a grid widened past an edge winner is a
second sweep, since a sweep folder refuses a changed grid): every trial's validation figure, the trial chosen on validation, the chosen
trial's validation curve (each `eval_every` step, so a reader sees whether the run was still
improving), the step its kept checkpoint came from, and its held-out figure. The held-out figure of
the trials that were not chosen is never read, so nothing here can tempt a choice by the test rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftcli.commands.sweep import as_override, pick_best, read_records
from peftcli.runs.metrics import read_metrics


def figure(metric: str, value: float) -> str:
    """Accuracies in %, losses as they are."""
    return f"{value:.4f}" if metric == "loss" else f"{100 * value:.1f}"


def curve(run: Path, metric: str) -> str:
    """The validation figure at each evaluation of one run, in step order."""
    evals = read_metrics(run).evals
    points = [f"{e['step']}: {figure(metric, e['eval'][metric])}" for e in evals if metric in e["eval"]]
    return " → ".join(points) or "–"


def row(folders: list[Path]) -> str:
    recs = [r for folder in folders for r in read_records(folder)]
    name = folders[0].name
    if not recs:
        return f"| {name} | no finished trial | – | – | – |"
    metric = next(r["metric"] for r in recs if r.get("metric"))
    best = pick_best(recs, metric)

    def settings(rec: dict) -> str:
        return " ".join(f"{k.split('.')[-1]}={as_override(v)}" for k, v in rec["settings"].items())

    cells = ", ".join(f"{settings(r)}: " + (figure(metric, r["value"]) if r.get("status") == "done"
                                             else r.get("status", "?")) for r in recs)
    if best is None:
        return f"| {name} | {cells} | – | – | – |"
    run = Path(best["run"])
    summary = json.loads((run / "summary.json").read_text())
    held = f"{figure(metric, summary['test'][metric])} (step {summary['best']['step']})"
    return f"| {name} ({metric}) | {cells} | {settings(best)} | {curve(run, metric)} | {held} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="sweep folders (the --out of peftcli sweep); A,B for one row")
    args = ap.parse_args()
    rows = [[Path(f) for f in arg.split(",")] for arg in args.folders]
    missing = [str(f) for folders in rows for f in folders if not f.is_dir()]
    if missing:
        print(f"error: no sweep folder at {', '.join(missing)}; run peftcli sweep … --out FOLDER first",
              file=sys.stderr)
        return 2
    print("| sweep (validation metric) | trials: validation | chosen | its validation curve | "
          "its held-out (kept step) |\n|---|---|---|---|---|")
    for folders in rows:
        print(row(folders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
