"""torch's compute threads when serving on the CPU: an explicit, process-wide choice made once at start."""

from __future__ import annotations

import os

import torch


def serving_threads() -> int:
    """All usable cores but one: the HTTP event loop and the clients need one (two threads fighting a busy core
    stall every matrix multiply)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def use_serving_threads(threads: int | None = None) -> int:
    """Set torch's compute threads (default `serving_threads()`); returns the number set."""
    threads = threads or serving_threads()
    torch.set_num_threads(threads)
    return threads
