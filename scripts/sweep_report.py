"""A markdown table of finished `peftcli sweep` folders, for the README.

    python scripts/sweep_report.py runs/sweeps/smollm2_lora runs/sweeps/smollm2_chat ...

One row per sweep: every trial's validation figure, the trial chosen on validation, the chosen
trial's validation curve (each `eval_every` step, so a reader sees whether the run was still
improving), the step its kept checkpoint came from, and its held-out figure. The held-out figure of
the trials that were not chosen is never read, so nothing here can tempt a choice by the test rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftcli.sweep import as_override, pick_best, read_records


def figure(metric: str, value: float) -> str:
    """Accuracies in %, losses as they are."""
    return f"{value:.4f}" if metric == "loss" else f"{100 * value:.1f}"


def curve(run: Path, metric: str) -> str:
    """The validation figure at each evaluation of one run, in step order."""
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get("val"), dict) and metric in rec["val"]:
            points.append(f"{rec['step']}: {figure(metric, rec['val'][metric])}")
    return " → ".join(points) or "–"


def row(folder: Path) -> str:
    recs = read_records(folder)
    if not recs:
        return f"| {folder.name} | no finished trial | – | – | – |"
    metric = next(r["metric"] for r in recs if r.get("metric"))
    best = pick_best(recs, metric)

    def settings(rec: dict) -> str:
        return " ".join(f"{k.split('.')[-1]}={as_override(v)}" for k, v in rec["settings"].items())

    cells = ", ".join(f"{settings(r)}: " + (figure(metric, r["value"]) if r.get("status") == "done"
                                             else r.get("status", "?")) for r in recs)
    if best is None:
        return f"| {folder.name} | {cells} | – | – | – |"
    run = Path(best["run"])
    summary = json.loads((run / "summary.json").read_text())
    held = f"{figure(metric, summary['test'][metric])} (step {summary['best']['step']})"
    return f"| {folder.name} ({metric}) | {cells} | {settings(best)} | {curve(run, metric)} | {held} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="sweep folders (the --out of peftcli sweep)")
    args = ap.parse_args()
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"error: no sweep folder at {', '.join(missing)}; run peftcli sweep … --out FOLDER first",
              file=sys.stderr)
        return 2
    print("| sweep (validation metric) | trials: validation | chosen | its validation curve | "
          "its held-out (kept step) |\n|---|---|---|---|---|")
    for folder in args.folders:
        print(row(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
