"""The certified sparse matching solver agrees with scipy's dense linear_sum_assignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sae_pipeline.stability.assignment import max_similarity_matching


def optimal_value(similarity: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(similarity.astype(np.float64), maximize=True)
    return float(similarity.astype(np.float64)[rows, cols].sum())


def matching_value(similarity: np.ndarray, partner: np.ndarray) -> float:
    matched = partner >= 0
    return float(similarity.astype(np.float64)[np.flatnonzero(matched), partner[matched]].sum())


def check_matching(similarity: np.ndarray, partner: np.ndarray) -> None:
    n_rows, n_cols = similarity.shape
    matched = partner[partner >= 0]
    assert len(matched) == min(n_rows, n_cols)
    assert len(set(matched.tolist())) == len(matched)
    assert matching_value(similarity, partner) == pytest.approx(optimal_value(similarity), abs=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "ties", "gaussian"])
def test_sparse_solver_is_optimal_on_small_random_matrices(kind):
    rng = np.random.default_rng({"uniform": 0, "ties": 1, "gaussian": 2}[kind])
    for _ in range(25):
        n_rows, n_cols = rng.integers(1, 40, size=2)
        if kind == "uniform":
            similarity = rng.random((n_rows, n_cols))
        elif kind == "ties":
            similarity = np.round(rng.random((n_rows, n_cols)), 1)
        else:
            similarity = np.abs(rng.standard_normal((n_rows, n_cols)))
        partner, report = max_similarity_matching(similarity.astype(np.float32), solver="sparse", candidates=2)
        check_matching(similarity.astype(np.float32), partner)
        if report.solver == "sparse":
            assert report.max_dual_violation <= 1e-9


def test_sparse_solver_on_dictionary_like_similarities_needs_and_passes_the_certificate():
    # half the rows have a close copy, the rest are random directions: the first candidate graph is
    # not enough (the check adds edges), and the result must still equal the dense optimum.
    generator = torch.Generator().manual_seed(0)
    n, d = 600, 32
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    b[: n // 2] = torch.nn.functional.normalize(a[: n // 2] + 0.2 * torch.randn(n // 2, d, generator=generator) / d**0.5, dim=1)
    similarity = (a @ b.T).abs()
    partner, report = max_similarity_matching(similarity, solver="sparse", candidates=2)
    assert report.solver == "sparse" and report.rounds >= 2
    assert report.full_checks < report.rounds  # the last round checked only the rows/columns whose potentials dropped
    check_matching(similarity.numpy(), partner)
    dense_partner, dense_report = max_similarity_matching(similarity, solver="dense")
    assert dense_report.solver == "dense"
    assert matching_value(similarity.numpy(), partner) == pytest.approx(matching_value(similarity.numpy(), dense_partner), abs=1e-6)


def test_rectangular_matrices_leave_surplus_rows_unmatched():
    rng = np.random.default_rng(3)
    similarity = rng.random((30, 12)).astype(np.float32)
    for solver in ("dense", "sparse"):
        partner, _ = max_similarity_matching(similarity, solver=solver, candidates=2)
        assert (partner == -1).sum() == 18
        check_matching(similarity, partner)


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="match.solver"):
        max_similarity_matching(np.eye(3), solver="greedy")
