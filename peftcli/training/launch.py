"""`peftcli train --nproc N [--nnodes M --node-rank K --rdzv-endpoint HOST:PORT]`: re-run the
same command under torchrun, on this machine alone or as one node of M.

The parent process checks what it can before starting N children (a recipe error or a missing
GPU should be one message, not N tracebacks), then hands over to torchrun and returns its exit
status.

Several machines: one launcher per node, each with the same recipe, `--nproc`, `--nnodes` and
`--rdzv-endpoint`, meet at torchrun's c10d rendezvous on HOST:PORT; node 0 (`--node-rank 0`, which
must run on HOST) hosts it. The rendezvous numbers the ranks (torchrun ignores a node rank under
c10d), so global rank 0 — the one rank that writes the run folder — may live on any node: the run
folder must be on a filesystem every node shares, at the same path, and training refuses to start
when a rank sees it otherwise (peftcli.training.distributed.check_folder_shared).

Exit status: torchrun answers 1 whatever went wrong, and the rank it names as the root cause is
the first one *it noticed*, not necessarily the first that failed. So each rank that fails records
its own exit code and the time into a folder the launcher passes in PEFTCLI_EXIT_DIR, and the
launcher returns the code of the earliest failure: 2 when a rank refused bad input, 1 when one
failed while running, whatever the ranks it took down with it reported afterwards.

Stopping: torchrun runs in a session of its own, so a terminal's Ctrl-C reaches the launcher
alone. On Ctrl-C or SIGTERM the launcher sends torchrun SIGTERM, which forwards it to every rank;
the ranks agree on a step, write a checkpoint and exit (peftcli.training.loop), and the launcher
exits 130 or 143 once torchrun has. Only rank 0 takes the run folder's one-writer lock.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peftcli.core.errors import BadInput
from peftcli.core.files import atomic_file_write
from peftcli.core.signals import ProcessGroup, Stopped, stop_and_wait, stop_signals

EXIT_DIR_ENV = "PEFTCLI_EXIT_DIR"
# The launcher's --node-rank, passed to its ranks for messages that name a node (under c10d
# torchrun's GROUP_RANK is the rendezvous' numbering, not the user's).
NODE_ENV = "PEFTCLI_NODE_RANK"
_ENDPOINT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


class LaunchError(BadInput, ValueError):
    """A malformed --nproc / --nnodes / --node-rank / --rdzv-endpoint: bad input, exit 2."""


@dataclass(frozen=True)
class Nodes:
    """Where this launcher stands in a launch across machines (count 1: this machine alone)."""

    count: int = 1
    rank: int = 0
    endpoint: str | None = None


def check_nodes(nnodes: int, node_rank: int, endpoint: str | None, nproc: int = 1) -> Nodes:
    """The flags of a launch across machines, refused before anything starts when they cannot work."""
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: expected 1 or more processes per node")
    if nnodes < 1:
        raise LaunchError(f"--nnodes {nnodes}: expected 1 or more machines")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank}: expected 0 to {nnodes - 1} for --nnodes {nnodes} "
                          "(node 0 runs on the --rdzv-endpoint host)")
    if nnodes == 1:
        if endpoint:
            raise LaunchError("--rdzv-endpoint is for a launch across machines; add --nnodes N (N > 1) "
                              "or leave it out")
        return Nodes()
    if not endpoint:
        raise LaunchError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address of node 0 that every "
                          "node can reach (e.g. --rdzv-endpoint $MASTER_ADDR:29500)")
    m = _ENDPOINT.fullmatch(endpoint.strip())
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise LaunchError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT with a port from 1 to 65535, "
                          "e.g. node0.cluster:29500, 10.0.0.1:29500 or [fe80::1]:29500")
    return Nodes(nnodes, node_rank, endpoint.strip())


@dataclass(frozen=True)
class RankExit:
    rank: int
    code: int
    time: float


def record_rank_exit(code: int) -> None:
    """In a rank: note a non-zero exit for the launcher. Never raises: the rank is exiting anyway."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder or not code:
        return
    rank = int(os.environ.get("RANK", "0"))
    try:
        # Atomic: the launcher never reads half a record.
        atomic_file_write(Path(folder) / f"rank{rank}.json", json.dumps({"rank": rank, "code": code, "time": time.time()}))
    except OSError:
        pass


def read_rank_exits(folder: Path) -> list[RankExit]:
    out = []
    for f in sorted(Path(folder).glob("rank*.json")):
        try:
            d = json.loads(f.read_text())
            out.append(RankExit(int(d["rank"]), int(d["code"]), float(d["time"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def first_failure(torchrun_status: int, exits: list[RankExit]) -> tuple[int, RankExit | None]:
    """The launcher's exit code, and the rank exit it comes from (None: torchrun's own status).

    A rank killed by a signal records nothing; then torchrun's status stands.
    """
    if torchrun_status == 0:
        return 0, None
    failed = [e for e in exits if e.code != 0]
    if not failed:
        # subprocess reports a signal as a negative status; a shell would say 128 + signal.
        return (128 - torchrun_status if torchrun_status < 0 else torchrun_status), None
    first = min(failed, key=lambda e: (e.time, e.rank))
    return first.code, first


def torchrun_command(
    recipe: Path, overrides: list[str], nproc: int, *, mode: str, resume: bool, smoke: bool, nodes: Nodes = Nodes(),
    trust_remote_code: bool = False,
) -> list[str]:
    # Every rank's output is shown so that an error on any rank is seen; training itself prints
    # from rank 0 only.
    if nodes.count == 1:
        where = ["--standalone"]
    else:
        # No restarts: a failed node ends the launch everywhere. is_host names the rendezvous' host
        # by --node-rank instead of by matching host names, which aliases and 127.0.0.1 defeat.
        where = [f"--nnodes={nodes.count}", "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.endpoint}",
                 "--rdzv-id=peftcli", f"--rdzv-conf=is_host={int(nodes.rank == 0)}", "--max-restarts=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}",
           "-m", "peftcli.cli", "train", str(recipe), *overrides]
    if not any(o.startswith("train.distributed=") for o in overrides):
        cmd.append(f"train.distributed={mode}")
    if resume:
        cmd.append("--resume")
    if smoke:
        cmd.append("--smoke")
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def launch_torchrun(recipe: Path, overrides: list[str], nproc: int, *, resume: bool, smoke: bool,
                    nodes: Nodes = Nodes(), trust_remote_code: bool = False) -> int:
    from peftcli.config.recipe import load_recipe
    from peftcli.methods.attach import pick_device

    r = load_recipe(recipe, overrides)
    # The recipe's own train.distributed wins; `none` means "not chosen", and N processes need one.
    mode = r.train.distributed if r.train.distributed != "none" else "ddp"
    from peftcli.training.distributed import check_setup, collective_timeout

    check_setup(mode, nproc * nodes.count, r.model.quantization)
    device = pick_device(r.train.device, "train.device")
    if r.model.quantization == "nf4":
        from peftcli.methods.attach import check_qlora_possible

        check_qlora_possible(r.method_name, device, r.method)
    if device.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise RuntimeError(
                f"--nproc {nproc} but only {torch.cuda.device_count()} CUDA device(s) visible; one process per GPU"
            )
    collective_timeout()  # a malformed PEFTCLI_DIST_TIMEOUT is one message here, not N
    # The run folder's one-writer lock (runs/lock.py) is not taken here: under torchrun only global
    # rank 0 writes, so rank 0 takes it in training.loop.set_up, on the shared filesystem, whichever
    # node the rendezvous puts it on.
    cmd = torchrun_command(recipe, overrides, nproc, mode=mode, resume=resume, smoke=smoke, nodes=nodes,
                           trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="peftcli-exits-") as exit_dir, stop_signals():
        torchrun = ProcessGroup(cmd, env={**os.environ, EXIT_DIR_ENV: exit_dir, NODE_ENV: str(nodes.rank)})
        try:
            status = torchrun.wait()
        except Stopped:
            stop_and_wait([torchrun])
            raise
        code, first = first_failure(status, read_rank_exits(Path(exit_dir)))
    if first is not None:
        from rich.console import Console

        kind = "bad input" if code == 2 else "failure"
        here = f" on this node (--node-rank {nodes.rank})" if nodes.count > 1 else ""
        Console(stderr=True).print(
            f"[red]error:[/] rank {first.rank} failed first{here} ({kind}, exit {code}; its message is above); "
            "the other ranks were stopped", highlight=False, soft_wrap=True)
    return code
