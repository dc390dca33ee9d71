"""95% intervals: normal-approximation means, Wilson proportions, cluster-bootstrap rates, differences."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

# Two-sided 95% quantile of the standard normal.
Z_95 = 1.959963984540054


def mean_with_interval(values: Iterable[float]) -> dict[str, Any]:
    """Mean and normal-approximation 95% interval (1.96 standard errors) of ``values`` (NaNs dropped).

    JSON-safe: ``mean`` is None without values, the interval is None with fewer than two.
    """
    values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else float("nan")
    mean = float(values.mean())
    return {
        "mean": mean,
        "ci_low": mean - half_width if values.size > 1 else None,
        "ci_high": mean + half_width if values.size > 1 else None,
        "n": int(values.size),
    }


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """Wilson 95% interval of a binomial proportion."""
    if trials == 0:
        return float("nan"), float("nan")
    share = successes / trials
    denominator = 1 + Z_95**2 / trials
    centre = (share + Z_95**2 / (2 * trials)) / denominator
    half_width = Z_95 * math.sqrt(share * (1 - share) / trials + Z_95**2 / (4 * trials**2)) / denominator
    return centre - half_width, centre + half_width


def cluster_bootstrap_rate(successes: np.ndarray, trials: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution ``[samples]`` of ``sum(successes) / sum(trials)`` resampling features (clusters)."""
    successes, trials = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    picks = rng.integers(0, len(successes), size=(samples, len(successes)))
    return successes[picks].sum(axis=1) / trials[picks].sum(axis=1)


def difference_of_proportions(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """``p1 - p2`` with a normal-approximation 95% interval."""
    difference = p1 - p2
    half_width = Z_95 * math.sqrt(p1 * (1 - p1) / max(n1, 1) + p2 * (1 - p2) / max(n2, 1))
    return difference, difference - half_width, difference + half_width


def difference_of_means(mean_a: float, low_a: float, high_a: float, mean_b: float, low_b: float, high_b: float) -> tuple[float, float, float]:
    """``mean_a - mean_b`` with a normal 95% interval, each standard error recovered from its own 95% interval."""
    se_a, se_b = (high_a - low_a) / (2 * Z_95), (high_b - low_b) / (2 * Z_95)
    difference = mean_a - mean_b
    half_width = Z_95 * math.sqrt(se_a**2 + se_b**2) if np.isfinite(se_a) and np.isfinite(se_b) else float("nan")
    return difference, difference - half_width, difference + half_width
