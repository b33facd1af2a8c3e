"""Run folders and adapter checkpoints.

A run folder holds:
    recipe.yaml              the resolved recipe (every default filled in)
    adapter/                 best checkpoint: adapter.safetensors + meta.json
    last/                    latest checkpoint + trainer_state.pt tensors for --resume
    metrics.jsonl, curves.png

Writes go to a temporary sibling folder that is renamed into place, so a crash mid-save leaves the
previous good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    pass


def adapter_state(model: nn.Module, spec, arch, cfg) -> dict[str, torch.Tensor]:
    if spec.export_state is not None:
        sd = spec.export_state(model, arch, cfg)
    else:
        sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_adapter_state(model: nn.Module, spec, arch, cfg, sd: dict[str, torch.Tensor]) -> None:
    if spec.load_state is not None:
        spec.load_state(model, arch, cfg, sd)
        return
    params = dict(model.named_parameters())
    missing_from_file = [n for n, p in params.items() if p.requires_grad and n not in sd]
    unknown = [k for k in sd if k not in params]
    if unknown:
        raise CheckpointError(
            f"adapter has {len(unknown)} tensors this model lacks (e.g. {unknown[0]}); "
            "was it trained with another base model or method?"
        )
    if missing_from_file and not spec.trains_base:
        raise CheckpointError(f"adapter is missing {len(missing_from_file)} trained tensors (e.g. {missing_from_file[0]})")
    copy_into_params(params, sd)


def copy_into_params(params: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into named parameters, refusing any shape mismatch."""
    with torch.no_grad():
        for k, v in sd.items():
            p = params[k]
            if p.shape != v.shape:
                raise CheckpointError(f"{k}: shape {tuple(v.shape)} in the file, {tuple(p.shape)} in the model")
            p.copy_(v.to(p.dtype))


def atomic_dir_write(dest: Path, write) -> None:
    """Call write(tmp_dir), then swap tmp_dir into dest."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_file_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_adapter(
    dest: Path,
    model: nn.Module,
    spec,
    arch,
    cfg,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    sd = adapter_state(model, spec, arch, cfg)
    full_meta = {
        "method": spec.name,
        "peftcli_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tensors": len(sd),
        "adapter_parameters": int(sum(v.numel() for v in sd.values())),
        **meta,
    }

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "method": spec.name})
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
        if extra:
            torch.save(extra, tmp / "trainer_state.pt")

    atomic_dir_write(Path(dest), write)


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    f = folder / ADAPTER_FILE
    if not f.exists():
        raise CheckpointError(f"{folder}: no {ADAPTER_FILE}; is this a peftcli run's adapter folder?")
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).exists() else {}
    return load_file(str(f)), meta


def find_run_adapter(run: Path) -> Path:
    """A run folder's best adapter, or the folder itself if it is an adapter folder."""
    run = Path(run)
    for cand in (run / "adapter", run / "last", run):
        if (cand / ADAPTER_FILE).exists():
            return cand
    raise CheckpointError(f"{run}: no adapter found (expected {run}/adapter/{ADAPTER_FILE}); did training finish?")
