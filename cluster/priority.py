"""Scheduling priority of serving processes.

Ray starts worker processes at niceness 15, below its own control-plane daemons. On a small node the engine's
matmul threads and the ingress then wait behind them, and decode steps slow down (docs/measurements.md). Linux
keeps niceness per thread, so every thread is reset.
"""

from __future__ import annotations

import os


def use_default_priority() -> None:
    """Set every thread of this process (and threads it starts later) to niceness 0, where permitted."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except (OSError, AttributeError):
            return  # not permitted (unprivileged) or not Linux: keep what Ray chose
