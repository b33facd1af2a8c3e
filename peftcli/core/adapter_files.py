"""Reading adapter files, where nothing read can run code.

An adapter folder is `adapter.safetensors` + `meta.json` (what `runs.checkpoint.save_adapter`
writes). Every layer that reads one (a method loading its source runs, the run loader, the
commands) reads it here, so each file is checked the same way and every failure is one
CheckpointError naming the file and the fix (exit 2).
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftcli.core.errors import CheckpointError

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "meta.json"


def _check_meta(path: Path) -> dict:
    """meta.json, parsed and checked: a hand-edited or truncated file should fail here, naming the
    key, not later as a KeyError or a model with the wrong number of classes.

    `method` is always written by save_adapter; the other keys are checked when present, since
    adapters saved through the library API may omit them.
    """
    def names(v: Any) -> bool:
        return v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def text(v: Any) -> bool:
        return isinstance(v, str)

    types_ = {
        "method": (text, "a method name"),
        "base_model": (text, "a model name or folder"),
        "task": (lambda v: v in ("classification", "causal_lm"), "'classification' or 'causal_lm'"),
        "label_names": (names, "a list of class names or null"),
        "disabled_modules": (names, "a list of module names"),
        "tensors": (count, "an integer"),
        "adapter_parameters": (count, "an integer"),
        "trainable": (count, "an integer"),
        "total": (count, "an integer"),
    }
    fix = "restore it from the run that wrote it, or retrain"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object of keys, got {type(meta).__name__}; {fix}")
    if "method" not in meta:
        raise CheckpointError(f"{path}: key 'method' is missing; {fix}")
    for key, (ok, want) in types_.items():
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: key {key!r} should be {want}, got {meta[key]!r}; {fix}")
    return meta


def _pickle_reason(e: BaseException) -> str:
    """One line out of torch's many-line refusal: the part that says what the pickle wanted."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it is a pickle that asks to call {m.group(1)}, which only code (never tensors) needs"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if m:
        return f"it is a pickle holding more than tensors ({m.group(1).strip()})"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return first[:200]


def _file_kind(path: Path) -> str:
    """What a file that failed to load looks like, for the message."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "; it looks like a torch.save/pickle archive, which can run code when read, so it is not read"
    if head[:1] == b"\x80":
        return "; it looks like a pickle, which can run code when read, so it is not read"
    return ""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A name -> tensor file that runs no code while being read.

    safetensors for everything peftcli writes; a `.bin`/`.pt` file (HF PEFT's older adapter format)
    goes through torch's weights-only unpickler, which refuses anything but tensors and containers.
    Every failure becomes one CheckpointError naming the file, so the command exits 2 and says which
    file to replace instead of showing a traceback (or, with a plain unpickler, running the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({reason}){_file_kind(path)}; "
                "replace it with the file as it was saved (or train/export again)"
            ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, AttributeError, KeyError,
            TypeError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: refused to read: {_pickle_reason(e)}; only plain tensors are loaded from pickle files. "
            "Save the adapter as safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a mapping of names to tensors")
    return obj


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    f = folder / ADAPTER_FILE
    if not f.exists():
        raise CheckpointError(f"{folder}: no {ADAPTER_FILE}; is this a peftcli run's adapter folder?")
    if not (folder / META_FILE).exists():
        raise CheckpointError(f"{folder}: no {META_FILE} next to {ADAPTER_FILE}; restore it from the run that wrote it, or retrain")
    meta = _check_meta(folder / META_FILE)
    return finite(f, load_tensors(f)), meta


def finite(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors`, refused when one holds NaN or an infinity: training stops before it saves such a
    step, so the file was damaged or edited, and scoring, merging or exporting it would spread NaN
    into every output (a merged model, an exported adapter, eval's JSON)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: {name} holds {bad:,} NaN or infinite value{'s' if bad != 1 else ''}; "
                                  "a trained adapter has none: restore the file as it was saved, or train again")
    return tensors



def unkept_note(run: Path) -> str | None:
    """What to tell a user whose run has no kept adapter/ but a last/ checkpoint, which is then
    what a command reads (a run stopped before it finished; or adapter/ was removed)."""
    run = Path(run)
    if not (run / "adapter" / ADAPTER_FILE).exists() and (run / "last" / ADAPTER_FILE).exists():
        return (f"{run} has no kept adapter (adapter/): using its last checkpoint (last/), which is not the one "
                "validation chose")
    return None


def run_recipe_file(run: Path) -> Path:
    """A run folder's recipe.yaml, refused (one CheckpointError naming the path) when `run` is not
    there, is a file, or holds no recipe.yaml: the one check of every reader of a run folder."""
    run = Path(run)
    if not run.exists():
        raise CheckpointError(f"{run}: no such folder; pass the run folder `peftcli train` wrote")
    if run.is_file():
        raise CheckpointError(f"{run} is a file; pass the run folder `peftcli train` wrote"
                              + (f" ({run.parent})" if run.name == "recipe.yaml" else ""))
    if not (run / "recipe.yaml").exists():
        raise CheckpointError(f"{run}: not a run folder (no recipe.yaml); pass the folder `peftcli train` wrote")
    return run / "recipe.yaml"


def read_run_recipe(run: Path) -> dict:
    """A run folder's recipe.yaml as plain data, for readers below the recipe layer and for early
    choices made before the recipe is checked. `yaml.safe_load` constructs nothing but plain values,
    so the file cannot run code. A missing, unreadable or non-mapping file is one CheckpointError
    naming it; whether the mapping is a valid recipe is the recipe layer's to say."""
    import yaml

    f = run_recipe_file(run)
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{f}: not a readable recipe ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: not a readable recipe (expected a mapping of sections, got {type(raw).__name__})")
    return raw


def find_run_adapter(run: Path) -> Path:
    """A run folder's best adapter, or the folder itself if it is an adapter folder."""
    run = Path(run)
    for cand in (run / "adapter", run / "last", run):
        if (cand / ADAPTER_FILE).exists():
            return cand
    raise CheckpointError(f"{run}: no adapter found (expected {run}/adapter/{ADAPTER_FILE}); did training finish?")
