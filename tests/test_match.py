"""Feature matching across seeds: hand-built dictionaries whose overlaps are known exactly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sae_pipeline.data.checkpoint import save_sae
from sae_pipeline.stability.matching import match_dictionaries
from sae_pipeline.stages.match import run_match

D = 64


def basis(*indices: int) -> np.ndarray:
    """Rows of the D-dimensional identity: exact unit directions with known cosines."""
    return np.eye(D)[list(indices)]


def test_permuted_sign_flipped_scaled_copy_is_fully_shared():
    rng = np.random.default_rng(0)
    decoder = rng.standard_normal((40, D))
    encoder = rng.standard_normal((40, D))
    permutation = rng.permutation(40)
    signs = rng.choice([-1.0, 1.0], size=40)
    scale = rng.uniform(0.5, 3.0, size=40)[:, None]
    copy_decoder = decoder[permutation] * signs[:, None] * scale
    copy_encoder = encoder[permutation] * -signs[:, None]
    result = match_dictionaries([decoder, copy_decoder], [encoder, copy_encoder])
    pair = result.pair_table.iloc[0]
    assert pair["n_shared"] == 40
    assert pair["fraction_shared"] == 1.0
    assert pair["mmcs_decoder"] == pytest.approx(1.0, abs=1e-6)
    assert pair["mmcs_encoder"] == pytest.approx(1.0, abs=1e-6)
    features = result.feature_table()
    # feature permutation[j] of seed 0 is row j of the copy
    expected_partner = np.argsort(permutation)
    np.testing.assert_array_equal(features["decoder_partner_seed1"], expected_partner)
    np.testing.assert_array_equal(features["encoder_partner_seed1"], expected_partner)
    assert (features["category"] == "always").all()


def test_known_overlap_gives_exact_fractions_and_mmcs():
    # seed 0: e0..e7. seed 1: e0..e4 permuted (shared), 0.6 e5 + 0.8 e20 (cos 0.6: matched, not shared), e21, e22.
    seed0 = basis(0, 1, 2, 3, 4, 5, 6, 7)
    seed1 = np.vstack([basis(3, 1, 0, 2, 4), 0.6 * basis(5) + 0.8 * basis(20), basis(21, 22)])
    result = match_dictionaries([seed0, seed1], [seed0, seed1], threshold=0.7)
    pair = result.pair_table.iloc[0]
    assert pair["n_shared"] == 5
    assert pair["fraction_shared"] == pytest.approx(5 / 8)
    assert pair["fraction_paired_decoder"] == pytest.approx(5 / 8)
    # max cosines: five 1.0, one 0.6, two 0.0 in each direction
    assert pair["mmcs_decoder_a_to_b"] == pytest.approx(5.6 / 8)
    assert pair["mmcs_decoder_b_to_a"] == pytest.approx(5.6 / 8)
    assert pair["mmcs_encoder"] == pytest.approx(5.6 / 8)
    features = result.feature_table()
    assert features.loc[5, "decoder_partner_seed1"] == 5
    assert features.loc[5, "decoder_cosine_seed1"] == pytest.approx(0.6)
    assert not features.loc[5, "shared_seeds0-1"]
    np.testing.assert_array_equal(features["decoder_partner_seed1"][:5], [2, 1, 3, 0, 4])


def test_three_seeds_categories_follow_partners():
    # seed 0: e0..e7; seed 1 shares e0..e4; seed 2 shares e0, e1, e2, e5 (others are fresh directions).
    seed0 = basis(0, 1, 2, 3, 4, 5, 6, 7)
    seed1 = basis(4, 3, 2, 1, 0, 30, 31, 32)
    seed2 = basis(5, 2, 1, 0, 40, 41, 42, 43)
    result = match_dictionaries([seed0, seed1, seed2], [seed0, seed1, seed2], seeds=[7, 8, 9])
    features = result.feature_table()
    assert list(features["share_count"]) == [3, 3, 3, 1, 1, 1, 0, 0]
    assert list(features["direct_share_count"]) == [2, 2, 2, 1, 1, 1, 0, 0]
    assert list(features["category"]) == ["always"] * 3 + ["sometimes"] * 3 + ["never"] * 2
    summary = result.summary()
    assert summary["reference_fractions"]["always"] == pytest.approx(3 / 8)
    assert summary["reference_fractions"]["sometimes"] == pytest.approx(3 / 8)
    assert summary["reference_fractions"]["never"] == pytest.approx(2 / 8)
    pairs = result.pair_table.set_index(["seed_a", "seed_b"])
    assert pairs.loc[(7, 8), "n_shared"] == 5
    assert pairs.loc[(7, 9), "n_shared"] == 4
    assert pairs.loc[(8, 9), "n_shared"] == 3
    # the same result seen from seed 9: its e5 (index 0) is shared with seed 7 only
    per_seed = result.feature_table(9)
    assert list(per_seed["share_count"][:4]) == [1, 3, 3, 3]


def test_pair_without_reference_counts_only_through_partners():
    # seeds 1 and 2 share e50, which seed 0 lacks: it must not raise any seed-0 feature's share_count.
    seed0 = basis(0, 1, 2, 3)
    seed1 = basis(50, 1, 60, 61)
    seed2 = basis(62, 50, 63, 1)
    result = match_dictionaries([seed0, seed1, seed2], [seed0, seed1, seed2])
    features = result.feature_table()
    assert result.pair(1, 2).summary["n_shared"] == 2
    assert list(features["share_count"]) == [0, 3, 0, 0]


def test_encoder_decoder_disagreement_is_not_shared():
    decoder = basis(0, 1, 2, 3, 4, 5)
    encoder = basis(10, 11, 12, 13, 14, 15)
    swapped_encoder = basis(11, 10, 12, 13, 14, 15)  # latents 0 and 1 swap encoder directions
    result = match_dictionaries([decoder, decoder.copy()], [encoder, swapped_encoder])
    features = result.feature_table()
    assert list(features["decoder_partner_seed1"]) == [0, 1, 2, 3, 4, 5]
    assert list(features["encoder_partner_seed1"]) == [1, 0, 2, 3, 4, 5]
    assert list(features["shared_seeds0-1"]) == [False, False, True, True, True, True]
    assert result.pair_table.iloc[0]["partner_agreement"] == pytest.approx(4 / 6)


def test_same_partner_but_encoder_cosine_below_threshold_is_not_shared():
    decoder = basis(0, 1, 2)
    encoder = basis(10, 11, 12)
    weak_encoder = np.vstack([0.65 * basis(10) + np.sqrt(1 - 0.65**2) * basis(30), basis(11, 12)])
    result = match_dictionaries([decoder, decoder.copy()], [encoder, weak_encoder])
    features = result.feature_table()
    assert features.loc[0, "encoder_partner_seed1"] == 0
    assert features.loc[0, "encoder_cosine_seed1"] == pytest.approx(0.65)
    assert list(features["shared_seeds0-1"]) == [False, True, True]


def test_dead_latents_are_excluded_from_matching_and_denominators():
    seed0 = basis(0, 1, 2, 3, 4, 5)
    seed1 = basis(2, 1, 0, 3, 40, 41)
    alive0 = np.array([True, True, True, True, False, True])  # latent 4 dead
    alive1 = np.array([True, True, True, True, False, False])  # latents 4, 5 dead
    result = match_dictionaries([seed0, seed1], [seed0, seed1], alive_masks=[alive0, alive1])
    pair = result.pair_table.iloc[0]
    assert (pair["n_features_a"], pair["n_features_b"]) == (5, 4)
    assert (pair["n_excluded_a"], pair["n_excluded_b"]) == (1, 2)
    assert pair["n_shared"] == 4
    assert pair["fraction_shared_a"] == pytest.approx(4 / 5)
    assert pair["fraction_shared_b"] == pytest.approx(1.0)
    features = result.feature_table()
    assert features.loc[4, "category"] == "dead"
    assert features.loc[4, "decoder_partner_seed1"] == -1
    assert np.isnan(features.loc[4, "max_decoder_cosine_seed1"])
    assert features.loc[5, "decoder_partner_seed1"] == -1  # 5 alive latents, 4 partners: one unmatched
    assert result.summary()["reference_fractions"]["always"] == pytest.approx(4 / 5)
    # matched partners never point at excluded latents
    assert not set(features["decoder_partner_seed1"]) & {4, 5}


def hand_built_sae_folders(tmp_path, training_settings: dict | None = None) -> dict[int, str]:
    """Three seeds' SAE folders of 12 latents: directions 0-9 common to all (permuted), 10-11 per seed,
    direction 3 never fired (firing frequency 0; the rest 0.05). ``training_settings`` go to cfg.json."""
    rng = np.random.default_rng(1)
    d_in, d_sae = 16, 12
    base = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    folders = {}
    for seed, permutation in zip((0, 1, 2), (np.arange(d_sae), rng.permutation(d_sae), rng.permutation(d_sae))):
        directions = base.copy()
        directions[10:] = rng.standard_normal((2, d_in))  # directions 10 and 11 differ per seed
        decoder = directions[permutation]  # latent j of this seed is direction permutation[j]
        frequency = np.full(d_sae, 0.05)
        frequency[np.argsort(permutation)[3]] = 0.0  # direction 3 never fired
        tensors = {
            "W_enc": torch.from_numpy(decoder.T.copy()),
            "W_dec": torch.from_numpy(decoder),
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_in),
        }
        cfg = {"architecture": "topk", "k": 2, "metadata": {"dataset_path": "hand-built"}}
        if training_settings is not None:
            cfg["training"] = {"seed": seed, "settings": training_settings}
        folders[seed] = str(save_sae(tmp_path / "sae" / f"seed{seed}", tensors, cfg, firing_frequency=torch.from_numpy(frequency)))
    return folders


MATCH_SETTINGS = {"threshold": 0.7, "exclude_dead": True, "dead_frequency_threshold": 1e-9, "reference_seed": None, "solver": "auto", "candidates": 8, "device": "cpu"}


def test_run_match_writes_outputs_from_checkpoints(tmp_path):
    d_sae = 12
    folders = hand_built_sae_folders(tmp_path)
    output = tmp_path / "match"
    summary = run_match(folders, str(output), MATCH_SETTINGS, title="test/variant")
    for name in ("pairs.csv", "features.parquet", "summary.json", "max_cosine_hist.png"):
        assert (output / name).stat().st_size > 0
    assert json.loads((output / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["n_dead"] == {"0": 1, "1": 1, "2": 1}
    assert summary["sae_metadata"] == {"dataset_path": "hand-built"}
    features = pd.read_parquet(output / "features.parquet")
    assert features.loc[3, "dead"] and features.loc[3, "category"] == "dead"
    # seed 0 is unpermuted: latents 0..9 except the dead one are common to every seed
    assert set(features.index[features["category"] == "always"]) == set(range(10)) - {3}
    pairs = pd.read_csv(output / "pairs.csv")
    assert list(zip(pairs["seed_a"], pairs["seed_b"])) == [(0, 1), (0, 2), (1, 2)]
    assert (pairs["n_features_a"] == d_sae - 1).all()
    assert (output / "max_cosine_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["excluded_latents"]["count"] == {"0": 1, "1": 1, "2": 1}
    assert "rows not recorded" in summary["excluded_latents"]["reason"]  # cfg.json names no firing window


@pytest.mark.parametrize(("window", "words"), [(262144, "the first 262,144 training rows"), (None, "every training row")])
def test_match_summary_says_over_which_rows_latents_are_dead(tmp_path, window, words):
    folders = hand_built_sae_folders(tmp_path, {"firing_window_tokens": window})
    summary = run_match(folders, str(tmp_path / "match"), MATCH_SETTINGS)
    assert summary["dead_definition"] == f"firing frequency below 1e-09 over {words} (sparsity.safetensors)"
    assert summary["excluded_latents"] == {"count": {"0": 1, "1": 1, "2": 1}, "reason": summary["dead_definition"]}
    kept = run_match(folders, str(tmp_path / "match_all"), {**MATCH_SETTINGS, "exclude_dead": False})
    assert kept["excluded_latents"]["count"] == {"0": 0, "1": 0, "2": 0}


def test_a_seed_with_every_latent_dead_matches_nothing():
    seed0 = basis(0, 1, 2)
    result = match_dictionaries([seed0, seed0.copy()], [seed0, seed0.copy()], alive_masks=[np.ones(3, bool), np.zeros(3, bool)])
    pair = result.pair_table.iloc[0]
    assert (pair["n_features_a"], pair["n_features_b"], pair["n_shared"]) == (3, 0, 0)
    assert pair["mmcs_decoder_a_to_b"] == 0.0
    assert list(result.feature_table()["category"]) == ["never"] * 3
