"""Does the autointerp score predict steering success, and does regularization change that?

Unit of analysis (statsmodels, formula interface):

- ``logit_row``: one row per (feature, prompt) steering attempt; ``success ~ interp_score`` (logit),
  standard errors clustered by feature (a feature's attempts share its direction and strength).
- ``binomial_feature``: one row per feature; successes out of its judged prompts, binomial GLM
  (logit link) on ``interp_score``; when Pearson's chi^2 / df exceeds 1 it is used as the dispersion
  (quasi-binomial), so intervals widen when a feature's prompts succeed or fail together.
- ``ols_feature``: one row per feature; the feature's mean judge score (embedding cosine or LLM 1-5
  score), OLS on ``interp_score``.

Each is fitted per regularization condition (:class:`sae_pipeline.layout.Condition` label of the
variant, e.g. ``l2w1e-03+noreg``; variants that share a condition are pooled) and once over all
conditions with the interaction ``interp_score * condition`` (treatment coding against the reference
condition). ``share_count`` is an optional covariate; it is left out, with a note, where it does not
vary. Claim 3 is the per-condition slope of ``interp_score`` and the pooled
``interp_score:condition[...]`` terms (slope differences).

A fit that cannot be made (too few rows, a constant outcome or predictor, a single condition for the
pooled model, complete separation of successes from failures, a failed or non-converged optimisation,
non-finite estimates) produces one row whose ``message`` says why, and empty numbers; it never raises.
Steering success rates per condition get a cluster bootstrap over features (prompts of one feature
are not independent), also for their ratio to the reference condition.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import pandas as pd

from sae_pipeline.layout import reference_condition
from sae_pipeline.settings import OUTCOME_MODELS, RegressSettings
from sae_pipeline.stats.intervals import cluster_bootstrap_rate

JUDGE_COLUMNS = {"embedding": ("embedding_success", "embedding_score"), "llm": ("llm_success", "llm_score"), "lm": ("lm_success", "lm_score")}
COEFFICIENT_COLUMNS = [
    "outcome_model", "judge", "scope", "term", "estimate", "ci_low", "ci_high", "p_value",
    "pseudo_r2", "pseudo_r2_kind", "n", "n_features", "formula", "message",
]


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
    from statsmodels.tools.sm_exceptions import (
        ConvergenceWarning,
        PerfectSeparationError,
        PerfectSeparationWarning,
    )

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


def fit_all_models(rows: pd.DataFrame, settings: RegressSettings | Mapping[str, Any], reference: str | None = None) -> tuple[pd.DataFrame, dict[tuple[str, str, str], Any]]:
    """Every (judge, outcome model, scope) fit; returns the coefficient table and the fitted results
    keyed by ``(judge, outcome_model, scope)`` (scope = a condition or ``"pooled"``). Pooled fits
    contrast against ``reference`` (default: chosen among the conditions of ``rows``)."""
    settings = RegressSettings.from_mapping(settings)
    table: list[dict[str, Any]] = []
    fitted: dict[tuple[str, str, str], Any] = {}
    conditions = sorted(rows["condition"].unique()) if len(rows) else []
    if reference is None and conditions:
        reference = reference_condition(conditions, settings.reference_condition)
    for judge in settings.judges:
        row_frame, feature_frame = judge_frames(rows, judge)
        if row_frame.empty:
            table.append(_message_row({"judge": judge, "scope": "all", "outcome_model": "all", "n": 0, "n_features": 0}, f"skipped: no steering rows scored by the {judge} judge (judge not run, or every answer unparseable)"))
            continue
        for outcome_model in settings.models:
            frame = row_frame if outcome_model == "logit_row" else feature_frame
            min_n = settings.min_rows if outcome_model == "logit_row" else settings.min_features
            scopes = [(condition, frame[frame["condition"] == condition], False) for condition in conditions] + [("pooled", frame, True)]
            for scope, subset, pooled in scopes:
                new_rows, result = fit_outcome_model(
                    subset, outcome_model, pooled, reference, settings.share_count_covariate, min_n, {"judge": judge, "scope": scope}, settings.min_events
                )
                table.extend(new_rows)
                if result is not None:
                    fitted[(judge, outcome_model, scope)] = result
    return pd.DataFrame(table, columns=COEFFICIENT_COLUMNS), fitted


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
