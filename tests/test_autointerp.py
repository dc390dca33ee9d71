"""Autointerp: mining on a hand-made cache with planted activations, the offline baseline, the LLM
backend against the local fake server (real ``openai`` client over HTTP), strict parsing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sae_pipeline.data.checkpoint import load_sae, save_sae
from sae_pipeline.data.shards import (
    ActivationStore,
    ShardData,
    write_manifest,
    write_numbered_shard,
    write_sequences,
)
from sae_pipeline.features.contexts import TokenText, build_contexts, render_context
from sae_pipeline.features.mining import mine_examples
from sae_pipeline.judges.prompts import parse_binary_list, parse_explanation
from sae_pipeline.judges.scorers import balanced_accuracy
from sae_pipeline.settings import MiningSettings
from sae_pipeline.stages.autointerp import (
    SCORE_COLUMNS,
    run_autointerp,
    select_features,
)
from tests.conftest import REPO_ROOT, tiny_documents
from tests.fake_openai_server import FakeOpenAIServer, Scripted, autointerp_responder

CONTEXT = 16
N_SEQUENCES = 120
ROWS_PER_SHARD = 100  # not a multiple of CONTEXT: sequences straddle shards
# Feature 1 fires only here: (sequence, position, activation).
PLANTED = [(3, 5, 9.0), (10, 12, 8.0), (10, 11, 7.5), (20, 1, 7.0), (40, 15, 6.0), (41, 8, 5.0)] + [(doc, 7, 0.5) for doc in range(50, 60)]
MINING = MiningSettings(window_before=3, window_after=2, n_top=4, n_activating_sample=30, n_non_activating=5, batch_rows=50, device="cpu")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_subject_model):
    """A cache of 120 real token sequences with d_model 4 activations planted per feature, and an identity ReLU SAE.

    Feature 0 fires (2 + 0.01 * position) on every occurrence of one word token (the target);
    feature 1 fires only at ``PLANTED``; feature 2 never fires; feature 3 fires at random on 20% of tokens.
    BOS rows carry activation 50 on every feature (mining must ignore them).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_subject_model)
    stream = np.asarray(tokenizer(" ".join(tiny_documents()))["input_ids"], dtype=np.int32)
    body = stream[: N_SEQUENCES * (CONTEXT - 1)].reshape(N_SEQUENCES, CONTEXT - 1)
    sequences = np.concatenate([np.zeros((N_SEQUENCES, 1), np.int32), body], axis=1)
    counts = np.bincount(sequences[:, 1:].ravel(), minlength=len(tokenizer))
    share = counts / counts.sum()
    words = [t for t in range(len(tokenizer)) if len(tokenizer.decode([t]).strip()) >= 3 and 0.01 <= share[t] <= 0.05]
    target = max(words, key=lambda t: counts[t])

    rng = np.random.default_rng(0)
    positions = np.tile(np.arange(CONTEXT), N_SEQUENCES)
    docs = np.repeat(np.arange(N_SEQUENCES), CONTEXT)
    tokens = sequences.reshape(-1)
    activations = np.zeros((len(tokens), 4), np.float32)
    activations[:, 0] = np.where(tokens == target, 2.0 + 0.01 * positions, 0.0)
    for doc, position, value in PLANTED:
        activations[doc * CONTEXT + position, 1] = value
    activations[:, 2] = -1.0
    activations[:, 3] = np.where(rng.random(len(tokens)) < 0.2, rng.random(len(tokens)), 0.0)
    activations[positions == 0] = 50.0

    root = tmp_path_factory.mktemp("planted_cache")
    shards = []
    for index, begin in enumerate(range(0, len(tokens), ROWS_PER_SHARD)):
        part = slice(begin, begin + ROWS_PER_SHARD)
        data = ShardData(activations[part], docs[part], positions[part].astype(np.int32), tokens[part], positions[part] == 0)
        shards.append(write_numbered_shard(root, index, data, "float32"))
    write_sequences(root / "tokens.parquet", sequences)
    write_manifest(
        root, model=str(tiny_subject_model), hook_name="blocks.0.hook_resid_post", dtype="float32", d_model=4, context_size=CONTEXT,
        rows_per_shard=ROWS_PER_SHARD, shards=shards, tokens="tokens.parquet", bos_token_id=0,
    )

    sae_folder = root / "sae"
    eye = torch.eye(4)
    save_sae(sae_folder, {"W_enc": eye, "W_dec": eye.clone(), "b_enc": torch.zeros(4), "b_dec": torch.zeros(4)}, {"architecture": "relu"})
    sharedness = pd.DataFrame({"feature": [0, 1, 2, 3], "share_count": [3, 1, 0, 0], "category": ["always", "sometimes", "never", "never"]})
    sharedness.to_parquet(root / "features.parquet")
    return {"root": root, "sae": sae_folder, "sequences": sequences, "target": int(target), "tokenizer": tokenizer, "features": root / "features.parquet"}


def mine(planted, settings=MINING, features=(0, 1, 2, 3)):
    return mine_examples(ActivationStore(planted["root"]), load_sae(planted["sae"]), list(features), settings, random_seed=0, progress=False)


def test_mining_finds_the_planted_top_contexts(planted):
    examples = mine(planted)
    top = examples[1].top
    # (10, 11) overlaps (10, 12)'s window and is dropped; windows are centred: 3 before, 2 after.
    assert list(zip(top.doc_id, top.start + 3)) == [(3, 5), (10, 12), (20, 1), (40, 15)]
    contexts = build_contexts(top, planted["sequences"])
    np.testing.assert_allclose(contexts[0].activations, [0, 0, 0, 9, 0, 0])
    np.testing.assert_allclose(contexts[1].activations, [0, 0, 7.5, 8, 0, 0])  # the neighbour's activation shows
    np.testing.assert_allclose(contexts[2].activations, [7, 0, 0])  # clipped at the sequence start, BOS excluded
    np.testing.assert_allclose(contexts[3].activations, [0, 0, 0, 6])  # clipped at the sequence end
    assert (contexts[2].start, contexts[3].start) == (1, 12)
    for context in contexts:
        np.testing.assert_array_equal(context.token_ids, planted["sequences"][context.doc_id, context.start : context.start + len(context.token_ids)])


def test_mining_samples_and_non_activating_contexts(planted):
    examples = mine(planted)
    sampled = examples[1].sampled
    peaks = {(int(d), int(p)) for d, p in zip(sampled.doc_id, sampled.start + 3)}
    assert peaks == {(41, 8)} | {(doc, 7) for doc in range(50, 60)}
    quiet = examples[1].non_activating
    assert len(quiet) == 5 and np.all(quiet.start % MINING.window == 0)
    planted_positions = {(d, p) for d, p, _ in PLANTED}
    for doc, start in zip(quiet.doc_id, quiet.start):
        assert not any((doc, p) in planted_positions for p in range(start, start + MINING.window))
    dead = examples[2]
    assert len(dead.top) == 0 and len(dead.sampled) == 0 and dead.n_firing_tokens == 0 and len(dead.non_activating) == 5
    # Feature 0: BOS rows (activation 50) never show up; the top values are the planted 2 + 0.01 * position.
    assert examples[0].max_activation < 3.0
    assert examples[0].n_firing_tokens == int((planted["sequences"][:, 1:] == planted["target"]).sum())
    assert examples[1].n_firing_tokens == len(PLANTED)


def test_mining_does_not_depend_on_chunking(planted):
    small = mine(planted)
    whole = mine(planted, MiningSettings(**{**MINING.__dict__, "batch_rows": 100000}))
    np.testing.assert_array_equal(small[1].top.doc_id, whole[1].top.doc_id)
    np.testing.assert_array_equal(small[1].top.start, whole[1].top.start)
    np.testing.assert_allclose(small[1].top.activations, whole[1].top.activations)
    # Feature 0 has ties (same position in several sequences): the peak values agree, the tie-break may not.
    np.testing.assert_allclose(small[0].top.activations.max(axis=1), whole[0].top.activations.max(axis=1))
    assert set(zip(small[1].sampled.doc_id, small[1].sampled.start)) == set(zip(whole[1].sampled.doc_id, whole[1].sampled.start))


def test_mining_a_subset_of_features_matches_mining_all(planted):
    subset = mine(planted, features=(1,))
    everything = mine(planted)
    np.testing.assert_array_equal(subset[1].top.start, everything[1].top.start)
    assert set(subset) == {1}


def autointerp_settings(backend: str, llm: dict | None = None) -> dict:
    """The repository's config section, shrunk for the planted cache."""
    settings = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["autointerp"]
    settings.update(backend=backend, threads=1)
    settings["mining"] = {**MINING.__dict__}
    settings["explain"] = {"n_top": 2, "n_per_quantile": 1}
    settings["score"] = {"n_quantiles": 2, "n_per_quantile": 3, "contexts_per_prompt": 4, "min_activating_contexts": 3}
    if llm is not None:
        settings["llm"] = {**settings["llm"], **llm}
    return settings


def test_config_section_matches_its_schema():
    import jsonschema

    schema = yaml.safe_load((REPO_ROOT / "workflow/schemas/autointerp.schema.yaml").read_text())
    jsonschema.validate(yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["autointerp"], schema)
    with pytest.raises(jsonschema.ValidationError, match="api_kye_env"):
        jsonschema.validate({**autointerp_settings("llm"), "llm": {**autointerp_settings("llm")["llm"], "api_kye_env": "X"}}, schema)


def test_offline_baseline_explains_planted_feature(planted, tmp_path):
    scores_path, audit_path = tmp_path / "scores.parquet", tmp_path / "audit.jsonl"
    table = run_autointerp(planted["root"], planted["sae"], planted["features"], scores_path, audit_path, autointerp_settings("offline"))
    assert list(table.columns) == list(SCORE_COLUMNS)
    written = pd.read_parquet(scores_path)
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    row = table.set_index("feature").loc[0]
    target_text = planted["tokenizer"].decode([planted["target"]])
    assert row["explanation"] == "tokens: " + json.dumps(target_text)
    assert row["detection_score"] == 1.0 and row["fuzzing_score"] == 1.0
    assert row["backend"] == "offline_token_baseline" and "non-LLM" in row["judge_model"]
    assert (row["category"], row["share_count"]) == ("always", 3)
    dead = table.set_index("feature").loc[2]
    assert pd.isna(dead["explanation"]) and np.isnan(dead["detection_score"])
    assert "only 0 activating contexts" in json.loads(dead["failures"])[0]["reason"]
    assert (table["tokens_spent"] == 0).all()
    audit = [json.loads(line) for line in audit_path.read_text().splitlines()]
    explain_zero = next(r for r in audit if r["task"] == "explain" and r["feature"] == 0)
    assert explain_zero["token_scores"][0]["token_id"] == planted["target"]
    assert audit[-1]["task"] == "run_summary"


def test_llm_backend_against_local_server_with_failure_and_cached_rerun(planted, tmp_path):
    llm = {"base_url": None, "model": "fake-judge", "api_key_env": None, "max_concurrency": 1, "max_retries": 2, "timeout_s": 5.0, "backoff_initial_s": 0.01}
    with FakeOpenAIServer(responder=autointerp_responder) as server:
        llm["base_url"] = server.base_url
        settings = autointerp_settings("llm", llm)
        # Requests go out in order at concurrency 1: explain features 0, 1, 3, then feature 0's first detection batch.
        server.script([Scripted(), Scripted(text="Hmm, hard to say what these share."), Scripted(), Scripted(text="[1, 1]")])
        run = lambda name: run_autointerp(  # noqa: E731
            planted["root"], planted["sae"], planted["features"], tmp_path / f"{name}.parquet", tmp_path / f"{name}.jsonl", settings, judge_cache_dir=tmp_path / "judge_cache"
        )
        table = run("first").set_index("feature")
        sent = server.completion_requests
        assert sent > 3
        # Features 0 and 3 are explained; all-ones answers give balanced accuracy exactly 0.5.
        for feature in (0, 3):
            assert table.loc[feature, "explanation"] == "a planted test concept"
            assert table.loc[feature, "detection_score"] == 0.5 and table.loc[feature, "fuzzing_score"] == 0.5
            assert table.loc[feature, "tokens_spent"] > 0 and table.loc[feature, "judge_model"] == "fake-judge"
        # Feature 1's explanation answer was unparseable: a failure with the text, no score, never a zero.
        failures = json.loads(table.loc[1, "failures"])
        assert pd.isna(table.loc[1, "explanation"]) and np.isnan(table.loc[1, "detection_score"])
        assert failures[0]["step"] == "explain" and "hard to say" in failures[0]["reason"]
        assert table.loc[2, "tokens_spent"] == 0  # dead: never sent
        # Feature 0's first detection batch (4 excerpts) got a 2-entry list: recorded, left out of the score.
        (detection_failure,) = [f for f in json.loads(table.loc[0, "failures"]) if f["step"] == "detection"]
        assert "2 entries, expected 4" in detection_failure["reason"] and "'[1, 1]'" in detection_failure["reason"]
        audit = [json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()]
        assert sum(1 for r in audit if "messages" in r) == sent
        detection_zero = [r for r in audit if r.get("feature") == 0 and r["task"] == "detection"]
        assert detection_zero[0]["parsed"] is None and all(r["parsed"] == [1] * len(r["labels"]) for r in detection_zero[1:])
        assert audit[-1]["usage"]["requests_sent"] == sent

        rerun = run("second").set_index("feature")
        assert server.completion_requests == sent  # served wholly from the cache
        pd.testing.assert_frame_equal(rerun, table)


def test_strict_parsers():
    assert parse_binary_list("Sure. [1, 0,1 ,0]", 4) == [1, 0, 1, 0]
    assert parse_binary_list("thinking [x] ... final: [0, 1]", 2) == [0, 1]
    for bad, expected in [("1 0 1", 3), ("[1, 0]", 3), ("[1, 2, 0]", 3), ("[yes, no]", 2), ("[]", 1)]:
        with pytest.raises(ValueError):
            parse_binary_list(bad, expected)
    assert parse_explanation("Reasoning...\nEXPLANATION: the word 'king'") == "the word 'king'"
    assert parse_explanation("**Explanation:** numbers and counting") == "numbers and counting"
    for bad in ["the word king", "EXPLANATION:   ", "EXPLANATION: " + "x" * 600]:
        with pytest.raises(ValueError):
            parse_explanation(bad)


def test_balanced_accuracy_by_hand():
    # positives: 3 (2 right), negatives: 2 (1 right) -> (2/3 + 1/2) / 2
    assert balanced_accuracy([1, 1, 1, 0, 0], [1, 1, 0, 0, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert np.isnan(balanced_accuracy([1, 1], [1, 0]))


def test_render_marks_runs_of_tokens(planted):
    tokenizer = planted["tokenizer"]
    ids = tokenizer(" the king and the river")["input_ids"]
    text = TokenText(tokenizer)
    marks = np.zeros(len(ids), bool)
    marks[1:3] = True
    rendered = render_context(ids, marks, text)
    assert rendered.replace("<<", "").replace(">>", "") == " the king and the river"
    assert rendered.count("<<") == 1 and rendered.count(">>") == 1
    assert render_context(ids, None, text) == " the king and the river"


def test_feature_selection():
    sharedness = pd.DataFrame({"feature": range(10), "share_count": [3] * 3 + [1] * 3 + [0] * 4, "category": ["always"] * 3 + ["sometimes"] * 3 + ["never"] * 4})
    assert select_features(10, None, {"selection": "all"}, 0) == list(range(10))
    chosen = select_features(10, None, {"selection": "random", "n_features": 4}, 0)
    assert len(chosen) == 4 and chosen == sorted(set(chosen)) and chosen == select_features(10, None, {"selection": "random", "n_features": 4}, 0)
    by_category = select_features(10, sharedness, {"selection": "category", "n_features": 2, "categories": ["always", "never"]}, 0)
    assert len(by_category) == 4 and sum(f < 3 for f in by_category) == 2 and sum(f >= 6 for f in by_category) == 2
    with pytest.raises(ValueError, match="features.parquet"):
        select_features(10, None, {"selection": "category", "n_features": 2}, 0)


def test_llm_backend_fails_before_mining_when_the_endpoint_is_down(planted, tmp_path, monkeypatch):
    import socket

    import sae_pipeline.stages.autointerp as autointerp
    from sae_pipeline.judges.client import JudgeUnavailable

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(autointerp, "mine_examples", lambda *args, **kwargs: pytest.fail("mined before checking the endpoint"))
    settings = autointerp_settings("llm", {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": None, "timeout_s": 2.0})
    with pytest.raises(JudgeUnavailable, match="unreachable"):
        run_autointerp(planted["root"], planted["sae"], planted["features"], tmp_path / "s.parquet", tmp_path / "a.jsonl", settings, judge_cache_dir=tmp_path / "cache")
    assert not (tmp_path / "s.parquet").exists()


def test_sharedness_of_another_seed_is_refused(tmp_path):
    from sae_pipeline.stages.autointerp import read_sharedness

    path = tmp_path / "features.parquet"
    pd.DataFrame({"seed": [1, 1], "feature": [0, 1], "included": [True, True], "share_count": [3, 0], "category": ["always", "never"]}).to_parquet(path)
    assert list(read_sharedness(path, 2, seed=1)["category"]) == ["always", "never"]
    with pytest.raises(ValueError, match="reference_seed to 0"):
        read_sharedness(path, 2, seed=0)
