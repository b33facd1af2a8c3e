"""`peftcli` commands in processes forked from one warm interpreter per test worker.

A `python -m peftcli.cli` process spends 6-8 s of CPU importing torch and transformers' model code
before it does anything, which is most of what a test of a tiny run costs. Here each command runs
in a child of multiprocessing's forkserver, which imported all of that once: the child is still a
process of its own (its own pid, exit status, signals, stdout and stderr files, environment and
working folder), so tests of exit codes, kills, signals and what a command prints hold as they do
for a fresh process. What a child cannot show is output printed while those modules are imported:
tests of that start a real interpreter (tests/core/test_quiet.py, tests/e2e/test_cli_ergonomics.py).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Everything a command imports (transformers loads its model and data code lazily), so that each
# forked command starts warm.
PRELOAD = [
    "peftcli.cli", "peftcli.training.loop", "peftcli.methods", "peftcli.runs.state", "peftcli.inference.evaluate",
    "datasets", "pandas", "sympy", "scipy.optimize", "scipy.sparse", "torch._dynamo", "torch.distributed",
    "accelerate", "transformers.models.bert.modeling_bert", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto", "transformers.generation", "transformers.integrations",
    "transformers.quantizers", "matplotlib.pyplot", "uvicorn", "starlette.applications",
]
_ctx: multiprocessing.context.ForkServerContext | None = None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _context() -> multiprocessing.context.ForkServerContext:
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload([m for m in PRELOAD if _installed(m)])
    return _ctx


def _child(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str | None) -> None:
    """The `peftcli` command in this (forked) process, writing to the files named; exits with its status."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    if err is None:
        os.dup2(fd, 2)
    else:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    # The server process may have started with Ctrl-C ignored (a suite run as a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["peftcli", *argv]
    from peftcli.cli import main

    main()


class CliProcess:
    """One forked command, driven like `subprocess.Popen`: pid, poll, wait, send_signal, kill."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None, cwd: Path, out: Path,
                 err: Path | None) -> None:
        self.out, self.err = out, err
        env = dict(os.environ if env is None else env)
        self._p = _context().Process(target=_child, args=(list(argv), env, str(cwd), str(out),
                                                          None if err is None else str(err)))
        self._p.start()
        self.pid = self._p.pid

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode  # -N for death by signal N, as Popen reports it

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(["peftcli"], timeout or 0)
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        if self._p.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self._p.exitcode is None:
            self._p.kill()
            self._p.join(10)


def start(argv: list[str], out: Path, *, err: Path | None = None, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> CliProcess:
    """`peftcli ARGV` started in a forked child; stdout (and stderr unless `err` names its own file)
    to `out`. `env` replaces the environment (default: this process's)."""
    return CliProcess(argv, env=env, cwd=cwd, out=out, err=err)


def run(argv: list[str], tmp: Path, *, env: dict[str, str] | None = None, cwd: Path = ROOT,
        timeout: float = 240) -> subprocess.CompletedProcess:
    """`peftcli ARGV` to completion, as `subprocess.run(..., capture_output=True, text=True)` returns it;
    `tmp` is a folder for its output files."""
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    out, err = tmp / f"cli-{stamp}.out", tmp / f"cli-{stamp}.err"
    p = start(argv, out, err=err, env=env, cwd=cwd)
    try:
        code = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(["peftcli", *argv], code, out.read_text(), err.read_text())
