"""Training curves as PNG: one run next to its metrics.jsonl, or several runs side by side."""

from __future__ import annotations

from pathlib import Path

from peftcli.core.files import atomic_write
from peftcli.runs.metrics import read_metrics


def plot_runs(runs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    eval_key = None
    for run in runs:
        m = read_metrics(run)
        train, evals = m.steps, m.evals
        label = Path(run).name
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{label} train")
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "--o", ms=3,
                         label=f"{label} val")
            eval_key = next((k for k in ("accuracy", "generate_accuracy", "perplexity") if k in evals[0]["eval"]), "loss")
            ax_eval.plot([r["step"] for r in evals], [r["eval"][eval_key] for r in evals], "-o", ms=3, label=label)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=7)
    ax_eval.set_xlabel("optimizer step")
    ax_eval.set_ylabel(eval_key or "eval")
    ax_eval.set_title(f"validation {eval_key or ''}")
    if eval_key:
        ax_eval.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out
