"""How many CPU threads a training process should ask torch for on a shared machine."""

from __future__ import annotations

import os


def idle_cpu_threads() -> int:
    """Intra-op threads for CPU training: the cores that other processes are not keeping busy.

    torch starts one thread per core. When other processes already load those cores, every
    parallel op ends in a barrier that waits for a descheduled thread: on a 2-core machine with a
    load average of 7, a MiniLM LoRA step took 3-4× longer with 2 threads than with 1 (either
    library). Reads the 1-minute load average, so call it before training starts.
    """
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        return n
    return max(1, min(n, round(n - busy)))
