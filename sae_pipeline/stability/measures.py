"""Stability measures beyond the paper's: threshold-free, per feature, subspace level, intervals over seeds.

All of them read a :class:`~sae_pipeline.stability.matching.MatchResult` (its optimal one-to-one
decoder and encoder matchings) and the dictionaries it matched. Definitions (README "Stability measures"):

- **PW-MCC** (Song et al., arXiv 2505.20254): for a seed pair, the mean |cos| of matched latents
  under the optimal one-to-one assignment; reported per pair and as mean and SD over all pairs, for
  decoder and for encoder directions.
- **Threshold curve**: the shared fraction of a pair (same partner in both matchings, both |cos| > t)
  as a function of t, averaged over pairs; the paper's figure is the curve at t = 0.7.
- **Reappearance probability** of a reference feature: the share of the other S - 1 seeds in which it
  is shared (``direct_share_count / (S - 1)``).
- **Subspace overlap** of the features that are *not* shared in a pair: with ``U_a [d, r]`` the top-r
  right singular vectors of seed a's non-shared unit decoder rows (likewise ``U_b``), overlap =
  ``||U_a^T U_b||_F^2 / r`` = mean squared cosine of the r principal angles; two random r-dimensional
  subspaces of R^d give r / d in expectation.
- **Seed-resampled intervals**: seeds are drawn with replacement; a draw's statistic is the mean of the
  per-pair values over the pairs of distinct drawn seeds (weighted by how often each seed was drawn);
  draws with fewer than two distinct seeds are skipped. The interval is the percentile interval of
  those means: it shows how much the figure depends on which seeds were trained, not only on features.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.linalg import subspace_angles
from scipy.stats import spearmanr

from sae_pipeline.stability.matching import MatchResult, shared_mask, unit_rows

DEFAULT_THRESHOLDS = tuple(np.round(np.linspace(0.1, 0.95, 18), 3))


def pair_key(seed_a: int, seed_b: int) -> str:
    return f"{seed_a}-{seed_b}"


def pw_mcc(result: MatchResult) -> dict[str, dict[str, Any]]:
    """``{"decoder"|"encoder": {"mean", "sd", "per_pair": {"a-b": value}}}`` (SD over pairs, ddof 0)."""
    measures = {}
    for kind in ("decoder", "encoder"):
        per_pair = {pair_key(pair.seed_a, pair.seed_b): float(pair.summary[f"mean_matched_cosine_{kind}"]) for pair in result.pairs}
        values = np.array(list(per_pair.values()))
        measures[kind] = {"mean": float(np.nanmean(values)), "sd": float(np.nanstd(values)), "per_pair": per_pair}
    return measures


def threshold_curve(result: MatchResult, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Shared fraction against the threshold: columns threshold, fraction_shared (mean over pairs), its min
    and max over pairs, and fraction_matched_decoder (share of matched decoder |cos| above the threshold)."""
    rows = []
    for threshold in thresholds:
        shared, matched_above = [], []
        for pair in result.pairs:
            index_a = result.seeds.index(pair.seed_a)
            index_b = result.seeds.index(pair.seed_b)
            n_a, n_b = int(result.included[index_a].sum()), int(result.included[index_b].sum())
            view = pair.view_a
            n_shared = int(shared_mask(view.decoder_partner, view.encoder_partner, view.decoder_cosine, view.encoder_cosine, float(threshold)).sum())
            shared.append(2 * n_shared / (n_a + n_b) if n_a + n_b else np.nan)
            cosines = pair.view_a.decoder_cosine[result.included[index_a]]
            matched_above.append(float(np.mean(np.nan_to_num(cosines) > threshold)) if cosines.size else np.nan)
        rows.append({
            "threshold": float(threshold), "fraction_shared": float(np.nanmean(shared)),
            "fraction_shared_min": float(np.nanmin(shared)), "fraction_shared_max": float(np.nanmax(shared)),
            "fraction_matched_decoder": float(np.nanmean(matched_above)),
        })
    return pd.DataFrame(rows)


def matched_cosine_quantiles(result: MatchResult, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, dict[str, float]]:
    """Quantiles of the matched |cos| (optimal assignment) pooled over pairs, decoder and encoder."""
    quantile_table = {}
    for kind in ("decoder", "encoder"):
        pooled = np.concatenate([getattr(pair.view_a, f"{kind}_cosine") for pair in result.pairs])
        pooled = pooled[np.isfinite(pooled)]
        quantile_table[kind] = {f"q{round(100 * q):02d}": float(np.quantile(pooled, q)) if pooled.size else float("nan") for q in quantiles}
    return quantile_table


def reappearance(features: pd.DataFrame, n_seeds: int) -> np.ndarray:
    """``[n]`` share of the other ``n_seeds - 1`` seeds in which each reference feature is shared (NaN if excluded)."""
    values = features["direct_share_count"].to_numpy(dtype=np.float64) / max(n_seeds - 1, 1)
    return np.where(features["included"].to_numpy(dtype=bool), values, np.nan)


def reappearance_by(values: np.ndarray, covariate: np.ndarray, name: str, bins: int = 4) -> dict[str, Any]:
    """How reappearance relates to a covariate (firing frequency, autointerp score...): Spearman's rho over
    features with both finite, and the mean reappearance per quantile bin of the covariate."""
    values, covariate = np.asarray(values, dtype=np.float64), np.asarray(covariate, dtype=np.float64)
    keep = np.isfinite(values) & np.isfinite(covariate)
    if keep.sum() < 3 or np.ptp(covariate[keep]) == 0:
        return {"covariate": name, "n": int(keep.sum()), "spearman_rho": None, "bins": []}
    rho = spearmanr(covariate[keep], values[keep]).statistic
    edges = np.unique(np.quantile(covariate[keep], np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, covariate[keep], side="right") - 1, 0, len(edges) - 2)
    table = [
        {"low": float(edges[b]), "high": float(edges[b + 1]), "n": int((which == b).sum()), "mean_reappearance": float(values[keep][which == b].mean())}
        for b in range(len(edges) - 1) if (which == b).any()
    ]
    return {"covariate": name, "n": int(keep.sum()), "spearman_rho": float(rho), "bins": table}


def top_basis(directions: np.ndarray, rank: int) -> np.ndarray:
    """``[d, rank]`` orthonormal basis of the top-``rank`` right singular vectors of ``directions [n, d]``."""
    _, _, right = np.linalg.svd(np.asarray(directions, dtype=np.float64), full_matrices=False)
    return right[:rank].T


def subspace_overlap(basis_a: np.ndarray, basis_b: np.ndarray) -> tuple[float, float]:
    """(overlap ``||U_a^T U_b||_F^2 / r``, median principal angle in degrees) of two ``[d, r]`` orthonormal bases."""
    rank = basis_a.shape[1]
    overlap = float(np.linalg.norm(basis_a.T @ basis_b) ** 2 / rank)
    return overlap, float(np.degrees(np.median(subspace_angles(basis_a, basis_b))))


def nonshared_subspace_overlaps(result: MatchResult, decoders: Sequence[np.ndarray], ranks: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per rank r: overlap of the non-shared features' top-r decoder subspaces, per pair and averaged, with
    the random baseline r / d. Ranks above a pair's non-shared count (or d) are skipped for that pair."""
    d_in = int(np.asarray(decoders[0]).shape[1])
    units = [unit_rows(decoder).double().numpy() for decoder in decoders]
    per_rank: dict[int, dict[str, Any]] = {}
    bases: dict[tuple[int, int, int, int], np.ndarray] = {}
    for pair in result.pairs:
        for seed, view in ((pair.seed_a, pair.view_a), (pair.seed_b, pair.view_b)):
            index = result.seeds.index(seed)
            nonshared = result.included[index] & ~view.shared
            if nonshared.sum() == 0:
                continue
            full = top_basis(units[index][nonshared], min(int(nonshared.sum()), d_in))
            for rank in ranks:
                if rank <= full.shape[1]:
                    bases[(pair.seed_a, pair.seed_b, seed, rank)] = full[:, :rank]
    for rank in ranks:
        overlaps, angles = {}, {}
        for pair in result.pairs:
            basis_a, basis_b = bases.get((pair.seed_a, pair.seed_b, pair.seed_a, rank)), bases.get((pair.seed_a, pair.seed_b, pair.seed_b, rank))
            if basis_a is None or basis_b is None:
                continue
            overlaps[pair_key(pair.seed_a, pair.seed_b)], angles[pair_key(pair.seed_a, pair.seed_b)] = subspace_overlap(basis_a, basis_b)
        if overlaps:
            mean_overlap = float(np.mean(list(overlaps.values())))
            per_rank[int(rank)] = {
                "overlap_mean": mean_overlap, "random_baseline": rank / d_in, "overlap_over_baseline": mean_overlap / (rank / d_in),
                "median_angle_deg_mean": float(np.mean(list(angles.values()))), "per_pair": overlaps,
            }
    return per_rank


def seed_resampled_interval(per_pair: Mapping[str, float], seeds: Sequence[int], n_resamples: int = 1000,
                            confidence: float = 0.95, random_seed: int = 0) -> dict[str, Any]:
    """Percentile interval of a per-pair statistic's mean when the seeds themselves are resampled (module docstring).

    ``per_pair`` maps ``"a-b"`` (``a`` before ``b`` in ``seeds``) to the pair's value. Returns mean (over all
    pairs), low, high and the number of usable draws.
    """
    seeds = [int(seed) for seed in seeds]
    values = np.full((len(seeds), len(seeds)), np.nan)
    for i, seed_a in enumerate(seeds):
        for j, seed_b in enumerate(seeds):
            if i < j and pair_key(seed_a, seed_b) in per_pair:
                values[i, j] = values[j, i] = per_pair[pair_key(seed_a, seed_b)]
    rng = np.random.default_rng(random_seed)
    upper = np.triu_indices(len(seeds), k=1)
    means = []
    for _ in range(n_resamples):
        counts = np.bincount(rng.integers(0, len(seeds), size=len(seeds)), minlength=len(seeds)).astype(np.float64)
        weights = np.outer(counts, counts)[upper]
        pair_values = values[upper]
        usable = (weights > 0) & np.isfinite(pair_values)
        if usable.any():
            means.append(float(np.average(pair_values[usable], weights=weights[usable])))
    all_pairs = values[upper]
    mean = float(np.nanmean(all_pairs)) if np.isfinite(all_pairs).any() else float("nan")
    if not means:
        return {"mean": mean, "low": None, "high": None, "n_draws": 0}
    alpha = (1 - confidence) / 2
    return {"mean": mean, "low": float(np.quantile(means, alpha)), "high": float(np.quantile(means, 1 - alpha)), "n_draws": len(means)}


def stability_measures(result: MatchResult, decoders: Sequence[np.ndarray], features: pd.DataFrame, firing_frequency: np.ndarray | None,
                       subspace_ranks: Sequence[int], n_resamples: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every measure above for one variant: (the summary's ``stability`` section, the threshold curve table)."""
    mcc = pw_mcc(result)
    fraction_shared = {pair_key(pair.seed_a, pair.seed_b): float(pair.summary["fraction_shared"]) for pair in result.pairs}
    overlaps = nonshared_subspace_overlaps(result, decoders, subspace_ranks)
    values = reappearance(features, len(result.seeds))
    frequency = np.full(len(features), np.nan) if firing_frequency is None else np.log10(np.maximum(np.asarray(firing_frequency, dtype=np.float64), 1e-12))
    section = {
        "pw_mcc": {kind: {**measure, "seed_resampled": seed_resampled_interval(measure["per_pair"], result.seeds, n_resamples)} for kind, measure in mcc.items()},
        "fraction_shared_seed_resampled": seed_resampled_interval(fraction_shared, result.seeds, n_resamples),
        "matched_cosine_quantiles": matched_cosine_quantiles(result),
        "reappearance": {
            "mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
            "distribution": {f"{k}/{len(result.seeds) - 1}": int(np.sum(np.isclose(values, k / max(len(result.seeds) - 1, 1)))) for k in range(len(result.seeds))},
            "by_log10_firing_frequency": reappearance_by(values, frequency, "log10 firing frequency"),
        },
        "subspace_overlap": {
            str(rank): {**measure, "seed_resampled": seed_resampled_interval(measure["per_pair"], result.seeds, n_resamples)} for rank, measure in overlaps.items()
        },
    }
    return section, threshold_curve(result, thresholds)
