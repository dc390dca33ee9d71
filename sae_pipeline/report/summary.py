"""The run's results summary: one markdown section per claim of ../shared/SPEC.md, plus an HTML page.

Intervals: Wilson 95% intervals for shared fractions (features as trials); for steering success, a
cluster bootstrap over features of the pooled success rate and of its ratio to the reference
condition; normal-approximation 95% intervals for means of per-feature scores and their differences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from sae_pipeline.data.atomic import write_text
from sae_pipeline.report.html import markdown_to_html
from sae_pipeline.report.tables import format_interval, markdown_table
from sae_pipeline.stats.intervals import difference_of_means, difference_of_proportions


@dataclass
class JudgesReport:
    """What the summary says about its judges: accuracy on held-out labelled cases, and positive controls.

    Attributes:
        accuracy: the judge-accuracy stage's table (judge, model, task, metric, value, n).
        autointerp_controls: planted single-token features scored like SAE features (one table per variant, concatenated).
        steer_controls: steering rows along unembedding directions, judged like features.
    """

    accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)
    autointerp_controls: pd.DataFrame = field(default_factory=pd.DataFrame)
    steer_controls: pd.DataFrame = field(default_factory=pd.DataFrame)


# Below these a judge's known-answer accuracy, or a positive control, limits what its results can say.
TRUSTED_ACCURACY = 0.8
# The known-answer tasks that stand for what each judge decides in the pipeline.
JUDGE_ROLES = {"embedding": ("steering_threshold",), "lm": ("detection", "ranking", "steering")}
TRUSTED_CONTROL = 0.7


def _section_judges(report: JudgesReport, judges: Sequence[str]) -> list[str]:
    lines = ["## Judges: accuracy on held-out labelled cases, and positive controls\n"]
    limits = []
    if report.accuracy.empty:
        lines.append("No judge accuracy was measured in this run.\n")
    else:
        rows = [[row.judge, row.model, row.task, row.metric, f"{row.value:.3f}", row.n] for row in report.accuracy.itertuples()]
        lines.append("Each judge scored on sentences with known answers (`sae_pipeline/judges/cases.py`, none from the corpus):\n")
        lines.append(markdown_table(["judge", "model", "task", "metric", "value", "cases"], rows))
        for row in report.accuracy.itertuples():
            if row.task in JUDGE_ROLES.get(row.judge, ()) and row.metric != "auroc" and row.value < TRUSTED_ACCURACY:
                limits.append(f"the {row.judge} judge's {row.task} {row.metric} on known answers is {row.value:.2f} (below {TRUSTED_ACCURACY}): its {row.task} results are noisy")
    if not report.autointerp_controls.empty:
        controls = report.autointerp_controls
        detection = pd.to_numeric(controls["detection_score"], errors="coerce")
        lines.append("Autointerp positive controls (planted single-token features, explained and scored by the run's backend):\n")
        rows = [[row.variant, row.control_token, row.explanation, format_interval(row.detection_score), format_interval(row.fuzzing_score)] for row in controls.itertuples()]
        lines.append(markdown_table(["variant", "planted token", "explanation found", "detection", "fuzzing"], rows))
        if detection.notna().any() and detection.mean() < TRUSTED_CONTROL:
            limits.append(f"autointerp scores planted single-token features at {detection.mean():.2f} on average (below {TRUSTED_CONTROL}): low feature scores may be the judge's")
    if not report.steer_controls.empty:
        controls = report.steer_controls
        lines.append("Steering positive controls (the unit unembedding vector of a word, at the features' strength, judged like features):\n")
        rows = []
        for judge in judges:
            column = f"{judge}_success"
            if column not in controls or not controls[column].notna().any():
                continue
            rate = float(controls[column].astype("Float64").mean())
            rows.append([judge, format_interval(rate), int(controls[column].notna().sum()), ", ".join(sorted(controls["explanation"].astype(str).unique()))])
            if rate < TRUSTED_CONTROL:
                limits.append(f"the {judge} judge calls only {rate:.2f} of known-good steering (unembedding directions) a success: a low feature success rate under it is weak evidence")
        lines.append(markdown_table(["judge", "control success rate", "attempts", "words"], rows) if rows else "No judged control rows.\n")
    if limits:
        lines.append("**Limits of this run's judges:**\n")
        lines += [f"- {limit}\n" for limit in limits]
    lines.append("")
    return lines


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
            difference = format_interval(*difference_of_proportions(a["always_fraction"], int(a["n_features"]), b["always_fraction"], int(b["n_features"])))
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
                difference = difference_of_proportions(row.always_fraction, row.n_features, base["always_fraction"], int(base["n_features"]))
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
                difference = difference_of_means(
                    row.detection_mean, row.detection_ci_low, row.detection_ci_high, base_row["detection_mean"], base_row["detection_ci_low"], base_row["detection_ci_high"]
                )
                lines.append(f"- `{row.condition}` minus `{reference}`, mean detection score: {format_interval(*difference)}\n")
        if autointerp["backend"].str.contains("offline").any():
            lines.append("\nNote: the `offline` autointerp backend is a non-LLM token-frequency baseline, not the paper's LLM judge.\n")
    return lines


def _section_stability(stability: pd.DataFrame | None) -> list[str]:
    """Threshold-free, per-feature and subspace stability per condition (README "Stability measures")."""
    lines = ["## Stability beyond the shared fraction: PW-MCC, reappearance, subspaces\n"]
    if stability is None or stability.empty:
        lines.append("No stability measures in this run's match outputs.\n")
        return lines
    lines.append(
        "PW-MCC: mean |cos| of latents matched one-to-one (optimal assignment), over seed pairs; shared per pair at "
        "the match threshold; brackets are 95% intervals from resampling seeds (with 3 seeds they span the pairs' "
        "own spread). Reappearance: share of the other seeds in which a reference feature is shared, with Spearman's "
        "rho against log firing frequency, the autointerp detection score and the latent's reconstruction "
        "contribution (share of the variance lost when it alone is dropped; evaluate stage, same seed).\n"
    )
    rows = [
        [row.condition, row.n_seeds, format_interval(row.pw_mcc_decoder, row.pw_mcc_decoder_low, row.pw_mcc_decoder_high),
         format_interval(row.pw_mcc_encoder, row.pw_mcc_encoder_low, row.pw_mcc_encoder_high),
         format_interval(row.pair_fraction_shared, row.pair_fraction_shared_low, row.pair_fraction_shared_high),
         format_interval(row.reappearance_mean), format_interval(row.rho_firing_frequency, digits=2), format_interval(row.rho_interp_score, digits=2),
         format_interval(row.rho_reconstruction_contribution, digits=2)]
        for row in stability.itertuples()
    ]
    lines.append(markdown_table(["condition", "seeds", "PW-MCC decoder", "PW-MCC encoder", "shared per pair", "reappearance (mean)",
                                 "rho vs firing freq.", "rho vs interp score", "rho vs reconstruction contribution"], rows))
    if "agreement_shared" in stability.columns:
        lines.append("Explanation agreement: cosine (all-MiniLM-L6-v2) between a feature's explanation and those of its one-to-one "
                     "decoder partners in the other seeds (`autointerp.partner_seeds`), mean over interpreted features [normal 95%]:\n")
        rows = [[row["condition"], f"{format_interval(row['agreement_shared'], row['agreement_shared_low'], row['agreement_shared_high'])} (n={row['agreement_shared_n']})",
                 f"{format_interval(row['agreement_never'], row['agreement_never_low'], row['agreement_never_high'])} (n={row['agreement_never_n']})"]
                for _, row in stability.iterrows()]
        lines.append(markdown_table(["condition", "shared in some pair", "never shared"], rows))
    ranks = sorted({int(column[len("overlap_r"):]) for column in stability.columns if column.startswith("overlap_r") and column[len("overlap_r"):].isdigit()})
    if ranks:
        lines.append("Subspace overlap of the features *not* shared in a pair, (1/r)||U_a^T U_b||_F^2 of their top-r decoder "
                     "subspaces (1 = the same subspace; random subspaces give r/d), mean over pairs [seed-resampled 95%]:\n")
        rows = [
            [row["condition"]] + [f"{format_interval(row[f'overlap_r{rank}'], row[f'overlap_r{rank}_low'], row[f'overlap_r{rank}_high'])} (random {row[f'overlap_r{rank}_baseline']:.3f})"
                                  if pd.notna(row.get(f"overlap_r{rank}")) else "n/a" for rank in ranks]
            for _, row in stability.iterrows()
        ]
        lines.append(markdown_table(["condition"] + [f"r = {rank}" for rank in ranks], rows))
    lines += _exclusion_lines(stability)
    return lines


def _exclusion_lines(stability: pd.DataFrame) -> list[str]:
    """Per condition, how many of the reference seed's latents each stage leaves out, and why."""
    if "excluded_match" not in stability.columns:
        return []
    lines = ["Latents each stage leaves out (reference seed):\n"]
    rows = []
    for _, row in stability.iterrows():
        cells = [row["condition"], _count(row.get("n_latents")), f"{_count(row['excluded_match'])}: {row['excluded_match_reason']}"]
        if pd.notna(row.get("evaluate_tokens")):
            cells += [f"{_count(row['never_fired_on_evaluate_tokens'])} of {_count(row['n_latents'])} never fired on its {_count(row['evaluate_tokens'])} hold-out tokens",
                      f"{_count(row['unscored_by_proxies'])} (fewer than {_count(row['proxy_min_activations'])} firings there)"]
        else:
            cells += ["n/a", "n/a"]
        rows.append(cells)
    lines.append(markdown_table(["condition", "latents", "match: excluded as dead", "evaluate: silent on its tokens (not excluded)",
                                 "evaluate: left out of the monosemanticity proxies"], rows))
    return lines


def _count(value: Any) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{int(value):,}"


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
    lines.append("At the trained k (one seed per variant, on the evaluate stage's hold-out tokens; \"never fired on these tokens\" is "
                 "silence on those tokens, not death: the match stage's dead latents are counted over the training window, "
                 "see the stability section; monosemanticity proxies: mean over latents with enough firings, normal 95% intervals):\n")
    rows = [
        [row.variant, row.condition, f"{row.fvu:.4f}", format_interval(row.ce_loss_recovered, digits=4), f"{row.l0:.1f}", f"{row.effective_latents:.2f}", f"{row.l1_over_l2:.2f}",
         f"{row.dead_fraction:.3f}", f"{row.dense_fraction:.3f}", format_interval(row.top_token_mass_share, row.top_token_mass_share_ci_low, row.top_token_mass_share_ci_high),
         format_interval(row.token_entropy_bits, row.token_entropy_ci_low, row.token_entropy_ci_high, 2)]
        for row in claim4.itertuples()
    ]
    lines.append(markdown_table(
        ["variant", "condition", "FVU", "CE-loss recovered", "L0", "effective latents/token", "l1/l2", "never fired on these tokens", "dense", "top-token mass share (higher = more mono.)", "top-activation token entropy, bits (lower = more mono.)"],
        rows,
    ))
    reference_rows = claim4[claim4["condition"] == reference]
    if not reference_rows.empty:
        base = reference_rows.iloc[0]
        lines.append(f"Against the reference `{base['variant']}` ({reference}); monosemanticity differences with normal 95% intervals:\n")
        for row in claim4[claim4["condition"] != reference].itertuples():
            share = difference_of_means(row.top_token_mass_share, row.top_token_mass_share_ci_low, row.top_token_mass_share_ci_high,
                                         base["top_token_mass_share"], base["top_token_mass_share_ci_low"], base["top_token_mass_share_ci_high"])
            entropy = difference_of_means(row.token_entropy_bits, row.token_entropy_ci_low, row.token_entropy_ci_high,
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
    judges_report: "JudgesReport | None" = None,
    stability: pd.DataFrame | None = None,
    claim4_sweep: str | None = None,
) -> str:
    """Write the markdown summary of every claim (and, with ``html_path``, the same as an HTML page); return the markdown."""
    lines = ["# sae-stability: results summary\n"]
    lines.append("Variants and their regularization condition (weight penalty + sparsity regularizer):\n")
    lines.append(markdown_table(["variant", "condition"], [[variant, condition] for variant, condition in conditions.items()]))
    lines += _section_judges(judges_report or JudgesReport(), judges)
    lines += _section_claim1(digits, digits_verdict)
    lines += _section_claim2(shared, success, autointerp, reference)
    lines += _section_stability(stability)
    lines += _section_claim3(coefficients, judges)
    lines += _section_claim4(claim4, robustness, probing, reference)
    if claim4_sweep:
        lines.append(claim4_sweep.rstrip() + "\n")
    text = re.sub(r"(?m)^(- .*)\n\n(?=- )", r"\1\n", "\n".join(lines))  # bullets of one list on consecutive lines
    write_text(path, text)
    if html_path is not None:
        write_text(html_path, markdown_to_html(text, "sae-stability: results summary"))
    return text
