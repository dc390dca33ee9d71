"""Claim-4 rule and proxy against hand computation."""

import math

import numpy as np
import pytest

from sae_pipeline.stats.tradeoff import activation_weighted_similarity, largest_harmless_coefficient, reconstruction_cost_interval


def test_cost_interval_by_hand():
    difference, low, high = reconstruction_cost_interval([0.10, 0.12], [0.20, 0.22])
    half = 1.959963984540054 * math.sqrt(0.0002 / 2 + 0.0002 / 2)
    assert difference == pytest.approx(0.10)
    assert low == pytest.approx(0.10 - half)
    assert high == pytest.approx(0.10 + half)


def test_flat_then_rising_curve():
    curve = {0.0: [0.10, 0.12], 1e-3: [0.11, 0.12], 1e-2: [0.10, 0.13], 1e-1: [0.30, 0.31], 1.0: [0.60, 0.61]}
    assert largest_harmless_coefficient(curve) == 1e-2


def test_stops_at_first_harmful_even_if_later_recovers():
    curve = {0.0: [0.10, 0.11], 1e-3: [0.50, 0.51], 1e-2: [0.10, 0.11]}
    assert largest_harmless_coefficient(curve) == 0.0


def test_all_harmless_and_missing_baseline():
    curve = {0.0: [0.10, 0.12], 0.5: [0.09, 0.11], 5.0: [0.11, 0.12]}
    assert largest_harmless_coefficient(curve) == 5.0
    with pytest.raises(ValueError, match="baseline"):
        largest_harmless_coefficient({1e-3: [0.1, 0.2]})


def test_similarity_by_hand():
    # e0 = x, e1 = x (cos 1), e2 = y (cos 0 to both); weights 1, 2, 3.
    embeddings = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    score = activation_weighted_similarity([1.0, 2.0, 3.0], embeddings)
    assert score == pytest.approx((1 * 2 * 1.0 + 1 * 3 * 0.0 + 2 * 3 * 0.0) / (2 + 3 + 6))


def test_similarity_drops_zero_activations():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert activation_weighted_similarity([0.0, 1.0, 1.0], embeddings) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(activation_weighted_similarity([0.0, 0.0, 4.0], embeddings))
