"""Claim-4 sweep figures, one of each per swept regularizer, from the claim-4 stage's ``table.csv`` rows
(``<figure>_mean``, ``_ci_low``, ``_ci_high`` per training k and coefficient; bars are the 95% intervals over seeds):

- :func:`plot_tradeoff`: reconstruction (FVU, CE-loss recovered; rows) against the monosemanticity proxies and
  effective latents per token (columns), one point per coefficient (labelled), colour = training k;
- :func:`plot_k_robustness_sweep`: FVU against k'/k, one curve per coefficient, one panel per training k;
- :func:`plot_probing_sweep`: probing accuracy against the coefficient, one curve per budget m, one panel per k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sae_pipeline.report.figures import no_data_figure, pyplot, save_figure

RECONSTRUCTION = (("fvu", "FVU (lower = better)"), ("ce_loss_recovered", "CE-loss recovered (higher = better)"))
MONOSEMANTICITY = (
    ("top_token_mass_share", "top-token mass share (higher = more mono.)"),
    ("token_entropy_bits", "top-activation token entropy, bits (lower = more mono.)"),
    ("embedding_similarity", "embedding similarity (higher = more mono.)"),
    ("effective_latents", "effective latents per token"),
)


def _has(rows: pd.DataFrame, figure: str) -> bool:
    return f"{figure}_mean" in rows.columns and rows[f"{figure}_mean"].notna().any()


def _error(rows: pd.DataFrame, figure: str) -> np.ndarray:
    """``[2, n]`` distances from the mean to the interval ends (0 where the interval is missing)."""
    mean = rows[f"{figure}_mean"].to_numpy(dtype=float)
    low = rows[f"{figure}_ci_low"].to_numpy(dtype=float)
    high = rows[f"{figure}_ci_high"].to_numpy(dtype=float)
    return np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0)


def _colours(ks: Sequence[int]) -> dict[int, str]:
    palette = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {int(k): palette[index % len(palette)] for index, k in enumerate(sorted(ks))}


def _panel_per_k(rows: pd.DataFrame) -> tuple[object, list[tuple[object, int]]]:
    """A figure with one panel per training k of ``rows``, and its ``(axis, k)`` pairs in increasing k."""
    ks = sorted(int(k) for k in rows["k"].unique())
    figure, axes = pyplot().subplots(1, len(ks), figsize=(5 * len(ks), 3.8), squeeze=False)
    return figure, list(zip(axes[0], ks))


def plot_tradeoff(path: str | Path, rows: pd.DataFrame, regularizer: str) -> None:
    """Reconstruction against monosemanticity, one point per coefficient, k as colour."""
    columns = [item for item in MONOSEMANTICITY if not rows.empty and _has(rows, item[0])]
    if rows.empty or not columns:
        return no_data_figure(path, f"{regularizer}: trade-off", "no sweep results")
    plt = pyplot()
    colours = _colours(rows["k"].unique())
    figure, axes = plt.subplots(len(RECONSTRUCTION), len(columns), figsize=(4.2 * len(columns), 3.6 * len(RECONSTRUCTION)), squeeze=False)
    for row_index, (y, y_label) in enumerate(RECONSTRUCTION):
        for column_index, (x, x_label) in enumerate(columns):
            axis = axes[row_index][column_index]
            if not _has(rows, y):
                axis.axis("off")
                continue
            for k, group in rows.groupby("k", sort=True):
                group = group.sort_values("coefficient")
                axis.errorbar(group[f"{x}_mean"], group[f"{y}_mean"], xerr=_error(group, x), yerr=_error(group, y), marker="o", linestyle="-",
                              color=colours[int(k)], capsize=2, label=f"k={int(k)}")
                for _, point in group.iterrows():
                    axis.annotate(f"{point['coefficient']:g}", (point[f"{x}_mean"], point[f"{y}_mean"]), fontsize=6, textcoords="offset points", xytext=(3, 3))
            axis.set_xlabel(x_label, fontsize=8)
            axis.set_ylabel(y_label, fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{regularizer}: reconstruction vs monosemanticity (points labelled by coefficient; 95% intervals over seeds)", fontsize=9)
    save_figure(figure, path)


def _multipliers(rows: pd.DataFrame) -> list[tuple[float, str]]:
    columns = [column[:-5] for column in rows.columns if column.startswith("fvu_x") and column.endswith("_mean")]
    return sorted(((float(column[5:]), column) for column in columns), key=lambda item: item[0])


def plot_k_robustness_sweep(path: str | Path, rows: pd.DataFrame, regularizer: str) -> None:
    """FVU against k'/k per coefficient, one panel per training k."""
    multipliers = _multipliers(rows) if not rows.empty else []
    if not multipliers:
        return no_data_figure(path, f"{regularizer}: k-robustness", "no k-robustness results")
    figure, panels = _panel_per_k(rows)
    for axis, k in panels:
        for _, point in rows[rows["k"] == k].sort_values("coefficient").iterrows():
            x = [m for m, _ in multipliers]
            y = [point[f"{column}_mean"] for _, column in multipliers]
            error = np.hstack([_error(point.to_frame().T, column) for _, column in multipliers])
            axis.errorbar(x, y, yerr=error, marker="o", capsize=2, label=f"{point['coefficient']:g}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.axvline(1.0, color="grey", linestyle=":")
        axis.set_xlabel("inference k' / trained k")
        axis.set_ylabel("FVU")
        axis.set_title(f"{regularizer}, trained k={k}")
        axis.legend(title="coefficient", fontsize=6, title_fontsize=7)
    save_figure(figure, path)


def _symlog_threshold(coefficients: Sequence[float]) -> float:
    positive = [c for c in coefficients if c > 0]
    return min(positive) if positive else 1.0


def plot_probing_sweep(path: str | Path, rows: pd.DataFrame, regularizer: str, budgets: Sequence[int]) -> None:
    """Probing accuracy (mean over token properties) against the coefficient, one curve per budget m."""
    present = [int(m) for m in budgets if not rows.empty and _has(rows, f"probe_m{int(m)}")]
    if not present:
        return no_data_figure(path, f"{regularizer}: sparse probing", "no probing results at the budgets")
    figure, panels = _panel_per_k(rows)
    for axis, k in panels:
        group = rows[rows["k"] == k].sort_values("coefficient")
        for m in present:
            axis.errorbar(group["coefficient"], group[f"probe_m{m}_mean"], yerr=_error(group, f"probe_m{m}"), marker="o", capsize=2, label=f"m={m}")
        axis.set_xscale("symlog", linthresh=_symlog_threshold(group["coefficient"].tolist()))
        axis.set_xlabel(f"{regularizer} coefficient (0 = unregularized)")
        axis.set_ylabel("test balanced accuracy")
        axis.set_title(f"sparse probing, trained k={k}")
        axis.legend(fontsize=7)
    save_figure(figure, path)
