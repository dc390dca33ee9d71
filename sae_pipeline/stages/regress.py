"""Regress stage: does autointerp score predict steering success, and does regularization change that?
Plus the run's summary of every claim in ../shared/SPEC.md, its plots, and the tables the report shows.

The stage reads the other stages' outputs (paths from :meth:`sae_pipeline.layout.Experiment.regress_inputs`),
fits the models of :mod:`sae_pipeline.stats.regression`, and writes the tables, the plots of
:mod:`sae_pipeline.report.plots` and the summary of :mod:`sae_pipeline.report.summary`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from sae_pipeline.data.atomic import write_dataframe
from sae_pipeline.layout import reference_condition
from sae_pipeline.report.plots import (
    plot_k_robustness,
    plot_probing,
    plot_reappearance,
    plot_shared_fraction,
    plot_steering_success,
    plot_success_vs_interp,
    plot_training_curves,
)
from sae_pipeline.report.summary import JudgesReport, write_summary
from sae_pipeline.settings import RegressSettings
from sae_pipeline.stats.intervals import mean_with_interval, wilson_interval
from sae_pipeline.stats.regression import (
    fit_all_models,
    judge_frames,
    steering_success_by_condition,
)

logger = logging.getLogger("sae_pipeline.stages.regress")


# ----------------------------------------------------------------------------------------------
# Data


def load_steering_rows(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """All variants' steering rows (``rows.parquet``) with ``variant`` and ``condition`` columns added."""
    frames = []
    for variant, inputs in variant_inputs.items():
        if inputs.get("steer_rows"):
            frame = pd.read_parquet(inputs["steer_rows"])
            frame.insert(0, "condition", inputs["condition"])
            frame.insert(0, "variant", variant)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["variant", "condition", "feature", "interp_score", "share_count"])


# ----------------------------------------------------------------------------------------------
# Fitting


# ----------------------------------------------------------------------------------------------
# Intervals


# ----------------------------------------------------------------------------------------------
# Other stages' outputs


def shared_fraction_by_condition(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per variant with match outputs: share of the reference seed's considered features in each
    sharedness category (Wilson 95% intervals, features as trials), plus the match summary's pair
    averages (decoder/encoder MMCS, fraction paired, pairwise fraction shared).

    Features the match stage left out (``included`` false, i.e. dead latents when ``exclude_dead``) are
    not counted, as in the match summary's ``reference_fractions``.
    """
    rows = []
    for variant, inputs in variant_inputs.items():
        if not inputs.get("match_features"):
            continue
        features = pd.read_parquet(inputs["match_features"])
        if "included" in features.columns:
            features = features[features["included"].astype(bool)]
        summary = json.loads(Path(inputs["match_summary"]).read_text()) if inputs.get("match_summary") else {}
        row = {"variant": variant, "condition": inputs["condition"], "n_features": int(len(features))}
        for category in ("always", "sometimes", "never"):
            count = int((features["category"] == category).sum())
            low, high = wilson_interval(count, len(features))
            row.update({f"{category}_fraction": count / len(features) if len(features) else float("nan"), f"{category}_ci_low": low, f"{category}_ci_high": high})
        pair_means = summary.get("mean_over_pairs", {})
        for key, column in (("mmcs_decoder", "mmcs_decoder"), ("mmcs_encoder", "mmcs_encoder"), ("fraction_paired_decoder", "fraction_paired_decoder"), ("fraction_shared", "pair_fraction_shared")):
            row[column] = float(pair_means[key]) if isinstance(pair_means.get(key), (int, float)) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def stability_by_condition(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per variant, the match summary's ``stability`` section as one row (:mod:`sae_pipeline.stability.measures`):
    PW-MCC (decoder, encoder) and the pairwise shared fraction with seed-resampled 95% intervals, mean
    reappearance probability and Spearman's rho with log firing frequency, with the autointerp detection
    score (reference-seed features that autointerp scored) and with the reconstruction contribution (evaluate), and the non-shared subspace overlap per rank
    with its random baseline r / d."""
    rows = []
    for variant, inputs in variant_inputs.items():
        if not inputs.get("match_summary"):
            continue
        summary = json.loads(Path(inputs["match_summary"]).read_text())
        stability = summary.get("stability")
        if not stability:
            continue
        row: dict[str, Any] = {"variant": variant, "condition": inputs["condition"], "n_seeds": len(summary.get("seeds", []))}
        for name, measure in (("pw_mcc_decoder", stability["pw_mcc"]["decoder"]), ("pw_mcc_encoder", stability["pw_mcc"]["encoder"])):
            resampled = measure["seed_resampled"]
            row.update({name: measure["mean"], f"{name}_sd": measure["sd"], f"{name}_low": resampled["low"], f"{name}_high": resampled["high"]})
        shared = stability["fraction_shared_seed_resampled"]
        row.update({"pair_fraction_shared": shared["mean"], "pair_fraction_shared_low": shared["low"], "pair_fraction_shared_high": shared["high"]})
        row["reappearance_mean"] = stability["reappearance"]["mean"]
        row["rho_firing_frequency"] = stability["reappearance"]["by_log10_firing_frequency"]["spearman_rho"]
        features = pd.read_parquet(inputs["match_features"]) if inputs.get("match_features") else None
        for column, covariate in (("rho_interp_score", "autointerp detection score"), ("rho_reconstruction_contribution", "reconstruction contribution")):
            row[column] = _spearman(_join_reappearance(features, inputs, *REAPPEARANCE_COVARIATES[covariate]))
        row.update(_explanation_agreement(inputs))
        row.update(_exclusions(summary, inputs))
        for rank, overlap in stability["subspace_overlap"].items():
            row.update({f"overlap_r{rank}": overlap["overlap_mean"], f"overlap_r{rank}_baseline": overlap["random_baseline"],
                        f"overlap_r{rank}_low": overlap["seed_resampled"]["low"], f"overlap_r{rank}_high": overlap["seed_resampled"]["high"]})
        rows.append(row)
    return pd.DataFrame(rows)


def _exclusions(match_summary: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """How many of the reference seed's latents each stage leaves out, and why: the match stage (dead over
    the training window), the evaluate stage's monosemanticity proxies (too few firings on its tokens)
    and the evaluate figure "never fired on the evaluated tokens"."""
    excluded = match_summary.get("excluded_latents", {})
    reference = str(match_summary.get("reference_seed", ""))
    row: dict[str, Any] = {
        "n_latents": match_summary.get("n_features", {}).get(reference),
        "excluded_match": excluded.get("count", {}).get(reference),
        "excluded_match_reason": excluded.get("reason", "not recorded (match output of an older version)"),
    }
    if inputs.get("evaluate_metrics"):
        metrics = json.loads(Path(inputs["evaluate_metrics"]).read_text())
        firing, mono = metrics["firing"], metrics["monosemanticity"]
        row.update({
            "evaluate_tokens": metrics["n_tokens"],
            "never_fired_on_evaluate_tokens": firing["n_dead"],
            "unscored_by_proxies": firing["n_latents"] - mono["scored_latents"],
            "proxy_min_activations": mono["min_activations"],
        })
    return row


def _explanation_agreement(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Mean explanation agreement (autointerp ``explanation_agreement``: cosine of a feature's explanation and its
    partners' in the other seeds) over features shared in some pair and over never-shared ones, normal 95% intervals."""
    if not inputs.get("autointerp_scores"):
        return {}
    scores = pd.read_parquet(inputs["autointerp_scores"])
    if "explanation_agreement" not in scores.columns:
        return {}
    agreement = pd.to_numeric(scores["explanation_agreement"], errors="coerce")
    shared = pd.to_numeric(scores["share_count"], errors="coerce").fillna(0) > 0
    row = {}
    for name, mask in (("shared", shared), ("never", ~shared & (scores["category"] == "never"))):
        interval = mean_with_interval(agreement[mask].dropna().to_numpy())
        row.update({f"agreement_{name}": interval["mean"], f"agreement_{name}_low": interval["ci_low"], f"agreement_{name}_high": interval["ci_high"],
                    f"agreement_{name}_n": interval["n"]})
    return row


REAPPEARANCE_COVARIATES = {
    "log10 firing frequency": (None, "feature", "firing_frequency"),
    "autointerp detection score": ("autointerp_scores", "feature", "detection_score"),
    "reconstruction contribution": ("evaluate_latents", "latent", "reconstruction_contribution"),
}
"""Per-latent values reappearance is related to: name -> (input key of the table, its latent column, its value column);
None = the match ``features.parquet`` itself."""


def _join_reappearance(features: pd.DataFrame | None, inputs: Mapping[str, Any], table_key: str | None, id_column: str, value_column: str) -> pd.DataFrame:
    """``[feature, reappearance, value]`` for the reference seed's latents (``features``: the match ``features.parquet``)
    joined with a per-latent value of the same seed's SAE in another stage's table (``inputs[table_key]``: its
    ``id_column`` holds the latent, ``seed`` if present must be the match's reference seed; None = ``features``'
    own column). Firing frequency becomes log10 and drops latents that never fired. Empty when nothing joins."""
    empty = pd.DataFrame(columns=["feature", "reappearance", "value"])
    if features is None or "reappearance" not in features.columns or (table_key is not None and not inputs.get(table_key)):
        return empty
    if table_key is None:
        other = features[["feature", value_column]]
    else:
        other = pd.read_parquet(inputs[table_key])
        if value_column not in other.columns:
            return empty
        if "seed" in other.columns and len(features) and set(other["seed"].unique()) != {features["seed"].iloc[0]}:
            return empty
        other = other[[id_column, value_column]].rename(columns={id_column: "feature"})
    joined = features[["feature", "reappearance"]].merge(other, on="feature").rename(columns={value_column: "value"}).dropna()
    if value_column == "firing_frequency":
        joined = joined[joined["value"] > 0].assign(value=lambda frame: np.log10(frame["value"]))
    return joined


def _spearman(joined: pd.DataFrame) -> float | None:
    """Spearman's rho of reappearance and value; None when fewer than 3 latents or either is constant."""
    if len(joined) < 3 or joined["reappearance"].nunique() < 2 or joined["value"].nunique() < 2:
        return None
    return float(spearmanr(joined["reappearance"], joined["value"]).statistic)


def reappearance_relations(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per condition and covariate (:data:`REAPPEARANCE_COVARIATES`), each reference-seed latent's reappearance and
    value: ``[condition, covariate, feature, reappearance, value]`` (the data of the reappearance plot)."""
    frames = []
    for inputs in variant_inputs.values():
        if not inputs.get("match_features"):
            continue
        features = pd.read_parquet(inputs["match_features"])
        for covariate, (table_key, id_column, value_column) in REAPPEARANCE_COVARIATES.items():
            joined = _join_reappearance(features, inputs, table_key, id_column, value_column)
            if len(joined):
                frames.append(joined.assign(condition=inputs["condition"], covariate=covariate))
    columns = ["condition", "covariate", "feature", "reappearance", "value"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def autointerp_by_condition(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per condition: mean detection (and fuzzing) score over scored features with 95% intervals, and the backend used."""
    frames = []
    for variant, inputs in variant_inputs.items():
        if inputs.get("autointerp_scores"):
            frame = pd.read_parquet(inputs["autointerp_scores"])
            frame["condition"] = inputs["condition"]
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    scores = pd.concat(frames, ignore_index=True)
    rows = []
    for condition, group in scores.groupby("condition", sort=True):
        detection = mean_with_interval(pd.to_numeric(group["detection_score"], errors="coerce"))
        fuzzing = mean_with_interval(pd.to_numeric(group.get("fuzzing_score", pd.Series(dtype=float)), errors="coerce"))
        rows.append(
            {
                "condition": condition,
                "detection_mean": detection["mean"], "detection_ci_low": detection["ci_low"], "detection_ci_high": detection["ci_high"],
                "n_scored": detection["n"], "n_features": int(len(group)),
                "fuzzing_mean": fuzzing["mean"], "fuzzing_ci_low": fuzzing["ci_low"], "fuzzing_ci_high": fuzzing["ci_high"],
                "backend": ", ".join(sorted(group["backend"].dropna().astype(str).unique())) if "backend" in group else "",
            }
        )
    table = pd.DataFrame(rows)
    numeric = [column for column in table.columns if column.startswith(("detection_", "fuzzing_"))]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table


def evaluate_table(variant_inputs: Mapping[str, Mapping[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Claim-4 figures per variant: ``(metrics table, k-robustness rows, probing rows)`` from the evaluate stage."""
    metrics_rows, robustness, probing = [], [], []
    for variant, inputs in variant_inputs.items():
        if not inputs.get("evaluate_metrics"):
            continue
        metrics = json.loads(Path(inputs["evaluate_metrics"]).read_text())
        mono = metrics["monosemanticity"]
        metrics_rows.append(
            {
                "variant": variant,
                "condition": inputs["condition"],
                "fvu": metrics["at_trained_k"]["fvu"],
                "ce_loss_recovered": metrics["at_trained_k"]["ce_loss_recovered"],
                "l0": metrics["at_trained_k"]["l0"],
                "effective_latents": metrics["effective_latents_per_token"]["mean"],
                "l1_over_l2": metrics["l1_over_l2"]["mean"],
                "dead_fraction": metrics["firing"]["dead_fraction"],
                "dense_fraction": metrics["firing"]["dense_fraction"],
                "top_token_mass_share": mono["top_token_mass_share"]["mean"],
                "top_token_mass_share_ci_low": mono["top_token_mass_share"]["ci_low"],
                "top_token_mass_share_ci_high": mono["top_token_mass_share"]["ci_high"],
                "token_entropy_bits": mono["top_activation_token_entropy_bits"]["mean"],
                "token_entropy_ci_low": mono["top_activation_token_entropy_bits"]["ci_low"],
                "token_entropy_ci_high": mono["top_activation_token_entropy_bits"]["ci_high"],
                "scored_latents": mono["scored_latents"],
                "n_tokens": metrics["n_tokens"],
            }
        )
        if inputs.get("evaluate_k_robustness"):
            frame = pd.read_csv(inputs["evaluate_k_robustness"])
            frame["variant"], frame["condition"] = variant, inputs["condition"]
            robustness.append(frame)
        if inputs.get("evaluate_probing"):
            frame = pd.read_csv(inputs["evaluate_probing"])
            frame["variant"], frame["condition"] = variant, inputs["condition"]
            probing.append(frame)
    return (
        pd.DataFrame(metrics_rows),
        pd.concat(robustness, ignore_index=True) if robustness else pd.DataFrame(),
        pd.concat(probing, ignore_index=True) if probing else pd.DataFrame(),
    )


def load_controls(variant_inputs: Mapping[str, Mapping[str, Any]], key: str) -> pd.DataFrame:
    """Every variant's positive-control table (``autointerp_controls`` or ``steer_controls``) with a ``variant`` column."""
    frames = []
    for variant, inputs in variant_inputs.items():
        path = inputs.get(key)
        if path and Path(path).exists():
            frames.append(pd.read_parquet(path).assign(variant=variant, condition=inputs["condition"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_training_curves(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """All variants' ``curves.parquet`` (one per seed-group folder) with a ``variant`` column."""
    frames = []
    for variant, inputs in variant_inputs.items():
        for path in inputs.get("training_curves", []):
            path = Path(path)
            if path.exists():
                frame = pd.read_parquet(path)
                frame["variant"] = variant
                frames.append(frame)
            else:
                logger.warning("no training curves at %s", path)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ----------------------------------------------------------------------------------------------
# The stage


def _in_condition_order(table: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Rows of a per-condition table in ``order`` (reference first, then as the variants come)."""
    if table.empty:
        return table
    rank = {condition: index for index, condition in enumerate(order)}
    return table.sort_values("condition", key=lambda column: column.map(lambda c: rank.get(c, len(rank))), kind="stable").reset_index(drop=True)


def run_regression(
    variant_inputs: Mapping[str, Mapping[str, Any]],
    outputs: Mapping[str, str],
    settings: RegressSettings | Mapping[str, Any],
    digits_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    digits_summary: str | None = None,
    judge_accuracy: str | None = None,
    claim4_markdown: str | None = None,
) -> pd.DataFrame:
    """Fit the regressions, write the coefficient table, the per-claim tables, the summary and the plots.

    Args:
        variant_inputs: per language-model variant, ``condition`` (its ``condition_label``) and the paths
            this stage reads, each optional: ``match_summary``, ``match_features``, ``autointerp_scores``,
            ``steer_rows``, ``evaluate_metrics``, ``evaluate_k_robustness``, ``evaluate_probing``, and
            ``sae_group_dirs`` (list; each may hold ``curves.parquet``).
        outputs: paths for ``coefficients``, ``summary`` (markdown), ``summary_html``, ``steering_success``, ``shared_fraction``,
            ``autointerp``, ``claim4``, ``k_robustness`` (CSV / markdown) and the PNGs
            ``plot_shared_fraction``, ``plot_steering_success``, ``plot_success_vs_interp``,
            ``plot_training_curves``, ``plot_k_robustness``, ``plot_probing``.
        settings: the ``regress`` config section.
        digits_inputs: per digits cell (variant), ``condition`` (a label) and ``match_features`` / ``match_summary``.
        digits_summary: the digits stage's ``stability_summary.json`` (claim 1's direction and its comparisons).
        judge_accuracy: the judge-accuracy stage's ``accuracy.csv`` (the judges on held-out labelled cases).
        claim4_markdown: the claim-4 stage's markdown section (the regularizer-strength sweep), appended to the summary.

    Returns:
        The coefficient table.
    """
    settings = RegressSettings.from_mapping(settings)
    judges = list(settings.judges)
    rows = load_steering_rows(variant_inputs)
    conditions = {variant: inputs["condition"] for variant, inputs in variant_inputs.items()}
    reference = reference_condition(list(conditions.values()), settings.reference_condition) if conditions else None
    logger.info("regress: %d steering rows from %d variants; reference condition %s", len(rows), rows["variant"].nunique() if len(rows) else 0, reference)

    coefficients, fitted = fit_all_models(rows, settings, reference)
    for message in coefficients.loc[coefficients["term"] == "", "message"]:
        logger.warning("regress: %s", message)
    order = [reference] + [condition for condition in dict.fromkeys(conditions.values()) if condition != reference]
    success = {
        judge: _in_condition_order(steering_success_by_condition(judge_frames(rows, judge)[1], reference, settings.bootstrap_samples, settings.seed), order)
        for judge in judges
    }
    shared = shared_fraction_by_condition(variant_inputs)
    stability = _in_condition_order(stability_by_condition(variant_inputs), order)
    relations = reappearance_relations(variant_inputs)
    digits = shared_fraction_by_condition(digits_inputs or {})
    digits_verdict = json.loads(Path(digits_summary).read_text()) if digits_summary else None
    autointerp = _in_condition_order(autointerp_by_condition(variant_inputs), order)
    claim4, robustness, probing = evaluate_table(variant_inputs)
    curves = load_training_curves(variant_inputs)
    judges_report = JudgesReport(
        accuracy=pd.read_csv(judge_accuracy) if judge_accuracy else pd.DataFrame(),
        autointerp_controls=load_controls(variant_inputs, "autointerp_controls"),
        steer_controls=load_controls(variant_inputs, "steer_controls"),
    )

    write_dataframe(outputs["coefficients"], coefficients)
    success_table = pd.concat([table.assign(judge=judge) for judge, table in success.items() if not table.empty], ignore_index=True) if any(not t.empty for t in success.values()) else pd.DataFrame(columns=["judge", "condition", "success_rate"])
    write_dataframe(outputs["steering_success"], success_table)
    write_dataframe(outputs["shared_fraction"], shared if not shared.empty else pd.DataFrame(columns=["variant", "condition", "always_fraction"]))
    write_dataframe(outputs["autointerp"], autointerp if not autointerp.empty else pd.DataFrame(columns=["condition", "detection_mean"]))
    write_dataframe(outputs["claim4"], claim4 if not claim4.empty else pd.DataFrame(columns=["variant", "condition", "fvu"]))
    write_dataframe(outputs["k_robustness"], robustness if not robustness.empty else pd.DataFrame(columns=["variant", "condition", "multiplier", "fvu"]))

    plot_shared_fraction(outputs["plot_shared_fraction"], shared)
    plot_steering_success(outputs["plot_steering_success"], success)
    plot_success_vs_interp(outputs["plot_success_vs_interp"], rows, fitted, judges, settings.plot_bins)
    plot_training_curves(outputs["plot_training_curves"], curves, settings.curve_metrics)
    plot_k_robustness(outputs["plot_k_robustness"], robustness)
    plot_probing(outputs["plot_probing"], probing)
    write_dataframe(outputs["reappearance"], relations)
    plot_reappearance(outputs["plot_reappearance"], relations)
    write_summary(outputs["summary"], conditions, reference, digits, shared, success, autointerp, coefficients, claim4, robustness, probing, judges, outputs.get("summary_html"), digits_verdict,
                  judges_report, stability, Path(claim4_markdown).read_text() if claim4_markdown else None)
    return coefficients
