"""Digits-table stage (claim 1): the match summaries of the digits grid gathered into
``stability_table.csv``, ``stability.png`` and ``stability_summary.json`` (which states whether claim 1's
direction holds).

The paper trains SAEs on MNIST (784 pixels) and compares cross-seed consistency across weight
penalty (none / L1 / L2) x tied initialisation x unit-norm decoder; the offline stand-in is
scikit-learn's 8x8 digits (:mod:`sae_pipeline.data.digits`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sae_pipeline.data.atomic import write_dataframe, write_json
from sae_pipeline.report.plots import plot_stability
from sae_pipeline.report.tables import digits_cell_row

logger = logging.getLogger(__name__)


def _mean_training_metrics(metrics_files: Sequence[str]) -> dict[str, float]:
    values: dict[str, list[float]] = {"fvu": [], "l0": [], "dead_fraction": []}
    for path in map(Path, metrics_files):
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        for name in values:
            if metrics.get(name) is not None:
                values[name].append(float(metrics[name]))
    return {f"{name}_mean": float(np.mean(found)) if found else float("nan") for name, found in values.items()}


def digits_stability_table(
    match_summaries: Mapping[str, str],
    cells: Mapping[str, Mapping[str, Any]],
    metrics_files: Mapping[str, Sequence[str]],
    manifest_path: str | os.PathLike,
    output_table: str | os.PathLike,
    output_plot: str | os.PathLike,
    output_summary: str | os.PathLike,
) -> pd.DataFrame:
    """One row per digits variant (grid cell): stability across seeds and training quality.

    Args:
        match_summaries: ``{variant: path of its match summary.json}``.
        cells: ``{variant: its grid cell}`` (:func:`sae_pipeline.layout.digits_cell` of the variant's settings).
        metrics_files: ``{variant: its per-seed metrics.json}`` (FVU, L0, dead fraction of each SAE).
        manifest_path: the digits cache manifest (names the dataset).
        output_table, output_plot, output_summary: ``stability_table.csv``, ``stability.png``,
            ``stability_summary.json``.

    Columns: dataset, variant, weight_penalty, penalty_coefficient, tied_init, unit_norm_decoder,
    fraction_shared (mean over seed pairs), mmcs_decoder, mmcs_encoder, fraction_paired_decoder,
    always/sometimes/never fractions of the reference seed, n_pairs, fvu_mean, l0_mean, dead_fraction_mean.
    """
    dataset = json.loads(Path(manifest_path).read_text()).get("dataset", "unknown")
    rows = []
    for variant, summary_path in match_summaries.items():
        summary = json.loads(Path(summary_path).read_text())
        pair_means = summary["mean_over_pairs"]
        fractions = summary["reference_fractions"]
        rows.append(
            {
                "dataset": dataset,
                "variant": variant,
                **cells[variant],
                "fraction_shared": pair_means["fraction_shared"],
                "mmcs_decoder": pair_means["mmcs_decoder"],
                "mmcs_encoder": pair_means["mmcs_encoder"],
                "fraction_paired_decoder": pair_means["fraction_paired_decoder"],
                "always_fraction": fractions["always"],
                "sometimes_fraction": fractions["sometimes"],
                "never_fraction": fractions["never"],
                "n_pairs": summary["n_pairs"],
                "n_dead_reference": summary.get("reference_dead_latents", {}).get("count"),
                **_mean_training_metrics(metrics_files.get(variant, [])),
            }
        )
    table = pd.DataFrame(rows)
    penalty_order = {"none": 0, "l1": 1, "l2": 2}
    table = table.sort_values(
        ["weight_penalty", "tied_init", "unit_norm_decoder"], key=lambda column: column.map(penalty_order) if column.name == "weight_penalty" else column
    ).reset_index(drop=True)
    write_dataframe(output_table, table)
    write_json(output_summary, claim1_direction(table, dataset))
    plot_stability(table, output_plot, dataset)
    return table


def claim1_direction(table: pd.DataFrame, dataset: str) -> dict[str, Any]:
    """Does L2 + tied init + unit-norm decoder raise cross-seed consistency over the other cells?

    Compares the L2/tied/unit cell with (a) the plain cell (no penalty, untied, free decoder norms),
    (b) the same tricks without the penalty (none/tied/unit), (c) L2 without the tricks, and (d) every
    other cell, on the mean shared fraction over seed pairs and on decoder MMCS. The direction holds
    when the L2/tied/unit cell is above (a), (b) and (c) on both measures. This is a direction, from
    3 seeds per cell on one dataset: no significance is claimed.
    """
    target = digits_cell_row(table, "l2", True, True)
    comparisons = {"plain (none, untied, free norms)": ("none", False, False), "no penalty, tied, unit": ("none", True, True), "l2, untied, free norms": ("l2", False, False)}
    result: dict[str, Any] = {"dataset": dataset, "claim": "L2 weight penalty with tied init and unit-norm decoder raises cross-seed consistency"}
    if target is None:
        result.update(holds=None, reason="the grid has no l2 / tied / unit-norm cell")
        return result
    result["l2_tied_unit"] = {"variant": target["variant"], "fraction_shared": float(target["fraction_shared"]), "mmcs_decoder": float(target["mmcs_decoder"])}
    verdicts = []
    result["comparisons"] = {}
    for label, key in comparisons.items():
        other = digits_cell_row(table, *key)
        if other is None:
            continue
        higher = bool(target["fraction_shared"] > other["fraction_shared"] and target["mmcs_decoder"] > other["mmcs_decoder"])
        verdicts.append(higher)
        result["comparisons"][label] = {
            "variant": other["variant"], "fraction_shared": float(other["fraction_shared"]), "mmcs_decoder": float(other["mmcs_decoder"]), "l2_tied_unit_higher_on_both": higher,
        }
    others = table[table["variant"] != target["variant"]]
    result["rank_by_fraction_shared"] = int((others["fraction_shared"] >= target["fraction_shared"]).sum()) + 1
    result["rank_by_mmcs_decoder"] = int((others["mmcs_decoder"] >= target["mmcs_decoder"]).sum()) + 1
    result["n_cells"] = int(len(table))
    result["holds"] = bool(verdicts) and all(verdicts)
    return result


