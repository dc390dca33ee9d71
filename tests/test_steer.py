"""Steering: the hook, KV-cached generation, strengths, feature sampling, the LLM judge's parser, and
the whole stage on the tiny subject model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sae_pipeline.judges.prompts import parse_llm_score
from sae_pipeline.stages import steer
from sae_pipeline.stages.steer import feature_strengths, sample_features
from sae_pipeline.subject import steering
from sae_pipeline.subject.steering import (
    NewestPositionSteering,
    SamplingSettings,
    generate_continuations,
    last_prompt_activations,
    left_pad,
    prompt_token_ids,
    residual_rms,
    sample_next_tokens,
    sampling_uniforms,
    steer_features,
)
from tests.conftest import TINY_HOOK

PROMPTS = ["The most important thing is", "A common example of", "In recent years,", "He said"]
GREEDY = SamplingSettings(greedy=True)
SAMPLED = SamplingSettings(greedy=False, temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def bridge(tiny_subject_model):
    from sae_pipeline.subject.model import load_subject_model

    return load_subject_model(str(tiny_subject_model), device="cpu")


@pytest.fixture(scope="module")
def prompt_tokens(bridge):
    tokens = prompt_token_ids(bridge.tokenizer, PROMPTS, 0)
    assert len({len(row) for row in tokens}) > 1, "the prompts should need padding"
    return tokens


def unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    vectors = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=-1, keepdim=True)


def test_hook_changes_only_the_last_position_by_the_vector():
    activation = torch.randn(3, 5, 8)
    vectors = torch.randn(3, 8)
    steered = NewestPositionSteering(vectors)(activation)
    assert torch.equal(steered[:, :-1], activation[:, :-1])
    assert torch.equal(steered[:, -1], activation[:, -1] + vectors)
    assert not torch.equal(activation[:, -1], steered[:, -1]), "the input must not be modified in place"


def test_hook_in_the_model_adds_strength_times_unit_direction_at_the_newest_position(bridge, prompt_tokens):
    """Capture the hook point's output after the steering hook: it equals the unsteered output plus
    strength x unit vector at the last position, and is bit-identical elsewhere."""
    batch = left_pad(prompt_tokens, 0, "cpu")
    direction = unit_vectors(1, bridge.cfg.d_model, 0)[0]
    strengths = torch.tensor([0.0, 1.5, 7.0, -3.0])

    def capture(store):
        def hook(activation, hook=None):
            store.append(activation.detach().clone())
            return activation

        return hook

    plain, steered = [], []
    with torch.no_grad():
        with bridge.hooks(fwd_hooks=[(TINY_HOOK, capture(plain))]):
            bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        hook = NewestPositionSteering(strengths[:, None] * direction)
        with bridge.hooks(fwd_hooks=[(TINY_HOOK, hook), (TINY_HOOK, capture(steered))]):
            bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    added = steered[0] - plain[0]
    assert torch.equal(added[:, :-1], torch.zeros_like(added[:, :-1]))
    torch.testing.assert_close(added[:, -1], strengths[:, None] * direction, atol=1e-5, rtol=0)
    torch.testing.assert_close(added[:, -1].norm(dim=-1), strengths.abs(), atol=1e-5, rtol=0)


def test_cached_generation_equals_full_recompute_with_vector_from_the_last_prompt_token(bridge, prompt_tokens):
    """The documented semantics: KV-cached generation with the newest-position hook equals a cache-free
    forward over prompt + generated tokens with the vector at every position from the last prompt token on."""
    new_tokens = 6
    vectors = 4.0 * unit_vectors(len(prompt_tokens), bridge.cfg.d_model, 1)
    uniforms = sampling_uniforms(3, len(prompt_tokens), new_tokens)
    generated = generate_continuations(bridge, TINY_HOOK, prompt_tokens, new_tokens, SAMPLED, vectors, uniforms, return_logits=True)
    for row, prompt in enumerate(prompt_tokens):
        sequence = torch.tensor([list(prompt) + generated.tokens[row, :-1].tolist()])
        first_steered = len(prompt) - 1

        def add_from_last_prompt_token(activation, hook=None, row=row, first_steered=first_steered):
            activation = activation.clone()
            activation[0, first_steered:] += vectors[row]
            return activation

        with torch.no_grad(), bridge.hooks(fwd_hooks=[(TINY_HOOK, add_from_last_prompt_token)]):
            logits = bridge(sequence)
        torch.testing.assert_close(generated.logits[row], logits[0, first_steered:], atol=2e-5, rtol=1e-5)


def test_unsteered_greedy_generation_matches_the_bridge_generate(bridge, prompt_tokens):
    ours = generate_continuations(bridge, TINY_HOOK, prompt_tokens[:1], 8, GREEDY)
    reference = bridge.generate(torch.tensor([prompt_tokens[0]]), max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert ours.tokens[0].tolist() == reference[0, len(prompt_tokens[0]) :].tolist()


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_generation_equals_one_at_a_time(bridge, prompt_tokens, sampling):
    new_tokens = 8
    rows = prompt_tokens * 2
    vectors = 3.0 * unit_vectors(len(rows), bridge.cfg.d_model, 2)
    vectors[: len(prompt_tokens)] = 0.0
    uniforms = sampling_uniforms(0, len(prompt_tokens), new_tokens).repeat(2, 1)
    batched = generate_continuations(bridge, TINY_HOOK, rows, new_tokens, sampling, vectors, uniforms, return_logits=True)
    for row in range(len(rows)):
        single = generate_continuations(bridge, TINY_HOOK, rows[row : row + 1], new_tokens, sampling, vectors[row : row + 1], uniforms[row : row + 1], return_logits=True)
        assert batched.tokens[row].tolist() == single.tokens[0].tolist()
        torch.testing.assert_close(batched.logits[row], single.logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_strength_zero_reproduces_the_unsteered_text_and_a_large_one_changes_it(bridge, sampling):
    directions = unit_vectors(3, bridge.cfg.d_model, 4)
    zero = steer_features(bridge, TINY_HOOK, PROMPTS, directions, np.zeros(3), 10, sampling, sampling_seed=7, batch_size=8)
    assert zero.steered == [zero.originals] * 3
    strong = steer_features(bridge, TINY_HOOK, PROMPTS, directions, np.full(3, 40.0), 10, sampling, sampling_seed=7, batch_size=8)
    assert strong.originals == zero.originals
    assert strong.steered != [strong.originals] * 3


def test_steer_features_does_not_depend_on_batch_size(bridge):
    directions = unit_vectors(3, bridge.cfg.d_model, 5)
    strengths = np.array([2.0, 5.0, 9.0])
    one_feature_per_batch = steer_features(bridge, TINY_HOOK, PROMPTS, directions, strengths, 8, SAMPLED, sampling_seed=1, batch_size=1)
    all_in_one = steer_features(bridge, TINY_HOOK, PROMPTS, directions, strengths, 8, SAMPLED, sampling_seed=1, batch_size=64)
    assert one_feature_per_batch == all_in_one


def test_sampler_inverse_cdf_by_hand():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]] * 3))
    # top_p 1: the CDF over token ids in order is [0.2, 0.7, 1.0]
    full = SamplingSettings(greedy=False, temperature=1.0, top_p=1.0)
    assert sample_next_tokens(logits, torch.tensor([0.1, 0.6, 0.9]), full).tolist() == [0, 1, 2]
    # top_p 0.7: by probability [1 (0.5), 2 (0.3), 0 (0.2)]; the nucleus is {1, 2} (mass 0.8)
    # u = 0.9 -> 0.72 of 0.8 -> token 2; u = 0.5 -> 0.4 -> token 1; u = 0.99 -> 0.792 -> token 2
    nucleus_settings = SamplingSettings(greedy=False, temperature=1.0, top_p=0.7)
    assert sample_next_tokens(logits, torch.tensor([0.9, 0.5, 0.99]), nucleus_settings).tolist() == [2, 1, 2]
    # top_p 0.5: only token 1
    only_top = SamplingSettings(greedy=False, temperature=1.0, top_p=0.5)
    assert sample_next_tokens(logits, torch.tensor([0.0, 0.5, 0.999]), only_top).tolist() == [1, 1, 1]
    assert sample_next_tokens(logits, None, GREEDY).tolist() == [1, 1, 1]


def reference_nucleus_sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Full stable sort of the vocabulary, then inverse CDF over the nucleus (no candidate shortcut)."""
    probabilities = torch.softmax(logits.double() / temperature, dim=-1)
    values, order = probabilities.sort(dim=-1, descending=True, stable=True)
    kept = torch.where(values.cumsum(-1) - values < top_p, values, torch.zeros_like(values))
    cumulative = kept.cumsum(-1)
    picks = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(-1), right=True)
    picks = torch.minimum(picks, (kept > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, picks).squeeze(-1)


@pytest.mark.parametrize("candidates", [1024, 3], ids=["candidates-cover", "some-rows-fully-sorted"])
def test_nucleus_from_candidates_equals_the_full_sort(monkeypatch, candidates):
    monkeypatch.setattr(steering, "NUCLEUS_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 50, generator=generator) * torch.linspace(0.2, 4.0, 400).unsqueeze(-1)
    logits[:10, :5] = 2.0  # exact ties, broken by token id
    uniforms = torch.rand(400, generator=generator, dtype=torch.float64)
    for top_p in (0.3, 0.9):
        ours = sample_next_tokens(logits, uniforms, SamplingSettings(greedy=False, temperature=0.8, top_p=top_p))
        assert torch.equal(ours, reference_nucleus_sample(logits, uniforms, 0.8, top_p))


def test_sampler_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = sample_next_tokens(logits, uniforms, SamplingSettings(greedy=False, temperature=2.0, top_p=1.0))
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    observed = torch.bincount(tokens, minlength=4).double() / len(tokens)
    torch.testing.assert_close(observed, expected.double(), atol=0.015, rtol=0)


def test_strength_modes_by_hand(bridge, prompt_tokens):
    d = bridge.cfg.d_model
    directions = unit_vectors(2, d, 6)
    encoder_columns = torch.randn(2, d, generator=torch.Generator().manual_seed(7))
    settings = {"fixed_strength": 3.0, "strength_multiple": 5.0, "target_rise": 2.5}
    assert feature_strengths("fixed", directions, encoder_columns, settings).tolist() == [3.0, 3.0]

    last = last_prompt_activations(bridge, TINY_HOOK, prompt_tokens)
    by_hand = np.mean([math.sqrt(float((last[i] ** 2).mean())) for i in range(len(prompt_tokens))])
    assert residual_rms(last) == pytest.approx(by_hand, rel=1e-6)
    assert feature_strengths("resid_rms", directions, encoder_columns, settings, resid_rms=by_hand) == pytest.approx([5 * by_hand] * 2)

    strengths = feature_strengths("target_rise", directions, encoder_columns, settings)
    rises = [(strengths[i] * directions[i].double() @ encoder_columns[i].double()).item() for i in range(2)]
    assert rises == pytest.approx([2.5, 2.5], rel=1e-9)
    axes = torch.eye(d)[:2]
    orthogonal = torch.stack([torch.eye(d)[1], torch.eye(d)[1]])
    assert np.isnan(feature_strengths("target_rise", axes, orthogonal, settings)).tolist() == [True, False]
    with pytest.raises(ValueError, match="strength_mode"):
        feature_strengths("loud", directions, encoder_columns, settings)


def test_last_prompt_activations_are_padding_independent(bridge, prompt_tokens):
    together = last_prompt_activations(bridge, TINY_HOOK, prompt_tokens)
    for row, tokens in enumerate(prompt_tokens):
        alone = last_prompt_activations(bridge, TINY_HOOK, [tokens])
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)


def scores_table() -> pd.DataFrame:
    """Autointerp-like table: 5 always, 3 sometimes, 6 never features; some without explanations."""
    rows = []
    categories = ["always"] * 5 + ["sometimes"] * 3 + ["never"] * 6
    for feature, category in enumerate(categories):
        explanation = {2: None, 9: "", 10: "N/A"}.get(feature, f"words about topic {feature}")
        share = {"always": 3, "sometimes": 1, "never": 0}[category]
        rows.append({"feature": feature, "category": category, "share_count": share, "explanation": explanation,
                     "detection_score": feature / 20, "fuzzing_score": 0.5})
    return pd.DataFrame(rows)


def test_sample_features_caps_each_category_and_needs_an_explanation():
    scores = scores_table()
    chosen = sample_features(scores, per_category=3, seed=0)
    counts = chosen["category"].value_counts().to_dict()
    assert counts == {"always": 3, "sometimes": 3, "never": 3}
    assert not set(chosen["feature"]) & {2, 9, 10}
    assert list(chosen["category"].unique()) == ["always", "sometimes", "never"]
    assert chosen.equals(sample_features(scores, per_category=3, seed=0))
    everything = sample_features(scores, per_category=100, seed=0)
    assert sorted(everything["feature"]) == [f for f in range(14) if f not in (2, 9, 10)]
    with pytest.raises(ValueError, match="explanation"):
        sample_features(scores.drop(columns=["explanation"]), 3, 0)


def test_features_without_a_sharedness_category_are_sampled_as_unknown():
    """Autointerp run without the match table leaves category and share_count empty."""
    scores = scores_table()
    scores["category"] = pd.array([pd.NA] * len(scores), dtype="string")
    scores["share_count"] = pd.array([pd.NA] * len(scores), dtype="Int64")
    chosen = sample_features(scores, per_category=4, seed=1)
    assert chosen["category"].tolist() == ["unknown"] * 4
    texts = steer.SteeringTexts(originals=["a"], steered=[["b"]] * 4)
    rows = steer.steering_rows(chosen, ["p"], texts, np.ones(4), steer_settings())
    assert rows["share_count"].isna().all() and str(rows["share_count"].dtype) == "Int64"
    assert rows["interp_score"].tolist() == (chosen["feature"] / 20).tolist()


@pytest.mark.parametrize(
    "answer, score",
    [("4", 4), (" 5\n", 5), ("1.", 1), ("3", 3), ("0", None), ("6", None), ("4/5", None), ("Score: 4", None),
     ("4 - slightly more", None), ("", None), (None, None), ("45", None)],
)
def test_llm_score_parser_is_strict(answer, score):
    assert parse_llm_score(answer) == score


def test_llm_success_threshold():
    assert [steer.llm_success(s, 4) for s in (1, 2, 3, 4, 5, None)] == [False, False, False, True, True, None]
    assert steer.llm_success(3, 3) is True


def test_llm_judge_prompt_names_the_scale_and_the_texts():
    messages = steer.llm_judge_messages("fish and the sea", "The cat sat", "The fish swam in the sea")
    assert messages[0]["role"] == "system" and "3 = no meaningful change" in messages[0]["content"]
    assert "MORE related" in messages[0]["content"]
    user = messages[1]["content"]
    assert '"fish and the sea"' in user and '"The cat sat"' in user and '"The fish swam in the sea"' in user


@pytest.fixture(scope="module")
def steering_inputs(tmp_path_factory, tiny_subject_model, tiny_cache):
    """Manifest, a random SAE over the tiny model's hook, and an autointerp scores table."""
    from sae_pipeline.data.checkpoint import save_sae

    folder = tmp_path_factory.mktemp("steer_inputs")
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    d_in, d_sae = int(manifest["d_model"]), 16
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    tensors = {"W_enc": W_dec.T.clone(), "W_dec": W_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}
    save_sae(folder / "sae", tensors, {"architecture": "topk", "k": 4, "metadata": {"hook_name": manifest["hook_name"]}})
    scores_path = folder / "scores.parquet"
    scores_table().to_parquet(scores_path, index=False)
    return {"manifest": tiny_cache / "manifest.json", "sae": folder / "sae", "scores": scores_path}


def steer_settings(**overrides) -> dict:
    settings = {
        "seed": 0, "features_per_category": 2, "prompts": PROMPTS[:3], "new_tokens": 6, "strength_mode": "resid_rms",
        "strength_multiple": 5.0, "fixed_strength": 5.0, "target_rise": 5.0, "greedy": False, "sampling_seed": 0,
        "temperature": 0.7, "top_p": 0.9, "judges": [], "embedding_threshold": 0.45, "llm_success_threshold": 4,
        "batch_size": 8, "device": "cpu",
    }
    settings.update(overrides)
    return settings


def test_run_steering_writes_rows_and_feature_rates_with_the_llm_judge(tmp_path, steering_inputs):
    """The stage end to end with the LLM judge served by a local OpenAI-compatible server."""
    from tests.fake_openai_server import FakeOpenAIServer, Scripted

    rows_path, features_path = tmp_path / "rows.parquet", tmp_path / "features.csv"
    with FakeOpenAIServer() as server:
        # 6 features x 3 prompts = 18 requests: scripted answers cover every case of the parser.
        answers = ["5", "4", "3", "2", "1", "four"] * 3
        answers[7] = None  # a request the server rejects: recorded with its error, not scored
        server.script([Scripted(text=answer) if answer is not None else Scripted(status=400) for answer in answers])
        llm = {"base_url": server.base_url, "model": "fake-judge", "api_key_env": None, "max_concurrency": 1}
        rows = steer.run_steering(
            steering_inputs["manifest"], steering_inputs["sae"], steering_inputs["scores"],
            rows_path, features_path, steer_settings(judges=["llm"]), llm_settings=llm, llm_cache_dir=tmp_path / "judge_cache",
        )
        assert server.completion_requests == 18
    written = pd.read_parquet(rows_path)
    assert list(written.columns) == list(steer.ROW_COLUMNS)
    assert len(written) == 18 and written["feature"].nunique() == 6
    assert (written.groupby("feature").size() == 3).all()
    assert set(written["category"]) == {"always", "sometimes", "never"}
    assert written["llm_answer"].tolist() == [pd.NA if answer is None else answer for answer in answers]
    assert written["llm_score"].tolist()[:8] == [5, 4, 3, 2, 1, pd.NA, 5, pd.NA]
    assert written["llm_success"].tolist()[:8] == [True, True, False, False, False, pd.NA, True, pd.NA]
    assert "400" in written["llm_error"].iloc[7] and written["llm_error"].drop(index=7).isna().all()
    assert written["embedding_score"].isna().all()
    assert (written["strength_mode"] == "resid_rms").all() and written["strength"].nunique() == 1
    assert written["strength"].iloc[0] > 0
    expected_interp = written["feature"] / 20
    np.testing.assert_allclose(written["interp_score"], expected_interp)
    # one original per prompt, shared by every feature (common random numbers)
    assert written.groupby("prompt")["original"].nunique().eq(1).all()

    features = pd.read_csv(features_path)
    assert len(features) == 6
    for feature in features.itertuples():
        mine = written[written["feature"] == feature.feature]
        scored = mine["llm_success"].dropna()
        assert feature.llm_success_rate == pytest.approx(scored.astype(float).mean())
        assert feature.n_llm_scored == len(scored)
    assert rows is not None


def test_run_steering_without_explained_features_writes_empty_tables(tmp_path, steering_inputs):
    scores = scores_table()
    scores["explanation"] = "N/A"
    scores.to_parquet(tmp_path / "scores.parquet", index=False)
    rows = steer.run_steering(
        steering_inputs["manifest"], steering_inputs["sae"], tmp_path / "scores.parquet",
        tmp_path / "rows.parquet", tmp_path / "features.csv", steer_settings(judges=["embedding"]),
    )
    assert rows.empty and list(pd.read_parquet(tmp_path / "rows.parquet").columns) == list(steer.ROW_COLUMNS)
    assert pd.read_csv(tmp_path / "features.csv").empty


def test_run_steering_llm_judge_needs_endpoint_settings(tmp_path, steering_inputs):
    with pytest.raises(ValueError, match="judge endpoint"):
        steer.run_steering(
            steering_inputs["manifest"], steering_inputs["sae"], steering_inputs["scores"],
            tmp_path / "rows.parquet", tmp_path / "features.csv", steer_settings(judges=["llm"]),
        )
    assert not (tmp_path / "rows.parquet").exists()


def test_run_steering_with_strength_zero_changes_nothing_and_embedding_judge_scores(tmp_path, steering_inputs):
    rows = steer.run_steering(
        steering_inputs["manifest"], steering_inputs["sae"], steering_inputs["scores"],
        tmp_path / "rows.parquet", tmp_path / "features.csv",
        steer_settings(strength_mode="fixed", fixed_strength=0.0, greedy=True, judges=["embedding"], features_per_category=1),
    )
    assert (rows["original"] == rows["steered"]).all()
    assert rows["embedding_score"].between(-1, 1).all()
    assert rows["embedding_success"].tolist() == (rows["embedding_score"] >= 0.45).tolist()
    features = pd.read_csv(tmp_path / "features.csv")
    for feature in features.itertuples():
        mine = rows[rows["feature"] == feature.feature]
        assert feature.embedding_success_rate == pytest.approx(mine["embedding_success"].astype(float).mean())
        assert feature.mean_embedding_score == pytest.approx(mine["embedding_score"].mean())
    assert features["llm_success_rate"].isna().all()
