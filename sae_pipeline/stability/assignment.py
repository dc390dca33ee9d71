"""Exact maximum-similarity one-to-one matching (the Hungarian step of feature matching), fast at SAE sizes.

``max_similarity_matching(similarity)`` returns, for every row of a ``[n_rows, n_cols]`` similarity
matrix, the column it is matched to, such that the matching is one-to-one, covers every row when
``n_rows <= n_cols`` (every column otherwise), and has the largest possible total similarity -- the
same problem ``scipy.optimize.linear_sum_assignment(similarity, maximize=True)`` solves.

Two solvers:

- ``dense``: ``linear_sum_assignment`` on the whole matrix (float64). Exact; about 37 s for a random
  16384 x 16384 matrix on this project's 2-core machine, and it needs the matrix in host memory.
- ``sparse``: solve on a candidate graph (each row's and each column's ``candidates`` most similar
  partners) with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``, then **certify** the
  result on the full matrix with linear-programming duality: from the matching we compute dual
  potentials ``u`` (rows) and ``v >= 0`` (columns) that satisfy ``u_i + v_j = s_ij`` on matched pairs and
  ``u_i + v_j >= s_ij`` on every candidate edge (Bellman-Ford shortest paths on the residual graph).
  If ``u_i + v_j >= s_ij - tolerance`` also holds for every entry of the full matrix, the matching is
  optimal for the full matrix (weak duality), to within ``n_rows * tolerance`` in total similarity.
  Entries that violate it are added to the candidate graph and the solve repeats; if that does not
  settle within ``max_rounds`` the dense solver is used. The result is therefore exactly optimal,
  like ``dense``; where several matchings tie for the optimum the two solvers may return different ones.

``auto`` uses ``dense`` for small problems and ``sparse`` otherwise. The similarity may be a NumPy
array or a torch tensor (on any device); the full-matrix check runs where the tensor lives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sparse
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

logger = logging.getLogger(__name__)

Solver = Literal["auto", "dense", "sparse"]
# Below this many matrix entries `auto` uses the dense solver (2048 x 2048 takes well under a second).
DENSE_AUTO_MAX_ENTRIES = 2048 * 2048
# Rows of the full matrix checked against the dual potentials at a time.
CHECK_BLOCK_ROWS = 2048
# A round checks only the rows/columns whose potentials dropped when they cover less than this share of
# the matrix; otherwise it checks everything (and its potentials become the new reference).
PARTIAL_CHECK_SHARE = 0.5


@dataclass
class MatchingReport:
    """How a matching was found.

    Attributes:
        solver: "dense" or "sparse" (the one that produced the answer).
        rounds: sparse solves run (0 for dense).
        candidate_edges: edges of the final candidate graph (0 for dense).
        max_dual_violation: largest ``s_ij - u_i - v_j`` among the entries checked in the last round
            (sparse only; <= tolerance means certified optimal; NaN for dense, exact by construction).
        bellman_ford_iterations: relaxation sweeps used to compute the potentials (sparse only).
        full_checks: rounds whose check covered the whole matrix (the others checked only the rows and
            columns whose potentials dropped since the last full check, which suffices; sparse only).
    """

    solver: str
    rounds: int = 0
    candidate_edges: int = 0
    max_dual_violation: float = float("nan")
    bellman_ford_iterations: int = 0
    full_checks: int = 0


def max_similarity_matching(
    similarity: np.ndarray | torch.Tensor,
    solver: Solver = "auto",
    candidates: int = 8,
    tolerance: float = 1e-9,
    max_rounds: int = 20,
) -> tuple[np.ndarray, MatchingReport]:
    """One-to-one matching of maximal total similarity.

    Args:
        similarity: ``[n_rows, n_cols]`` similarities (any real values; finite).
        solver: "auto", "dense" or "sparse" (see module docstring).
        candidates: partners per row and per column in the first candidate graph (sparse solver).
        tolerance: allowed dual violation per entry when certifying (sparse solver).
        max_rounds: sparse solves before falling back to the dense solver.

    Returns:
        ``(partner, report)``: ``partner`` is ``[n_rows]`` int64, the matched column of each row, or -1
        for rows left unmatched (only when ``n_rows > n_cols``).
    """
    if solver not in ("auto", "dense", "sparse"):
        raise ValueError(f"match.solver must be auto, dense or sparse, got {solver!r}")
    n_rows, n_cols = similarity.shape
    if n_rows == 0 or n_cols == 0:
        return np.full(n_rows, -1, dtype=np.int64), MatchingReport(solver="dense")
    if n_rows > n_cols:
        column_partner, report = max_similarity_matching(similarity.T, solver, candidates, tolerance, max_rounds)
        partner = np.full(n_rows, -1, dtype=np.int64)
        partner[column_partner] = np.arange(n_cols)
        return partner, report
    if solver == "dense" or (solver == "auto" and n_rows * n_cols <= DENSE_AUTO_MAX_ENTRIES):
        return _dense_matching(similarity), MatchingReport(solver="dense")
    return _certified_sparse_matching(torch.as_tensor(similarity), candidates, tolerance, max_rounds)


def _dense_matching(similarity: np.ndarray | torch.Tensor) -> np.ndarray:
    values = similarity.detach().cpu().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    rows, cols = linear_sum_assignment(values.astype(np.float64, copy=False), maximize=True)
    partner = np.full(values.shape[0], -1, dtype=np.int64)
    partner[rows] = cols
    return partner


def _initial_candidates(similarity: torch.Tensor, similarity_t: torch.Tensor, candidates: int) -> np.ndarray:
    """Flat keys ``row * n_cols + col`` of the first candidate graph.

    Three sets, each ``candidates`` wide: every row's most similar columns, every column's most similar
    rows, and every row's best columns after subtracting a guessed price from each column. The price
    guess is what the column's keenest row would lose by taking its second choice instead (0 for a
    column nobody prefers), so rows whose favourite columns are firmly taken by others also get their
    realistic options -- without it the first solve forces such rows into long chains and the check
    finds many violations.
    """
    n_rows, n_cols = similarity.shape
    per_row = min(candidates, n_cols)
    per_col = min(candidates, n_rows)
    row_top = similarity.topk(min(2, n_cols), dim=1)
    col_best = similarity_t.topk(per_col, dim=1)  # row-wise on the transposed copy: much faster on CPU
    keenest_row = col_best.indices[:, 0]
    if n_cols > 1:
        column_is_first = row_top.indices[keenest_row, 0] == torch.arange(n_cols, device=similarity.device)
        second_choice = torch.where(column_is_first, row_top.values[keenest_row, 1], row_top.values[keenest_row, 0])
        price_guess = (col_best.values[:, 0] - second_choice).clamp_min(0)
    else:
        price_guess = torch.zeros(n_cols, device=similarity.device, dtype=similarity.dtype)
    row_best = similarity.topk(per_row, dim=1).indices.cpu().numpy()
    row_best_priced = (similarity - price_guess[None, :]).topk(per_row, dim=1).indices.cpu().numpy()
    row_index = np.arange(n_rows)[:, None] * n_cols
    keys = np.concatenate(
        [(row_index + row_best).ravel(), (row_index + row_best_priced).ravel(), (col_best.indices.cpu().numpy() * n_cols + np.arange(n_cols)[:, None]).ravel()]
    )
    return _unique_sorted(keys)


def _unique_sorted(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array (faster than ``np.unique`` for large arrays)."""
    keys = np.sort(keys, kind="stable")
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys


def _gather(similarity: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    device = similarity.device
    index_rows = torch.from_numpy(rows).to(device)
    index_cols = torch.from_numpy(cols).to(device)
    return similarity[index_rows, index_cols].double().cpu().numpy()


def _certified_sparse_matching(similarity: torch.Tensor, candidates: int, tolerance: float, max_rounds: int) -> tuple[np.ndarray, MatchingReport]:
    n_rows, n_cols = similarity.shape
    # Column-wise work (top-k per column, checking columns) runs row-wise on a contiguous transposed copy.
    similarity_t = similarity.T.contiguous()
    keys = _initial_candidates(similarity, similarity_t, candidates)
    report = MatchingReport(solver="sparse")
    reference: tuple[np.ndarray, np.ndarray] | None = None  # potentials at the last full-matrix check
    for round_index in range(1, max_rounds + 1):
        rows, cols = np.divmod(keys, n_cols)
        values = _gather(similarity, rows, cols)
        # Costs in [offset - max, offset - min] are all positive, so no edge is an implicit zero;
        # every full matching has n_rows edges, so the offset does not change which one is optimal.
        offset = 1.0 + values.max() - min(values.min(), 0.0)
        graph = sparse.csr_matrix((offset - values, (rows, cols)), shape=(n_rows, n_cols))
        try:
            matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
        except ValueError:
            if len(keys) >= n_rows * n_cols // 2:
                break
            candidates *= 2
            logger.info("candidate graph has no full matching; retrying with %d candidates per row/column", candidates)
            keys = _unique_sorted(np.concatenate([keys, _initial_candidates(similarity, similarity_t, candidates)]))
            continue
        partner = np.full(n_rows, -1, dtype=np.int64)
        partner[matched_rows] = matched_cols
        row_potential, col_potential, iterations = _dual_potentials(partner, rows, cols, values, n_cols)
        rows_to_check, cols_to_check = None, None
        if reference is not None:
            # Entries whose row and column potentials did not drop since the last full check still
            # satisfy the bound (they did then, or they are candidates); only the rest need a look.
            rows_to_check = np.flatnonzero(row_potential < reference[0])
            cols_to_check = np.flatnonzero(col_potential < reference[1])
            if len(rows_to_check) * n_cols + len(cols_to_check) * n_rows > PARTIAL_CHECK_SHARE * n_rows * n_cols:
                rows_to_check, cols_to_check = None, None
        violating_keys, max_violation = _dual_violations(similarity, similarity_t, row_potential, col_potential, tolerance, rows_to_check, cols_to_check)
        if rows_to_check is None:
            reference = (row_potential, col_potential)
            report.full_checks += 1
        report.rounds = round_index
        report.candidate_edges = int(len(keys))
        report.max_dual_violation = max_violation
        report.bellman_ford_iterations = iterations
        if len(violating_keys) == 0:
            return partner, report
        logger.info("matching round %d: %d entries violate the dual bound (max %.3g); adding them", round_index, len(violating_keys), max_violation)
        keys = _unique_sorted(np.concatenate([keys, violating_keys]))
    logger.warning("sparse matching did not certify within %d rounds; using the dense solver", max_rounds)
    return _dense_matching(similarity), MatchingReport(solver="dense", rounds=report.rounds, candidate_edges=report.candidate_edges)


def _dual_potentials(
    partner: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_cols: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Dual potentials certifying that ``partner`` is optimal on the candidate edges.

    The assignment LP's dual asks for row potentials ``u`` (free) and column potentials ("prices")
    ``v >= 0``, zero on unmatched columns, with ``u_i + v_j >= s_ij`` on every edge and equality on
    matched edges. Writing ``u_i = s_{i,M(i)} - v_{M(i)}``, an edge ``(i, j)`` requires
    ``v_j >= v_{M(i)} - (s_{i,M(i)} - s_ij)``. We take the smallest prices that satisfy these lower
    bounds starting from 0 (a longest-path Bellman-Ford over arcs ``M(i) -> j``). Optimality of the
    matching on the candidate graph means no alternating cycle or path improves it, so the sweeps
    converge and unmatched columns keep price 0. Small prices leave the most room for the entries
    outside the candidate graph (a column nobody else wants costs nothing), so few of them violate
    ``u_i + v_j >= s_ij`` in the full-matrix check.

    Returns ``(u [n_rows], v [n_cols], sweeps)``.
    """
    on_matching = partner[rows] == cols
    row_value = np.zeros(len(partner))
    row_value[rows[on_matching]] = values[on_matching]
    arc_source = partner[rows[~on_matching]]
    arc_target = cols[~on_matching]
    arc_weight = row_value[rows[~on_matching]] - values[~on_matching]
    order = np.argsort(arc_target, kind="stable")
    price = np.zeros(n_cols)
    sweeps = _raise_prices(price, arc_source[order], arc_target[order], arc_weight[order])
    return row_value - price[partner], price, sweeps


def _raise_prices(price: np.ndarray, source: np.ndarray, target: np.ndarray, weight: np.ndarray, slack: float = 1e-12) -> int:
    """Bellman-Ford in place: ``price[t] = max(price[t], price[s] - w)`` over arcs (sorted by target).

    Rises smaller than ``slack`` are ignored so rounding on zero-weight cycles cannot loop forever.
    Returns the number of sweeps.
    """
    if source.size == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
    heads = target[starts]
    for sweeps in range(1, len(price) + 2):
        best = np.maximum.reduceat(price[source] - weight, starts)
        raised = best > price[heads] + slack
        if not raised.any():
            return sweeps
        price[heads[raised]] = best[raised]
    raise RuntimeError("Bellman-Ford did not converge: the candidate matching is not optimal on its graph")


def _dual_violations(
    similarity: torch.Tensor, similarity_t: torch.Tensor, row_potential: np.ndarray, col_potential: np.ndarray, tolerance: float,
    rows: np.ndarray | None = None, cols: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Flat keys of entries with ``s_ij > u_i + v_j + tolerance`` and the largest ``s_ij - u_i - v_j``.

    Checks the whole matrix when ``rows`` and ``cols`` are None, else only those rows and columns
    (columns are read from ``similarity_t``, the contiguous transpose).
    """
    n_rows, n_cols = similarity.shape
    device = similarity.device
    u = torch.from_numpy(row_potential).to(device)
    v = torch.from_numpy(col_potential).to(device)
    if rows is None and cols is None:
        found_rows, found_cols, max_violation = _scan_rows(similarity, None, u, v, tolerance)
        return found_rows * n_cols + found_cols, max_violation
    by_row = _scan_rows(similarity, rows, u, v, tolerance)
    by_col = _scan_rows(similarity_t, cols, v, u, tolerance)
    keys = _unique_sorted(np.concatenate([by_row[0] * n_cols + by_row[1], by_col[1] * n_cols + by_col[0]]))
    return keys, max(by_row[2], by_col[2])


def _scan_rows(
    matrix: torch.Tensor, row_ids: np.ndarray | None, u: torch.Tensor, v: torch.Tensor, tolerance: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Entries of ``matrix`` in rows ``row_ids`` (all when None) with ``m_ij > u_i + v_j + tolerance``.

    The pass runs in the matrix's dtype with a margin far above its rounding error; entries inside the
    margin are re-checked in float64, so the answer is the float64 one. Returns ``(rows, cols, max excess)``.
    """
    margin = 1e-5 if matrix.dtype in (torch.float32, torch.float64) else 1e-2
    u_low, v_low = u.to(matrix.dtype), v.to(matrix.dtype)
    n_rows = matrix.shape[0] if row_ids is None else len(row_ids)
    found_rows: list[np.ndarray] = []
    found_cols: list[np.ndarray] = []
    max_violation = -np.inf
    for start in range(0, n_rows, CHECK_BLOCK_ROWS):
        if row_ids is None:
            index = torch.arange(start, min(start + CHECK_BLOCK_ROWS, n_rows), device=matrix.device)
            block = matrix[start : start + CHECK_BLOCK_ROWS]
        else:
            index = torch.from_numpy(row_ids[start : start + CHECK_BLOCK_ROWS]).to(matrix.device)
            block = matrix[index]
        excess = block - v_low[None, :]
        excess -= u_low[index, None]
        block_rows, block_cols = torch.nonzero(excess > tolerance - margin, as_tuple=True)
        if block_rows.numel() == 0:
            max_violation = max(max_violation, float(excess.max()))
            continue
        exact = block[block_rows, block_cols].double() - u[index[block_rows]] - v[block_cols]
        max_violation = max(max_violation, float(exact.max()))
        keep = exact > tolerance
        found_rows.append(index[block_rows[keep]].cpu().numpy().astype(np.int64))
        found_cols.append(block_cols[keep].cpu().numpy().astype(np.int64))
    empty = np.empty(0, dtype=np.int64)
    return (np.concatenate(found_rows) if found_rows else empty, np.concatenate(found_cols) if found_cols else empty, max_violation)
