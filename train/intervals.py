"""Uncertainty of an evaluation score: 95 % intervals, and a paired comparison of two models on the same rows.

- Row-level metrics (one unit per row: exact, contains, regex): the Wilson score interval for a proportion.
- json-fields (many fields per row): the fields of one row are not independent, so Wilson over fields would be too
  narrow; the interval is the seeded percentile bootstrap over rows of Σcorrect / Σtotal.
- Two models on the same rows: the difference of their scores with a seeded paired bootstrap interval (the same
  resampled rows for both), the rows each wins, and an exact two-sided sign test on wins against losses (for
  row-level metrics this is McNemar's exact test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .metrics import Scored

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
RESAMPLES = 2000


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """(p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n) with p̂ = successes / trials."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    denominator = 1 + z * z / trials
    return (max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator))


def _resampled_rows(rows: int, seed: int) -> np.ndarray:
    """[RESAMPLES, rows] row indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, rows, size=(RESAMPLES, rows))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def score_summary(scores: Sequence[Scored], row_level: bool, seed: int) -> dict:
    """The score Σcorrect / Σtotal with its 95 % interval: Wilson when every row is one unit, else the bootstrap."""
    correct, total = sum(s.correct for s in scores), sum(s.total for s in scores)
    if row_level:
        low, high, method = *wilson(correct, total), "wilson"
    else:
        index = _resampled_rows(len(scores), seed)
        hits, units = np.array([s.correct for s in scores]), np.array([s.total for s in scores])
        low, high, method = *_percentiles(hits[index].sum(1) / units[index].sum(1)), "bootstrap over rows"
    return {"score": correct / total, "ci95": [low, high], "interval": method, "correct": correct, "total": total,
            "rows": len(scores)}


def paired_comparison(model: Sequence[Scored], baseline: Sequence[Scored], seed: int) -> dict:
    """model's score minus baseline's on the same rows, with a paired bootstrap 95 % interval; rows where each does
    better; the sign test's two-sided p-value."""
    hits = np.array([s.correct for s in model]) - np.array([s.correct for s in baseline])
    units = np.array([s.total for s in model])
    index = _resampled_rows(len(model), seed)
    wins = sum(m.value > b.value for m, b in zip(model, baseline))
    losses = sum(m.value < b.value for m, b in zip(model, baseline))
    return {
        "difference": float(hits.sum() / units.sum()),
        "ci95": list(_percentiles(hits[index].sum(1) / units[index].sum(1))),
        "interval": "paired bootstrap over rows",
        "better": wins,
        "worse": losses,
        "same": len(model) - wins - losses,
        "sign_test_p": sign_test(wins, losses),
    }


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of wins against losses under 'either is equally likely': 2·P(X ≤ min) for
    X ~ Binomial(wins + losses, ½), at most 1."""
    trials = wins + losses
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(min(wins, losses) + 1)) / 2**trials
    return min(1.0, 2 * tail)
