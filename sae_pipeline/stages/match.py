"""Match stage: the SAEs of one variant (one per seed) matched across seeds (:mod:`sae_pipeline.stability.matching`).

Writes, in the stage's folder (names from :data:`sae_pipeline.layout.MATCH_OUTPUTS`), the per-pair
table, the reference seed's per-feature table (share count, category, dead flag, firing frequency),
the summary and the max-cosine histogram.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sae_pipeline.data.atomic import write_dataframe, write_json
from sae_pipeline.data.checkpoint import (
    firing_window_of,
    load_firing_frequency,
    load_sae_arrays,
    load_sae_config,
)
from sae_pipeline.layout import MATCH_OUTPUTS
from sae_pipeline.report.plots import plot_max_cosines, plot_threshold_curve
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.settings import MatchSettings
from sae_pipeline.stability.matching import dead_mask, match_dictionaries
from sae_pipeline.stability.measures import reappearance, stability_measures

logger = logging.getLogger(__name__)


def run_match(sae_dirs: Mapping[int, str], output_dir: str, settings: MatchSettings | Mapping[str, Any], title: str | None = None) -> dict[str, Any]:
    """Match the SAE folders of one configuration (one per seed) and write the match outputs.

    Args:
        sae_dirs: ``{seed: SAE folder}`` (``cfg.json`` + ``sae_weights.safetensors``, optionally
            ``sparsity.safetensors`` with firing frequencies).
        output_dir: gets ``pairs.csv``, ``features.parquet`` (with ``reappearance``), ``summary.json`` (with the
            ``stability`` section of :mod:`sae_pipeline.stability.measures`), ``max_cosine_hist.png``,
            ``threshold_curve.csv`` and ``threshold_curve.png``.
        settings: the config's ``match`` section: threshold, exclude_dead, dead_frequency_threshold,
            reference_seed (null = first seed), solver, candidates, device.
        title: label for the plot and summary (e.g. ``lm/topk-k16-l2w0-noreg``).

    Returns the summary dictionary written to ``summary.json``.
    """
    settings = MatchSettings.from_mapping(settings)
    seeds = [int(seed) for seed in sae_dirs]
    folders = [str(folder) for folder in sae_dirs.values()]
    device = resolve_device(settings.device)
    threshold = float(settings.threshold)
    decoders, encoders, dead, frequencies = [], [], [], []
    for folder in folders:
        arrays = load_sae_arrays(folder)
        decoders.append(arrays["W_dec"])
        encoders.append(arrays["W_enc"].T)
        frequency = load_firing_frequency(folder)
        if frequency is None:
            logger.warning("%s has no sparsity.safetensors: every latent counts as alive", folder)
        frequencies.append(frequency)
        dead.append(dead_mask(frequency, arrays["W_dec"].shape[0], float(settings.dead_frequency_threshold)))
    exclude_dead = bool(settings.exclude_dead)
    result = match_dictionaries(
        decoders, encoders, threshold=threshold, alive_masks=[~mask for mask in dead] if exclude_dead else None,
        seeds=seeds, solver=settings.solver, candidates=int(settings.candidates), device=device,
    )
    reference = seeds[0] if settings.reference_seed is None else int(settings.reference_seed)
    features = result.feature_table(reference)
    reference_index = seeds.index(reference)
    features.insert(3, "dead", dead[reference_index])
    frequency = frequencies[reference_index]
    features.insert(4, "firing_frequency", frequency if frequency is not None else np.full(len(features), np.nan))
    features.insert(features.columns.get_loc("category") + 1, "reappearance", reappearance(features, len(seeds)))
    stability, curve = stability_measures(result, decoders, features, frequency, settings.subspace_ranks, int(settings.seed_resamples))
    summary = result.summary(reference, features)
    window = firing_window_of(load_sae_config(folders[reference_index]))
    dead_reason = (f"firing frequency below {float(settings.dead_frequency_threshold):g} over {window} "
                   "(sparsity.safetensors)")
    summary = {
        "title": title,
        "sae_dirs": folders,
        "sae_metadata": load_sae_config(folders[0]).get("metadata", {}),
        "exclude_dead": exclude_dead,
        "dead_frequency_threshold": float(settings.dead_frequency_threshold),
        "n_dead": {str(seed): int(mask.sum()) for seed, mask in zip(seeds, dead)},
        "dead_definition": dead_reason,
        "excluded_latents": {
            "count": {str(seed): int(mask.sum()) if exclude_dead else 0 for seed, mask in zip(seeds, dead)},
            "reason": dead_reason if exclude_dead else "none excluded (match.exclude_dead is false)",
        },
        "firing_frequency_available": {str(seed): frequency is not None for seed, frequency in zip(seeds, frequencies)},
        **summary,
        "stability": stability,
        "reference_dead_latents": {
            "count": int(dead[reference_index].sum()),
            "share_count_mean": float(features.loc[features["dead"], "share_count"].mean()) if dead[reference_index].any() else None,
        },
    }
    output = Path(output_dir)
    write_dataframe(output / MATCH_OUTPUTS["pairs"], result.pair_table)
    write_dataframe(output / MATCH_OUTPUTS["features"], features)
    plot_max_cosines(result, output / MATCH_OUTPUTS["histogram"], title or "")
    write_dataframe(output / MATCH_OUTPUTS["threshold_curve"], curve)
    plot_threshold_curve(curve, threshold, output / MATCH_OUTPUTS["threshold_plot"], title or "")
    write_json(output / MATCH_OUTPUTS["summary"], summary)
    return summary


