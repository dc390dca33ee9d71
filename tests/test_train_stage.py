"""train_saes end to end on small caches: planted features are recovered, the group folder has the
promised layout, a killed run resumes to the same weights, and CE-loss recovered is measured."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from snakemake.utils import validate

from sae_pipeline.data.checkpoint import (
    load_firing_frequency,
    load_sae,
    load_sae_arrays,
    load_sae_config,
)
from sae_pipeline.data.loader import write_synthetic_cache
from sae_pipeline.layout import Experiment, expand_variants
from sae_pipeline.stages.train import (
    TrainingInterrupted,
    cross_entropy_losses,
    train_saes,
)
from tests.conftest import REPO_ROOT, TINY_HOOK

D_IN = 24
N_FEATURES = 48
FEATURES_PER_ROW = 3


def planted_activations(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [rows, D_IN], dictionary [N_FEATURES, D_IN])``: each row is 3 random unit features with
    magnitudes in [1, 3], a constant offset and a little noise."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((N_FEATURES, D_IN))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    chosen = np.argsort(rng.random((rows, N_FEATURES)), axis=1)[:, :FEATURES_PER_ROW]
    codes = np.zeros((rows, N_FEATURES))
    np.put_along_axis(codes, chosen, rng.uniform(1.0, 3.0, (rows, FEATURES_PER_ROW)), axis=1)
    x = codes @ dictionary + 0.4 + 0.01 * rng.standard_normal((rows, D_IN))
    return x.astype(np.float32), dictionary


PLANTED_SETTINGS = dict(architecture="topk", k=FEATURES_PER_ROW, d_sae=N_FEATURES, batch_size=256, total_tokens=256 * 350,
                        lr=1e-2, lr_scale_with_width=False, warmup_steps=10, decay_fraction=0.3, holdout_tokens=1024,
                        shuffle_buffer_rows=4096, dead_window_tokens=5000, aux_k=8, log_every=25, checkpoint_every=100, device="cpu")


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x, dictionary = planted_activations(12288)
    return write_synthetic_cache(tmp_path_factory.mktemp("planted"), x, context_size=16, rows_per_shard=2048), dictionary


def max_cosines(dictionary: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    return np.abs(dictionary @ decoder.T).max(axis=1)


def test_planted_features_are_recovered_and_the_group_folder_is_complete(planted_cache, tmp_path):
    cache, dictionary = planted_cache
    output = tmp_path / "sae" / "planted" / "seeds0-1"
    metrics = train_saes(cache, output, PLANTED_SETTINGS, [0, 1], tmp_path / "state", variant="planted", threads=1, progress=False)

    for seed in (0, 1):
        folder = output / f"seed{seed}"
        recovery = max_cosines(dictionary, load_sae_arrays(folder)["W_dec"]).mean()
        assert recovery > 0.9, f"seed {seed}: mean max cosine to the planted features {recovery:.3f}"
        assert metrics[seed]["fvu"] < 0.1
        assert metrics[seed]["l0"] <= FEATURES_PER_ROW

        cfg = load_sae_config(folder)
        assert cfg["architecture"] == "topk" and cfg["k"] == FEATURES_PER_ROW
        assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, N_FEATURES, "float32")
        assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
        assert set(cfg["metadata"]) == {"hook_name", "model_name", "context_size", "prepend_bos", "dataset_path", "sae_lens_version", "sae_lens_training_version"}
        assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["metadata"]["context_size"] == 16
        assert cfg["training"]["seed"] == seed and cfg["training"]["settings"]["lr"] == PLANTED_SETTINGS["lr"]

        written = json.loads((folder / "metrics.json").read_text())
        assert written == pytest.approx(metrics[seed])
        for key in ("fvu", "mse", "l0", "dead_fraction", "W_enc_norm", "W_dec_norm", "tokens_seen", "wall_time_s"):
            assert written[key] is not None, key
        assert written["ce_loss_recovered"] is None  # this cache names no subject model
        assert written["tokens_seen"] == 350 * 256 and written["eval_rows"] == 1024 - 1024 // 16

        frequency = load_firing_frequency(folder)
        assert frequency.shape == (N_FEATURES,)
        assert frequency.sum() == pytest.approx(written["l0"], rel=1e-3)  # frequencies sum to the mean L0


    curves = pd.read_parquet(output / "curves.parquet")
    assert {"step", "seed", "tokens", "mse", "fvu", "l0", "dead_fraction", "aux_loss", "penalty", "regularizer", "lr",
            "W_enc_norm", "W_dec_norm", "loss"} <= set(curves.columns)
    assert sorted(curves["seed"].unique()) == [0, 1] and curves["step"].max() == 350
    for seed in (0, 1):
        losses = curves[curves["seed"] == seed].sort_values("step")["loss"].to_numpy()
        assert losses[-1] < 0.2 * losses[0]  # the first row is step 1
    assert not (tmp_path / "state").exists()


def test_inference_sae_reproduces_the_reported_fvu(planted_cache, tmp_path):
    cache, _ = planted_cache
    config = {**PLANTED_SETTINGS, "total_tokens": 256 * 20}
    metrics = train_saes(cache, tmp_path / "out", config, [4], tmp_path / "state", threads=1, progress=False)
    sae = load_sae(tmp_path / "out" / "seed4")
    x, _ = planted_activations(12288)
    held_out = torch.from_numpy(x[-1024:][np.arange(12288 - 1024, 12288) % 16 != 0])
    with torch.no_grad():
        x_hat = sae(held_out)
    fvu = ((x_hat - held_out) ** 2).sum() / ((held_out - held_out.mean(dim=0)) ** 2).sum()
    assert fvu.item() == pytest.approx(metrics[4]["fvu"], rel=1e-4)


def test_firing_frequency_is_counted_over_the_training_window_not_the_hold_out(planted_cache, tmp_path):
    """sparsity.safetensors holds the share of the first firing_window_tokens training rows (BOS left
    out, hold-out never) on which each latent fires, counted with the final weights; the held-out
    figure stays in metrics.json under its own name."""
    cache, _ = planted_cache
    window = 5000
    config = {**PLANTED_SETTINGS, "total_tokens": 256 * 20, "firing_window_tokens": window}
    metrics = train_saes(cache, tmp_path / "out", config, [3], tmp_path / "state", threads=1, progress=False)
    sae = load_sae(tmp_path / "out" / "seed3")
    x, _ = planted_activations(12288)
    training_rows = x[: 12288 - 1024][np.arange(12288 - 1024) % 16 != 0]
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(training_rows[:window]))
    expected = (codes != 0).double().mean(dim=0).numpy()
    np.testing.assert_allclose(load_firing_frequency(tmp_path / "out" / "seed3"), expected, rtol=1e-5, atol=1e-9)
    assert metrics[3]["firing_window_rows"] == window
    assert metrics[3]["never_fired_in_window_fraction"] == pytest.approx(float((expected == 0).mean()))

    everything = train_saes(cache, tmp_path / "all", {**config, "firing_window_tokens": None}, [3], tmp_path / "state_all", threads=1, progress=False)
    assert everything[3]["firing_window_rows"] == len(training_rows)


def test_killed_run_resumes_to_identical_weights(planted_cache, tmp_path):
    cache, _ = planted_cache
    config = {**PLANTED_SETTINGS, "total_tokens": 256 * 60, "checkpoint_every": 10, "dead_window_tokens": 1500,
              "regularizer": {"kind": "off_support_l1", "coefficient": 1e-3}}
    train_saes(cache, tmp_path / "straight", config, [0, 1], tmp_path / "state_straight", threads=1, progress=False)

    with pytest.raises(TrainingInterrupted):
        train_saes(cache, tmp_path / "resumed", config, [0, 1], tmp_path / "state", threads=1, progress=False, stop_after_step=25)
    assert (tmp_path / "state" / "state.pt").exists() and not (tmp_path / "resumed").exists()
    train_saes(cache, tmp_path / "resumed", config, [0, 1], tmp_path / "state", threads=1, progress=False)
    assert not (tmp_path / "state").exists()

    for seed in (0, 1):
        straight = load_sae_arrays(tmp_path / "straight" / f"seed{seed}")
        resumed = load_sae_arrays(tmp_path / "resumed" / f"seed{seed}")
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert np.array_equal(straight[name], resumed[name]), (seed, name)
    straight_curves = pd.read_parquet(tmp_path / "straight" / "curves.parquet")
    resumed_curves = pd.read_parquet(tmp_path / "resumed" / "curves.parquet")
    pd.testing.assert_frame_equal(straight_curves, resumed_curves)


def test_state_from_other_settings_is_ignored(planted_cache, tmp_path):
    cache, _ = planted_cache
    config = {**PLANTED_SETTINGS, "total_tokens": 256 * 30}
    with pytest.raises(TrainingInterrupted):
        train_saes(cache, tmp_path / "a", {**config, "lr": 5e-3}, [0], tmp_path / "state", threads=1, progress=False, stop_after_step=10)
    train_saes(cache, tmp_path / "a", config, [0], tmp_path / "state", threads=1, progress=False)
    train_saes(cache, tmp_path / "b", config, [0], tmp_path / "state_b", threads=1, progress=False)
    assert np.array_equal(load_sae_arrays(tmp_path / "a" / "seed0")["W_dec"], load_sae_arrays(tmp_path / "b" / "seed0")["W_dec"])


@pytest.mark.parametrize("architecture, expected", [("relu", "standard"), ("batchtopk", "jumprelu"), ("matryoshka_batchtopk", "jumprelu")])
def test_other_architectures_train_and_save_saelens_names(planted_cache, tmp_path, architecture, expected):
    cache, _ = planted_cache
    config = {**PLANTED_SETTINGS, "architecture": architecture, "total_tokens": 256 * 40, "matryoshka_prefixes": [8, 24], "l1_coefficient": 0.01}
    metrics = train_saes(cache, tmp_path / "out", config, [0], tmp_path / "state", threads=1, progress=False)
    cfg = load_sae_config(tmp_path / "out" / "seed0")
    assert cfg["architecture"] == expected and cfg["training"]["architecture"] == architecture
    tensors = load_sae_arrays(tmp_path / "out" / "seed0")
    assert ("threshold" in tensors) == (expected == "jumprelu")
    if expected == "jumprelu":
        assert tensors["threshold"].shape == (N_FEATURES,) and tensors["threshold"].min() > 0
    assert 0 < metrics[0]["fvu"] < 1


def test_language_model_cache_gets_ce_loss_recovered(tiny_cache, tmp_path):
    config = dict(k=4, d_sae=64, batch_size=128, total_tokens=128 * 40, lr=5e-3, lr_scale_with_width=False, warmup_steps=5,
                  holdout_tokens=512, ce_eval_sequences=8, shuffle_buffer_rows=1024, log_every=10, device="cpu")
    metrics = train_saes(tiny_cache, tmp_path / "out", config, [0], tmp_path / "state", threads=1, progress=False)[0]
    assert metrics["ce_eval_sequences"] == 8
    # the tiny subject model is random, so only the bookkeeping can be checked, not the direction
    assert metrics["ce_loss_clean"] != pytest.approx(metrics["ce_loss_zero_ablation"], abs=1e-4)
    expected = (metrics["ce_loss_zero_ablation"] - metrics["ce_loss_with_sae"]) / (metrics["ce_loss_zero_ablation"] - metrics["ce_loss_clean"])
    assert metrics["ce_loss_recovered"] == pytest.approx(expected)
    cfg = load_sae_config(tmp_path / "out" / "seed0")
    assert cfg["metadata"]["hook_name"] == TINY_HOOK and cfg["metadata"]["prepend_bos"] is True


def test_identity_splice_recovers_all_of_the_loss(tiny_cache, tiny_subject_model):
    from sae_pipeline.data.shards import ActivationStore
    from sae_pipeline.subject.model import load_subject_model

    bridge = load_subject_model(str(tiny_subject_model), "cpu")
    tokens = torch.from_numpy(ActivationStore(tiny_cache).sequences()[:4].astype(np.int64))
    losses = cross_entropy_losses(bridge, TINY_HOOK, tokens, [torch.nn.Identity(), lambda activation: 0.5 * activation])
    assert losses["with_sae"][0] == pytest.approx(losses["clean"], abs=1e-6)
    assert losses["with_sae"][1] != pytest.approx(losses["clean"], abs=1e-4)
    assert losses["zero_ablation"] != pytest.approx(losses["clean"], abs=1e-3)


def test_group_and_variant_lookups_name_what_is_configured():
    experiment = Experiment(yaml.safe_load((REPO_ROOT / "config.yaml").read_text()))
    config = experiment.train_section("lm")
    assert experiment.group_seeds("lm", "seeds0-1-2") == [0, 1, 2]
    with pytest.raises(ValueError, match="seeds0-1-2"):
        experiment.group_seeds("lm", "seeds7")
    all_variants = expand_variants(config)
    name = next(iter(all_variants))
    assert experiment.variant_settings("lm", name)["d_sae"] == config["options"]["d_sae"]
    with pytest.raises(ValueError, match=name):
        experiment.variant_settings("lm", "nope")


def test_schema_accepts_the_default_section_and_a_digits_style_section_and_names_bad_keys():
    schema = str(REPO_ROOT / "workflow" / "schemas" / "train.schema.yaml")
    section = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["train"]
    validate(copy.deepcopy(section), schema)
    digits_style = {"seeds": [0, 1], "seeds_per_job": 2,
                    "grid": {"weight_penalty": [{"kind": "none"}, {"kind": "l1", "coefficient": 1e-4}], "tied_init": [True, False],
                             "unit_norm_decoder": [True, False]},
                    "options": {"architecture": "relu", "d_sae": 128, "holdout_tokens": 256, "ce_eval_sequences": 0}}
    validate(copy.deepcopy(digits_style), schema)
    every_variant = expand_variants(digits_style)
    assert len(every_variant) == 8
    for settings in every_variant.values():
        from sae_pipeline.settings import TrainSettings

        TrainSettings.from_mapping(settings)
    for path, value in ((("options", "lr_schedule"), 1), (("grid", "colour"), ["red"]), (("options", "autocast"), "fp8")):
        broken = copy.deepcopy(section)
        broken[path[0]][path[1]] = value
        with pytest.raises(Exception, match=path[1] if path[1] != "autocast" else "fp8"):
            validate(broken, schema)


def test_normalized_activations_train_the_same_sae_at_any_scale(tmp_path):
    """With normalize_activations the SAE trains on x scaled to mean squared norm d_in: a cache 1000x
    larger gives the same codes, its saved weights carry the factor, and they reconstruct the raw rows."""
    x, _ = planted_activations(8192, seed=3)
    settings = {**PLANTED_SETTINGS, "normalize_activations": "mean_squared_norm", "total_tokens": 256 * 120, "holdout_tokens": 512}
    results = {}
    for factor in (1.0, 1000.0):
        cache = write_synthetic_cache(tmp_path / f"cache{factor:g}", (x * factor).astype(np.float32), context_size=16, rows_per_shard=2048)
        output = tmp_path / f"sae{factor:g}"
        metrics = train_saes(cache, output, settings, [0], tmp_path / f"state{factor:g}", threads=1, progress=False)
        results[factor] = (metrics[0], load_sae_arrays(output / "seed0"))
    (small, small_tensors), (large, large_tensors) = results[1.0], results[1000.0]
    assert large["activation_scale"] == pytest.approx(small["activation_scale"] / 1000, rel=1e-6)
    assert large["fvu"] == pytest.approx(small["fvu"], rel=1e-3) and small["fvu"] < 0.2
    np.testing.assert_allclose(large_tensors["W_enc"], small_tensors["W_enc"] / 1000, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(large_tensors["W_dec"], small_tensors["W_dec"] * 1000, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("cap_multiple, selection", [(0, "dense"), (1, "candidates")])
def test_batchtopk_metrics_say_how_the_batch_was_selected(planted_cache, tmp_path, cap_multiple, selection):
    """metrics.json names BatchTopK's selection; from candidates it gives their number and the capped tokens, which
    with one candidate a token (k of them) are counted on the planted rows, whose latents spread unevenly over tokens."""
    cache, _ = planted_cache
    config = {**PLANTED_SETTINGS, "architecture": "batchtopk", "total_tokens": 256 * 20, "sparse_decoder": "kernels",
              "batch_topk_cap_multiple": cap_multiple}
    metrics = train_saes(cache, tmp_path / "out", config, [0], tmp_path / "state", threads=1, progress=False)[0]
    assert metrics["batch_topk_selection"] == selection
    if selection == "candidates":
        assert metrics["batch_topk_candidates"] == FEATURES_PER_ROW
        assert 0 < metrics["batch_topk_capped_tokens"] <= 256 * 20
    else:
        assert "batch_topk_capped_tokens" not in metrics
