"""Training curves as PNG: one run next to its metrics.jsonl, or several runs side by side."""

from __future__ import annotations

import math
from pathlib import Path

from peftcli.core.errors import UsageError
from peftcli.core.files import atomic_write
from peftcli.runs.metrics import read_metrics

# The PNG's Software text. A figure carrying it is one this module drew, so a later plot may
# replace it; any other file at the destination is the user's and is left alone.
MARK = "peftcli plot"
_PNG = b"\x89PNG\r\n\x1a\n"


def drawn_by_peftcli(path: Path) -> bool:
    """Whether `path` is a PNG whose Software text is `MARK`. Text chunks come before the image
    data, so only the file's head is read."""
    want = b"Software\x00" + MARK.encode()
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG:
                return False
            while len(head := f.read(8)) == 8 and head[4:] not in (b"IDAT", b"IEND"):
                data = f.read(int.from_bytes(head[:4], "big"))
                f.read(4)  # the chunk's CRC
                if head[4:] == b"tEXt" and data == want:
                    return True
    except OSError:
        return False
    return False


def check_plot_destination(out: Path, replace: bool = False) -> None:
    """Refuse a destination that is not a .png, or a file this module did not draw unless `replace`."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the figure is a PNG; name a file ending in .png")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name a .png file in it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not replace and not drawn_by_peftcli(out):
        raise UsageError(f"--out {out} exists and is not a figure peftcli plot drew; choose another file, "
                         "or pass --force to replace it")


def _shared_eval_key(evals_per_run: list[list[dict]]) -> str | None:
    """The validation metric every run measured, in order of preference; the loss when the runs
    measured different ones (accuracy beside perplexity on one axis would read as a comparison)."""
    if not evals_per_run:
        return None
    for key in ("accuracy", "generate_accuracy", "perplexity"):
        if all(key in evals[0]["eval"] for evals in evals_per_run):
            return key
    return "loss"


def plot_runs(runs: list[Path], out: Path, replace: bool = False) -> Path:
    """Draw the curves of `runs` into the PNG `out`; `check_plot_destination` first (the training
    loop passes `replace` for the curves.png of the run folder it writes)."""
    check_plot_destination(out, replace)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    metrics = {Path(run): read_metrics(run) for run in runs}
    eval_key = _shared_eval_key([m.evals for m in metrics.values() if m.evals])
    for run, m in metrics.items():
        train, evals = m.steps, m.evals
        label = run.name
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{label} train")
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval"].get("loss", math.nan) for r in evals], "--o", ms=3,
                         label=f"{label} val")
            ax_eval.plot([r["step"] for r in evals], [r["eval"].get(eval_key, math.nan) for r in evals], "-o", ms=3,
                         label=label)
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
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png", metadata={"Software": MARK}))
    finally:
        plt.close(fig)
    return out
