"""Multi-process training on torch.distributed: DDP or FSDP2, started by torchrun.

Only the pieces the training loop needs: join the process group torchrun describes in the
environment, wrap the model, and move optimizer state in a layout that does not depend on the
world size (keyed by parameter name, full tensors), so `--resume` works after a change of ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import read_adapter


def init_from_env(device_choice: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        use_cuda = device_choice in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device_for_rank(device: torch.device, rank: int) -> torch.device:
    if device.type == "cuda" and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def wrap(model: nn.Module, arch, mode: str, device: torch.device) -> nn.Module:
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in arch.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, trainable: list[nn.Parameter]) -> dict:
    """AdamW state keyed by parameter name, full (unsharded) tensors on CPU."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Any] = {"param_groups": [], "state": {}}
    for g in optimizer.param_groups:
        out["param_groups"].append({k: v for k, v in g.items() if k != "params"} | {"names": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            out["state"][names[id(p)]] = {
                k: (_full(v).detach().cpu() if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in st.items()
            }
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    params = dict(model.named_parameters())
    for g_saved, g in zip(saved["param_groups"], optimizer.param_groups, strict=False):
        for k, v in g_saved.items():
            if k not in ("names", "params"):
                g[k] = v
    for name, st in saved["state"].items():
        p = params.get(name)
        if p is None:
            continue
        new = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                if hasattr(p, "device_mesh"):  # FSDP2 DTensor: shard the full tensor like the param
                    from torch.distributed.tensor import distribute_tensor

                    v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                else:
                    v = v.to(p.device)
            new[k] = v
        optimizer.state[p] = new


def load_resume_state(last: Path, model, spec, arch, recipe, optimizer, trainable) -> dict | None:
    if not (last / "trainer_state.pt").exists():
        return None
    from .checkpoint import load_adapter_state

    sd, _ = read_adapter(last)
    load_adapter_state(model, spec, arch, recipe.method, sd)
    state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=False)
    load_optimizer_state(optimizer, model, state["optimizer"])
    saved_world = state.get("world", 1)
    world = dist.get_world_size() if is_dist() else 1
    if saved_world != world:
        # The data order is per epoch, not per rank: restart the epoch's batches at the same
        # number of examples seen.
        state["batch_in_epoch"] = state["batch_in_epoch"] * saved_world // world
    return state
