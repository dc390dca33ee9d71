"""Evaluate stage: each metric against hand computation on small tensors, the CE splice, and one
end-to-end run on the tiny cache and subject model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sae_pipeline.sae.metrics import (
    balanced_sample,
    code_concentration,
    firing_summary,
    fraction_of_variance_unexplained,
    inference_ks,
    monosemanticity_proxies,
    rank_latents_by_class_difference,
    sparse_probe,
    token_property_labels,
)
from sae_pipeline.stages.evaluate import run_evaluation
from sae_pipeline.stats.intervals import mean_with_interval


def test_fvu_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0]; total sum of squares 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 0.0], [2.5, 0.0]])  # residual sum of squares 0.25
    assert fraction_of_variance_unexplained(x, x_hat) == pytest.approx(0.125)
    # with an explicit centre [0, 0] the total is 1 + 9 = 10
    assert fraction_of_variance_unexplained(x, x_hat, mean=torch.zeros(2)) == pytest.approx(0.025)


def test_code_concentration_matches_hand_computation():
    codes = torch.tensor([[2.0, 2.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    effective, ratio = code_concentration(codes)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    # the all-zero row is dropped
    assert effective.tolist() == pytest.approx([2.0, math.exp(entropy), 1.0])
    assert ratio.tolist() == pytest.approx([4 / math.sqrt(8), 4 / math.sqrt(10), 1.0])


def test_firing_summary_counts_dead_and_dense():
    summary = firing_summary(np.array([0.0, 0.05, 0.2, 0.5]), dense_threshold=0.1)
    assert (summary["n_dead"], summary["n_dense"], summary["n_latents"]) == (1, 2, 4)
    assert summary["dead_fraction"] == 0.25 and summary["dense_fraction"] == 0.5


def test_monosemanticity_proxies_match_hand_computation():
    # latent 0 fires on tokens 5, 5, 7 with values 1, 2, 1; latent 1 on tokens 1, 2 with 1, 1; latent 2 never.
    latent = np.array([0, 1, 0, 0, 1])
    token = np.array([5, 1, 5, 7, 2])
    value = np.array([1.0, 1.0, 2.0, 1.0, 1.0])
    table = monosemanticity_proxies(latent, token, value, d_sae=3, top_activations=3)
    assert table["n_activations"].tolist() == [3, 2, 0]
    assert table["activation_mass"].tolist() == pytest.approx([4.0, 2.0, 0.0])
    assert table["top_token_id"].tolist()[0] == 5 and table["top_token_id"].tolist()[2] == -1
    assert table["top_token_mass_share"].tolist()[:2] == pytest.approx([0.75, 0.5])
    third = 1 / 3
    assert table["top_activation_token_entropy_bits"].tolist()[:2] == pytest.approx([-(2 * third * math.log2(2 * third) + third * math.log2(third)), 1.0])
    assert np.isnan(table["top_token_mass_share"][2]) and np.isnan(table["top_activation_token_entropy_bits"][2])
    # with the two largest activations only: value 2 (token 5) and the first value-1 entry (token 5): entropy 0
    narrow = monosemanticity_proxies(latent, token, value, d_sae=3, top_activations=2)
    assert narrow["top_activation_token_entropy_bits"][0] == 0.0


def test_mean_with_interval():
    summary = mean_with_interval(np.array([1.0, 2.0, 3.0, np.nan]))
    assert summary["mean"] == 2.0 and summary["n"] == 3
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((2 - 1.96 / math.sqrt(3), 2 + 1.96 / math.sqrt(3)))
    assert mean_with_interval([5.0]) == {"mean": 5.0, "ci_low": None, "ci_high": None, "n": 1}
    assert mean_with_interval([])["mean"] is None


def test_token_property_labels():
    strings = [" the", "The", ",", " London", "!?", " ", "42", " 42", "a", "'s"]
    assert token_property_labels(strings, "word_start").tolist() == [True, False, False, True, False, False, False, True, False, False]
    assert token_property_labels(strings, "capitalised").tolist() == [False, True, False, True, False, False, False, False, False, False]
    assert token_property_labels(strings, "punctuation").tolist() == [False, False, True, False, True, False, False, False, False, False]
    with pytest.raises(ValueError, match="unknown property 'vowel'"):
        token_property_labels(strings, "vowel")


def test_inference_ks_and_balanced_sample():
    assert [k for _, k in inference_ks(16, [0.25, 0.5, 1, 2, 4])] == [4, 8, 16, 32, 64]
    assert inference_ks(3, [0.25]) == [(0.25, 1)]
    labels = np.array([True] * 3 + [False] * 10)
    sample = balanced_sample(labels, max_per_class=100, seed=0)
    assert labels[sample].sum() == 3 and (~labels[sample]).sum() == 3
    assert balanced_sample(labels, max_per_class=2, seed=0).size == 4


def test_probe_ranks_and_finds_the_informative_latent():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.5
    codes = rng.random((400, 8)) * 0.1
    codes[:, 3] += labels * 1.0  # latent 3 carries the label
    codes[:, 6] += labels * 0.3 + rng.random(400) * 0.6  # latent 6 carries it weakly and noisily
    assert rank_latents_by_class_difference(codes, labels)[:2].tolist() == [3, 6]
    results = sparse_probe(codes, labels, budgets=[1, 2], test_fraction=0.25, seed=0)
    assert results[0]["latents"] == [3] and results[1]["latents"] == [3, 6]
    assert results[0]["test_balanced_accuracy"] == 1.0
    assert results[0]["n_test"] == 100


def test_ce_loss_with_replacement_identity_zero_and_bos(tiny_subject_model):
    from sae_pipeline.subject.model import (
        ce_loss_recovered,
        ce_loss_with_replacement,
        load_subject_model,
    )

    bridge = load_subject_model(str(tiny_subject_model))
    tokens = torch.randint(0, int(bridge.cfg.d_vocab), (5, 12), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_post"
    clean = ce_loss_with_replacement(bridge, tokens, hook, batch_size=2)
    with torch.no_grad():
        direct = float(bridge(tokens, return_type="loss"))
    assert clean == pytest.approx(direct, rel=1e-5)
    assert ce_loss_with_replacement(bridge, tokens, hook, lambda a: a.clone(), batch_size=3) == pytest.approx(clean, rel=1e-6)
    zero = ce_loss_with_replacement(bridge, tokens, hook, torch.zeros_like)
    zero_everywhere = ce_loss_with_replacement(bridge, tokens, hook, torch.zeros_like, keep_first_position=False)
    assert zero != pytest.approx(clean) and zero != pytest.approx(zero_everywhere)
    assert ce_loss_recovered(clean, clean, zero) == pytest.approx(1.0)
    assert ce_loss_recovered(clean, zero, zero) == pytest.approx(0.0)
    assert ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)


EVALUATE_SETTINGS = {
    "seed": 0,
    "k_multipliers": [0.5, 1, 2],
    "max_tokens": 1500,
    "ce_sequences": 6,
    "ce_batch_size": 4,
    "batch_size": 256,
    "dense_threshold": 0.2,
    "top_activations": 20,
    "min_activations": 5,
    "device": "cpu",
    "probe": {
        "properties": ["word_start", "capitalised", "punctuation"],
        "latent_budgets": [1, 2, 5],
        "max_examples_per_class": 200,
        "min_examples_per_class": 20,
        "test_fraction": 0.3,
        "seed": 0,
    },
}


def test_run_evaluation_end_to_end(tmp_path, tiny_cache, tiny_topk_sae):
    from sae_pipeline.data.checkpoint import load_sae
    from sae_pipeline.data.shards import ActivationStore
    from sae_pipeline.stages.evaluate import evaluation_set
    from sae_pipeline.subject.model import (
        ce_loss_recovered,
        ce_loss_with_replacement,
        load_subject_model,
    )

    outputs = {name: str(tmp_path / file) for name, file in [
        ("metrics", "metrics.json"), ("k_robustness", "k_robustness.csv"), ("probing", "probing.csv"),
        ("latents", "latents.parquet"), ("frequency_plot", "latent_frequency.png")]}
    metrics = run_evaluation(str(tiny_topk_sae), str(tiny_cache), outputs, EVALUATE_SETTINGS, variant="v", seed=0, condition="l2w0+noreg")

    robustness = pd.read_csv(outputs["k_robustness"])
    assert robustness["k_prime"].tolist() == [2, 4, 8]
    assert robustness["l0"].tolist() == pytest.approx([2, 4, 8], abs=0.05)  # Top-k keeps k (a few may be zero after ReLU)

    store = ActivationStore(tiny_cache)
    evaluation = evaluation_set(store, 0, EVALUATE_SETTINGS["max_tokens"], EVALUATE_SETTINGS["ce_sequences"], EVALUATE_SETTINGS["probe"]["seed"])
    activations = evaluation.activations
    assert activations.shape[0] == metrics["n_tokens"] == 1500
    assert "no training hold-out recorded" in metrics["evaluation_rows"]
    sae = load_sae(tiny_topk_sae)
    x = torch.from_numpy(activations)
    with torch.no_grad():
        codes = sae.encode(x)
        assert robustness.loc[1, "fvu"] == pytest.approx(fraction_of_variance_unexplained(x, sae.decode(codes)), rel=1e-6)

    # CE-loss recovered at k'=4 against the splice function called directly on the same sequences
    bridge = load_subject_model(store.manifest["model"])
    assert len(evaluation.ce_doc_ids) == 6
    tokens = torch.from_numpy(store.sequences()[evaluation.ce_doc_ids].astype(np.int64))
    hook = store.manifest["hook_name"]
    clean = ce_loss_with_replacement(bridge, tokens, hook)
    zero = ce_loss_with_replacement(bridge, tokens, hook, torch.zeros_like)
    spliced = ce_loss_with_replacement(bridge, tokens, hook, lambda a: sae(a, 4))
    assert robustness.loc[1, "ce_loss_recovered"] == pytest.approx(ce_loss_recovered(clean, spliced, zero), rel=1e-5)
    assert metrics["at_trained_k"]["ce_loss_recovered"] == pytest.approx(robustness.loc[1, "ce_loss_recovered"])

    latents = pd.read_parquet(outputs["latents"])
    frequency = (codes > 0).double().mean(dim=0).numpy()
    assert latents["firing_frequency"].to_numpy() == pytest.approx(frequency)
    assert metrics["firing"]["n_dead"] == int((frequency == 0).sum())
    assert metrics["firing"]["n_dense"] == int((frequency > 0.2).sum())
    effective, _ = code_concentration(codes)
    assert metrics["effective_latents_per_token"]["mean"] == pytest.approx(float(effective.mean()))
    assert 1.0 <= metrics["effective_latents_per_token"]["mean"] <= 4.0
    scored = latents[latents["n_activations"] >= 5]
    assert metrics["monosemanticity"]["scored_latents"] == len(scored)
    assert metrics["monosemanticity"]["top_token_mass_share"]["mean"] == pytest.approx(scored["top_token_mass_share"].mean())

    probing = pd.read_csv(outputs["probing"])
    assert set(probing["property"]) == {"word_start", "capitalised", "punctuation"}
    fitted = probing[probing["message"].isna()]
    assert not fitted.empty and fitted["m"].isin([1, 2, 5]).all()
    assert fitted["test_balanced_accuracy"].between(0, 1).all()

    saved = json.loads(open(outputs["metrics"]).read())
    assert saved["variant"] == "v" and saved["condition"] == "l2w0+noreg"
    assert open(outputs["frequency_plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_probe_with_too_few_examples_gives_a_message_row(tmp_path, tiny_cache, tiny_topk_sae):
    settings = {**EVALUATE_SETTINGS, "k_multipliers": [2], "probe": {**EVALUATE_SETTINGS["probe"], "min_examples_per_class": 10**6}}
    outputs = {name: str(tmp_path / file) for name, file in [
        ("metrics", "metrics.json"), ("k_robustness", "k.csv"), ("probing", "probing.csv"),
        ("latents", "latents.parquet"), ("frequency_plot", "f.png")]}
    metrics = run_evaluation(str(tiny_topk_sae), str(tiny_cache), outputs, settings)
    # the trained k (multiplier 1) is always evaluated, even when the grid leaves it out
    assert pd.read_csv(outputs["k_robustness"])["k_prime"].tolist() == [4, 8]
    assert metrics["at_trained_k"]["l0"] == pytest.approx(4, abs=0.05)
    probing = pd.read_csv(outputs["probing"])
    assert len(probing) == 3
    assert probing["message"].str.contains("fewer than evaluate.probe.min_examples_per_class").all()


def test_evaluation_uses_the_training_holdout(tmp_path, tiny_cache, tiny_topk_sae):
    """With ``training.settings.holdout_tokens`` in cfg.json, only the last cache rows (never trained on) are used."""
    import shutil

    from sae_pipeline.data.checkpoint import holdout_rows_of
    from sae_pipeline.data.shards import ActivationStore
    from sae_pipeline.stages.evaluate import evaluation_set

    folder = tmp_path / "seed0"
    shutil.copytree(tiny_topk_sae, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["training"] = {"settings": {"holdout_tokens": 512}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert holdout_rows_of(cfg) == 512 and holdout_rows_of({"architecture": "topk"}) == 0

    store = ActivationStore(tiny_cache)
    shards = [store.read_shard(index) for index in range(len(store.shard_paths))]
    last = {name: np.concatenate([getattr(shard, name) for shard in shards])[-512:] for name in ("activations", "doc_id", "position", "is_bos")}
    evaluation = evaluation_set(store, 512, 10**6, 10**6, 0)
    assert np.array_equal(evaluation.activations, last["activations"][~last["is_bos"]].astype(np.float32))
    assert evaluation.ce_doc_ids.tolist() == sorted(set(last["doc_id"][last["position"] == 0].tolist()))

    outputs = {name: str(tmp_path / file) for name, file in [
        ("metrics", "metrics.json"), ("k_robustness", "k.csv"), ("probing", "probing.csv"),
        ("latents", "latents.parquet"), ("frequency_plot", "f.png")]}
    metrics = run_evaluation(str(folder), str(tiny_cache), outputs, {**EVALUATE_SETTINGS, "k_multipliers": [1]})
    assert metrics["n_tokens"] == int((~last["is_bos"]).sum())
    assert metrics["evaluation_rows"].startswith("training hold-out")
    assert pd.read_csv(outputs["k_robustness"])["ce_sequences"].tolist() == [6]


def test_reconstruction_contribution_is_the_exact_drop_one_variance_loss():
    """Against brute force: zero one latent's code, decode, and measure the added squared error over the total variance."""
    from sae_pipeline.sae.model import SparseAutoencoder
    from sae_pipeline.stages.evaluate import _native_pass

    generator = torch.Generator().manual_seed(0)
    d_in, d_sae = 6, 10
    tensors = {"W_enc": torch.randn(d_in, d_sae, generator=generator), "W_dec": torch.randn(d_sae, d_in, generator=generator),
               "b_enc": torch.zeros(d_sae), "b_dec": 0.1 * torch.randn(d_in, generator=generator)}
    sae = SparseAutoencoder({"architecture": "topk", "k": 3}, tensors)
    x = torch.randn(40, d_in, generator=generator)
    native = _native_pass(sae, x, np.zeros(40, dtype=np.int64), batch_size=16)
    codes = sae.encode(x).double()
    base_error = ((x.double() - (codes @ sae.W_dec.double() + sae.b_dec.double())) ** 2).sum()
    total = ((x.double() - x.double().mean(dim=0)) ** 2).sum()
    for latent in range(d_sae):
        dropped = codes.clone()
        dropped[:, latent] = 0
        error = ((x.double() - (dropped @ sae.W_dec.double() + sae.b_dec.double())) ** 2).sum()
        assert native["reconstruction_contribution"][latent] == pytest.approx(float((error - base_error) / total), rel=1e-4, abs=1e-7)  # float32 decode
