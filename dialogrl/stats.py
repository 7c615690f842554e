"""Statistics for honest comparisons: paired bootstrap CIs, Wilson intervals, pass^k. Pure numpy."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from math import comb, sqrt

import numpy as np

_CHUNK = 1_000_000
"""Bootstrap indices drawn at a time, so 10,000 resamples of thousands of scenarios stay small in memory."""


def paired_bootstrap_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 10_000,
                        seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Mean of ``a - b`` over paired scenarios, with a percentile bootstrap CI that resamples scenarios.

    ``a[i]`` and ``b[i]`` are the two methods' values on scenario ``i``. Written by hand: scipy is not a
    dependency, and the paired resampling is a few lines.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples need equal non-empty 1-d shapes, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired samples must be finite")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    diff = a - b
    n = len(diff)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // n)
    means = np.concatenate([diff[rng.integers(0, n, size=(min(rows, n_boot - start), n))].mean(axis=1)
                            for start in range(0, n_boot, rows)])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    mean = float(diff.mean())
    # Rounding in the resampled means can put a zero-width CI a few ulps beside the mean; clamp it.
    return {"mean_diff": mean, "low": min(float(low), mean), "high": max(float(high), mean), "n": int(n)}


def runs_and_scenarios_bootstrap_ci(a: np.ndarray, b: np.ndarray, paired_runs: bool, n_boot: int = 10_000,
                                    seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Mean of ``a - b`` with a percentile bootstrap CI that resamples training runs as well as scenarios.

    ``a[r, i]`` is run ``r``'s value on scenario ``i`` (runs: one method's training seeds), ``b`` the same for
    the other method on the same scenarios. Each resample draws runs with replacement (the same draws for both
    methods when ``paired_runs``: run ``r`` of one started from run ``r`` of the other), then scenarios, so the
    interval also holds the spread between training seeds that :func:`paired_bootstrap_ci` over pooled scenarios
    leaves out. Two-level resampling is conservative: each episode's own noise is counted at both levels, so even
    when the runs agree the interval is wider than the pooled one (for R runs of independent episodes, by
    sqrt((3R - 2) / R) in expectation: about 1.5x for three). With few runs it is also coarse: three runs make
    ten distinct draws. Written by hand, as above.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or 0 in a.shape or 0 in b.shape:
        raise ValueError(f"need (runs, scenarios) arrays over the same scenarios, got {a.shape} and {b.shape}")
    if paired_runs and a.shape[0] != b.shape[0]:
        raise ValueError(f"paired runs need as many runs on each side, got {a.shape[0]} and {b.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("samples must be finite")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)

    def run_means(values: np.ndarray, picks: np.ndarray) -> np.ndarray:
        # (rows, runs) draws -> each resample's mean over its drawn runs, per scenario: (rows, n)
        weights = (picks[:, :, None] == np.arange(len(values))).mean(axis=1)
        return weights @ values

    rows, means = max(1, _CHUNK // (n * max(a.shape[0], b.shape[0]))), []
    for start in range(0, n_boot, rows):
        size = min(rows, n_boot - start)
        picks_a = rng.integers(0, a.shape[0], size=(size, a.shape[0]))
        picks_b = picks_a if paired_runs else rng.integers(0, b.shape[0], size=(size, b.shape[0]))
        scenarios = rng.integers(0, n, size=(size, n))
        diff = run_means(a, picks_a) - run_means(b, picks_b)
        means.append(np.take_along_axis(diff, scenarios, axis=1).mean(axis=1))
    low, high = np.quantile(np.concatenate(means), [alpha / 2, 1 - alpha / 2])
    mean = float(a.mean() - b.mean())
    return {"mean_diff": mean, "low": min(float(low), mean), "high": max(float(high), mean), "n": int(n),
            "runs": [int(a.shape[0]), int(b.shape[0])], "paired_runs": bool(paired_runs)}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (``successes`` may be fractional when pooled).

    Unlike the bootstrap it never collapses to zero width at 0% or 100% success.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval always contains p; clamping keeps float rounding at p = 0 or 1 from putting it outside.
    return (max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))


def pass_hat_k(successes_by_scenario: Mapping[Hashable, Sequence[bool]], k: int) -> float:
    """tau-bench's pass^k: the chance that k trials of the same scenario all succeed, averaged over scenarios.

    Unbiased per scenario with n trials and c successes: C(c, k) / C(n, k).
    """
    if k < 1:
        raise ValueError(f"pass^k needs k >= 1, got {k}")
    values = []
    for trials in successes_by_scenario.values():
        n, c = len(trials), int(sum(bool(t) for t in trials))
        if n < k:
            raise ValueError(f"pass^{k} needs at least {k} trials per scenario, got {n}")
        values.append(comb(c, k) / comb(n, k))
    if not values:
        raise ValueError("pass^k needs at least one scenario")
    return float(np.mean(values))
