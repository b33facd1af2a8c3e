"""What `--resume` needs to continue a run exactly where it stopped, stored without pickle.

A checkpoint's trainer state is two files in `last/`: `trainer_state.json` (position in the data,
best metric, schedule, Python RNG state, numbers the loss log is averaging) and
`trainer_state.safetensors` (optimizer moments and torch RNG states). Nothing in either file can
run code when read, so a run folder someone shared is safe to resume.

Also here: the recipe check that keeps `--resume` from silently continuing a different
experiment, and the metrics-log trim that keeps one curve per run after a crash.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftcli.core.adapter_files import load_tensors
from peftcli.core.errors import BadInput, CheckpointError
from peftcli.core.files import atomic_file_write
from peftcli.runs.metrics import read_lines

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_PICKLE = "trainer_state.pt"
FORMAT = 2


def is_trainer_state(name: str) -> bool:
    """Whether a file of a checkpoint folder is trainer state rather than adapter: commands that copy
    `last/` into a new run's `adapter/` (drop) leave these behind, since resuming belongs to the old run."""
    return name in (STATE_JSON, STATE_TENSORS, LEGACY_PICKLE)


@dataclass
class Position:
    """Where a run is. Saved at every checkpoint; everything the loop needs to go on from there."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` already consumed (per rank)
    best: float | None = None
    window_loss: float = 0.0  # sum of micro-batch losses since the last metrics line
    window_n: int = 0
    last_eval: dict | None = None  # validation metrics of the latest evaluation
    best_step: int | None = None  # step of the kept adapter (`adapter/`)
    best_eval: dict | None = None  # its validation metrics (summary.json's `val`)
    # Preference objectives: sums of the reward statistics since the last metrics line
    # (peftcli.training.preference.PrefStats), so a resumed run logs the same averages.
    window_stats: dict = field(default_factory=dict)


class ResumeError(BadInput, ValueError):
    """`--resume` would not continue the same run: bad input (exit 2)."""


# ------------------------------------------------------------------------------------ save


def trainer_state(
    pos: Position,
    *,
    optimizer: dict,
    scheduler: dict,
    scaler: dict | None,
    drop_rng: random.Random,
    world: int,
    batch_size: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of a checkpoint's trainer state."""
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    opt_json: dict[str, Any] = {"param_groups": optimizer["param_groups"], "state": {}}
    # One tensor several parameters' state shares is written once and referenced by every entry
    # (the reader looks each reference up by key, so it needs no change and gets one object back).
    key_of: dict[int, str] = {}
    for name, st in optimizer["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                if id(v) not in key_of:
                    key_of[id(v)] = f"opt/{name}/{k}"
                    tensors[key_of[id(v)]] = v.detach().cpu().contiguous()
                entry[k] = {"tensor": key_of[id(v)]}
            else:
                entry[k] = v
        opt_json["state"][name] = entry
    js = {
        "format": FORMAT,
        "position": asdict(pos),
        "world": world,
        "batch_size": batch_size,
        "scheduler": scheduler,
        "scaler": scaler,
        "optimizer": opt_json,
        "python_rng": _rng_to_json(random.getstate()),
        "drop_rng": _rng_to_json(drop_rng.getstate()),
    }
    return js, tensors


def write_trainer_state(folder: Path, js: dict, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(js))


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(js: list) -> tuple:
    version, internal, gauss = js
    return (version, tuple(internal), gauss)


# ------------------------------------------------------------------------------------ load


@dataclass
class Saved:
    position: Position
    world: int
    batch_size: int
    scheduler: dict
    scaler: dict | None
    optimizer: dict  # name-keyed, full tensors (distributed.load_optimizer_state's layout)
    python_rng: tuple
    drop_rng: tuple
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]


def read_trainer_state(folder: Path) -> Saved | None:
    """The trainer state in a checkpoint folder; None when it has none. Never unpickles."""
    folder = Path(folder)
    if (folder / LEGACY_PICKLE).exists() and not (folder / STATE_JSON).exists():
        raise CheckpointError(
            f"{folder / LEGACY_PICKLE}: a pickled trainer state; peftcli never unpickles files (they can "
            "run code). Start the run again without --resume, or resume it with the peftcli version that wrote it"
        )
    if not (folder / STATE_JSON).exists():
        return None
    path = folder / STATE_JSON
    try:
        js = json.loads(path.read_text())
        tensors = load_tensors(folder / STATE_TENSORS)
        pos = Position(**js["position"])
        opt = {"param_groups": js["optimizer"]["param_groups"], "state": {}}
        for name, st in js["optimizer"]["state"].items():
            opt["state"][name] = {
                k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in st.items()
            }
        for g in opt["param_groups"]:  # JSON has no tuples; AdamW wants betas as one
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
        return Saved(
            position=pos, world=int(js["world"]), batch_size=int(js["batch_size"]), scheduler=js["scheduler"],
            scaler=js.get("scaler"), optimizer=opt, python_rng=_rng_from_json(js["python_rng"]),
            drop_rng=_rng_from_json(js["drop_rng"]), torch_rng=tensors["rng/torch"], cuda_rng=cuda,
        )
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: unreadable trainer state ({type(e).__name__}: {e}); the checkpoint is damaged. "
            "Start the run again without --resume (output.overwrite=true)"
        ) from None


def restore_rng(saved: Saved, drop_rng: random.Random) -> None:
    random.setstate(saved.python_rng)
    drop_rng.setstate(saved.drop_rng)
    torch.set_rng_state(saved.torch_rng)
    if saved.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved.cuda_rng[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------------ recipe check

# Keys that may change between a run and its resume: they decide how long it runs or what is
# shown, not what a step computes. `batch_size` / `grad_accum` may change only together with the
# number of ranks so that the global batch stays the same (checked apart).
MAY_CHANGE = {
    "train.epochs", "train.max_steps", "train.progress", "train.log_every", "train.num_threads",
    "train.device", "train.distributed", "train.eval_every", "train.batch_size", "train.grad_accum",
    "eval.batch_size", "eval.generate_samples", "eval.max_new_tokens", "output.plot", "output.overwrite",
    "train.report_to", "data.strict",
}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_differences(saved: dict, new: dict) -> list[str]:
    """Keys whose values differ and that change what is trained, as 'key: old -> new'."""
    a, b = _flat(saved), _flat(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in MAY_CHANGE or k == "output.dir":
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}")
    return diffs


def check_resume(saved_recipe: dict, new_recipe: dict, saved: Saved | None, *, world: int, source: str) -> None:
    """Refuse a resume that would train something other than the run being resumed."""
    diffs = recipe_differences(saved_recipe, new_recipe)
    if saved is not None:
        old_t, new_t = saved_recipe.get("train", {}), new_recipe.get("train", {})
        old_global = old_t.get("batch_size", saved.batch_size) * old_t.get("grad_accum", 1) * saved.world
        new_global = new_t.get("batch_size", 1) * new_t.get("grad_accum", 1) * world
        if old_global != new_global:
            diffs.append(
                f"global batch (train.batch_size x train.grad_accum x ranks): {old_global} -> {new_global}"
            )
    if diffs:
        raise ResumeError(
            f"{source}: --resume would train something else than the run it continues; these keys differ "
            "from the run's recipe.yaml:\n    " + "\n    ".join(diffs)
            + "\n  Only train.epochs / train.max_steps (and display keys) may change on resume; start a new run "
            "(another output.dir) to train with other settings"
        )


# ------------------------------------------------------------------------------------ metrics log


def trim_metrics(path: Path, step: int) -> int:
    """Drop the metrics lines written after the checkpoint at `step`; returns how many.

    The resumed run writes them again, so the log stays one curve. A torn last line (a kill
    mid-write) is dropped too.
    """
    kept, dropped = [], 0
    for line, rec in read_lines(path):
        # The test score is written after the last checkpoint, by the finish a resume repeats.
        if (rec is not None and isinstance(rec.get("step"), int) and rec["step"] <= step
                and "error" not in rec and "test" not in rec):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_file_write(path, "".join(k + "\n" for k in kept))
    return dropped
