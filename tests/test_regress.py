"""Regress stage: fitted coefficients recover known ones within their intervals, degenerate inputs give
clear messages (never a crash or a silent NaN), and a whole run writes its tables, summary and plots."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.layout import REGRESS_OUTPUTS, reference_condition
from sae_pipeline.stages.regress import run_regression
from sae_pipeline.stats.intervals import cluster_bootstrap_rate, wilson_interval
from sae_pipeline.stats.regression import (
    completely_separated,
    fit_all_models,
    fit_outcome_model,
    judge_frames,
    steering_success_by_condition,
)

SETTINGS = {
    "judges": ["embedding", "llm"],
    "models": ["logit_row", "binomial_feature", "ols_feature"],
    "share_count_covariate": True,
    "reference_condition": None,
    "min_rows": 20,
    "min_features": 10,
    "min_events": 5,
    "bootstrap_samples": 400,
    "seed": 0,
    "plot_bins": 5,
    "curve_metrics": ["fvu", "l0", "dead_fraction"],
}

# condition -> (intercept, interp slope) of the true logit, and (intercept, slope) of the true mean embedding score
TRUTH = {"l2w0+noreg": ((-1.0, 1.0), (0.2, 0.1)), "l2w1e-03+noreg": ((-2.0, 4.0), (0.1, 0.5))}


def synthetic_rows(n_features: int = 250, n_prompts: int = 8, seed: int = 0, truth=TRUTH) -> pd.DataFrame:
    """Steering rows in the steer stage's layout, drawn from known logits (no feature-level effects)."""
    rng = np.random.default_rng(seed)
    frames = []
    for variant_index, (condition, ((a, b), (c, d))) in enumerate(truth.items()):
        interp = rng.random(n_features)
        share = rng.integers(0, 4, n_features)
        feature = np.repeat(np.arange(n_features), n_prompts)
        x = np.repeat(interp, n_prompts)
        success = rng.random(x.size) < 1 / (1 + np.exp(-(a + b * x)))
        score = c + d * x + rng.normal(0, 0.05, x.size)
        frames.append(
            pd.DataFrame(
                {
                    "variant": f"variant{variant_index}",
                    "condition": condition,
                    "feature": feature,
                    "category": "sometimes",
                    "share_count": np.repeat(share, n_prompts),
                    "interp_score": x,
                    "prompt": np.tile([f"prompt {i}" for i in range(n_prompts)], n_features),
                    "embedding_score": score,
                    "embedding_success": pd.array(success, dtype="boolean"),
                    "llm_score": pd.array([pd.NA] * x.size, dtype="Int64"),
                    "llm_success": pd.array([pd.NA] * x.size, dtype="boolean"),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def slope_row(table: pd.DataFrame, model: str, scope: str, term: str = "interp_score") -> pd.Series:
    match = table[(table["outcome_model"] == model) & (table["scope"] == scope) & (table["term"] == term) & (table["judge"] == "embedding")]
    assert len(match) == 1, table[(table["outcome_model"] == model) & (table["scope"] == scope)]
    return match.iloc[0]


def test_known_coefficients_fall_within_their_intervals():
    rows = synthetic_rows()
    table, fitted = fit_all_models(rows, {**SETTINGS, "share_count_covariate": False})
    for condition, ((a, b), (c, d)) in TRUTH.items():
        for model in ("logit_row", "binomial_feature"):
            slope, intercept = slope_row(table, model, condition), slope_row(table, model, condition, "Intercept")
            assert slope["ci_low"] <= b <= slope["ci_high"], (model, condition, slope)
            assert intercept["ci_low"] <= a <= intercept["ci_high"], (model, condition, intercept)
        ols = slope_row(table, "ols_feature", condition)
        assert ols["ci_low"] <= d <= ols["ci_high"]
    # pooled interaction: the slope difference between the conditions
    interaction = slope_row(table, "logit_row", "pooled", "interp_score:condition[l2w1e-03+noreg]")
    assert interaction["ci_low"] <= 3.0 <= interaction["ci_high"]
    assert interaction["p_value"] < 0.001
    assert "reference condition l2w0+noreg" in interaction["message"]
    # the logit and the binomial GLM on the same attempts give the same estimates
    assert slope_row(table, "binomial_feature", "l2w0+noreg")["estimate"] == pytest.approx(slope_row(table, "logit_row", "l2w0+noreg")["estimate"], rel=1e-4)
    assert 0 < slope_row(table, "logit_row", "pooled")["pseudo_r2"] < 1
    assert ("embedding", "logit_row", "l2w0+noreg") in fitted


def test_share_count_covariate_is_estimated_and_dropped_when_constant():
    rows = synthetic_rows(n_features=120)
    table, _ = fit_all_models(rows, SETTINGS)
    share = slope_row(table, "logit_row", "l2w0+noreg", "share_count")
    assert share["ci_low"] <= 0.0 <= share["ci_high"]  # the truth has no share_count effect
    rows["share_count"] = 2
    table, _ = fit_all_models(rows, SETTINGS)
    assert "share_count left out" in slope_row(table, "logit_row", "l2w0+noreg")["message"]


def test_llm_judge_not_run_gives_a_message_row():
    table, _ = fit_all_models(synthetic_rows(n_features=30), SETTINGS)
    llm = table[table["judge"] == "llm"]
    assert len(llm) == 1 and "no steering rows scored by the llm judge" in llm["message"].iloc[0]


def test_no_silent_nans():
    rows = synthetic_rows(n_features=30)
    rows.loc[rows["condition"] == "l2w0+noreg", "embedding_success"] = True  # degenerate condition
    table, _ = fit_all_models(rows, SETTINGS)
    missing = table["estimate"].isna()
    assert missing.any()
    assert (table.loc[missing, "message"].str.len() > 0).all()


def base_frame(n: int, success: np.ndarray, interp: np.ndarray, condition: str = "a") -> pd.DataFrame:
    return pd.DataFrame({"variant": "v", "feature": np.arange(n), "condition": condition, "interp_score": interp, "share_count": 0.0, "success": success.astype(int)})


@pytest.mark.parametrize(
    "frame, pooled, expected",
    [
        (base_frame(40, np.ones(40), np.linspace(0, 1, 40)), False, "all 40 steering attempts are successes"),
        (base_frame(40, np.zeros(40), np.linspace(0, 1, 40)), False, "all 40 steering attempts are failures"),
        (base_frame(5, np.array([0, 1, 0, 1, 1]), np.linspace(0, 1, 5)), False, "5 rows, fewer than regress.min_n=20"),
        (base_frame(40, np.arange(40) >= 20, np.linspace(0, 1, 40)), False, "complete separation"),
        (base_frame(40, np.arange(40) % 2, np.full(40, 0.5)), False, "interp_score takes the single value 0.5"),
        (base_frame(40, np.arange(40) % 3 == 0, np.linspace(0, 1, 40)), True, "only one condition (a)"),
    ],
)
def test_degenerate_inputs_give_clear_messages(frame, pooled, expected):
    rows, result = fit_outcome_model(frame, "logit_row", pooled, "a", True, 20, {"judge": "embedding", "scope": "x"})
    assert result is None and len(rows) == 1
    assert expected in rows[0]["message"]
    assert rows[0]["estimate"] is None and rows[0]["term"] == ""


def test_binomial_separation_and_constant_ols_scores():
    features = pd.DataFrame(
        {"variant": "v", "feature": np.arange(20), "condition": "a", "interp_score": np.linspace(0, 1, 20), "share_count": 0.0,
         "successes": np.where(np.arange(20) >= 10, 8, 0), "trials": 8, "mean_score": 0.3}
    )
    features["failures"] = features["trials"] - features["successes"]
    rows, _ = fit_outcome_model(features, "binomial_feature", False, None, False, 10, {})
    assert "complete separation" in rows[0]["message"]
    rows, _ = fit_outcome_model(features, "ols_feature", False, None, False, 10, {})
    assert "mean judge score is 0.3 for every feature" in rows[0]["message"]


def test_completely_separated_lp():
    design = np.column_stack([np.ones(6), [0.0, 1, 2, 3, 4, 5]])
    assert completely_separated(design, np.array([0, 0, 0, 1, 1, 1]))
    assert not completely_separated(design, np.array([0, 1, 0, 1, 0, 1]))


def test_intervals_match_hand_computation():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    draws = cluster_bootstrap_rate(np.array([2, 4, 6]), np.array([4, 8, 12]), 100, np.random.default_rng(0))
    assert draws == pytest.approx(np.full(100, 0.5))  # every feature has rate 0.5, so every resample does
    features = pd.DataFrame({"condition": ["a", "a", "b", "b"], "successes": [1, 1, 2, 2], "trials": [4, 4, 4, 4]})
    table = steering_success_by_condition(features, "a", 200, 0).set_index("condition")
    assert table.loc["a", "success_rate"] == 0.25 and table.loc["b", "success_rate"] == 0.5
    assert table.loc["b", "ratio_to_reference"] == pytest.approx(2.0)
    assert table.loc["b", "ratio_ci_low"] == pytest.approx(2.0) and math.isnan(table.loc["a", "ratio_to_reference"])


def test_reference_condition_choice():
    assert reference_condition(["l2w1e-03+noreg", "l2w0+noreg", "l2w0+off_support_l11e-03"], None) == "l2w0+noreg"
    assert reference_condition(["l1w1e-04+noreg", "nopen+noreg"], None) == "nopen+noreg"
    assert reference_condition(["b", "a"], None) == "a"
    with pytest.raises(ValueError, match="regress.reference_condition 'c'"):
        reference_condition(["a", "b"], "c")


def test_judge_frames_aggregate_per_feature():
    rows = synthetic_rows(n_features=3, n_prompts=4)
    row_frame, feature_frame = judge_frames(rows, "embedding")
    assert len(row_frame) == 24 and len(feature_frame) == 6
    first = rows[(rows["variant"] == "variant0") & (rows["feature"] == 0)]
    record = feature_frame[(feature_frame["variant"] == "variant0") & (feature_frame["feature"] == 0)].iloc[0]
    assert record["successes"] == int(first["embedding_success"].sum()) and record["trials"] == 4
    assert record["mean_score"] == pytest.approx(first["embedding_score"].mean())


OUTPUT_NAMES = REGRESS_OUTPUTS


def write_stage_inputs(folder, rows: pd.DataFrame) -> dict:
    """Fabricated outputs of match, autointerp, steer, train and evaluate for each variant in ``rows``."""
    rng = np.random.default_rng(1)
    inputs = {}
    for variant, group in rows.groupby("variant"):
        condition = group["condition"].iloc[0]
        base = folder / variant
        base.mkdir(parents=True)
        group.drop(columns=["variant", "condition"]).to_parquet(base / "rows.parquet")
        categories = rng.choice(["always", "sometimes", "never"], 200, p=[0.5, 0.2, 0.3] if "1e-03" in condition else [0.2, 0.3, 0.5])
        included = np.arange(200) % 20 != 0  # every 20th latent dead and left out of matching
        categories = np.where(included, categories, "dead")
        pd.DataFrame({"feature": np.arange(200), "included": included, "share_count": 0, "category": categories}).to_parquet(base / "features.parquet")
        (base / "summary.json").write_text(json.dumps({"mean_over_pairs": {"mmcs_decoder": 0.8, "mmcs_encoder": 0.7, "fraction_paired_decoder": 0.6, "fraction_shared": 0.4}}))
        pd.DataFrame({"feature": np.arange(50), "detection_score": rng.random(50), "fuzzing_score": rng.random(50), "backend": "offline_token_baseline"}).to_parquet(base / "scores.parquet")
        group_dir = base / "seeds0-1"
        group_dir.mkdir()
        pd.DataFrame({"step": np.tile(np.arange(10), 2), "seed": np.repeat([0, 1], 10), "fvu": np.linspace(1, 0.2, 20), "l0": 16.0, "dead_fraction": 0.1}).to_parquet(group_dir / "curves.parquet")
        metrics = {
            "n_tokens": 1000,
            "at_trained_k": {"fvu": 0.2, "mse": 0.1, "l0": 16.0, "ce_loss": 3.0, "ce_loss_recovered": 0.9},
            "effective_latents_per_token": {"mean": 9.5}, "l1_over_l2": {"mean": 3.2},
            "firing": {"dead_fraction": 0.01, "dense_fraction": 0.0},
            "monosemanticity": {"scored_latents": 900, "top_token_mass_share": {"mean": 0.4, "ci_low": 0.38, "ci_high": 0.42},
                                "top_activation_token_entropy_bits": {"mean": 2.1, "ci_low": 2.0, "ci_high": 2.2}},
        }
        (base / "metrics.json").write_text(json.dumps(metrics))
        pd.DataFrame({"inference": ["k'=8", "k'=16", "k'=32"], "multiplier": [0.5, 1.0, 2.0], "k_prime": [8, 16, 32],
                      "fvu": [0.3, 0.2, 0.25], "ce_loss_recovered": [0.8, 0.9, 0.85]}).to_csv(base / "k_robustness.csv", index=False)
        pd.DataFrame({"property": ["word_start", "word_start", "punctuation"], "m": [1, 2, None], "test_balanced_accuracy": [0.7, 0.8, None],
                      "message": [None, None, "skipped: 3 tokens in the smaller class"]}).to_csv(base / "probing.csv", index=False)
        inputs[variant] = {
            "condition": condition, "steer_rows": str(base / "rows.parquet"), "match_features": str(base / "features.parquet"),
            "match_summary": str(base / "summary.json"), "autointerp_scores": str(base / "scores.parquet"), "sae_group_dirs": [str(group_dir)],
            "evaluate_metrics": str(base / "metrics.json"), "evaluate_k_robustness": str(base / "k_robustness.csv"), "evaluate_probing": str(base / "probing.csv"),
        }
    return inputs


def test_run_regression_writes_every_output(tmp_path):
    inputs = write_stage_inputs(tmp_path / "in", synthetic_rows(n_features=60, n_prompts=8))
    outputs = {name: str(tmp_path / "out" / file) for name, file in OUTPUT_NAMES.items()}
    coefficients = run_regression(inputs, outputs, SETTINGS)
    for name, path in outputs.items():
        if path.endswith(".png"):
            assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
    assert pd.read_csv(outputs["coefficients"]).shape[0] == len(coefficients)
    summary = open(outputs["summary"]).read()
    page = open(outputs["summary_html"]).read()
    assert page.count("<h2>") == summary.count("\n## ") + summary.startswith("## ") and "<table>" in page
    assert "- `variant1` (l2w1e-03+noreg): top-token mass share 0.000 [-0.028, 0.028]" in summary  # equal fabricated metrics: difference 0
    for heading in ("## Claim 1", "## Claim 2", "## Claim 3", "## Claim 4", "k-robustness", "Sparse probing", "non-LLM"):
        assert heading in summary, heading
    success = pd.read_csv(outputs["steering_success"]).set_index("condition")
    rows = synthetic_rows(n_features=60, n_prompts=8)
    expected = rows[rows["condition"] == "l2w1e-03+noreg"]["embedding_success"].astype(float).mean()
    assert success.loc["l2w1e-03+noreg", "success_rate"] == pytest.approx(expected)
    assert f"{expected:.3f} [" in summary
    shared = pd.read_csv(outputs["shared_fraction"]).set_index("condition")
    matched = pd.read_parquet(inputs["variant0"]["match_features"])
    assert shared.loc["l2w0+noreg", "n_features"] == 190
    assert shared.loc["l2w0+noreg", "always_fraction"] == pytest.approx((matched["category"] == "always").sum() / 190)
    assert shared.loc["l2w0+noreg", "mmcs_decoder"] == 0.8 and "| 0.400 | 0.800 | 0.700 | 190 |" in summary


def test_run_regression_with_degenerate_input_still_reports(tmp_path):
    rows = synthetic_rows(n_features=8, n_prompts=3, truth={"l2w0+noreg": ((5.0, 0.0), (0.2, 0.1))})
    rows["embedding_success"] = pd.array([True] * len(rows), dtype="boolean")  # every attempt succeeds
    inputs = write_stage_inputs(tmp_path / "in", rows)
    outputs = {name: str(tmp_path / "out" / file) for name, file in OUTPUT_NAMES.items()}
    coefficients = run_regression(inputs, outputs, SETTINGS)
    assert coefficients["estimate"].isna().all()
    messages = " ".join(coefficients["message"])
    assert "all 24 steering attempts are successes" in messages and "only one condition" in messages and "fewer than regress.min_n=10" in messages
    summary = open(outputs["summary"]).read()
    assert "only one condition" in summary


def test_feature_level_correlation_widens_row_level_intervals():
    """When every prompt of a feature succeeds or fails together, the attempts carry one feature's worth of
    information: the clustered row-level interval must be wider than a naive (independent-rows) logit's."""
    import statsmodels.formula.api as smf

    rows = synthetic_rows(n_features=80, n_prompts=8, truth={"l2w0+noreg": ((-1.0, 2.0), (0.2, 0.1))})
    first_prompt = rows.groupby("feature")["embedding_success"].transform("first")
    rows["embedding_success"] = first_prompt.astype("boolean")
    table, _ = fit_all_models(rows, {**SETTINGS, "share_count_covariate": False})
    clustered = slope_row(table, "logit_row", "l2w0+noreg")
    row_frame, _ = judge_frames(rows, "embedding")
    naive = smf.logit("success ~ interp_score", row_frame).fit(disp=0).conf_int().loc["interp_score"]
    assert clustered["ci_high"] - clustered["ci_low"] > 2 * (naive[1] - naive[0])
    quasi = slope_row(table, "binomial_feature", "l2w0+noreg")
    assert quasi["ci_high"] - quasi["ci_low"] > 2 * (naive[1] - naive[0])


def test_markdown_to_html_subset():
    from sae_pipeline.report.html import markdown_to_html

    page = markdown_to_html("# Title\n\nSome `code` and **bold** <x>.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n", "t")

    def compact(html: str) -> str:  # layout whitespace between tags does not matter
        return re.sub(r">\s+<", "><", html)

    assert "<h1>Title</h1>" in compact(page)
    assert "<p>Some <code>code</code> and <strong>bold</strong> &lt;x&gt;.</p>" in compact(page)
    assert compact("<thead><tr><th>a</th><th>b</th></tr></thead><tbody>\n<tr><td>1</td><td>2</td></tr>") in compact(page)
    assert "<ul><li>one</li><li>two</li></ul>" in compact(page)


def test_claim1_section_from_digits_outputs(tmp_path):
    """Digits cells' match outputs and the digits stage's verdict make the claim-1 section."""
    rows = synthetic_rows(n_features=20, n_prompts=4)
    inputs = write_stage_inputs(tmp_path / "in", rows)
    digits_inputs = {}
    for cell, always in (("none-tied0-unit0", 10), ("l2-tied1-unit1", 30)):
        folder = tmp_path / "digits" / cell
        folder.mkdir(parents=True)
        categories = ["always"] * always + ["never"] * (40 - always)
        pd.DataFrame({"feature": np.arange(40), "included": True, "share_count": 0, "category": categories}).to_parquet(folder / "features.parquet")
        (folder / "summary.json").write_text(json.dumps({"mean_over_pairs": {"mmcs_decoder": always / 40, "mmcs_encoder": 0.5, "fraction_paired_decoder": 0.5, "fraction_shared": always / 40}}))
        digits_inputs[cell] = {"condition": cell, "match_features": str(folder / "features.parquet"), "match_summary": str(folder / "summary.json")}
    verdict = {"dataset": "sklearn digits 8x8 (offline stand-in for MNIST)", "holds": True, "l2_tied_unit": {"variant": "l2-tied1-unit1"},
               "comparisons": {"plain (none, untied, free norms)": {"variant": "none-tied0-unit0", "l2_tied_unit_higher_on_both": True}}}
    (tmp_path / "stability_summary.json").write_text(json.dumps(verdict))
    outputs = {name: str(tmp_path / "out" / file) for name, file in OUTPUT_NAMES.items()}
    run_regression(inputs, outputs, SETTINGS, digits_inputs=digits_inputs, digits_summary=str(tmp_path / "stability_summary.json"))
    summary = open(outputs["summary"]).read()
    claim1 = summary.split("## Claim 1")[1].split("## Claim 2")[0]
    assert "stand-in for MNIST" in claim1 and "direction holds" in claim1
    low, high = wilson_interval(30, 40)
    assert f"| l2-tied1-unit1 | 0.750 [{low:.3f}, {high:.3f}] | 0.750 |" in claim1
    half_width = 1.959963984540054 * math.sqrt(0.75 * 0.25 / 40 + 0.25 * 0.75 / 40)
    assert f"0.500 [{0.5 - half_width:.3f}, {0.5 + half_width:.3f}]" in claim1


def test_few_events_and_quasi_separation_give_messages():
    success = np.zeros(40)
    success[[3, 30]] = 1
    rows, _ = fit_outcome_model(base_frame(40, success, np.linspace(0, 1, 40)), "logit_row", False, None, False, 20, {}, min_events=5)
    assert "only 2 of 40 attempts are successes, fewer than regress.min_events=5" in rows[0]["message"]
    # quasi-complete separation: failures at x=0, successes at x=1, both outcomes at x=0.5 (no complete separation)
    interp = np.repeat([0.0, 0.5, 1.0], 20)
    success = np.r_[np.zeros(20), np.arange(20) % 2, np.ones(20)]
    frame = base_frame(60, success, interp)
    assert not completely_separated(np.column_stack([np.ones(60), interp]), success)
    rows, result = fit_outcome_model(frame, "logit_row", False, None, False, 20, {}, min_events=5)
    assert result is None and rows[0]["estimate"] is None
    assert "separation" in rows[0]["message"] or "did not converge" in rows[0]["message"]


def test_pooled_model_leaves_out_a_condition_without_successes():
    rows = synthetic_rows(n_features=120, truth={**TRUTH, "l1w1e-04+noreg": ((-1.0, 1.0), (0.2, 0.1))})
    rows.loc[rows["condition"] == "l1w1e-04+noreg", "embedding_success"] = False
    table, _ = fit_all_models(rows, {**SETTINGS, "share_count_covariate": False})
    pooled = table[(table["outcome_model"] == "logit_row") & (table["scope"] == "pooled") & (table["judge"] == "embedding")]
    assert "left out (all attempts l1w1e-04+noreg: failures)" in pooled["message"].iloc[0]
    assert not pooled["term"].str.contains("l1w1e-04").any()
    assert pooled["term"].str.contains("interp_score:condition\\[l2w1e-03\\+noreg\\]").any()
    assert pooled["estimate"].notna().all() and pooled["n"].iloc[0] == 2 * 120 * 8


def test_summary_counts_the_latents_each_stage_leaves_out(tmp_path):
    """From a real match output (3 hand-built seeds, one latent never fired in the training window) and an
    evaluate metrics file: the stability section lists, per condition, the match stage's dead latents
    with their definition, the latents silent on the evaluate tokens and those the proxies leave out."""
    from sae_pipeline.report.summary import _section_stability
    from sae_pipeline.stages.match import run_match
    from sae_pipeline.stages.regress import stability_by_condition
    from tests.test_match import MATCH_SETTINGS, hand_built_sae_folders

    folders = hand_built_sae_folders(tmp_path, {"firing_window_tokens": 5000})
    run_match(folders, str(tmp_path / "match"), {**MATCH_SETTINGS, "subspace_ranks": [2], "seed_resamples": 20})
    metrics = {"n_tokens": 3000, "firing": {"n_latents": 12, "n_dead": 4, "dead_fraction": 4 / 12},
               "monosemanticity": {"scored_latents": 7, "min_activations": 20}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    inputs = {"v": {"condition": "l2w0+noreg", "match_summary": str(tmp_path / "match" / "summary.json"),
                    "evaluate_metrics": str(tmp_path / "metrics.json")}}
    row = stability_by_condition(inputs).iloc[0]
    assert (row["n_latents"], row["excluded_match"], row["never_fired_on_evaluate_tokens"], row["unscored_by_proxies"]) == (12, 1, 4, 5)
    text = "\n".join(_section_stability(stability_by_condition(inputs)))
    assert ("| l2w0+noreg | 12 | 1: firing frequency below 1e-09 over the first 5,000 training rows (sparsity.safetensors) "
            "| 4 of 12 never fired on its 3,000 hold-out tokens | 5 (fewer than 20 firings there) |") in text


def test_reappearance_relations_join_each_covariate_by_latent(tmp_path):
    """Reappearance of the reference seed's latents joined with log10 firing frequency (never-fired latents
    dropped), the autointerp detection score and the reconstruction contribution; rho as scipy computes it."""
    from scipy.stats import spearmanr

    from sae_pipeline.report.plots import plot_reappearance
    from sae_pipeline.stages.regress import reappearance_relations

    features = pd.DataFrame({"feature": np.arange(6), "seed": 0, "reappearance": [0.0, 0.5, 1.0, 1.0, 0.5, 0.0],
                             "firing_frequency": [1e-3, 1e-2, 1e-1, 0.0, 1e-2, 1e-4]})
    features.to_parquet(tmp_path / "features.parquet")
    pd.DataFrame({"feature": [1, 2, 5], "detection_score": [0.6, 0.9, 0.5]}).to_parquet(tmp_path / "scores.parquet")
    pd.DataFrame({"latent": np.arange(6), "seed": 0, "reconstruction_contribution": [0.1, 0.2, 0.4, 0.3, 0.2, 0.0]}).to_parquet(tmp_path / "latents.parquet")
    inputs = {"v": {"condition": "c", "match_features": str(tmp_path / "features.parquet"), "autointerp_scores": str(tmp_path / "scores.parquet"),
                    "evaluate_latents": str(tmp_path / "latents.parquet")}}
    relations = reappearance_relations(inputs)
    firing = relations[relations["covariate"] == "log10 firing frequency"]
    assert firing["feature"].tolist() == [0, 1, 2, 4, 5] and firing["value"].tolist() == pytest.approx([-3, -2, -1, -2, -4])
    detection = relations[relations["covariate"] == "autointerp detection score"]
    assert detection["reappearance"].tolist() == [0.5, 1.0, 0.0] and detection["value"].tolist() == [0.6, 0.9, 0.5]
    assert len(relations[relations["covariate"] == "reconstruction contribution"]) == 6
    row = stability_rows_with(inputs, tmp_path)
    assert row["rho_interp_score"] == pytest.approx(spearmanr([0.5, 1.0, 0.0], [0.6, 0.9, 0.5]).statistic)
    plot_reappearance(tmp_path / "reappearance.png", relations, bins=2)
    assert (tmp_path / "reappearance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def stability_rows_with(inputs: dict, folder) -> pd.Series:
    """The stability row of ``inputs``' one variant, with a minimal match summary written beside its features."""
    from sae_pipeline.stages.regress import stability_by_condition

    measure = {"mean": 0.5, "sd": 0.0, "seed_resampled": {"low": 0.5, "high": 0.5}}
    summary = {"seeds": [0, 1], "reference_seed": 0, "stability": {
        "pw_mcc": {"decoder": measure, "encoder": measure}, "fraction_shared_seed_resampled": {"mean": 0.1, "low": 0.1, "high": 0.1},
        "reappearance": {"mean": 0.5, "by_log10_firing_frequency": {"spearman_rho": 0.0}}, "subspace_overlap": {}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    variant = next(iter(inputs))
    return stability_by_condition({variant: {**inputs[variant], "match_summary": str(folder / "summary.json")}}).iloc[0]


def test_the_claim4_sweep_section_is_appended_to_the_summary(tmp_path):
    inputs = write_stage_inputs(tmp_path / "in", synthetic_rows(n_features=20, n_prompts=4))
    outputs = {name: str(tmp_path / "out" / file) for name, file in OUTPUT_NAMES.items()}
    section = tmp_path / "claim4.md"
    section.write_text("## Claim 4, regularizer strength sweep (`lm/claim4/`)\n\n- k=16: largest harmless coefficient **0.1**\n")
    run_regression(inputs, outputs, SETTINGS, claim4_markdown=str(section))
    summary = open(outputs["summary"]).read()
    assert summary.index("## Claim 4:") < summary.index("## Claim 4, regularizer strength sweep") and "largest harmless coefficient **0.1**" in summary
    assert "regularizer strength sweep" in open(outputs["summary_html"]).read()
