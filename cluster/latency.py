"""A latency figure as counters report it: count, mean and recent percentiles."""

from __future__ import annotations

from collections import deque


class LatencyStat:
    """Count, mean and recent percentiles of one latency (seconds)."""

    def __init__(self, keep: int = 512):
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.recent.append(seconds)

    def as_dict(self) -> dict:
        r = sorted(self.recent)
        pick = (lambda q: r[min(len(r) - 1, int(q * len(r)))]) if r else (lambda q: None)
        return {"count": self.count, "mean_s": self.total / self.count if self.count else None,
                "p50_s": pick(0.5), "p99_s": pick(0.99)}
