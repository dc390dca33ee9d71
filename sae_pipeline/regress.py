"""Regress stage: does autointerp score predict steering success, and does regularization change that?
Plus the run's summary of every claim in ../shared/SPEC.md, its plots, and the tables the report shows.

Unit of analysis (statsmodels, formula interface):

- ``logit_row``: one row per (feature, prompt) steering attempt; ``success ~ interp_score`` (logit),
  standard errors clustered by feature (a feature's attempts share its direction and strength).
- ``binomial_feature``: one row per feature; successes out of its judged prompts, binomial GLM
  (logit link) on ``interp_score``; when Pearson's chi^2 / df exceeds 1 it is used as the dispersion
  (quasi-binomial), so intervals widen when a feature's prompts succeed or fail together.
- ``ols_feature``: one row per feature; the feature's mean judge score (embedding cosine or LLM 1-5
  score), OLS on ``interp_score``.

Each is fitted per regularization condition (``condition_label`` of the variant, e.g. ``l2w1e-03+noreg``;
variants that share a condition are pooled) and once over all conditions with the interaction
``interp_score * condition`` (treatment coding against ``reference_condition``). ``share_count`` is an
optional covariate; it is left out, with a note, where it does not vary. Claim 3 is the per-condition
slope of ``interp_score`` and the pooled ``interp_score:condition[...]`` terms (slope differences).

A fit that cannot be made (too few rows, a constant outcome or predictor, a single condition for the
pooled model, complete separation of successes from failures, a failed or non-converged optimisation,
non-finite estimates) produces one row whose ``message`` says why, and empty numbers; it never raises.

Intervals in the summary: Wilson 95% intervals for shared fractions (features as trials); for steering
success, a cluster bootstrap over features (prompts of one feature are not independent) of the pooled
success rate and of its ratio to the reference condition; normal-approximation 95% intervals for
means of per-feature scores (``evaluate.mean_with_interval``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sae_pipeline.atomic import atomic_path, write_dataframe, write_text
from sae_pipeline.evaluate import mean_with_interval

logger = logging.getLogger("sae_pipeline.regress")

JUDGE_COLUMNS = {"embedding": ("embedding_success", "embedding_score"), "llm": ("llm_success", "llm_score")}
OUTCOME_MODELS = ("logit_row", "binomial_feature", "ols_feature")
COEFFICIENT_COLUMNS = [
    "outcome_model", "judge", "scope", "term", "estimate", "ci_low", "ci_high", "p_value",
    "pseudo_r2", "pseudo_r2_kind", "n", "n_features", "formula", "message",
]
Z_95 = 1.959963984540054


# ----------------------------------------------------------------------------------------------
# Data


def variant_layout(results_dir: str, variant: str, condition: str, seeds: Mapping[str, int], group_dirs: Sequence[str]) -> dict[str, Any]:
    """What the regress stage reads for one language-model variant (the paths other stages write).

    ``seeds`` gives the trained seed each stage used: keys ``autointerp``, ``steer``, ``evaluate``.
    """
    evaluate_folder = f"{results_dir}/lm/evaluate/{variant}/seed{seeds['evaluate']}"
    return {
        "condition": condition,
        "match_summary": f"{results_dir}/lm/match/{variant}/summary.json",
        "match_features": f"{results_dir}/lm/match/{variant}/features.parquet",
        "autointerp_scores": f"{results_dir}/lm/autointerp/{variant}/seed{seeds['autointerp']}/scores.parquet",
        "steer_rows": f"{results_dir}/lm/steer/{variant}/seed{seeds['steer']}/rows.parquet",
        "evaluate_metrics": f"{evaluate_folder}/metrics.json",
        "evaluate_k_robustness": f"{evaluate_folder}/k_robustness.csv",
        "evaluate_probing": f"{evaluate_folder}/probing.csv",
        "sae_group_dirs": list(group_dirs),
    }


def layout_files(layout: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every path in ``{variant: variant_layout(...)}`` (the regress rule's input), in a stable order."""
    files: list[str] = []
    for entry in layout.values():
        for key, value in entry.items():
            if key != "condition":
                files.extend(value if isinstance(value, list) else [value])
    return files


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


def judge_frames(rows: pd.DataFrame, judge: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Row-level and feature-level tables of one judge, keeping only rows that judge scored.

    Returns ``(row_frame, feature_frame)``: ``row_frame`` has ``success`` (0/1), ``score``,
    ``interp_score``, ``share_count``, ``condition``, ``variant``, ``feature``; ``feature_frame`` has one
    row per (variant, feature) with ``successes``, ``failures``, ``trials``, ``success_rate``,
    ``mean_score``, ``interp_score``, ``share_count``, ``condition``.
    """
    success_column, score_column = JUDGE_COLUMNS[judge]
    columns = ["variant", "condition", "feature", "interp_score", "share_count"]
    if success_column not in rows.columns or rows.empty:
        empty_rows = pd.DataFrame(columns=columns + ["success", "score"])
        return empty_rows, pd.DataFrame(columns=columns + ["successes", "failures", "trials", "success_rate", "mean_score"])
    scored = rows[rows[success_column].notna() & rows["interp_score"].notna()]
    row_frame = scored[columns].copy()
    row_frame["interp_score"] = row_frame["interp_score"].astype(float)
    row_frame["share_count"] = pd.to_numeric(row_frame["share_count"], errors="coerce").astype(float)
    row_frame["success"] = scored[success_column].astype(bool).astype(int).to_numpy()
    row_frame["score"] = pd.to_numeric(scored[score_column], errors="coerce").astype(float).to_numpy()
    row_frame = row_frame.reset_index(drop=True)
    grouped = row_frame.groupby(["variant", "feature"], sort=False)
    feature_frame = grouped[["condition", "interp_score", "share_count"]].first()
    feature_frame["successes"] = grouped["success"].sum()
    feature_frame["trials"] = grouped["success"].size()
    feature_frame["failures"] = feature_frame["trials"] - feature_frame["successes"]
    feature_frame["success_rate"] = feature_frame["successes"] / feature_frame["trials"]
    feature_frame["mean_score"] = grouped["score"].mean()
    return row_frame, feature_frame.reset_index()


def reference_condition(conditions: Sequence[str], requested: str | None) -> str:
    """The pooled model's reference level: ``requested`` if given, else an unpenalised and unregularized
    condition (``*w0+noreg`` or ``nopen+noreg``) when present, else the first in sorted order."""
    conditions = sorted(set(conditions))
    if requested:
        if requested not in conditions:
            raise ValueError(f"regress.reference_condition {requested!r} is not among the conditions {conditions}")
        return requested
    plain = [c for c in conditions if re.fullmatch(r"(nopen|[a-z0-9]+w0)\+noreg", c)]
    return plain[0] if plain else conditions[0]


# ----------------------------------------------------------------------------------------------
# Fitting


def completely_separated(design: np.ndarray, outcome: np.ndarray) -> bool:
    """Whether some linear predictor puts every success strictly above every failure (complete separation).

    Solves the feasibility LP ``s_i * (X_i w) >= 1`` with ``s_i = +1`` for successes and ``-1`` for
    failures; feasible means the logit MLE does not exist. ``design`` is ``[n, p]`` (intercept included).
    """
    from scipy.optimize import linprog

    signs = np.where(np.asarray(outcome) > 0, 1.0, -1.0)
    constraints = -(signs[:, None] * np.asarray(design, dtype=float))
    result = linprog(np.zeros(design.shape[1]), A_ub=constraints, b_ub=-np.ones(len(signs)), bounds=[(None, None)] * design.shape[1], method="highs")
    return result.status == 0


def _message_row(base: Mapping[str, Any], message: str) -> dict[str, Any]:
    return {**{column: None for column in COEFFICIENT_COLUMNS}, **base, "term": "", "message": message}


def _clean_term(term: str) -> str:
    """``condition[T.l2w1e-03+noreg]`` -> ``condition[l2w1e-03+noreg]`` (patsy's treatment prefix dropped)."""
    return term.replace("[T.", "[")


def fit_outcome_model(
    frame: pd.DataFrame,
    outcome_model: str,
    pooled: bool,
    reference: str | None,
    use_share_count: bool,
    min_n: int,
    base: Mapping[str, Any],
    min_events: int = 1,
) -> tuple[list[dict[str, Any]], Any]:
    """Fit one model and return ``(coefficient rows, statsmodels result or None)``.

    ``frame`` is a ``judge_frames`` table (row-level for ``logit_row``, feature-level otherwise).
    ``pooled`` adds ``condition`` and its interaction with ``interp_score``. ``base`` is copied into every
    returned row (judge, scope, ...). ``min_events``: fewest successes and fewest failures a logit or
    binomial fit needs. Degenerate inputs give a single row with a ``message``. In the pooled model a
    condition whose attempts are all successes or all failures is left out (its terms would be
    unbounded: quasi-complete separation), with a note; if that leaves fewer than two conditions the
    pooled fit is skipped.
    """
    import statsmodels.api as sm
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationError, PerfectSeparationWarning

    base = {**base, "outcome_model": outcome_model, "n": int(len(frame)), "n_features": int(frame[["variant", "feature"]].drop_duplicates().shape[0]) if len(frame) else 0}
    unit = "rows" if outcome_model == "logit_row" else "features"
    if len(frame) < min_n:
        return [_message_row(base, f"skipped: {len(frame)} {unit}, fewer than regress.min_n={min_n}")], None

    conditions = sorted(frame["condition"].unique())
    if pooled and len(conditions) < 2:
        return [_message_row(base, f"skipped: only one condition ({conditions[0]}); the pooled model needs at least two to estimate the interaction")], None
    if outcome_model == "logit_row":
        outcome, kind = "success", "mcfadden"
        total_successes, total = int(frame["success"].sum()), len(frame)
    elif outcome_model == "binomial_feature":
        outcome, kind = "successes + failures", "mcfadden"
        total_successes, total = int(frame["successes"].sum()), int(frame["trials"].sum())
    elif outcome_model == "ols_feature":
        outcome, kind = "mean_score", "r2"
        frame = frame[np.isfinite(frame["mean_score"].astype(float))]
        if len(frame) < min_n:
            return [_message_row(base, f"skipped: {len(frame)} features with a judge score, fewer than regress.min_n={min_n}")], None
        if np.ptp(frame["mean_score"].to_numpy(dtype=float)) <= 1e-12:
            return [_message_row(base, f"skipped: the mean judge score is {frame['mean_score'].iloc[0]:g} for every feature; nothing to explain")], None
    else:
        raise ValueError(f"unknown outcome model {outcome_model!r}; expected one of {OUTCOME_MODELS}")
    if outcome_model != "ols_feature":
        if total_successes == total:
            return [_message_row(base, f"skipped: all {total} steering attempts are successes; the logit slope is not identifiable")], None
        if total_successes == 0:
            return [_message_row(base, f"skipped: all {total} steering attempts are failures; the logit slope is not identifiable")], None
        fewest = min(total_successes, total - total_successes)
        if fewest < min_events:
            kind_of_event = "successes" if total_successes < total - total_successes else "failures"
            return [_message_row(base, f"skipped: only {fewest} of {total} attempts are {kind_of_event}, fewer than regress.min_events={min_events}; Wald intervals would not be trustworthy")], None
    if frame["interp_score"].nunique() < 2:
        return [_message_row(base, f"skipped: interp_score takes the single value {frame['interp_score'].iloc[0]:g}; no slope to estimate")], None

    frame = frame.copy()
    terms = ["interp_score"]
    notes = []
    if pooled and outcome_model != "ols_feature":
        successes_column, trials_column = ("success", None) if outcome_model == "logit_row" else ("successes", "trials")
        by_condition = frame.groupby("condition")
        rate = by_condition[successes_column].sum() / (by_condition[trials_column].sum() if trials_column else by_condition.size())
        degenerate = sorted(rate[(rate == 0) | (rate == 1)].index)
        if degenerate:
            notes.append("left out (all attempts " + ", ".join(f"{c}: {'successes' if rate[c] == 1 else 'failures'}" for c in degenerate) + ")")
            frame = frame[~frame["condition"].isin(degenerate)]
            conditions = [c for c in conditions if c not in degenerate]
            if len(conditions) < 2:
                return [_message_row(base, f"skipped: fewer than two conditions with both successes and failures ({'; '.join(notes)}); no interaction to estimate")], None
            base["n"] = int(len(frame))
    if pooled:
        ordered = [reference] + [c for c in conditions if c != reference] if reference in conditions else conditions
        frame["condition"] = pd.Categorical(frame["condition"], categories=ordered)
        terms = ["interp_score * condition"]
        notes.append(f"reference condition {ordered[0]}")
    if use_share_count:
        if frame["share_count"].notna().all() and frame["share_count"].nunique() > 1:
            terms.append("share_count")
        else:
            notes.append("share_count left out (constant or missing in this subset)")
    formula = f"{outcome} ~ {' + '.join(terms)}"
    base["formula"] = formula

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if outcome_model == "logit_row":
                model = smf.logit(formula, frame)
            elif outcome_model == "binomial_feature":
                model = smf.glm(formula, frame, family=sm.families.Binomial())
            else:
                model = smf.ols(formula, frame)
            design = np.asarray(model.exog)
            if design.shape[0] <= design.shape[1]:
                return [_message_row(base, f"skipped: {design.shape[0]} {unit} for {design.shape[1]} parameters")], None
            if np.linalg.matrix_rank(design) < design.shape[1]:
                return [_message_row(base, "skipped: the design matrix is rank deficient (a predictor is constant within a condition or collinear)")], None
            if outcome_model == "logit_row" and completely_separated(design, frame["success"].to_numpy()):
                return [_message_row(base, "skipped: complete separation (interp_score splits successes from failures exactly); the logit MLE does not exist")], None
            if outcome_model == "binomial_feature":
                expanded_design = np.concatenate([design[frame["successes"].to_numpy() > 0], design[frame["failures"].to_numpy() > 0]])
                expanded_outcome = np.r_[np.ones(int((frame["successes"] > 0).sum())), np.zeros(int((frame["failures"] > 0).sum()))]
                if completely_separated(expanded_design, expanded_outcome):
                    return [_message_row(base, "skipped: complete separation (features with successes and features with failures are split exactly by the predictors); the MLE does not exist")], None
            if outcome_model == "logit_row":
                # attempts of one feature share its direction and strength: cluster-robust errors by feature
                clusters = pd.factorize(frame["variant"].astype(str) + "/" + frame["feature"].astype(str))[0]
                result = model.fit(disp=0, maxiter=200, cov_type="cluster", cov_kwds={"groups": clusters})
            elif outcome_model == "binomial_feature":
                # quasi-binomial: prompts of one feature are correlated, so widen by Pearson chi^2 / df when above 1
                result = model.fit()
                dispersion = float(result.pearson_chi2 / result.df_resid)
                if dispersion > 1:
                    result = model.fit(scale=dispersion)
            else:
                result = model.fit()
    except (PerfectSeparationError, np.linalg.LinAlgError, ValueError) as error:
        return [_message_row(base, f"fit failed: {type(error).__name__}: {error}")], None
    separation = [w for w in caught if issubclass(w.category, PerfectSeparationWarning)]
    if separation:
        return [_message_row(base, f"skipped: quasi-complete separation ({separation[0].message})")], None
    converged = result.mle_retvals.get("converged", True) if outcome_model == "logit_row" else getattr(result, "converged", True)
    if not converged or any(issubclass(w.category, ConvergenceWarning) for w in caught):
        return [_message_row(base, "skipped: the optimiser did not converge (quasi-separation or too little variation)")], None

    intervals = result.conf_int(alpha=0.05)
    if not (np.isfinite(result.params).all() and np.isfinite(result.bse).all() and np.isfinite(intervals.to_numpy()).all()):
        return [_message_row(base, "skipped: non-finite estimates or standard errors")], None
    if outcome_model != "ols_feature":
        fitted = np.asarray(result.predict(), dtype=float)
        if (fitted < 1e-8).any() or (fitted > 1 - 1e-8).any() or (np.asarray(result.bse) > 1e3).any():
            return [_message_row(base, "skipped: quasi-complete separation (some fitted probabilities are 0 or 1, standard errors unbounded)")], None
    fit_statistic = float(result.prsquared) if outcome_model == "logit_row" else float(result.pseudo_rsquared(kind="mcf")) if outcome_model == "binomial_feature" else float(result.rsquared)
    rows = []
    for term in result.params.index:
        rows.append(
            {
                **base,
                "term": _clean_term(term),
                "estimate": float(result.params[term]),
                "ci_low": float(intervals.loc[term, 0]),
                "ci_high": float(intervals.loc[term, 1]),
                "p_value": float(result.pvalues[term]),
                "pseudo_r2": fit_statistic,
                "pseudo_r2_kind": kind,
                "message": "; ".join(notes),
            }
        )
    return rows, result


def fit_all_models(rows: pd.DataFrame, settings: Mapping[str, Any], reference: str | None = None) -> tuple[pd.DataFrame, dict[tuple[str, str, str], Any]]:
    """Every (judge, outcome model, scope) fit; returns the coefficient table and the fitted results
    keyed by ``(judge, outcome_model, scope)`` (scope = a condition or ``"pooled"``). Pooled fits
    contrast against ``reference`` (default: chosen among the conditions of ``rows``)."""
    table: list[dict[str, Any]] = []
    fitted: dict[tuple[str, str, str], Any] = {}
    conditions = sorted(rows["condition"].unique()) if len(rows) else []
    if reference is None and conditions:
        reference = reference_condition(conditions, settings.get("reference_condition"))
    for judge in settings["judges"]:
        row_frame, feature_frame = judge_frames(rows, judge)
        if row_frame.empty:
            table.append(_message_row({"judge": judge, "scope": "all", "outcome_model": "all", "n": 0, "n_features": 0}, f"skipped: no steering rows scored by the {judge} judge (judge not run, or every answer unparseable)"))
            continue
        for outcome_model in settings["models"]:
            frame = row_frame if outcome_model == "logit_row" else feature_frame
            min_n = int(settings["min_rows"] if outcome_model == "logit_row" else settings["min_features"])
            scopes = [(condition, frame[frame["condition"] == condition], False) for condition in conditions] + [("pooled", frame, True)]
            for scope, subset, pooled in scopes:
                new_rows, result = fit_outcome_model(
                    subset, outcome_model, pooled, reference, bool(settings["share_count_covariate"]), min_n, {"judge": judge, "scope": scope}, int(settings["min_events"])
                )
                table.extend(new_rows)
                if result is not None:
                    fitted[(judge, outcome_model, scope)] = result
    return pd.DataFrame(table, columns=COEFFICIENT_COLUMNS), fitted


# ----------------------------------------------------------------------------------------------
# Intervals


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """Wilson 95% interval of a binomial proportion."""
    if trials == 0:
        return float("nan"), float("nan")
    share = successes / trials
    denominator = 1 + Z_95**2 / trials
    centre = (share + Z_95**2 / (2 * trials)) / denominator
    half_width = Z_95 * math.sqrt(share * (1 - share) / trials + Z_95**2 / (4 * trials**2)) / denominator
    return centre - half_width, centre + half_width


def cluster_bootstrap_rate(successes: np.ndarray, trials: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution ``[samples]`` of ``sum(successes) / sum(trials)`` resampling features (clusters)."""
    successes, trials = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    picks = rng.integers(0, len(successes), size=(samples, len(successes)))
    return successes[picks].sum(axis=1) / trials[picks].sum(axis=1)


def steering_success_by_condition(feature_frame: pd.DataFrame, reference: str | None, samples: int, seed: int) -> pd.DataFrame:
    """Per condition: success rate over judged attempts, its cluster-bootstrap 95% interval, and the ratio
    to the reference condition's rate with its bootstrap interval (conditions resampled independently)."""
    rng = np.random.default_rng(seed)
    draws, rows = {}, []
    for condition, group in feature_frame.groupby("condition", sort=True):
        draws[condition] = cluster_bootstrap_rate(group["successes"].to_numpy(), group["trials"].to_numpy(), samples, rng)
        rate = float(group["successes"].sum() / group["trials"].sum())
        rows.append(
            {
                "condition": condition,
                "success_rate": rate,
                "ci_low": float(np.quantile(draws[condition], 0.025)),
                "ci_high": float(np.quantile(draws[condition], 0.975)),
                "n_attempts": int(group["trials"].sum()),
                "n_features": int(len(group)),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    reference_rate = table.set_index("condition")["success_rate"].get(reference, float("nan"))
    ratios = []
    for row in table.itertuples():
        if reference not in draws or row.condition == reference or reference_rate == 0:
            ratios.append((float("nan"), float("nan"), float("nan")))
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_draws = draws[row.condition] / draws[reference]
        ratio_draws = ratio_draws[np.isfinite(ratio_draws)]
        ratios.append((row.success_rate / reference_rate, float(np.quantile(ratio_draws, 0.025)), float(np.quantile(ratio_draws, 0.975))))
    table["ratio_to_reference"], table["ratio_ci_low"], table["ratio_ci_high"] = zip(*ratios)
    return table


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


def load_training_curves(variant_inputs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """All variants' ``curves.parquet`` (one per seed-group folder) with a ``variant`` column."""
    frames = []
    for variant, inputs in variant_inputs.items():
        for group_dir in inputs.get("sae_group_dirs", []):
            path = Path(group_dir) / "curves.parquet"
            if path.exists():
                frame = pd.read_parquet(path)
                frame["variant"] = variant
                frames.append(frame)
            else:
                logger.warning("no training curves at %s", path)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ----------------------------------------------------------------------------------------------
# Plots (PNG, written atomically)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | Path) -> None:
    plt = _pyplot()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def _no_data(path: str | Path, title: str, message: str) -> None:
    """A figure that says plainly that there is nothing to plot (so a report item always exists)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 2.5))
    axis.axis("off")
    axis.set_title(title)
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    _save(figure, path)


def _error_bars(values: pd.Series, low: pd.Series, high: pd.Series) -> np.ndarray:
    return np.vstack([(values - low).clip(lower=0).fillna(0).to_numpy(), (high - values).clip(lower=0).fillna(0).to_numpy()])


def plot_shared_fraction(path: str | Path, shared: pd.DataFrame) -> None:
    """Bars: share of features in each sharedness category per variant (condition), Wilson 95% intervals."""
    if shared.empty:
        return _no_data(path, "Shared fraction by condition", "no match outputs in this run")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(shared)), 4))
    positions = np.arange(len(shared))
    width = 0.27
    for offset, category, colour in ((-1, "always", "tab:green"), (0, "sometimes", "tab:orange"), (1, "never", "tab:grey")):
        values = shared[f"{category}_fraction"]
        axis.bar(positions + offset * width, values, width, yerr=_error_bars(values, shared[f"{category}_ci_low"], shared[f"{category}_ci_high"]), label=category, color=colour, capsize=3)
    axis.set_xticks(positions, [f"{row.condition}\n{row.variant}" for row in shared.itertuples()], fontsize=7)
    axis.set_ylabel("share of features")
    axis.set_ylim(0, 1)
    axis.set_title("Features shared across seeds (category over seed pairs)")
    axis.legend(title="shared in")
    _save(figure, path)


def plot_steering_success(path: str | Path, success: Mapping[str, pd.DataFrame]) -> None:
    """Bars: steering success rate per condition for each judge, cluster-bootstrap 95% intervals."""
    judges = [judge for judge, table in success.items() if not table.empty]
    if not judges:
        return _no_data(path, "Steering success by condition", "no judged steering rows in this run")
    plt = _pyplot()
    conditions = sorted(set().union(*(set(success[judge]["condition"]) for judge in judges)))
    figure, axis = plt.subplots(figsize=(max(6, 1.5 * len(conditions)), 4))
    width = 0.8 / len(judges)
    for index, judge in enumerate(judges):
        table = success[judge].set_index("condition").reindex(conditions)
        positions = np.arange(len(conditions)) + (index - (len(judges) - 1) / 2) * width
        axis.bar(positions, table["success_rate"], width, yerr=_error_bars(table["success_rate"], table["ci_low"], table["ci_high"]), capsize=3, label=f"{judge} judge")
    axis.set_xticks(np.arange(len(conditions)), conditions, fontsize=8)
    axis.set_ylabel("steering success rate")
    axis.set_ylim(0, 1)
    axis.set_title("Steering success by condition")
    axis.legend()
    _save(figure, path)


def plot_success_vs_interp(path: str | Path, rows: pd.DataFrame, fitted: Mapping[tuple[str, str, str], Any], judges: Sequence[str], bins: int) -> None:
    """Per judge: binned success rate against interp score (points) and the per-condition logit fit (curves)."""
    row_frames = {judge: judge_frames(rows, judge)[0] for judge in judges}
    panels = [judge for judge in judges if not row_frames[judge].empty]
    if not panels:
        return _no_data(path, "Steering success vs interp score", "no judged steering rows in this run")
    plt = _pyplot()
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
    _save(figure, path)


def plot_training_curves(path: str | Path, curves: pd.DataFrame, metrics: Sequence[str]) -> None:
    """One panel per logged metric against training tokens (or step), one line per variant and seed."""
    present = [metric for metric in metrics if metric in curves.columns]
    if curves.empty or not present:
        return _no_data(path, "Training curves", "no curves.parquet with the configured metrics in this run")
    x_column = "tokens" if "tokens" in curves.columns else "step"
    plt = _pyplot()
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
    _save(figure, path)


def plot_k_robustness(path: str | Path, robustness: pd.DataFrame) -> None:
    """FVU and CE-loss recovered against the inference-time k multiplier, one line per variant."""
    if robustness.empty or robustness["multiplier"].isna().all():
        return _no_data(path, "Robustness to inference-time k", "no evaluate outputs with a k grid in this run")
    plt = _pyplot()
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
    _save(figure, path)


def plot_probing(path: str | Path, probing: pd.DataFrame) -> None:
    """Sparse-probing test balanced accuracy against the latent budget m, one panel per token property."""
    fitted = probing[probing["m"].notna()] if not probing.empty and "m" in probing.columns else pd.DataFrame()
    if fitted.empty:
        return _no_data(path, "Sparse probing", "no sparse-probing results in this run")
    plt = _pyplot()
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
    _save(figure, path)


# ----------------------------------------------------------------------------------------------
# Summary (markdown)


def format_interval(value: Any, low: Any = None, high: Any = None, digits: int = 3) -> str:
    """``0.123 [0.100, 0.150]``; ``n/a`` for a missing value; the bracket is left out when the interval is missing."""

    def finite(number: Any) -> bool:
        return number is not None and not (isinstance(number, float) and math.isnan(number)) and not pd.isna(number)

    if not finite(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    if finite(low) and finite(high):
        text += f" [{float(low):.{digits}f}, {float(high):.{digits}f}]"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _difference_of_proportions(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """``p1 - p2`` with a normal-approximation 95% interval."""
    difference = p1 - p2
    half_width = Z_95 * math.sqrt(p1 * (1 - p1) / max(n1, 1) + p2 * (1 - p2) / max(n2, 1))
    return difference, difference - half_width, difference + half_width


def _difference_of_means(mean_a: float, low_a: float, high_a: float, mean_b: float, low_b: float, high_b: float) -> tuple[float, float, float]:
    """``mean_a - mean_b`` with a normal 95% interval, each standard error recovered from its own 95% interval."""
    se_a, se_b = (high_a - low_a) / (2 * Z_95), (high_b - low_b) / (2 * Z_95)
    difference = mean_a - mean_b
    half_width = Z_95 * math.sqrt(se_a**2 + se_b**2) if np.isfinite(se_a) and np.isfinite(se_b) else float("nan")
    return difference, difference - half_width, difference + half_width


def _section_claim1(digits: pd.DataFrame, verdict: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Claim 1 (digits): L2 weight penalty, tied init and unit-norm decoder raise cross-seed consistency\n"]
    if digits.empty:
        return lines + ["Not measured in this run (no digits match outputs were given to the regress stage).\n"]
    if verdict and verdict.get("dataset"):
        lines.append(f"Data: {verdict['dataset']}.\n")
    lines.append("Per grid cell: share of the reference seed's features shared in every seed pair (`always`, Wilson 95% interval over features), the pairwise shared fraction and decoder MMCS averaged over seed pairs:\n")
    rows = [
        [row.variant, format_interval(row.always_fraction, row.always_ci_low, row.always_ci_high), format_interval(row.pair_fraction_shared), format_interval(row.mmcs_decoder), row.n_features]
        for row in digits.itertuples()
    ]
    lines.append(markdown_table(["cell", "always shared", "shared per pair (mean)", "decoder MMCS", "features"], rows))
    if not verdict or verdict.get("holds") is None:
        lines.append(f"Direction not assessed: {verdict.get('reason', 'no digits stability summary') if verdict else 'no digits stability summary'}.\n")
        return lines
    target = verdict["l2_tied_unit"]["variant"]
    lines.append(
        f"L2 + tied init + unit-norm decoder cell `{target}`: the claim's direction "
        f"{'holds' if verdict['holds'] else 'does not hold'} (it must beat each comparison cell on both the pairwise shared fraction and decoder MMCS; "
        f"3 seeds per cell, a direction, not a significance test). Difference in always-shared fraction against each comparison (normal 95% interval):\n"
    )
    by_variant = digits.set_index("variant")
    for label, comparison in verdict.get("comparisons", {}).items():
        other = comparison["variant"]
        difference = "n/a"
        if target in by_variant.index and other in by_variant.index:
            a, b = by_variant.loc[target], by_variant.loc[other]
            difference = format_interval(*_difference_of_proportions(a["always_fraction"], int(a["n_features"]), b["always_fraction"], int(b["n_features"])))
        lines.append(f"- vs {label} (`{other}`): {difference}; higher on both measures: {'yes' if comparison['l2_tied_unit_higher_on_both'] else 'no'}\n")
    lines.append("")
    return lines


def _section_claim2(shared: pd.DataFrame, success: Mapping[str, pd.DataFrame], autointerp: pd.DataFrame, reference: str | None) -> list[str]:
    lines = ["## Claim 2: a small L2 weight penalty raises the shared fraction and steering success; autointerp barely moves\n"]
    lines.append(f"Reference (unregularized) condition: `{reference}`.\n")
    lines.append("### Shared fraction by condition (match stage; Wilson 95% intervals over features)\n")
    if shared.empty:
        lines.append("No match outputs in this run.\n")
    else:
        rows = [
            [row.condition, row.variant, format_interval(row.always_fraction, row.always_ci_low, row.always_ci_high),
             format_interval(row.sometimes_fraction, row.sometimes_ci_low, row.sometimes_ci_high), format_interval(row.never_fraction, row.never_ci_low, row.never_ci_high),
             format_interval(row.pair_fraction_shared), format_interval(row.mmcs_decoder), format_interval(row.mmcs_encoder), row.n_features]
            for row in shared.itertuples()
        ]
        lines.append(markdown_table(["condition", "variant", "always", "sometimes", "never", "shared per pair (mean)", "decoder MMCS", "encoder MMCS", "features"], rows))
        reference_rows = shared[shared["condition"] == reference]
        if not reference_rows.empty:
            base = reference_rows.iloc[0]
            for row in shared[shared["condition"] != reference].itertuples():
                difference = _difference_of_proportions(row.always_fraction, row.n_features, base["always_fraction"], int(base["n_features"]))
                lines.append(f"- `{row.condition}` minus `{reference}`, always-shared fraction: {format_interval(*difference)}\n")
        lines.append("")
    lines.append("### Steering success by condition (cluster bootstrap over features, 95%)\n")
    if not any(not table.empty for table in success.values()):
        lines.append("No judged steering rows in this run.\n")
    for judge, table in success.items():
        if table.empty:
            lines.append(f"- {judge} judge: no scored rows (judge not run).\n")
            continue
        reference_rate = table.set_index("condition")["success_rate"].get(reference, float("nan"))
        no_ratio = "n/a (reference rate is 0)" if reference_rate == 0 else "n/a"
        rows = [
            [row.condition, format_interval(row.success_rate, row.ci_low, row.ci_high),
             no_ratio if pd.isna(row.ratio_to_reference) and row.condition != reference else format_interval(row.ratio_to_reference, row.ratio_ci_low, row.ratio_ci_high, 2),
             row.n_attempts, row.n_features]
            for row in table.itertuples()
        ]
        lines.append(f"**{judge} judge**\n")
        lines.append(markdown_table(["condition", "success rate", f"ratio to {reference}", "attempts", "features"], rows))
    lines.append("### Mean autointerp score by condition (detection; normal 95% intervals over features)\n")
    if autointerp.empty:
        lines.append("No autointerp outputs in this run.\n")
    else:
        rows = [
            [row.condition, format_interval(row.detection_mean, row.detection_ci_low, row.detection_ci_high), format_interval(row.fuzzing_mean, row.fuzzing_ci_low, row.fuzzing_ci_high), f"{row.n_scored}/{row.n_features}", row.backend]
            for row in autointerp.itertuples()
        ]
        lines.append(markdown_table(["condition", "detection", "fuzzing", "scored/selected", "backend"], rows))
        base = autointerp[autointerp["condition"] == reference]
        if not base.empty:
            base_row = base.iloc[0]
            for row in autointerp[autointerp["condition"] != reference].itertuples():
                difference = _difference_of_means(
                    row.detection_mean, row.detection_ci_low, row.detection_ci_high, base_row["detection_mean"], base_row["detection_ci_low"], base_row["detection_ci_high"]
                )
                lines.append(f"- `{row.condition}` minus `{reference}`, mean detection score: {format_interval(*difference)}\n")
        if autointerp["backend"].str.contains("offline").any():
            lines.append("\nNote: the `offline` autointerp backend is a non-LLM token-frequency baseline, not the paper's LLM judge.\n")
    return lines


def _section_claim3(coefficients: pd.DataFrame, judges: Sequence[str]) -> list[str]:
    lines = ["## Claim 3: with regularization, steering success is better predicted by the autointerp score\n"]
    lines.append(
        "Slope of `interp_score` per condition (logit and binomial GLM: log-odds per unit score; OLS: judge score per unit score), "
        "and the pooled model's `interp_score:condition[...]` terms (slope difference from the reference). 95% Wald intervals.\n"
    )
    for judge in judges:
        subset = coefficients[coefficients["judge"] == judge]
        lines.append(f"### {judge} judge\n")
        if subset.empty:
            lines.append("No fits.\n")
            continue
        rows = []
        for (model, scope), group in subset.groupby(["outcome_model", "scope"], sort=False):
            slopes = group[group["term"].str.startswith("interp_score")]
            if slopes.empty:
                rows.append([model, scope, "", "n/a", "", group["n"].iloc[0], group["message"].iloc[0]])
                continue
            for slope in slopes.itertuples():
                rows.append([model, scope, slope.term, format_interval(slope.estimate, slope.ci_low, slope.ci_high), f"{slope.p_value:.3g}", slope.n, slope.message or ""])
        lines.append(markdown_table(["model", "scope", "term", "estimate [95% CI]", "p", "n", "note"], rows))
    return lines


def _section_claim4(claim4: pd.DataFrame, robustness: pd.DataFrame, probing: pd.DataFrame, reference: str | None) -> list[str]:
    lines = ["## Claim 4: off-support L1 and L1/L2-ratio regularizers: more monosemantic, no reconstruction cost, robust to inference k\n"]
    if claim4.empty:
        return lines + ["No evaluate outputs in this run.\n"]
    lines.append("At the trained k (one seed per variant; monosemanticity proxies: mean over latents with enough firings, normal 95% intervals):\n")
    rows = [
        [row.variant, row.condition, f"{row.fvu:.4f}", format_interval(row.ce_loss_recovered, digits=4), f"{row.l0:.1f}", f"{row.effective_latents:.2f}", f"{row.l1_over_l2:.2f}",
         f"{row.dead_fraction:.3f}", f"{row.dense_fraction:.3f}", format_interval(row.top_token_mass_share, row.top_token_mass_share_ci_low, row.top_token_mass_share_ci_high),
         format_interval(row.token_entropy_bits, row.token_entropy_ci_low, row.token_entropy_ci_high, 2)]
        for row in claim4.itertuples()
    ]
    lines.append(markdown_table(
        ["variant", "condition", "FVU", "CE-loss recovered", "L0", "effective latents/token", "l1/l2", "dead", "dense", "top-token mass share (higher = more mono.)", "top-activation token entropy, bits (lower = more mono.)"],
        rows,
    ))
    reference_rows = claim4[claim4["condition"] == reference]
    if not reference_rows.empty:
        base = reference_rows.iloc[0]
        lines.append(f"Against the reference `{base['variant']}` ({reference}); monosemanticity differences with normal 95% intervals:\n")
        for row in claim4[claim4["condition"] != reference].itertuples():
            share = _difference_of_means(row.top_token_mass_share, row.top_token_mass_share_ci_low, row.top_token_mass_share_ci_high,
                                         base["top_token_mass_share"], base["top_token_mass_share_ci_low"], base["top_token_mass_share_ci_high"])
            entropy = _difference_of_means(row.token_entropy_bits, row.token_entropy_ci_low, row.token_entropy_ci_high,
                                           base["token_entropy_bits"], base["token_entropy_ci_low"], base["token_entropy_ci_high"])
            lines.append(
                f"- `{row.variant}` ({row.condition}): top-token mass share {format_interval(*share)}; token entropy {format_interval(*entropy, 2)} bits; "
                f"FVU {row.fvu - base['fvu']:+.4f}; CE-loss recovered {format_interval(row.ce_loss_recovered - base['ce_loss_recovered'] if row.ce_loss_recovered is not None and base['ce_loss_recovered'] is not None else None, digits=4)}; "
                f"effective latents/token {row.effective_latents - base['effective_latents']:+.2f}\n"
            )
        lines.append("")
    if not robustness.empty and robustness["multiplier"].notna().any():
        grid = robustness.dropna(subset=["multiplier"])
        multipliers = sorted(grid["multiplier"].unique())
        lines.append("k-robustness: FVU / CE-loss recovered at inference k' = multiplier x trained k:\n")
        rows = []
        for variant, group in grid.groupby("variant", sort=False):
            by_multiplier = group.set_index("multiplier")
            rows.append([variant, group["condition"].iloc[0]] + [
                f"{by_multiplier.loc[m, 'fvu']:.4f} / {format_interval(by_multiplier.loc[m, 'ce_loss_recovered'], digits=3)}" if m in by_multiplier.index else "n/a" for m in multipliers
            ])
        lines.append(markdown_table(["variant", "condition"] + [f"x{m:g} (k'={int(grid[grid['multiplier'] == m]['k_prime'].iloc[0])})" for m in multipliers], rows))
    if not probing.empty and "m" in probing.columns:
        fitted = probing[probing["m"].notna()]
        skipped = probing[probing["m"].isna()] if "m" in probing.columns else pd.DataFrame()
        if not fitted.empty:
            budgets = sorted(fitted["m"].astype(int).unique())
            lines.append("Sparse probing, test balanced accuracy with the top-m latents (token properties from the tokenizer):\n")
            rows = []
            for (variant, prop), group in fitted.groupby(["variant", "property"], sort=False):
                by_budget = group.set_index(group["m"].astype(int))
                rows.append([variant, prop] + [f"{by_budget.loc[m, 'test_balanced_accuracy']:.3f}" if m in by_budget.index else "n/a" for m in budgets])
            lines.append(markdown_table(["variant", "property"] + [f"m={m}" for m in budgets], rows))
        for row in skipped.itertuples():
            lines.append(f"- {row.variant}, {row.property}: {row.message}\n")
    return lines


def markdown_to_html(text: str, title: str) -> str:
    """A standalone HTML page for the markdown subset :func:`write_summary` emits (headings, pipe tables,
    ``- `` bullets, paragraphs, ``**bold**`` and ```code```), so the Snakemake report can show it inline."""
    import html

    def inline(fragment: str) -> str:
        escaped = html.escape(fragment)
        escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)

    body: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].rstrip()
        if not line:
            index += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
            index += 1
        elif line.startswith("|"):
            block = []
            while index < len(lines) and lines[index].startswith("|"):
                block.append([cell.strip() for cell in lines[index].strip().strip("|").split("|")])
                index += 1
            header, rows = block[0], [row for row in block[1:] if not all(set(cell) <= {"-", ":"} for cell in row)]
            body.append("<table><thead><tr>" + "".join(f"<th>{inline(cell)}</th>" for cell in header) + "</tr></thead><tbody>")
            body += ["<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in row) + "</tr>" for row in rows]
            body.append("</tbody></table>")
        elif line.startswith("- "):
            items = []
            while index < len(lines) and lines[index].startswith("- "):
                items.append(f"<li>{inline(lines[index][2:].strip())}</li>")
                index += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        else:
            paragraph = []
            while index < len(lines) and lines[index].strip() and not lines[index].startswith(("#", "|", "- ")):
                paragraph.append(lines[index].strip())
                index += 1
            body.append(f"<p>{inline(' '.join(paragraph))}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1em}th,td{border:1px solid #bbb;padding:3px 7px;font-size:0.9em}"
        "th{background:#eee}code{background:#f4f4f4}"
    )
    return f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"


def write_summary(
    path: str | Path,
    conditions: Mapping[str, str],
    reference: str | None,
    digits: pd.DataFrame,
    shared: pd.DataFrame,
    success: Mapping[str, pd.DataFrame],
    autointerp: pd.DataFrame,
    coefficients: pd.DataFrame,
    claim4: pd.DataFrame,
    robustness: pd.DataFrame,
    probing: pd.DataFrame,
    judges: Sequence[str],
    html_path: str | Path | None = None,
    digits_verdict: Mapping[str, Any] | None = None,
) -> str:
    """Write the markdown summary of every claim (and, with ``html_path``, the same as an HTML page); return the markdown."""
    lines = ["# sae-stability: results summary\n"]
    lines.append("Variants and their regularization condition (weight penalty + sparsity regularizer):\n")
    lines.append(markdown_table(["variant", "condition"], [[variant, condition] for variant, condition in conditions.items()]))
    lines += _section_claim1(digits, digits_verdict)
    lines += _section_claim2(shared, success, autointerp, reference)
    lines += _section_claim3(coefficients, judges)
    lines += _section_claim4(claim4, robustness, probing, reference)
    text = re.sub(r"(?m)^(- .*)\n\n(?=- )", r"\1\n", "\n".join(lines))  # bullets of one list on consecutive lines
    write_text(path, text)
    if html_path is not None:
        write_text(html_path, markdown_to_html(text, "sae-stability: results summary"))
    return text


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
    settings: Mapping[str, Any],
    digits_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    digits_summary: str | None = None,
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

    Returns:
        The coefficient table.
    """
    judges = list(settings["judges"])
    rows = load_steering_rows(variant_inputs)
    conditions = {variant: inputs["condition"] for variant, inputs in variant_inputs.items()}
    reference = reference_condition(list(conditions.values()), settings.get("reference_condition")) if conditions else None
    logger.info("regress: %d steering rows from %d variants; reference condition %s", len(rows), rows["variant"].nunique() if len(rows) else 0, reference)

    coefficients, fitted = fit_all_models(rows, settings, reference)
    for message in coefficients.loc[coefficients["term"] == "", "message"]:
        logger.warning("regress: %s", message)
    order = [reference] + [condition for condition in dict.fromkeys(conditions.values()) if condition != reference]
    success = {
        judge: _in_condition_order(steering_success_by_condition(judge_frames(rows, judge)[1], reference, int(settings["bootstrap_samples"]), int(settings["seed"])), order)
        for judge in judges
    }
    shared = shared_fraction_by_condition(variant_inputs)
    digits = shared_fraction_by_condition(digits_inputs or {})
    digits_verdict = json.loads(Path(digits_summary).read_text()) if digits_summary else None
    autointerp = _in_condition_order(autointerp_by_condition(variant_inputs), order)
    claim4, robustness, probing = evaluate_table(variant_inputs)
    curves = load_training_curves(variant_inputs)

    write_dataframe(outputs["coefficients"], coefficients)
    success_table = pd.concat([table.assign(judge=judge) for judge, table in success.items() if not table.empty], ignore_index=True) if any(not t.empty for t in success.values()) else pd.DataFrame(columns=["judge", "condition", "success_rate"])
    write_dataframe(outputs["steering_success"], success_table)
    write_dataframe(outputs["shared_fraction"], shared if not shared.empty else pd.DataFrame(columns=["variant", "condition", "always_fraction"]))
    write_dataframe(outputs["autointerp"], autointerp if not autointerp.empty else pd.DataFrame(columns=["condition", "detection_mean"]))
    write_dataframe(outputs["claim4"], claim4 if not claim4.empty else pd.DataFrame(columns=["variant", "condition", "fvu"]))
    write_dataframe(outputs["k_robustness"], robustness if not robustness.empty else pd.DataFrame(columns=["variant", "condition", "multiplier", "fvu"]))

    plot_shared_fraction(outputs["plot_shared_fraction"], shared)
    plot_steering_success(outputs["plot_steering_success"], success)
    plot_success_vs_interp(outputs["plot_success_vs_interp"], rows, fitted, judges, int(settings["plot_bins"]))
    plot_training_curves(outputs["plot_training_curves"], curves, settings["curve_metrics"])
    plot_k_robustness(outputs["plot_k_robustness"], robustness)
    plot_probing(outputs["plot_probing"], probing)
    write_summary(outputs["summary"], conditions, reference, digits, shared, success, autointerp, coefficients, claim4, robustness, probing, judges, outputs.get("summary_html"), digits_verdict)
    return coefficients
