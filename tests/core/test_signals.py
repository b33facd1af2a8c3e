"""peftcli.core.signals: SIGTERM raises like Ctrl-C, a deferred stop waits for its safe point and a
second signal does not, ignored signals stay ignored, and a ProcessGroup child never outlives its
parent (even one killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from peftcli.core import signals


def test_sigterm_raises_stopped_with_the_shell_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_signals():
        with pytest.raises(KeyboardInterrupt) as e:  # every Ctrl-C path handles it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert isinstance(e.value, signals.Stopped) and e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # put back


@pytest.fixture
def sigint_handled():
    """SIGINT as an interactive Python has it. A suite started as a background job (`cmd &`, as some
    CI runners do) inherits SIGINT ignored, which `stop_signals` rightly leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_deferred_stop_waits_for_the_safe_point_and_a_second_one_does_not(sigint_handled):
    with signals.stop_signals(), signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        # The kernel may hand the signal to any thread of the process, which may wait its turn on a
        # loaded machine: wait for the record itself rather than a fixed time.
        deadline = time.monotonic() + 30
        while signals.requested() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signals.requested() == signal.SIGINT  # recorded, not raised
        with pytest.raises(signals.Stopped) as e:
            signals.stop_if_requested()
        assert e.value.exit_code == 130
        with pytest.raises(signals.Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signals.requested() is None  # a request belongs to the block it was made in


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.stop_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, previous)


PARENT = """
import sys, time
from peftcli.core.signals import ProcessGroup
child = ProcessGroup([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.slow
def test_a_child_gets_sigterm_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its SIGKILLed parent")
