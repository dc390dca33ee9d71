"""Stability measures against hand computation: PW-MCC, threshold curve, reappearance, subspace overlap,
seed-resampled intervals (sae_pipeline/stability/measures.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.stability.matching import match_dictionaries
from sae_pipeline.stability.measures import (
    nonshared_subspace_overlaps,
    pw_mcc,
    reappearance,
    reappearance_by,
    seed_resampled_interval,
    stability_measures,
    subspace_overlap,
    threshold_curve,
    top_basis,
)


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_pw_mcc_of_a_permuted_sign_flipped_copy_is_one():
    rng = np.random.default_rng(0)
    decoder = random_unit(rng, 40, 16)
    encoder = random_unit(rng, 40, 16)
    permutation = rng.permutation(40)
    signs = rng.choice([-1.0, 1.0], size=(40, 1))
    result = match_dictionaries([decoder, signs * decoder[permutation]], [encoder, signs * encoder[permutation]])
    measures = pw_mcc(result)
    assert measures["decoder"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert measures["encoder"]["mean"] == pytest.approx(1.0, abs=1e-6) and measures["decoder"]["sd"] == pytest.approx(0.0, abs=1e-6)


def test_pw_mcc_of_independent_one_latent_dictionaries_is_the_expected_absolute_cosine():
    """One latent per dictionary: the matched |cos| of two random unit vectors in R^d, whose expectation is
    Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)); the mean over 600 independent pairs lands within 4 standard errors."""
    rng = np.random.default_rng(1)
    d = 32
    expected = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    values = []
    for _ in range(600):
        a, b = random_unit(rng, 1, d), random_unit(rng, 1, d)
        values.append(pw_mcc(match_dictionaries([a, b], [a, b]))["decoder"]["mean"])
    standard_error = np.std(values) / math.sqrt(len(values))
    assert abs(np.mean(values) - expected) < 4 * standard_error
    assert expected == pytest.approx(0.1412, abs=1e-3)  # d = 32, by hand: Gamma(16) / (sqrt(pi) Gamma(16.5))


def half_shared_seeds(rng: np.random.Generator, n_seeds: int = 3, n: int = 20, d: int = 256):
    """Dictionaries whose first n/2 latents are one shared set (permuted per seed) and the rest independent."""
    shared = random_unit(rng, n // 2, d)
    decoders, permutations = [], []
    for _ in range(n_seeds):
        own = np.concatenate([shared, random_unit(rng, n - n // 2, d)])
        permutation = rng.permutation(n)
        decoders.append(own[permutation])
        permutations.append(permutation)
    return decoders, permutations


def test_reappearance_and_threshold_curve_of_a_planted_half_shared_dictionary_are_exact():
    rng = np.random.default_rng(2)
    decoders, permutations = half_shared_seeds(rng)
    result = match_dictionaries(decoders, decoders, seeds=[0, 1, 2])
    features = result.feature_table(0)
    values = reappearance(features, 3)
    planted = permutations[0] < 10  # latent i of seed 0 is original latent permutations[0][i]
    assert np.all(values[planted] == 1.0) and np.all(values[~planted] == 0.0)
    curve = threshold_curve(result, thresholds=[0.5, 0.9, 0.999])
    # Independent unit vectors in R^256 have |cos| far below 0.5; the planted half matches with |cos| 1.
    assert curve["fraction_shared"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert curve.loc[0, "fraction_matched_decoder"] == pytest.approx(0.5)


def test_principal_angles_of_planted_shared_and_orthogonal_subspaces_are_recovered():
    rng = np.random.default_rng(3)
    d, r = 64, 4
    basis = np.linalg.qr(rng.standard_normal((d, 2 * r)))[0]
    span_a = rng.standard_normal((30, r)) @ basis[:, :r].T  # 30 directions inside one r-dim subspace
    span_b = rng.standard_normal((25, r)) @ basis[:, :r].T
    overlap, angle = subspace_overlap(top_basis(span_a, r), top_basis(span_b, r))
    assert overlap == pytest.approx(1.0, abs=1e-9) and angle == pytest.approx(0.0, abs=1e-5)
    other = rng.standard_normal((25, r)) @ basis[:, r:].T  # the orthogonal complement within the 2r basis
    overlap, angle = subspace_overlap(top_basis(span_a, r), top_basis(other, r))
    assert overlap == pytest.approx(0.0, abs=1e-9) and angle == pytest.approx(90.0, abs=1e-5)
    # A half-overlapping pair: two shared directions of four: overlap = 2 / 4.
    mixed = rng.standard_normal((25, r)) @ np.concatenate([basis[:, :2], basis[:, r : r + 2]], axis=1).T
    assert subspace_overlap(top_basis(span_a, r), top_basis(mixed, r))[0] == pytest.approx(0.5, abs=1e-9)


def test_nonshared_features_spanning_one_subspace_overlap_fully_against_a_baseline_of_r_over_d():
    """Two seeds: 10 shared latents, and 20 non-shared ones whose decoders are different mixtures of the same 4
    directions (their encoders independent random directions of R^128, so no encoder match clears 0.7)."""
    rng = np.random.default_rng(4)
    d = 128
    shared = random_unit(rng, 10, d)
    common = np.linalg.qr(rng.standard_normal((d, 4)))[0]
    seed_a = np.concatenate([shared, rng.standard_normal((20, 4)) @ common.T])
    seed_b = np.concatenate([shared[::-1], rng.standard_normal((20, 4)) @ common.T])
    encoders = [np.concatenate([shared, random_unit(rng, 20, d)]), np.concatenate([shared[::-1], random_unit(rng, 20, d)])]
    result = match_dictionaries([seed_a, seed_b], encoders)
    assert result.pairs[0].view_a.shared.tolist() == [True] * 10 + [False] * 20
    overlaps = nonshared_subspace_overlaps(result, [seed_a, seed_b], ranks=[4, 64])
    assert overlaps[4]["overlap_mean"] == pytest.approx(1.0, abs=1e-6) and overlaps[4]["random_baseline"] == 4 / d
    assert 64 not in overlaps  # only 20 non-shared latents per seed: rank 64 is skipped, not made up


def test_seed_resampled_interval_by_hand():
    # Two seeds: every usable draw holds the one pair, so the interval is that value.
    assert seed_resampled_interval({"0-1": 0.4}, [0, 1], n_resamples=200) == {"mean": 0.4, "low": 0.4, "high": 0.4, "n_draws": pytest.approx(100, abs=40)}
    # Three seeds with pair values 0, 1, 2: the all-pairs mean is 1; draws mix pairs, bounded by the extremes.
    interval = seed_resampled_interval({"0-1": 0.0, "0-2": 1.0, "1-2": 2.0}, [0, 1, 2], n_resamples=2000)
    assert interval["mean"] == pytest.approx(1.0) and 0.0 <= interval["low"] < 1.0 < interval["high"] <= 2.0
    # Drawing seeds (0, 0, 1) weights pair 0-1 by 2 x 1; (0, 1, 2) weights the three pairs equally.
    assert seed_resampled_interval({"0-1": 0.3}, [0, 1], n_resamples=0)["low"] is None


def test_reappearance_by_covariate_bins_and_rank_correlation():
    values = np.array([0.0, 0.0, 0.5, 1.0, 1.0, np.nan])
    covariate = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    relation = reappearance_by(values, covariate, "x", bins=2)
    assert relation["n"] == 5 and relation["spearman_rho"] == pytest.approx(pd.Series(values[:5]).corr(pd.Series(covariate[:5]), method="spearman"))
    assert [row["n"] for row in relation["bins"]] == [2, 3] and relation["bins"][0]["mean_reappearance"] == 0.0


def test_stability_section_holds_every_measure():
    rng = np.random.default_rng(5)
    decoders, _ = half_shared_seeds(rng, n_seeds=3, n=24, d=64)
    result = match_dictionaries(decoders, decoders, seeds=[0, 1, 2])
    features = result.feature_table(0)
    section, curve = stability_measures(result, decoders, features, np.full(24, 0.01), subspace_ranks=[2, 8], n_resamples=50)
    assert set(section) == {"pw_mcc", "fraction_shared_seed_resampled", "matched_cosine_quantiles", "reappearance", "subspace_overlap"}
    assert section["reappearance"]["distribution"] == {"0/2": 12, "1/2": 0, "2/2": 12}
    assert set(section["subspace_overlap"]) == {"2", "8"} and len(curve) > 5
