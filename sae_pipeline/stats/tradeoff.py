"""Claim-4 trade-off measures: the "largest harmless coefficient" rule and the embedding-coherence proxy.

Both are pure numpy functions; the claim-4 stage (not yet built) is meant to call them on the evaluate
outputs of every variant of a regularizer sweep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sae_pipeline.stats.intervals import Z_95


def reconstruction_cost_interval(baseline: Sequence[float], treated: Sequence[float]) -> tuple[float, float, float]:
    """Cost of a coefficient: mean(treated) - mean(baseline) and its Welch-style 95% interval.

    ``baseline`` and ``treated`` are per-seed reconstruction errors (e.g. FVU, dimensionless; higher is
    worse), each with at least two seeds. Returns ``(difference, ci_low, ci_high)``.
    """
    base = np.asarray(baseline, dtype=np.float64)
    other = np.asarray(treated, dtype=np.float64)
    if base.size < 2 or other.size < 2:
        raise ValueError(f"need at least two seeds per coefficient, got {base.size} and {other.size}")
    difference = float(other.mean() - base.mean())
    half_width = Z_95 * math.sqrt(base.var(ddof=1) / base.size + other.var(ddof=1) / other.size)
    return difference, difference - half_width, difference + half_width


def largest_harmless_coefficient(fvu_by_coefficient: Mapping[float, Sequence[float]]) -> float:
    """Largest coefficient whose reconstruction cost is within seed-to-seed noise.

    ``fvu_by_coefficient`` maps each coefficient (>= 0; 0 must be present, it is the baseline) to its
    per-seed FVU values. A coefficient is harmless when the lower end of the 95% interval of its cost
    (:func:`reconstruction_cost_interval` against coefficient 0) is <= 0, i.e. the increase is not
    distinguishable from noise. Coefficients are walked in increasing order and the walk stops at the
    first harmful one, so the answer is the end of the harmless prefix of the curve (0 when the
    smallest non-zero coefficient already hurts).
    """
    if 0.0 not in {float(c) for c in fvu_by_coefficient}:
        raise ValueError("fvu_by_coefficient needs the baseline coefficient 0")
    baseline = next(values for coefficient, values in fvu_by_coefficient.items() if float(coefficient) == 0.0)
    largest = 0.0
    for coefficient in sorted(float(c) for c in fvu_by_coefficient if float(c) > 0.0):
        values = next(v for c, v in fvu_by_coefficient.items() if float(c) == coefficient)
        _, ci_low, _ = reconstruction_cost_interval(baseline, values)
        if ci_low > 0.0:
            break
        largest = coefficient
    return largest


def activation_weighted_similarity(activations: Sequence[float], embeddings: np.ndarray) -> float:
    """Monosemanticity proxy of one latent: activation-weighted mean cosine of its top contexts.

    ``activations``: shape (n,), the latent's activation on each of its n top-activating contexts
    (>= 0). ``embeddings``: shape (n, d), the contexts' sentence-model embeddings (any norm; they are
    normalised here). Score = sum_{i<j} a_i a_j cos(e_i, e_j) / sum_{i<j} a_i a_j, in [-1, 1]; NaN with
    fewer than two contexts of positive activation.
    """
    weights = np.asarray(activations, dtype=np.float64)
    vectors = np.asarray(embeddings, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != weights.shape[0]:
        raise ValueError(f"embeddings must be (n, d) with n={weights.shape[0]}, got {vectors.shape}")
    keep = weights > 0
    weights, vectors = weights[keep], vectors[keep]
    if weights.size < 2:
        return float("nan")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    pair_weights = np.outer(weights, weights)
    upper = np.triu_indices(weights.size, k=1)
    return float((pair_weights[upper] * cosine[upper]).sum() / pair_weights[upper].sum())
