"""Feature matching across seeds (Braun et al. 2024, as the paper's artifact applies it; SPEC.md).

For every pair of seeds, with absolute cosine similarity of unit-normed feature directions
(decoder directions are rows of ``W_dec [d_sae, d_in]``; encoder directions are columns of
``W_enc [d_in, d_sae]``, i.e. rows of ``W_enc.T``):

- mean max cosine similarity (MMCS) of decoder and of encoder directions, averaged over both
  directions (a->b and b->a);
- fraction paired: share of features whose max decoder (encoder) cosine exceeds the threshold;
- one-to-one matchings of maximal total similarity (the Hungarian step) on decoder and on encoder
  similarities; a feature is **shared** in the pair when both matchings give it the same partner and
  both matched cosines exceed the threshold (default 0.7).

Per feature of a reference seed (by default the first seed; :meth:`MatchResult.feature_table` gives
any seed's), ``share_count`` counts the seed pairs in which the feature is shared, over all
``n_seeds * (n_seeds - 1) / 2`` pairs: a pair containing the reference seed counts when the feature
itself is shared there; a pair ``(p, q)`` without it counts when the feature's decoder partners in
``p`` and in ``q`` are shared with each other in that pair (so with 3 seeds, "always" means the
feature and its two partners form a consistent triangle). ``direct_share_count`` counts only the
pairs containing the reference seed. Category: ``always`` (all pairs), ``sometimes`` (some),
``never`` (none), or ``dead`` for latents excluded from matching.

This deliberately differs from the artifact's ``shared_feature_analysis.py``, which adds up, per
feature index, the shared flags of pair (1, 2) indexed by seed 1's features as if they were the
reference seed's; latent indices of different seeds are unrelated, so we follow the partners instead.

Dead latents (firing frequency below ``dead_frequency_threshold``) are reported separately and, with
``exclude_dead``, left out of matching and of every fraction's denominator; collapsed latents
otherwise distort the fractions.

The matching is exact (certified optimal); see :mod:`sae_pipeline.stability.assignment` for the solver.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.settings import MATCH_CATEGORIES
from sae_pipeline.stability.assignment import MatchingReport, max_similarity_matching

logger = logging.getLogger(__name__)

CATEGORIES = MATCH_CATEGORIES


@dataclass
class SideView:
    """One seed's view of a matched pair: arrays over that seed's latents ``[n]`` (-1 / NaN where excluded).

    Attributes:
        decoder_partner, encoder_partner: matched latent index in the other seed (Hungarian), or -1.
        decoder_cosine, encoder_cosine: |cos| with that partner (NaN when unmatched).
        max_decoder_cosine, max_encoder_cosine: max |cos| over the other seed's included latents.
        shared: same partner in both matchings and both cosines above the threshold.
    """

    decoder_partner: np.ndarray
    encoder_partner: np.ndarray
    decoder_cosine: np.ndarray
    encoder_cosine: np.ndarray
    max_decoder_cosine: np.ndarray
    max_encoder_cosine: np.ndarray
    shared: np.ndarray


@dataclass
class PairMatch:
    """The comparison of two seeds' dictionaries; ``summary`` is one row of ``pairs.csv``."""

    seed_a: int
    seed_b: int
    view_a: SideView
    view_b: SideView
    summary: dict[str, Any]

    def view(self, seed: int) -> SideView:
        """Arrays indexed by ``seed``'s latents (``seed`` must be one of the pair)."""
        if seed == self.seed_a:
            return self.view_a
        if seed == self.seed_b:
            return self.view_b
        raise KeyError(f"seed {seed} is not in pair ({self.seed_a}, {self.seed_b})")


@dataclass
class MatchResult:
    """Matching of several seeds' dictionaries of one configuration.

    Attributes:
        seeds: seed labels, in the order the dictionaries were given.
        threshold: cosine threshold for "paired" and "shared".
        included: per seed, ``[n]`` bool: latents that took part in matching (alive, or all).
        pairs: one :class:`PairMatch` per seed pair ``(seeds[i], seeds[j])``, ``i < j``.
    """

    seeds: list[int]
    threshold: float
    included: list[np.ndarray]
    pairs: list[PairMatch] = field(default_factory=list)

    @property
    def pair_table(self) -> pd.DataFrame:
        """One row per seed pair (the content of ``pairs.csv``)."""
        return pd.DataFrame([pair.summary for pair in self.pairs])

    def pair(self, seed_a: int, seed_b: int) -> PairMatch:
        for pair in self.pairs:
            if {pair.seed_a, pair.seed_b} == {seed_a, seed_b}:
                return pair
        raise KeyError(f"no pair ({seed_a}, {seed_b})")

    def feature_table(self, reference_seed: int | None = None) -> pd.DataFrame:
        """Per-latent table of ``reference_seed`` (default: the first seed); see the module docstring.

        Columns: seed, feature, included, share_count, direct_share_count, category; for every other
        seed ``s``: decoder_partner_seed{s}, decoder_cosine_seed{s}, encoder_partner_seed{s},
        encoder_cosine_seed{s}, max_decoder_cosine_seed{s}, max_encoder_cosine_seed{s}; and for every
        pair ``(a, b)``: shared_seeds{a}-{b} (bool, chained through partners when the pair lacks the
        reference seed).
        """
        reference = self.seeds[0] if reference_seed is None else int(reference_seed)
        if reference not in self.seeds:
            raise ValueError(f"match.reference_seed {reference} is not one of the seeds {self.seeds}")
        included = self.included[self.seeds.index(reference)]
        n_features = len(included)
        table: dict[str, Any] = {
            "seed": np.full(n_features, reference, dtype=np.int64),
            "feature": np.arange(n_features, dtype=np.int64),
            "included": included,
        }
        for other in self.seeds:
            if other == reference:
                continue
            view = self.pair(reference, other).view(reference)
            table[f"decoder_partner_seed{other}"] = view.decoder_partner
            table[f"decoder_cosine_seed{other}"] = view.decoder_cosine
            table[f"encoder_partner_seed{other}"] = view.encoder_partner
            table[f"encoder_cosine_seed{other}"] = view.encoder_cosine
            table[f"max_decoder_cosine_seed{other}"] = view.max_decoder_cosine
            table[f"max_encoder_cosine_seed{other}"] = view.max_encoder_cosine
        share_count = np.zeros(n_features, dtype=np.int64)
        direct_share_count = np.zeros(n_features, dtype=np.int64)
        for pair in self.pairs:
            if reference in (pair.seed_a, pair.seed_b):
                shared = pair.view(reference).shared.copy()
                direct_share_count += shared
            else:
                shared = self._chained_shared(reference, pair)
            table[f"shared_seeds{pair.seed_a}-{pair.seed_b}"] = shared
            share_count += shared
        n_pairs = len(self.pairs)
        category = np.where(share_count == n_pairs, "always", np.where(share_count == 0, "never", "sometimes"))
        category = np.where(included, category, "dead")
        table["share_count"] = share_count
        table["direct_share_count"] = direct_share_count
        table["category"] = category
        leading = ["seed", "feature", "included", "share_count", "direct_share_count", "category"]
        frame = pd.DataFrame(table)
        return frame[leading + [column for column in frame.columns if column not in leading]]

    def _chained_shared(self, reference: int, pair: PairMatch) -> np.ndarray:
        """For pair (p, q) without the reference: are the reference feature's decoder partners in p and q shared?"""
        partner_p = self.pair(reference, pair.seed_a).view(reference).decoder_partner
        partner_q = self.pair(reference, pair.seed_b).view(reference).decoder_partner
        view_p = pair.view(pair.seed_a)
        has_both = (partner_p >= 0) & (partner_q >= 0)
        safe_p = np.where(has_both, partner_p, 0)
        return has_both & view_p.shared[safe_p] & (view_p.decoder_partner[safe_p] == partner_q)

    def summary(self, reference_seed: int | None = None, features: pd.DataFrame | None = None) -> dict[str, Any]:
        """Configuration summary: pair metrics averaged over pairs, and category fractions of the reference
        seed (``features``: its :meth:`feature_table`, when the caller already has it)."""
        reference = self.seeds[0] if reference_seed is None else int(reference_seed)
        features = self.feature_table(reference) if features is None else features
        considered = features[features["included"]]
        n_considered = max(len(considered), 1)
        counts = {category: int((features["category"] == category).sum()) for category in CATEGORIES}
        pair_table = self.pair_table
        averaged = [
            "mmcs_decoder", "mmcs_encoder", "fraction_paired_decoder", "fraction_paired_encoder",
            "fraction_shared", "mean_matched_cosine_decoder", "mean_matched_cosine_encoder", "partner_agreement",
        ]
        return {
            "seeds": list(self.seeds),
            "reference_seed": reference,
            "n_pairs": len(self.pairs),
            "threshold": self.threshold,
            "n_features": {str(seed): int(len(mask)) for seed, mask in zip(self.seeds, self.included)},
            "n_included": {str(seed): int(mask.sum()) for seed, mask in zip(self.seeds, self.included)},
            "mean_over_pairs": {name: float(pair_table[name].mean()) for name in averaged},
            "reference_counts": counts,
            "reference_fractions": {
                "always": counts["always"] / n_considered,
                "sometimes": counts["sometimes"] / n_considered,
                "never": counts["never"] / n_considered,
                "shared_in_any_pair": (counts["always"] + counts["sometimes"]) / n_considered,
            },
            "reference_mean_share_count": float(considered["share_count"].mean()) if len(considered) else float("nan"),
        }


def unit_rows(directions: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[n, d]`` rows scaled to unit L2 norm, float32 on ``device`` (all-zero rows stay zero)."""
    tensor = torch.as_tensor(np.asarray(directions, dtype=np.float32) if not isinstance(directions, torch.Tensor) else directions)
    tensor = tensor.to(device=device, dtype=torch.float32)
    return tensor / tensor.norm(dim=1, keepdim=True).clamp_min(1e-12)


def absolute_cosine(unit_a: torch.Tensor, unit_b: torch.Tensor) -> torch.Tensor:
    """``|cos|`` between every row of ``unit_a [n_a, d]`` and ``unit_b [n_b, d]``: ``[n_a, n_b]``."""
    return (unit_a @ unit_b.T).abs_()


@dataclass
class _DirectionMatch:
    """Matching of one kind of direction (decoder or encoder) between the included latents of a pair."""

    partner_a: np.ndarray  # [n_included_a] local index in b's included set, or -1
    cosine_a: np.ndarray  # [n_included_a] matched |cos| (NaN when unmatched)
    max_a: np.ndarray  # [n_included_a]
    max_b: np.ndarray  # [n_included_b]
    report: MatchingReport


def _match_directions(unit_a: torch.Tensor, unit_b: torch.Tensor, solver: str, candidates: int) -> _DirectionMatch:
    if len(unit_a) == 0 or len(unit_b) == 0:  # every latent of one seed excluded: nothing to match
        return _DirectionMatch(np.full(len(unit_a), -1, dtype=np.int64), np.full(len(unit_a), np.nan), np.zeros(len(unit_a)), np.zeros(len(unit_b)), MatchingReport(solver="none"))
    similarity = absolute_cosine(unit_a, unit_b)
    max_a = similarity.amax(dim=1).cpu().numpy().astype(np.float64)
    max_b = similarity.amax(dim=0).cpu().numpy().astype(np.float64)
    partner, report = max_similarity_matching(similarity, solver=solver, candidates=candidates)
    matched = partner >= 0
    cosine = np.full(len(partner), np.nan)
    if matched.any():
        rows = torch.from_numpy(np.flatnonzero(matched)).to(similarity.device)
        cols = torch.from_numpy(partner[matched]).to(similarity.device)
        cosine[matched] = similarity[rows, cols].double().cpu().numpy()
    del similarity
    return _DirectionMatch(partner, cosine, max_a, max_b, report)


def _scatter(values: np.ndarray, index: np.ndarray, size: int, fill: float) -> np.ndarray:
    out = np.full(size, fill, dtype=np.float64 if isinstance(fill, float) else values.dtype)
    out[index] = values
    return out


def _global_partner(local_partner: np.ndarray, own_index: np.ndarray, other_index: np.ndarray, size: int) -> np.ndarray:
    """Local partner indices (into the other seed's included set) -> latent indices, over all ``size`` latents."""
    partner = np.full(size, -1, dtype=np.int64)
    matched = local_partner >= 0
    partner[own_index[matched]] = other_index[local_partner[matched]]
    return partner


def _inverse(partner: np.ndarray, size_other: int) -> np.ndarray:
    """Invert a one-to-one partner array ``[n_a]`` (values in b or -1) to ``[n_b]``."""
    inverse = np.full(size_other, -1, dtype=np.int64)
    matched = partner >= 0
    inverse[partner[matched]] = np.flatnonzero(matched)
    return inverse


def shared_mask(decoder_partner: np.ndarray, encoder_partner: np.ndarray, decoder_cosine: np.ndarray, encoder_cosine: np.ndarray,
                threshold: float) -> np.ndarray:
    """``[n]`` bool: same partner in the decoder and the encoder matchings and both matched |cos| above ``threshold``."""
    return (
        (decoder_partner >= 0)
        & (decoder_partner == encoder_partner)
        & (np.nan_to_num(decoder_cosine) > threshold)
        & (np.nan_to_num(encoder_cosine) > threshold)
    )


def _match_pair(
    seed_a: int, seed_b: int, units: Mapping[str, list[torch.Tensor]], included: list[np.ndarray],
    index_a: int, index_b: int, threshold: float, solver: str, candidates: int,
) -> PairMatch:
    own_a = np.flatnonzero(included[index_a])
    own_b = np.flatnonzero(included[index_b])
    size_a, size_b = len(included[index_a]), len(included[index_b])
    views: dict[str, dict[str, np.ndarray]] = {"a": {}, "b": {}}
    reports: dict[str, MatchingReport] = {}
    matched_means: dict[str, float] = {}
    for kind in ("decoder", "encoder"):
        result = _match_directions(units[kind][index_a], units[kind][index_b], solver, candidates)
        reports[kind] = result.report
        partner_a = _global_partner(result.partner_a, own_a, own_b, size_a)
        cosine_a = _scatter(result.cosine_a, own_a, size_a, np.nan)
        partner_b = _inverse(partner_a, size_b)
        cosine_b = np.full(size_b, np.nan)
        cosine_b[partner_a[partner_a >= 0]] = cosine_a[partner_a >= 0]
        views["a"].update({f"{kind}_partner": partner_a, f"{kind}_cosine": cosine_a, f"max_{kind}_cosine": _scatter(result.max_a, own_a, size_a, np.nan)})
        views["b"].update({f"{kind}_partner": partner_b, f"{kind}_cosine": cosine_b, f"max_{kind}_cosine": _scatter(result.max_b, own_b, size_b, np.nan)})
        matched_means[kind] = float(np.nanmean(result.cosine_a)) if np.isfinite(result.cosine_a).any() else float("nan")
        views["a"][f"{kind}_max_local"] = result.max_a
        views["b"][f"{kind}_max_local"] = result.max_b
    for side in ("a", "b"):
        view = views[side]
        view["shared"] = shared_mask(view["decoder_partner"], view["encoder_partner"], view["decoder_cosine"], view["encoder_cosine"], threshold)
    n_a, n_b = len(own_a), len(own_b)
    n_shared = int(views["a"]["shared"].sum())
    agreement = (views["a"]["decoder_partner"][own_a] >= 0) & (views["a"]["decoder_partner"][own_a] == views["a"]["encoder_partner"][own_a])

    def directional(kind: str, statistic) -> tuple[float, float]:
        return statistic(views["a"][f"{kind}_max_local"]), statistic(views["b"][f"{kind}_max_local"])

    mean_or_nan = lambda values: float(values.mean()) if values.size else float("nan")  # noqa: E731
    paired = lambda values: float((values > threshold).mean()) if values.size else float("nan")  # noqa: E731
    summary: dict[str, Any] = {"seed_a": seed_a, "seed_b": seed_b, "n_features_a": n_a, "n_features_b": n_b, "n_excluded_a": size_a - n_a, "n_excluded_b": size_b - n_b}
    for kind in ("decoder", "encoder"):
        a_to_b, b_to_a = directional(kind, mean_or_nan)
        summary.update({f"mmcs_{kind}": (a_to_b + b_to_a) / 2, f"mmcs_{kind}_a_to_b": a_to_b, f"mmcs_{kind}_b_to_a": b_to_a})
    for kind in ("decoder", "encoder"):
        a_to_b, b_to_a = directional(kind, paired)
        summary.update({f"fraction_paired_{kind}": (a_to_b + b_to_a) / 2, f"fraction_paired_{kind}_a_to_b": a_to_b, f"fraction_paired_{kind}_b_to_a": b_to_a})
    summary.update(
        {
            "n_shared": n_shared,
            "fraction_shared": 2 * n_shared / (n_a + n_b) if n_a + n_b else float("nan"),
            "fraction_shared_a": n_shared / n_a if n_a else float("nan"),
            "fraction_shared_b": n_shared / n_b if n_b else float("nan"),
            "mean_matched_cosine_decoder": matched_means["decoder"],
            "mean_matched_cosine_encoder": matched_means["encoder"],
            "partner_agreement": float(agreement.mean()) if agreement.size else float("nan"),
        }
    )
    for kind in ("decoder", "encoder"):
        report = reports[kind]
        summary.update({f"{kind}_solver": report.solver, f"{kind}_solver_rounds": report.rounds, f"{kind}_max_dual_violation": report.max_dual_violation})
    side_views = {
        side: SideView(**{name: value for name, value in views[side].items() if not name.endswith("_max_local")}) for side in ("a", "b")
    }
    return PairMatch(seed_a, seed_b, side_views["a"], side_views["b"], summary)


def match_dictionaries(
    decoders: Sequence[np.ndarray | torch.Tensor],
    encoders: Sequence[np.ndarray | torch.Tensor],
    threshold: float = 0.7,
    alive_masks: Sequence[np.ndarray] | None = None,
    seeds: Sequence[int] | None = None,
    solver: str = "auto",
    candidates: int = 8,
    device: str = "cpu",
) -> MatchResult:
    """Match the dictionaries of several seeds pairwise.

    Args:
        decoders: per seed ``[n_s, d]`` decoder directions (rows of ``W_dec``).
        encoders: per seed ``[n_s, d]`` encoder directions (rows of ``W_enc.T``), same latent order.
        threshold: |cos| a match must exceed to count as paired / shared.
        alive_masks: per seed ``[n_s]`` bool; latents with False are excluded from matching (pass None
            to match every latent).
        seeds: labels of the seeds (default 0, 1, ...).
        solver, candidates: see :func:`sae_pipeline.stability.assignment.max_similarity_matching`.
        device: where similarities are computed ("cpu", "cuda", ...).
    """
    if len(decoders) != len(encoders):
        raise ValueError(f"match_dictionaries: {len(decoders)} decoders but {len(encoders)} encoders")
    if len(decoders) < 2:
        raise ValueError("match_dictionaries: need at least two seeds to match")
    seed_labels = [int(seed) for seed in (seeds if seeds is not None else range(len(decoders)))]
    if len(set(seed_labels)) != len(seed_labels) or len(seed_labels) != len(decoders):
        raise ValueError(f"match_dictionaries: seeds {seed_labels} must be distinct, one per dictionary")
    included: list[np.ndarray] = []
    for index, (decoder, encoder) in enumerate(zip(decoders, encoders)):
        if tuple(decoder.shape) != tuple(encoder.shape):
            raise ValueError(f"seed {seed_labels[index]}: decoder shape {tuple(decoder.shape)} != encoder shape {tuple(encoder.shape)} (pass W_enc.T)")
        mask = np.ones(decoder.shape[0], dtype=bool) if alive_masks is None else np.asarray(alive_masks[index], dtype=bool)
        if mask.shape != (decoder.shape[0],):
            raise ValueError(f"seed {seed_labels[index]}: alive mask has shape {mask.shape}, expected ({decoder.shape[0]},)")
        included.append(mask)
    units = {
        "decoder": [unit_rows(decoder, device)[torch.from_numpy(mask).to(device)] for decoder, mask in zip(decoders, included)],
        "encoder": [unit_rows(encoder, device)[torch.from_numpy(mask).to(device)] for encoder, mask in zip(encoders, included)],
    }
    result = MatchResult(seeds=seed_labels, threshold=float(threshold), included=included)
    for index_a, index_b in itertools.combinations(range(len(seed_labels)), 2):
        pair = _match_pair(seed_labels[index_a], seed_labels[index_b], units, included, index_a, index_b, float(threshold), solver, int(candidates))
        logger.info(
            "seeds %d-%d: MMCS dec %.3f enc %.3f, paired %.3f, shared %d (%.3f)",
            pair.seed_a, pair.seed_b, pair.summary["mmcs_decoder"], pair.summary["mmcs_encoder"],
            pair.summary["fraction_paired_decoder"], pair.summary["n_shared"], pair.summary["fraction_shared"],
        )
        result.pairs.append(pair)
    return result


def dead_mask(firing_frequency: np.ndarray | None, n_latents: int, dead_frequency_threshold: float) -> np.ndarray:
    """``[n]`` bool, True for latents whose firing frequency is below the threshold (all False when unknown)."""
    if firing_frequency is None:
        return np.zeros(n_latents, dtype=bool)
    return np.asarray(firing_frequency) < dead_frequency_threshold
