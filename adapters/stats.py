"""Plain counters the adapter manager and the engine keep; the server's metrics collector reads them at scrape time.

The layers below the server never name its metric objects: they count here, and `serve/metrics.py` turns these
counts into Prometheus families when scraped.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field


class BucketCounts:
    """Observations counted into fixed buckets (a histogram's data): thread-safe."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds  # upper bounds, ascending; one more bucket holds what lies above the last
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        """Counts per bucket (the last: above every bound) and the sum of the observations."""
        with self._lock:
            return list(self._counts), self._sum


@dataclass
class AdapterStats:
    """What the adapter manager counts since start: reads from disk (load_seconds: one observation per read),
    evictions by tier, and lookups by tier and result."""

    load_seconds: BucketCounts = field(
        default_factory=lambda: BucketCounts((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
    )
    # the keys are all there from the start: the collector reads while the engine thread counts
    evictions: Counter = field(default_factory=lambda: Counter(dict.fromkeys(("device", "host"), 0)))
    lookups: Counter = field(
        default_factory=lambda: Counter(dict.fromkeys(itertools.product(("device", "host"), ("hit", "miss")), 0))
    )  # (tier, result) -> count

    @property
    def loads(self) -> int:
        """Adapters read from disk and validated: one load_seconds observation each."""
        return sum(self.load_seconds.snapshot()[0])
