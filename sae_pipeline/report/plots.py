"""Every plot of the pipeline, one function per figure; each writes a PNG through :mod:`report.figures`.

Shared fractions, steering success, success against interp score, training curves, k-robustness,
probing and reappearance against firing frequency, interp score and reconstruction contribution (regress stage); latent firing frequency (evaluate); max-cosine histograms (match); the digits
stability bars (claim 1). Plots whose data are empty say so in the figure instead of drawing empty axes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sae_pipeline.report.figures import no_data_figure, pyplot, save_figure
from sae_pipeline.report.tables import digits_cell_row
from sae_pipeline.settings import SHAREDNESS_CATEGORIES
from sae_pipeline.stats.regression import judge_frames

if TYPE_CHECKING:
    from sae_pipeline.stability.matching import MatchResult

# Width of one character of a 7-point tick label (DejaVu Sans averages about 0.55 em), inches.
LABEL_INCHES_PER_CHARACTER = 0.06
# Fewest latents in one bin of the reappearance plot (fewer bins when a condition has few latents).
MIN_LATENTS_PER_BIN = 5
# Bins of the max-cosine histogram over [0, 1].
HISTOGRAM_BINS = 50


def _error_bars(values: pd.Series, low: pd.Series, high: pd.Series) -> np.ndarray:
    return np.vstack([(values - low).clip(lower=0).fillna(0).to_numpy(), (high - values).clip(lower=0).fillna(0).to_numpy()])


def note_if_all_zero(axis: Any, values: Sequence[float] | np.ndarray, what: str) -> bool:
    """Write "all <what> are 0" across ``axis`` when every finite value is zero (bars of height 0 are invisible,
    so the plot would look empty); returns whether it did."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size and not finite.any():
        axis.text(0.5, 0.5, f"all {what} are 0", transform=axis.transAxes, ha="center", va="center", fontsize=12, color="tab:red")
        return True
    return False


def plot_shared_fraction(path: str | Path, shared: pd.DataFrame) -> None:
    """Bars: share of features in each sharedness category per variant (condition), Wilson 95% intervals."""
    if shared.empty:
        return no_data_figure(path, "Shared fraction by condition", "no match outputs in this run")
    save_figure(shared_fraction_figure(shared), path)


def shared_fraction_figure(shared: pd.DataFrame) -> Any:
    """The figure of :func:`plot_shared_fraction`: as wide as the x labels (condition over variant name)
    need to stand side by side without overlapping."""
    plt = pyplot()
    labels = [f"{row.condition}\n{row.variant}" for row in shared.itertuples()]
    longest = max(len(line) for label in labels for line in label.splitlines())
    figure, axis = plt.subplots(figsize=(max(6.0, (0.3 + LABEL_INCHES_PER_CHARACTER * longest) * len(shared) + 1.0), 4))
    positions = np.arange(len(shared))
    width = 0.27
    for offset, category, colour in ((-1, "always", "tab:green"), (0, "sometimes", "tab:orange"), (1, "never", "tab:grey")):
        values = shared[f"{category}_fraction"]
        axis.bar(positions + offset * width, values, width, yerr=_error_bars(values, shared[f"{category}_ci_low"], shared[f"{category}_ci_high"]), label=category, color=colour, capsize=3)
    axis.set_xticks(positions, labels, fontsize=7)
    axis.set_ylabel("share of features")
    axis.set_ylim(0, 1)
    axis.set_title("Features shared across seeds (category over seed pairs)")
    axis.legend(title="shared in")
    note_if_all_zero(axis, shared[[f"{category}_fraction" for category in SHAREDNESS_CATEGORIES]].to_numpy().ravel(), "shared fractions")
    figure.tight_layout()
    return figure


def plot_steering_success(path: str | Path, success: Mapping[str, pd.DataFrame]) -> None:
    """Bars: steering success rate per condition for each judge, cluster-bootstrap 95% intervals."""
    judges = [judge for judge, table in success.items() if not table.empty]
    if not judges:
        return no_data_figure(path, "Steering success by condition", "no judged steering rows in this run")
    plt = pyplot()
    conditions = sorted(set().union(*(set(success[judge]["condition"]) for judge in judges)))
    figure, axis = plt.subplots(figsize=(max(6, 1.5 * len(conditions)), 4))
    width = 0.8 / len(judges)
    for index, judge in enumerate(judges):
        table = success[judge].set_index("condition").reindex(conditions)
        positions = np.arange(len(conditions)) + (index - (len(judges) - 1) / 2) * width
        axis.bar(positions, table["success_rate"], width, yerr=_error_bars(table["success_rate"], table["ci_low"], table["ci_high"]), capsize=3, label=f"{judge} judge")
    axis.set_xticks(np.arange(len(conditions)), conditions, fontsize=8, rotation=20, ha="right", rotation_mode="anchor")
    axis.set_ylabel("steering success rate")
    axis.set_ylim(0, 1)
    axis.set_title("Steering success by condition")
    axis.legend()
    note_if_all_zero(axis, np.concatenate([success[judge]["success_rate"].to_numpy(dtype=float) for judge in judges]), "success rates")
    save_figure(figure, path)


def plot_success_vs_interp(path: str | Path, rows: pd.DataFrame, fitted: Mapping[tuple[str, str, str], Any], judges: Sequence[str], bins: int) -> None:
    """Per judge: binned success rate against interp score (points) and the per-condition logit fit (curves)."""
    row_frames = {judge: judge_frames(rows, judge)[0] for judge in judges}
    panels = [judge for judge in judges if not row_frames[judge].empty]
    if not panels:
        return no_data_figure(path, "Steering success vs interp score", "no judged steering rows in this run")
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, judge in zip(axes[0], panels):
        row_frame = row_frames[judge]
        for index, (condition, group) in enumerate(sorted(row_frame.groupby("condition"), key=lambda item: item[0])):
            colour = colours[index % len(colours)]
            edges = np.unique(np.quantile(group["interp_score"], np.linspace(0, 1, bins + 1)))
            if edges.size >= 2:
                bin_index = np.clip(np.searchsorted(edges, group["interp_score"], side="right") - 1, 0, edges.size - 2)
                binned = group.groupby(bin_index).agg(x=("interp_score", "mean"), y=("success", "mean"), n=("success", "size"))
                axis.scatter(binned["x"], binned["y"], s=10 + binned["n"] / binned["n"].max() * 60, color=colour, alpha=0.7)
            result = fitted.get((judge, "logit_row", condition))
            label = condition
            if result is not None:
                grid = pd.DataFrame({"interp_score": np.linspace(group["interp_score"].min(), group["interp_score"].max(), 100)})
                if "share_count" in result.model.exog_names:
                    grid["share_count"] = group["share_count"].mean()
                axis.plot(grid["interp_score"], result.predict(grid), color=colour)
                label = f"{condition} (slope {result.params['interp_score']:.2f})"
            else:
                label = f"{condition} (no fit)"
            axis.plot([], [], color=colour, label=label)
        axis.set_xlabel("autointerp score (detection)")
        axis.set_ylabel(f"P(success), {judge} judge")
        axis.set_ylim(-0.02, 1.02)
        axis.legend(fontsize=7)
        axis.set_title(f"{judge} judge: binned rates and logit fits")
    save_figure(figure, path)


def plot_training_curves(path: str | Path, curves: pd.DataFrame, metrics: Sequence[str]) -> None:
    """One panel per logged metric against training tokens (or step), one line per variant and seed."""
    present = [metric for metric in metrics if metric in curves.columns]
    if curves.empty or not present:
        return no_data_figure(path, "Training curves", "no curves.parquet with the configured metrics in this run")
    x_column = "tokens" if "tokens" in curves.columns else "step"
    plt = pyplot()
    figure, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variant_order = list(dict.fromkeys(curves["variant"]))
    for axis, metric in zip(axes[0], present):
        for index, variant in enumerate(variant_order):
            group = curves[curves["variant"] == variant]
            for seed_index, (_, seed_group) in enumerate(group.groupby("seed") if "seed" in group.columns else [(None, group)]):
                axis.plot(seed_group[x_column], seed_group[metric], color=colours[index % len(colours)], alpha=0.8, linewidth=1, label=variant if seed_index == 0 else None)
        axis.set_xlabel(x_column)
        axis.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
        axis.set_title(metric)
        if metric in ("mse", "fvu", "loss"):
            axis.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    save_figure(figure, path)


def plot_k_robustness(path: str | Path, robustness: pd.DataFrame) -> None:
    """FVU and CE-loss recovered against the inference-time k multiplier, one line per variant."""
    if robustness.empty or robustness["multiplier"].isna().all():
        return no_data_figure(path, "Robustness to inference-time k", "no evaluate outputs with a k grid in this run")
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, group in robustness.dropna(subset=["multiplier"]).groupby("variant", sort=False):
        group = group.sort_values("multiplier")
        label = f"{variant} ({group['condition'].iloc[0]})"
        axes[0].plot(group["multiplier"], group["fvu"], marker="o", label=label)
        axes[1].plot(group["multiplier"], group["ce_loss_recovered"], marker="o", label=label)
    for axis, title in zip(axes, ("FVU", "CE-loss recovered")):
        axis.set_xscale("log", base=2)
        axis.axvline(1.0, color="grey", linestyle=":")
        axis.set_xlabel("inference k' / trained k")
        axis.set_title(title)
    axes[0].legend(fontsize=7)
    save_figure(figure, path)


def plot_probing(path: str | Path, probing: pd.DataFrame) -> None:
    """Sparse-probing test balanced accuracy against the latent budget m, one panel per token property."""
    fitted = probing[probing["m"].notna()] if not probing.empty and "m" in probing.columns else pd.DataFrame()
    if fitted.empty:
        return no_data_figure(path, "Sparse probing", "no sparse-probing results in this run")
    plt = pyplot()
    properties = list(dict.fromkeys(fitted["property"]))
    figure, axes = plt.subplots(1, len(properties), figsize=(4.5 * len(properties), 3.8), squeeze=False)
    for axis, prop in zip(axes[0], properties):
        for variant, group in fitted[fitted["property"] == prop].groupby("variant", sort=False):
            axis.plot(group["m"], group["test_balanced_accuracy"], marker="o", label=variant)
        axis.set_xscale("log")
        axis.set_xlabel("latents in the probe (m)")
        axis.set_ylabel("test balanced accuracy")
        axis.set_title(prop)
    axes[0][0].legend(fontsize=6)
    save_figure(figure, path)


def plot_reappearance(path: str | Path, relations: pd.DataFrame, bins: int = 8) -> None:
    """Mean reappearance probability against binned covariates, one panel per covariate, one line per condition.

    ``relations``: ``[condition, covariate, reappearance, value]`` (regress ``reappearance_relations``), one
    row per reference-seed latent and covariate. Latents are cut into up to ``bins`` quantile bins of the
    value per condition (at least :data:`MIN_LATENTS_PER_BIN` latents a bin); a covariate whose name starts
    with "log10" is already on a log scale, the reconstruction contribution is drawn on one; each point is a bin's mean value and mean reappearance with a normal 95% interval.
    """
    if relations.empty:
        return no_data_figure(path, "Reappearance across seeds", "no match outputs with reappearance in this run")
    plt = pyplot()
    covariates = list(dict.fromkeys(relations["covariate"]))
    figure, axes = plt.subplots(1, len(covariates), figsize=(4.8 * len(covariates), 3.9), squeeze=False)
    for axis, covariate in zip(axes[0], covariates):
        for condition, group in relations[relations["covariate"] == covariate].groupby("condition", sort=False):
            quantile = pd.qcut(group["value"].rank(method="first"), q=max(1, min(bins, len(group) // MIN_LATENTS_PER_BIN)), labels=False)
            binned = group.groupby(quantile).agg(value=("value", "mean"), mean=("reappearance", "mean"),
                                                 sd=("reappearance", "std"), n=("reappearance", "size"))
            half_width = 1.96 * binned["sd"].fillna(0.0) / np.sqrt(binned["n"])
            axis.errorbar(binned["value"], binned["mean"], yerr=half_width, marker="o", capsize=2, label=f"{condition} (n={len(group)})")
        if covariate == "reconstruction contribution":
            axis.set_xscale("symlog", linthresh=1e-6)
        axis.set_xlabel(covariate)
        axis.set_ylabel("reappearance (share of other seeds)")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"reappearance vs {covariate}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    save_figure(figure, path)


def plot_latent_frequency(path: str | Path, frequency: np.ndarray, dense_threshold: float, title: str) -> None:
    """Histogram of log10 firing frequency over live latents, with the dead count and the dense threshold marked."""
    plt = pyplot()
    alive = frequency[frequency > 0]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        axis.hist(np.log10(alive), bins=50, color="tab:blue")
    axis.axvline(math.log10(dense_threshold), color="tab:red", linestyle="--", label=f"dense > {dense_threshold:g}")
    axis.set_xlabel("log10 firing frequency (share of tokens)")
    axis.set_ylabel("latents")
    axis.set_title(f"{title}\n{int((frequency <= 0).sum())} dead of {frequency.size}")
    axis.legend()
    save_figure(figure, path)


def plot_max_cosines(result: MatchResult, path: str | os.PathLike, title: str) -> None:
    """Histogram of max |cos| (decoder and encoder, both directions of every pair), threshold marked."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    bins = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    for axis, kind in zip(axes, ("decoder", "encoder")):
        for pair in result.pairs:
            values = np.concatenate([getattr(pair.view_a, f"max_{kind}_cosine"), getattr(pair.view_b, f"max_{kind}_cosine")])
            values = values[np.isfinite(values)]
            axis.hist(values, bins=bins, histtype="step", linewidth=1.4, label=f"seeds {pair.seed_a}-{pair.seed_b} (MMCS {pair.summary[f'mmcs_{kind}']:.3f})")
        axis.axvline(result.threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {result.threshold:g}")
        axis.set_xlabel(f"max |cos| of {kind} direction in the other seed")
        axis.set_title(kind)
        axis.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("latents")
    figure.suptitle(title)
    save_figure(figure, path)


def plot_threshold_curve(curve: pd.DataFrame, threshold: float, path: str | os.PathLike, title: str) -> None:
    """Shared fraction against the cosine threshold (mean over seed pairs, range shaded), the paper's threshold marked."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(curve["threshold"], curve["fraction_shared"], marker="o", markersize=3, label="shared (decoder + encoder)")
    axis.fill_between(curve["threshold"], curve["fraction_shared_min"], curve["fraction_shared_max"], alpha=0.25, label="range over seed pairs")
    axis.plot(curve["threshold"], curve["fraction_matched_decoder"], linestyle=":", color="grey", label="matched decoder |cos| above")
    axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"match.threshold {threshold:g}")
    axis.set_xlabel("cosine threshold")
    axis.set_ylabel("share of latents")
    axis.set_ylim(0, 1.02)
    axis.set_title(title)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_stability(table: pd.DataFrame, path: str | os.PathLike, dataset: str) -> None:
    """Grouped bars per penalty: shared fraction and decoder MMCS for the four tied/unit combinations."""
    plt = pyplot()
    penalties = [penalty for penalty in ("none", "l1", "l2") if penalty in set(table["weight_penalty"])]
    combinations = [(False, False), (True, False), (False, True), (True, True)]
    width = 0.8 / len(combinations)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (column, label) in zip(axes, (("fraction_shared", "shared fraction (mean over seed pairs)"), ("mmcs_decoder", "decoder MMCS (mean over seed pairs)"))):
        for offset, (tied, unit) in enumerate(combinations):
            values = []
            for penalty in penalties:
                cell = digits_cell_row(table, penalty, tied, unit)
                values.append(float(cell[column]) if cell is not None else np.nan)
            positions = np.arange(len(penalties)) + (offset - (len(combinations) - 1) / 2) * width
            axis.bar(positions, values, width, label=f"tied init {'on' if tied else 'off'}, unit norm {'on' if unit else 'off'}")
        axis.set_xticks(np.arange(len(penalties)))
        axis.set_xticklabels([f"penalty: {penalty}" for penalty in penalties])
        axis.set_ylabel(label)
        axis.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Cross-seed stability of SAE features on {dataset}", fontsize=9)
    save_figure(figure, path)
