"""Statistics for honest comparisons: paired bootstrap CIs, Wilson intervals, pass^k. Pure numpy."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from math import comb, sqrt

import numpy as np


def paired_bootstrap_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 10_000,
                        seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Mean of ``a - b`` over paired scenarios, with a percentile bootstrap CI that resamples scenarios.

    Written by hand: scipy's ``bootstrap`` is not a dependency, and the paired resampling is three lines.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples need equal non-empty 1-d shapes, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean_diff": float(diff.mean()), "low": float(low), "high": float(high), "n": int(len(diff))}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (``successes`` may be fractional when pooled)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def pass_hat_k(successes_by_scenario: Mapping[Hashable, Sequence[bool]], k: int) -> float:
    """tau-bench's pass^k: the chance that k trials of the same scenario all succeed, averaged over scenarios.

    Unbiased per scenario with n trials and c successes: C(c, k) / C(n, k).
    """
    values = []
    for trials in successes_by_scenario.values():
        n, c = len(trials), int(sum(bool(t) for t in trials))
        if n < k:
            raise ValueError(f"pass^{k} needs at least {k} trials per scenario, got {n}")
        values.append(comb(c, k) / comb(n, k))
    if not values:
        raise ValueError("pass^k needs at least one scenario")
    return float(np.mean(values))
