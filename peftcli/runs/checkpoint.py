"""Run folders and adapter checkpoints.

A run folder holds:
    recipe.yaml              the resolved recipe (every default filled in)
    adapter/                 best checkpoint: adapter.safetensors + meta.json
    last/                    latest checkpoint + trainer state (JSON + safetensors) for --resume
    metrics.jsonl, curves.png

Writes go to a temporary sibling folder that is renamed into place (`core/files.write_dir`), so a
crash mid-save leaves the previous good checkpoint intact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftcli import __version__
from peftcli.core.adapter import copy_into_params
from peftcli.core.adapter_files import ADAPTER_FILE, META_FILE
from peftcli.core.errors import CheckpointError
from peftcli.core.files import recover_dir, write_dir


def adapter_state(model: nn.Module, spec, arch, cfg) -> dict[str, torch.Tensor]:
    if spec.export_state is not None:
        sd = spec.export_state(model, arch, cfg)
    else:
        sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_adapter_state(model: nn.Module, spec, arch, cfg, sd: dict[str, torch.Tensor],
                       source: Path | str | None = None) -> None:
    """Copy saved tensors into the model's adapter; a refusal names `source`, the file they came
    from, where the caller knows it (the methods' own loaders do not)."""
    try:
        _load_adapter_state(model, spec, arch, cfg, sd)
    except CheckpointError as e:
        if source is None or str(e).startswith(str(source)):
            raise
        raise CheckpointError(f"{source}: {e}") from None


def _load_adapter_state(model: nn.Module, spec, arch, cfg, sd: dict[str, torch.Tensor]) -> None:
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




def recover_checkpoint(dest: Path) -> str | None:
    """Bring a checkpoint folder (`adapter/`, `last/`) back after a kill inside its swap; say what
    was done. A temporary folder is whole once it holds meta.json (written last), so it may finish
    the swap. Run only by the one process that owns the run folder, so siblings are never in use."""
    return recover_dir(dest, complete=lambda p: (p / META_FILE).exists(), skip_live=False)


def save_adapter(
    dest: Path,
    model: nn.Module,
    spec,
    arch,
    cfg,
    meta: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write an adapter folder; `extra` writes more files into it (a trainer state for --resume)
    before meta.json, which marks the folder complete."""
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
        if extra is not None:
            extra(tmp)
        # Written last: a folder with meta.json is complete (recover_checkpoint relies on it).
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))

    write_dir(Path(dest), write)
