"""`peftcli train --nproc N`: re-run the same command under torchrun on this machine.

The parent process checks what it can before starting N children (a recipe error or a missing
GPU should be one message, not N tracebacks), then hands over to torchrun and returns its exit
status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def torchrun_command(
    recipe: Path, overrides: list[str], nproc: int, *, mode: str, resume: bool, smoke: bool
) -> list[str]:
    # Every rank's output is shown so that an error on any rank is seen; training itself prints
    # from rank 0 only.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "peftcli.cli", "train", str(recipe), *overrides]
    if not any(o.startswith("train.distributed=") for o in overrides):
        cmd.append(f"train.distributed={mode}")
    if resume:
        cmd.append("--resume")
    if smoke:
        cmd.append("--smoke")
    return cmd


def launch_torchrun(recipe: Path, overrides: list[str], nproc: int, *, resume: bool, smoke: bool) -> int:
    from .build import pick_device
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    # The recipe's own train.distributed wins; `none` means "not chosen", and N processes need one.
    mode = r.train.distributed if r.train.distributed != "none" else "ddp"
    from .distributed import check_setup

    check_setup(mode, nproc, r.model.quantization)
    device = pick_device(r.train.device)
    if r.model.quantization == "nf4":
        from .quant import check_qlora_possible

        check_qlora_possible(r.method_name, device, r.method)
    if device.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise RuntimeError(
                f"--nproc {nproc} but only {torch.cuda.device_count()} CUDA device(s) visible; one process per GPU"
            )
    return subprocess.call(torchrun_command(recipe, overrides, nproc, mode=mode, resume=resume, smoke=smoke))
