"""`peftcli train --nproc N`: re-run the same command under torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def launch_torchrun(recipe: Path, overrides: list[str], nproc: int, *, resume: bool, smoke: bool) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "peftcli.cli", "train", str(recipe), *overrides]
    if not any(o.startswith("train.distributed=") for o in overrides):
        cmd.append("train.distributed=ddp")
    if resume:
        cmd.append("--resume")
    if smoke:
        cmd.append("--smoke")
    return subprocess.call(cmd)
