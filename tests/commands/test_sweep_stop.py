"""The sweep's scheduler under a stop signal: nothing new starts, every running trial's process
group (the trial and whatever it started) gets SIGTERM, the scheduler waits for them and says how
each ended, and the stop propagates with the shell's exit code. Seconds, no training."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from peftcli.commands import sweep as sw
from peftcli.core import signals

# A trial that starts a child of its own (as a data loader or a compile worker would), writes the
# child's PID and sleeps; SIGTERM's default action ends both.
TRIAL = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
         "open(sys.argv[1] + '.tmp', 'w').write(str(c.pid)); __import__('os').replace(sys.argv[1] + '.tmp', sys.argv[1]); "
         "time.sleep(120)")


def _gone(pid: int, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_stop_signal_stops_each_running_trial_and_what_it_started(tmp_path: Path):
    started, stopped, ended = [], [], []

    def launch(item: int, worker: int):
        started.append(item)
        return signals.ProcessGroup([sys.executable, "-c", TRIAL, str(tmp_path / f"{item}.pid")])

    def on_start(item: int, worker: int) -> None:
        if item == 2:  # both slots busy: wait until both trials have started their child, then SIGTERM
            end = time.monotonic() + 60
            while not all((tmp_path / f"{i}.pid").exists() for i in (1, 2)):
                assert time.monotonic() < end
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

    with signals.stop_signals(), signals.deferred():
        with pytest.raises(signals.Stopped) as e:
            sw.schedule([1, 2, 3], 2, launch, lambda *a: ended.append(a), on_start=on_start,
                        on_stopped=lambda item, w, rc: stopped.append((item, rc)), poll_s=0.02)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert started == [1, 2]  # the third never starts
    assert ended == [] and sorted(stopped) == [(1, -signal.SIGTERM), (2, -signal.SIGTERM)]
    for i in (1, 2):
        assert _gone(int((tmp_path / f"{i}.pid").read_text())), f"trial {i}'s child outlived the stop"


def test_a_trial_stopped_by_a_signal_is_interrupted_not_failed(tmp_path: Path):
    summary = tmp_path / "summary.json"
    assert sw._how_it_ended(143, "", summary, stopped=False) == ("interrupted", None)
    assert sw._how_it_ended(-signal.SIGTERM, "", summary, stopped=False) == ("interrupted", None)
    assert sw._how_it_ended(-signal.SIGKILL, "", summary, stopped=True) == ("interrupted", None)
    # killed from outside (the out-of-memory killer): it was "failed" with its last log line as the
    # error, and never resumed although its last/ checkpoint stood
    status, why = sw._how_it_ended(-signal.SIGKILL, "step 3: val loss 1.09\n", summary, stopped=False)
    assert status == "interrupted" and "SIGKILL" in why and "resumes it" in why
    assert sw._how_it_ended(1, "error: CUDA out of memory\n", summary, stopped=False) == (
        "failed", "error: CUDA out of memory")
    summary.write_text("{}")
    assert sw._how_it_ended(0, "", summary, stopped=True) == ("done", None)  # finished as the stop came
