"""Claim 4, regularizer strength sweep: which variants form a sweep, the jobs workflow/configs/claim4.yaml plans,
the claim-4 stage on synthetic evaluate outputs with known answers, and the embedding proxy on a tiny case."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sae_pipeline.features.coherence import embedding_similarity_table, sample_latents, top_contexts
from sae_pipeline.layout import CLAIM4_PLOTS, Experiment, claim4_sweeps, sweep_point
from sae_pipeline.settings import EvaluateSettings
from sae_pipeline.stages.claim4 import run_claim4
from tests.conftest import REPO_ROOT, merge_configs
from tests.test_evaluate import EVALUATE_SETTINGS
from tests.test_pipeline import planned_jobs

CLAIM4_CONFIG = REPO_ROOT / "workflow" / "configs" / "claim4.yaml"
CLAIM4_L2_CONFIG = REPO_ROOT / "workflow" / "configs" / "claim4_l2.yaml"
Z = 1.959963984540054


def claim4_config(*more: Path, results_dir: str = "results/claim4") -> dict:
    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    for path in (CLAIM4_CONFIG, *more):
        config = merge_configs(config, yaml.safe_load(path.read_text()))
    return {**config, "results_dir": results_dir}


# ----------------------------------------------------------------------------------------------
# Layout: sweeps and evaluated seeds


def test_sweep_points_of_conditions():
    assert sweep_point({"weight_penalty": {"kind": "l2", "coefficient": 0.0}, "regularizer": {"kind": "none"}}) == ("baseline", 0.0)
    assert sweep_point({"weight_penalty": {"kind": "l2", "coefficient": 0.0}, "regularizer": {"kind": "off_support_l1", "coefficient": 0.1}}) == ("off_support_l1", 0.1)
    assert sweep_point({"weight_penalty": {"kind": "l2", "coefficient": 1e-3}, "regularizer": {"kind": "none"}}) == ("l2_weight", 1e-3)
    assert sweep_point({"weight_penalty": {"kind": "l2", "coefficient": 1e-3}, "regularizer": {"kind": "l1_l2_ratio", "coefficient": 1.0}}) is None


@pytest.mark.parametrize("more, regularizers, n_variants", [
    ((), ["off_support_l1", "l1_l2_ratio"], 18),
    ((CLAIM4_L2_CONFIG,), ["off_support_l1", "l1_l2_ratio", "l2_weight"], 26),
])
def test_the_claim4_configs_sweep_each_regularizer_over_two_k(more, regularizers, n_variants):
    experiment = Experiment(claim4_config(*more))
    experiment.check_settings()
    assert len(experiment.variants("lm")) == n_variants
    sweeps = claim4_sweeps(experiment.variants("lm"))
    assert list(sweeps) == regularizers
    for regularizer, entries in sweeps.items():
        assert [(entry["k"], entry["coefficient"]) for entry in entries][:5] == [(16, 0.0)] + [(16, c) for c in sorted(c for k, c in [(e["k"], e["coefficient"]) for e in entries] if k == 16 and c > 0)]
        assert len(entries) == 2 * 5 and {entry["k"] for entry in entries} == {16, 32}
        assert len({entry["coefficient"] for entry in entries if entry["coefficient"] > 0}) >= 4
    assert {entries[0]["variant"] for entries in sweeps.values()} == {"topk-k16-l2w0-noreg"}
    assert experiment.evaluate_seeds() == [0, 1]
    inputs = experiment.claim4_inputs()
    assert set(inputs["l1_l2_ratio"][0]["seeds"]) == {"0", "1"}
    # every variant x 2 seeds x 3 evaluate outputs, each listed once although the baseline is in every sweep
    assert len(experiment.claim4_input_files()) == n_variants * 2 * 3


def test_the_default_config_has_no_sweep_and_evaluates_one_seed():
    experiment = Experiment({**yaml.safe_load((REPO_ROOT / "config.yaml").read_text()), "results_dir": "r"})
    assert claim4_sweeps(experiment.variants("lm")) == {} and experiment.evaluate_seeds() == [0]


@pytest.mark.parametrize("seeds, expected", [(None, [1]), ("all", [0, 1, 2]), ([2], [1, 2]), ([0, 1], [0, 1])])
def test_evaluated_seeds(seeds, expected):
    assert EvaluateSettings.from_mapping({"seed": 1, "seeds": seeds}).evaluated_seeds([0, 1, 2]) == expected


def test_an_evaluated_seed_must_be_trained():
    with pytest.raises(ValueError, match=r"seed\(s\) \[5\] are not among train.seeds"):
        EvaluateSettings.from_mapping({"seeds": [5]}).evaluated_seeds([0, 1, 2])


# ----------------------------------------------------------------------------------------------
# Dry runs


def test_claim4_config_plans_the_sweep(tmp_path):
    counts = planned_jobs("claim4", "--configfile", str(CLAIM4_CONFIG), "--config", f"results_dir={tmp_path}")
    assert dict(counts) == {
        "export_corpus": 1, "prepare_subject_model": 1, "cache": 1,
        "train": 18,      # 2 k x (1 unregularized + 4 off_support_l1 + 4 l1_l2_ratio), 2 seeds per job
        "evaluate": 36,   # every variant on both seeds (evaluate.seeds: all)
        "claim4": 1,
    }


def test_the_l2_config_adds_the_weight_penalty_sweep(tmp_path):
    counts = planned_jobs("claim4", "--configfile", str(CLAIM4_CONFIG), str(CLAIM4_L2_CONFIG), "--config", f"results_dir={tmp_path}")
    assert (counts["train"], counts["evaluate"], counts["claim4"]) == (18 + 8, 36 + 16, 1)


def test_claim4_config_whole_run_includes_the_sweep_and_the_summary(tmp_path):
    counts = planned_jobs("--configfile", str(CLAIM4_CONFIG), "--config", f"results_dir={tmp_path}")
    assert counts["claim4"] == 1 and counts["regress"] == 1 and counts["evaluate"] == 36 and counts["train"] == 18 + 12


# ----------------------------------------------------------------------------------------------
# The stage on synthetic evaluate outputs

# Per coefficient, per seed: FVU, top-token mass share. Coefficient 0.01 and 0.1 are within seed noise, 1 is not.
FVU = {0.0: [0.10, 0.11, 0.12], 0.01: [0.10, 0.12, 0.11], 0.1: [0.115, 0.12, 0.125], 1.0: [0.20, 0.21, 0.22]}
SHARE = {0.0: [0.30, 0.31, 0.32], 0.01: [0.33, 0.33, 0.33], 0.1: [0.40, 0.42, 0.44], 1.0: [0.50, 0.50, 0.50]}


def _write_evaluate(folder: Path, fvu: float, share: float, seed: int) -> dict[str, str]:
    folder.mkdir(parents=True)
    metrics = {
        "at_trained_k": {"fvu": fvu, "ce_loss_recovered": 1 - fvu, "l0": 16.0},
        "effective_latents_per_token": {"mean": 10.0 + seed}, "l1_over_l2": {"mean": 3.0}, "firing": {"dead_fraction": 0.01},
        "monosemanticity": {"top_token_mass_share": {"mean": share}, "top_activation_token_entropy_bits": {"mean": 2.0 - share}},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    pd.DataFrame({"inference": ["k'=8", "k'=16", "k'=32"], "multiplier": [0.5, 1.0, 2.0], "k_prime": [8, 16, 32],
                  "fvu": [2 * fvu, fvu, fvu / 2], "ce_loss_recovered": [0.8, 1 - fvu, 0.99]}).to_csv(folder / "k_robustness.csv", index=False)
    pd.DataFrame({"property": ["word_start", "word_start", "capitalised", "capitalised"], "m": [1, 2, 1, 2],
                  "test_balanced_accuracy": [0.6, 0.7, 0.8, 0.9 + 0.01 * seed], "message": [None] * 4}).to_csv(folder / "probing.csv", index=False)
    return {"metrics": str(folder / "metrics.json"), "k_robustness": str(folder / "k_robustness.csv"), "probing": str(folder / "probing.csv")}


@pytest.fixture
def synthetic_sweep(tmp_path):
    entries = []
    for coefficient in FVU:
        variant = f"topk-k16-l2w0-off_support_l1{coefficient:g}"
        seeds = {str(seed): _write_evaluate(tmp_path / variant / f"seed{seed}", FVU[coefficient][seed], SHARE[coefficient][seed], seed) for seed in range(3)}
        entries.append({"variant": variant, "k": 16, "coefficient": coefficient, "condition": "", "seeds": seeds})
    layout = {"off_support_l1": entries}
    outputs = {name: str(tmp_path / "out" / file) for name, file in [("table", "table.csv"), ("seeds", "seeds.csv"), ("k_robustness", "k.csv"),
                                                                    ("probing", "probing.csv"), ("summary", "summary.json"), ("markdown", "claim4.md")]}
    plots = {"off_support_l1": {plot: str(tmp_path / "out" / f"{plot}.png") for plot in CLAIM4_PLOTS}}
    return layout, outputs, plots


def test_claim4_table_and_harmless_coefficient_against_hand_computation(synthetic_sweep):
    layout, outputs, plots = synthetic_sweep
    summary = run_claim4(layout, outputs, plots, budgets=[1, 2, 5])
    table = pd.read_csv(outputs["table"])
    assert table["coefficient"].tolist() == [0.0, 0.01, 0.1, 1.0] and (table["n_seeds"] == 3).all()
    row = table[table["coefficient"] == 0.1].iloc[0]
    assert row["fvu_mean"] == pytest.approx(0.12)
    half = Z * 0.005 / math.sqrt(3)  # sample SD of 0.115, 0.12, 0.125 is 0.005
    assert (row["fvu_ci_low"], row["fvu_ci_high"]) == pytest.approx((0.12 - half, 0.12 + half), rel=1e-3)  # intervals use 1.96
    assert row["fvu_x0.5_mean"] == pytest.approx(0.24) and row["fvu_x2_mean"] == pytest.approx(0.06)
    assert row["probe_m1_mean"] == pytest.approx(0.7)  # mean over the two properties, the same for every seed
    assert row["probe_m2_mean"] == pytest.approx(np.mean([(0.7 + 0.9 + 0.01 * s) / 2 for s in range(3)]))
    assert "probe_m5_mean" not in table.columns  # budget 5 was not evaluated

    entry = summary["regularizers"]["off_support_l1"]["16"]
    # cost of 0.1: +0.01, half width 1.96 * sqrt(0.01^2/3 + 0.005^2/3) = 0.01265 > 0.01 -> harmless; 1.0 costs +0.1 -> harmful
    assert entry["largest_harmless_coefficient"] == 0.1 and entry["first_harmful_coefficient"] == 1.0
    half_cost = Z * math.sqrt(0.01**2 / 3 + 0.005**2 / 3)
    assert entry["fvu_cost"]["difference"] == pytest.approx(0.01)
    assert entry["fvu_cost"]["ci_low"] == pytest.approx(0.01 - half_cost)
    gain = entry["gains"]["top_token_mass_share"]
    assert gain["difference"] == pytest.approx(0.11)
    assert gain["ci_high"] - gain["difference"] == pytest.approx(Z * math.sqrt(0.01**2 / 3 + 0.02**2 / 3))
    assert entry["k_robustness"]["fvu_x0.5"]["difference"] == pytest.approx(0.02)  # 2 x the FVU difference
    assert "embedding_similarity" not in entry["gains"]  # not in these metrics

    markdown = Path(outputs["markdown"]).read_text()
    assert "### off_support_l1" in markdown and "largest harmless coefficient **0.1**" in markdown and "first harmful one is 1" in markdown
    for path in plots["off_support_l1"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(outputs["seeds"])) == 12 and len(pd.read_csv(outputs["k_robustness"])) == 36


def test_the_walk_stops_at_the_first_harmful_coefficient(synthetic_sweep, tmp_path):
    layout, outputs, plots = synthetic_sweep
    # make 0.01 harmful: the answer is 0 even though 0.1 alone would pass
    for seed, paths in layout["off_support_l1"][1]["seeds"].items():
        metrics = json.loads(Path(paths["metrics"]).read_text())
        metrics["at_trained_k"]["fvu"] = 0.3 + 0.001 * int(seed)
        Path(paths["metrics"]).write_text(json.dumps(metrics))
    summary = run_claim4(layout, outputs, plots)
    entry = summary["regularizers"]["off_support_l1"]["16"]
    assert entry["largest_harmless_coefficient"] == 0.0 and entry["first_harmful_coefficient"] == 0.01
    assert "no non-zero coefficient is harmless" in Path(outputs["markdown"]).read_text()


def test_one_seed_gives_a_message_not_a_verdict(synthetic_sweep):
    layout, outputs, plots = synthetic_sweep
    for entry in layout["off_support_l1"]:
        entry["seeds"] = {"0": entry["seeds"]["0"]}
    summary = run_claim4(layout, outputs, plots)
    assert "fewer than two evaluated seeds" in summary["regularizers"]["off_support_l1"]["16"]["message"]


# ----------------------------------------------------------------------------------------------
# The embedding proxy


def test_top_contexts_keep_one_per_sequence():
    latent = np.array([0, 0, 0, 0, 1])
    row = np.array([0, 1, 2, 4, 3])
    value = np.array([3.0, 5.0, 2.0, 1.0, 7.0])
    doc_id = np.array([0, 0, 1, 1, 2, 2])
    chosen = top_contexts(latent, row, value, doc_id, [0, 1], n_contexts=3)
    assert chosen[0][0].tolist() == [1, 2, 4] and chosen[0][1].tolist() == [5.0, 2.0, 1.0]  # row 0 shares doc 0 with the larger row 1
    assert chosen[1][0].tolist() == [3]
    assert sample_latents([5, 1, 3], None, 0) == [1, 3, 5] and len(sample_latents(range(100), 7, 0)) == 7


def test_embedding_similarity_against_hand_computation():
    latent = np.array([0, 0, 0, 0, 1])
    row = np.array([0, 1, 2, 4, 3])
    value = np.array([3.0, 5.0, 2.0, 1.0, 7.0])
    doc_id = np.array([0, 0, 1, 1, 2, 2])
    position = np.array([1, 2, 1, 2, 1, 2])
    sequences = np.array([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    # windows (one token before) of latent 0's rows 1, 2, 4 and latent 1's row 3
    vectors = {"11 12": [1.0, 0.0], "20 21": [0.0, 2.0], "30 31": [3.0, 3.0], "21 22": [1.0, -1.0]}
    seen = []

    def embed(texts):
        seen.extend(texts)
        return np.array([vectors[text] for text in texts])

    table = embedding_similarity_table(latent, row, value, doc_id, position, sequences, [0, 1], 3, 1, 0, lambda ids: " ".join(map(str, ids)), embed)
    # weights 5*2, 5*1, 2*1; cosines 0, 1/sqrt(2), 1/sqrt(2)
    assert table.set_index("latent").loc[0, "embedding_similarity"] == pytest.approx((5 + 2) / math.sqrt(2) / 17)
    assert math.isnan(table.set_index("latent").loc[1, "embedding_similarity"])  # one context
    assert sorted(seen) == ["11 12", "20 21", "21 22", "30 31"]  # each distinct context embedded once


def test_evaluate_reports_the_embedding_proxy(tmp_path, tiny_cache, tiny_topk_sae):
    """The wired proxy against an independent computation: top contexts, windows, all-MiniLM-L6-v2, the formula by a double loop."""
    import torch

    from sae_pipeline.data.checkpoint import load_sae
    from sae_pipeline.data.shards import ActivationStore
    from sae_pipeline.judges.embedding import EmbeddingJudge
    from sae_pipeline.stages.evaluate import evaluation_set, run_evaluation
    from sae_pipeline.subject.model import load_subject_model

    proxy = {"enabled": True, "contexts": 4, "window_before": 3, "window_after": 1, "max_latents": 5, "batch_size": 16, "device": "cpu", "seed": 0}
    settings = {**EVALUATE_SETTINGS, "k_multipliers": [1], "embedding_proxy": proxy}
    outputs = {name: str(tmp_path / file) for name, file in [("metrics", "metrics.json"), ("k_robustness", "k.csv"), ("probing", "probing.csv"),
                                                           ("latents", "latents.parquet"), ("frequency_plot", "f.png")]}
    metrics = run_evaluation(str(tiny_topk_sae), str(tiny_cache), outputs, settings)
    latents = pd.read_parquet(outputs["latents"])
    computed = latents.dropna(subset=["embedding_similarity"])
    assert 1 <= len(computed) <= 5 and computed["scored"].all()
    assert metrics["monosemanticity"]["embedding_similarity"]["mean"] == pytest.approx(computed["embedding_similarity"].mean())

    store = ActivationStore(tiny_cache)
    evaluation = evaluation_set(store, 0, settings["max_tokens"], settings["ce_sequences"], 0)
    codes = load_sae(tiny_topk_sae).encode(torch.from_numpy(evaluation.activations)).detach().numpy()
    tokenizer = load_subject_model(store.manifest["model"]).tokenizer
    sequences = store.sequences()
    judge = EmbeddingJudge("cpu")
    for latent in computed["latent"].tolist()[:2]:
        order = sorted(np.flatnonzero(codes[:, latent] > 0), key=lambda r: (-codes[r, latent], r))
        rows, docs = [], set()
        for r in order:
            if evaluation.doc_ids[r] not in docs:
                docs.add(evaluation.doc_ids[r])
                rows.append(r)
        rows = rows[:4]
        texts = [tokenizer.decode(sequences[evaluation.doc_ids[r]][max(0, evaluation.positions[r] - 3) : evaluation.positions[r] + 2].tolist(), skip_special_tokens=True) for r in rows]
        vectors = judge.embed(texts).astype(np.float64)
        numerator = denominator = 0.0
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                weight = float(codes[rows[i], latent]) * float(codes[rows[j], latent])
                numerator += weight * float(vectors[i] @ vectors[j]) / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j]))
                denominator += weight
        assert computed.set_index("latent").loc[latent, "embedding_similarity"] == pytest.approx(numerator / denominator, abs=1e-4)
