"""Multi-process training on torch.distributed: DDP or FSDP2, started by torchrun.

Only the pieces the training loop needs: join the process group torchrun describes in the
environment, wrap the model, gather what rank 0 saves, and move optimizer state in a layout that
does not depend on the world size (keyed by parameter name, full tensors), so `--resume` works
after a change of ranks.

Collectives: under FSDP every parameter is a DTensor shard, so turning it into a full tensor is a
collective that every rank must enter in the same order. Every function here that says
"all ranks" must therefore be called by every rank, even though only rank 0 writes the result.

Failure: a rank that fails leaves the others inside a collective. It exits at once (peftcli.cli
skips the interpreter's tear-down under torchrun), its peers see the connection close, torchrun
stops whatever is left, and the launcher returns the failing rank's exit code (peftcli.training.launch).
The process-group timeout (PEFTCLI_DIST_TIMEOUT) bounds the remaining case, a rank that is alive
but never reaches the collective.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftcli.core.adapter_files import read_adapter
from peftcli.core.errors import BadInput
from peftcli.core.faults import raise_point
from peftcli.runs.checkpoint import adapter_state, load_adapter_state


class DistributedSetupError(RuntimeError):
    pass


class DistributedEnvError(BadInput, ValueError):
    """A malformed PEFTCLI_* environment setting for distributed runs: bad input (exit 2)."""


class SharedFolderError(BadInput, RuntimeError):
    """A rank sees the run folder unlike rank 0 does: it is not on a filesystem every node shares."""


TIMEOUT_ENV = "PEFTCLI_DIST_TIMEOUT"
# torch's own default is 30 minutes. A rank that dies is normally noticed at once (its peers see
# the connection close, and torchrun stops the rest), so this only bounds a rank that is alive but
# never reaches the collective. The longest legitimate wait is the others at a barrier while
# rank 0 writes a checkpoint; 10 minutes covers adapters and most full fine-tunes.
DEFAULT_TIMEOUT_S = 600.0


def collective_timeout() -> timedelta:
    """How long a collective may wait for the slowest rank before it fails on every rank."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise DistributedEnvError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds, e.g. 600")
    return timedelta(seconds=seconds)


def init_from_env(device_choice: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        use_cuda = device_choice in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            # NCCL needs each rank on its own GPU before the first collective.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=collective_timeout())
    if dist.get_rank() != 0:
        _quiet_libraries()
    return dist.get_rank(), dist.get_world_size()


def _quiet_libraries() -> None:
    """Progress bars and warnings of transformers and datasets: rank 0 shows them for all.

    Global on purpose, unlike `core.quiet.quiet_libraries`: a non-zero rank is a torchrun child
    that runs peftcli's training and nothing else, so no other program's settings are changed.
    """
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def device_for_rank(device: torch.device, rank: int) -> torch.device:
    if device.type == "cuda" and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def check_setup(mode: str, world: int, quantization: str) -> str:
    """The wrapping to use; refuses combinations that cannot work before any model is loaded.

    Under torchrun with `train.distributed: none` the ranks would train independent copies on
    different data, which is never what anyone means, so it becomes DDP.
    """
    if world <= 1:
        return "none"
    if mode == "fsdp" and quantization == "nf4":
        from peftcli.models.quant import QuantizationUnavailable

        raise QuantizationUnavailable(
            "train.distributed: fsdp cannot shard a bitsandbytes 4-bit base (its packed uint8 weights carry "
            "per-block quantization state outside the tensor); use train.distributed: ddp for QLoRA"
        )
    return "ddp" if mode == "none" else mode


def mean_across_ranks(value: torch.Tensor) -> float:
    """All ranks: the mean of a scalar over ranks (a NaN on any rank makes every rank see NaN)."""
    # Called once per micro-batch: a rank failing here leaves the others inside the all-reduce.
    raise_point("dist:all-reduce")
    if not is_dist():
        return float(value)
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def max_across_ranks(value: int) -> int:
    """All ranks: the largest of an integer over ranks (a stop signal seen by any rank stops every
    rank at the same step)."""
    if not is_dist():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def from_every_rank(value: Any) -> list[Any]:
    """All ranks: every rank's `value` (small and picklable), indexed by global rank."""
    if not is_dist():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def node_name() -> str:
    """This rank's machine, as a message names it: its host name and the launcher's --node-rank."""
    import socket

    node = os.environ.get("PEFTCLI_NODE_RANK")  # peftcli.training.launch.NODE_ENV
    return f"{socket.gethostname()}" + (f" (node {node})" if node is not None else "")


def check_folder_shared(run_dir: Path, seen: str, *, what: str) -> None:
    """All ranks: refuse, on every rank alike, when a rank sees `run_dir` unlike rank 0 does.

    Rank 0 alone writes the run folder and every rank reads it (a resumed checkpoint, the adapter
    that validation kept), so a run across machines needs it on a filesystem every node shares. A
    rank on a node with a folder of its own would otherwise train from other weights, or fail at
    the end of the run; one gather at set-up says so at once. `seen` describes what this rank
    finds; every rank raises the same message, so no rank is left waiting in a collective.
    """
    views = from_every_rank((seen, node_name()))
    odd = [(r, v) for r, v in enumerate(views) if v[0] != views[0][0]]
    if not odd:
        return
    r, (theirs, node) = odd[0]
    raise SharedFolderError(
        f"{what}: rank {r} on {node} finds {theirs} in {run_dir}, but rank 0 on {views[0][1]} finds {views[0][0]}; "
        f"the run folder (output.dir) must be on a filesystem every node shares (NFS, Lustre, ...), at the same "
        "path on every node")


def from_rank0(value: Any) -> Any:
    """All ranks: rank 0's `value` (small and picklable)."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_decides(flag: bool) -> bool:
    """All ranks: rank 0's answer, so that ranks never disagree on whether to enter a collective."""
    if not is_dist():
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


# ------------------------------------------------------------------------------------ wrapping


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def wrap(model: nn.Module, arch, mode: str, device: torch.device, *, find_unused: bool = False) -> nn.Module:
    """DDP: a wrapper around the model. FSDP2: the model itself, sharded in place.

    FSDP2 shards each transformer layer as one group and everything else (embeddings, head) as
    the root group. Frozen base weights and trainable adapter weights share a group; FSDP2 only
    reduce-scatters gradients of parameters that have them, but it needs all trainable parameters
    of a group in one dtype.
    """
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        if len(dtypes) > 1:
            raise DistributedSetupError(
                f"train.distributed: fsdp needs every trainable parameter in one dtype; this method made {sorted(map(str, dtypes))}"
            )
        for layer in arch.layers:
            fully_shard(layer)
        fully_shard(model)
        # transformers' generate() then keeps ranks in lockstep until all have finished.
        model._is_fsdp_managed_module = True
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reshard(model: nn.Module) -> None:
    # FSDP2 leaves the root group unsharded after a forward without backward (evaluation); the
    # optimizer holds the sharded parameters, so put those back before naming parameters.
    for m in fsdp_modules(model):
        m.reshard()


def full_adapter_state(model: nn.Module, spec, arch, cfg) -> dict[str, torch.Tensor]:
    """All ranks: the adapter tensors as plain CPU tensors, exactly what a single process saves.

    Methods that save every trainable parameter gather only those (adapter-sized). A method with
    its own export_state may compute across modules, so the whole model is unsharded around it.
    """
    if not is_fsdp(model):
        return adapter_state(model, spec, arch, cfg)
    _reshard(model)
    if spec.export_state is None:
        sd = {n: _full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    elif spec.saves_own_tensors:
        sd = {k: _full(v.detach()) for k, v in spec.export_state(model, arch, cfg).items()}
    else:
        mods = fsdp_modules(model)
        for m in mods:
            m.unshard()
        try:
            # Copies: unsharded parameters are views into a buffer that reshard() frees.
            sd = {k: _full(v.detach()).to("cpu", copy=True) for k, v in spec.export_state(model, arch, cfg).items()}
        finally:
            for m in mods:
                m.reshard()
    return {k: v.to("cpu").contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------ optimizer state


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, trainable: list[nn.Parameter] | None = None) -> dict:
    """All ranks: optimizer state keyed by parameter name, full (unsharded) tensors on CPU.

    A tensor that several parameters' state shares (bitsandbytes' 8-bit code books) comes out as
    one tensor object, so the checkpoint stores it once and a resumed run shares it again.
    """
    _reshard(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Any] = {"param_groups": [], "state": {}}
    copied: dict[int, torch.Tensor] = {}

    def on_cpu(v: torch.Tensor) -> torch.Tensor:
        if id(v) not in copied:
            copied[id(v)] = _full(v).detach().cpu()
        return copied[id(v)]

    for g in optimizer.param_groups:
        out["param_groups"].append({k: v for k, v in g.items() if k != "params"} | {"names": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            out["state"][names[id(p)]] = {k: (on_cpu(v) if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in st.items()}
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """All ranks: put name-keyed full-tensor state back, sharding it like each parameter."""
    _reshard(model)
    params = dict(model.named_parameters())
    group_of: dict[int, dict] = {}
    for g_saved, g in zip(saved["param_groups"], optimizer.param_groups, strict=False):
        for k, v in g_saved.items():
            if k not in ("names", "params"):
                g[k] = v
    for g in optimizer.param_groups:
        for p in g["params"]:
            group_of[id(p)] = g
    moved: dict[tuple[int, str], torch.Tensor] = {}  # a tensor shared in the file stays shared
    for name, st in saved["state"].items():
        p = params.get(name)
        if p is None or id(p) not in group_of:
            continue
        g = group_of[id(p)]
        new = {}
        for k, v in st.items():
            if k == "step" and torch.is_tensor(v):
                # torch keeps `step` on the parameter's device only for fused/capturable AdamW.
                on_device = g.get("fused") or g.get("capturable")
                v = v.to(dtype=torch.float32, device=p.device if on_device else "cpu")
            elif torch.is_tensor(v) and v.ndim > 0:
                # Each tensor comes back in the dtype it was saved in: 8-bit optimizers keep uint8
                # moments, and GaLore a projection that is not the parameter's shape.
                if hasattr(p, "device_mesh") and v.shape == p.shape:  # FSDP2: shard it like the param
                    from torch.distributed.tensor import distribute_tensor

                    v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                else:
                    key = (id(v), str(p.device))
                    if key not in moved:
                        moved[key] = v.to(p.device)
                    v = moved[key]
            new[k] = v
        optimizer.state[p] = new


# ------------------------------------------------------------------------------------ resume


def load_resume_weights(last: Path, model, spec, arch, recipe):
    """Load the last checkpoint's adapter into the unwrapped model; return its trainer state.

    Called before wrapping, so the weights go into plain tensors and FSDP shards them from there.
    The state is JSON and safetensors (peftcli.runs.state): nothing read here can run code.
    """
    from peftcli.runs.state import read_trainer_state

    saved = read_trainer_state(last)
    if saved is None:
        return None
    load_kept_weights(last, model, spec, arch, recipe)
    return saved


def load_kept_weights(folder: Path, model, spec, arch, recipe) -> None:
    """All ranks: load a saved adapter into the model (plain, wrapped or sharded) in place: a
    resumed run's weights, or the adapter validation chose, to score the test rows with."""
    _reshard(model)
    sd, _ = read_adapter(folder)
    load_adapter_state(model, spec, arch, recipe.method, sd)


def micro_in_epoch(saved_micro: int, saved_batch: int, saved_world: int, *, batch_size: int) -> int:
    """The micro-batch to continue at, for this world size and batch size.

    The data order is per epoch, not per rank: with W ranks and batch b, batch i of every rank
    together covers positions [i·b·W, (i+1)·b·W) of the epoch's order. Resuming continues at the
    same number of examples seen (the resume check keeps the global batch equal, so this is exact).
    """
    seen = saved_micro * saved_batch * saved_world
    return seen // (batch_size * world_size())
