"""Pieces of the real-model experiment: the WordNet+fortunes corpus, outlier rows, planted control
features, the judge-accuracy arithmetic, and the likelihood backend's choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sae_pipeline.data.corpus import fortune_documents, interleaved, wordnet_documents
from sae_pipeline.data.wordnet import word_categories
from sae_pipeline.features.mining import token_indicator_examples
from sae_pipeline.judges.accuracy import auroc, balanced_accuracy_at, judge_accuracy
from sae_pipeline.judges.cases import TOPICS, detection_cases, ranking_cases, steering_cases
from sae_pipeline.settings import LikelihoodJudgeSettings, MiningSettings
from sae_pipeline.stages.autointerp import control_tokens
from sae_pipeline.stages.cache import outlier_rows
from sae_pipeline.stages.export_corpus import export_documents

WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def write_mini_wordnet(folder):
    """A WordNet-format folder with two noun synsets (animal, food) and one verb synset (motion)."""
    folder.mkdir()
    noun = WORDNET_HEADER
    dog_offset = len(noun.encode())
    noun += "02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; \"the dog barked all night\"  \n"
    bread_offset = len(noun.encode())
    noun += "07679356 13 n 01 bread 0 000 | food made from dough of flour or meal  \n"
    verb = WORDNET_HEADER
    run_offset = len(verb.encode())
    verb += "01926311 38 v 01 run 0 000 | move fast by using one's feet; \"Don't run--you'll be out of breath\"  \n"
    (folder / "data.noun").write_text(noun)
    (folder / "data.verb").write_text(verb)
    (folder / "data.adj").write_text(WORDNET_HEADER)
    (folder / "data.adv").write_text(WORDNET_HEADER)
    (folder / "index.noun").write_text(f"{WORDNET_HEADER}bread n 1 0 1 0 {bread_offset:08d}  \ndog n 1 0 1 0 {dog_offset:08d}  \n")
    (folder / "index.verb").write_text(f"{WORDNET_HEADER}run v 1 0 1 0 {run_offset:08d}  \n")
    (folder / "index.adj").write_text(WORDNET_HEADER)
    (folder / "index.adv").write_text(WORDNET_HEADER)
    return folder


def test_wordnet_glosses_become_documents_grouped_by_category(tmp_path):
    folder = write_mini_wordnet(tmp_path / "wordnet")
    documents = wordnet_documents(folder, synsets_per_document=20)
    assert sorted(documents) == sorted([
        'dog, domestic dog: a member of the genus Canis; "the dog barked all night"',
        "bread: food made from dough of flour or meal",
        "run: move fast by using one's feet; \"Don't run--you'll be out of breath\"",
    ])
    assert word_categories("dog", folder) == ["animals"] and word_categories("Bread", folder) == ["food and drink"]
    assert word_categories("run", folder) == ["movement and travel"] and word_categories("the", folder) == []


def test_fortunes_become_documents_of_whole_cookies_without_pictures_or_quote_files(tmp_path):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "wisdom").write_text("A first cookie.\n%\nA second\ncookie.\n%\nA third one.\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00")
    (folder / "art").write_text("  /\\_/\\ \n%\n")
    (folder / "startrek").write_text("A quote of a copyrighted work.\n%\n")
    assert fortune_documents(folder, document_chars=20, include_third_party_quotes=False) == ["A first cookie.\nA second\ncookie.", "A third one."]
    assert len(fortune_documents(folder, document_chars=20, include_third_party_quotes=True)) == 3
    assert sorted(interleaved(["a", "b", "c"], seed=0)) == ["a", "b", "c"]


def test_the_wordnet_fortunes_corpus_exports_from_the_debian_packages(tmp_path):
    if not (Path("/usr/share/wordnet/data.noun").exists() and Path("/usr/share/games/fortunes").is_dir()):
        pytest.skip("Debian's wordnet-base and fortunes are not installed")
    count = export_documents({"source": "wordnet_fortunes"}, tmp_path / "documents.jsonl")
    texts = [json.loads(line)["text"] for line in (tmp_path / "documents.jsonl").read_text().splitlines()]
    assert count == len(texts) > 5000
    assert any("WordNet" not in text and ":" in text for text in texts[:50])


def test_outlier_rows_are_far_above_the_median_norm_and_never_bos():
    rows = np.ones((6, 4), dtype=np.float32)
    rows[2] *= 10  # norm 20 against a median of 2
    rows[0] *= 100  # BOS: never an outlier, whatever its norm
    is_bos = np.array([True, False, False, False, False, False])
    assert outlier_rows(rows, is_bos, 4.0).tolist() == [False, False, True, False, False, False]
    assert not outlier_rows(rows, is_bos, None).any()
    rows[3, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        outlier_rows(rows, is_bos, 4.0)


def test_planted_single_token_feature_fires_exactly_on_its_token():
    sequences = np.array([[2, 5, 7, 5, 9, 9, 9, 9], [2, 8, 8, 8, 8, 8, 8, 8], [2, 9, 5, 9, 9, 9, 9, 9]])
    settings = MiningSettings(window_before=1, window_after=1, n_top=2, n_activating_sample=5, n_non_activating=5, batch_rows=64, device="cpu")
    examples = token_indicator_examples(sequences, 5, 1_000_000_000, settings, random_seed=0)
    assert examples.n_firing_tokens == 3 and len(examples.top) + len(examples.sampled) == 3
    for contexts in (examples.top, examples.sampled):
        for doc, start, activations in zip(contexts.doc_id, contexts.start, contexts.activations):
            for slot, value in enumerate(activations):
                position = start + slot
                inside = 1 <= position < sequences.shape[1]
                assert value == (1.0 if inside and sequences[doc, position] == 5 else 0.0)
    for doc, start in zip(examples.non_activating.doc_id, examples.non_activating.start):
        assert 5 not in sequences[doc, start : start + settings.window]


def test_control_tokens_are_the_commonest_content_words(tmp_path):
    """Function words (commoner here) and words under 4 letters are passed over; the nouns come commonest first."""
    wordnet_dir = write_mini_wordnet(tmp_path / "wordnet")
    with open(wordnet_dir / "index.noun", "a") as index:  # a second 4+ letter noun (its synset does not matter here)
        index.write("river n 1 0 1 0 00000000  \n")
    texts = {1: " that", 2: " river", 3: " with", 4: " bread", 5: " dog", 6: "bread", 7: "<bos>"}
    sequences = np.array([[7, 1, 1, 1, 3, 3, 4, 4], [7, 1, 1, 3, 3, 4, 5, 5], [7, 6, 6, 6, 6, 6, 2, 5]])
    assert control_tokens(sequences, texts.__getitem__, count=3, wordnet_dir=wordnet_dir) == [4, 2]
    assert control_tokens(sequences, texts.__getitem__, count=1, wordnet_dir=wordnet_dir) == [4]


def test_judge_accuracy_of_an_oracle_is_one_and_of_a_coin_is_chance():
    answers = {(case.explanation, case.context): case.label for case in detection_cases()}
    oracle_rank = {tuple(case.contexts): case.answer for case in ranking_cases()}
    oracle_steer = {(case.concept, case.text_a, case.text_b): case.label for case in steering_cases()}

    def detect(explanations, contexts):
        return [answers.get((e, c), 0) for e, c in zip(explanations, contexts)]

    def rank(contexts, candidates):
        return [1.0 if index == oracle_rank[tuple(contexts)] else 0.0 for index in range(len(candidates))]

    def compare(concepts, texts_a, texts_b):
        return [1.0 if oracle_steer[key] else -1.0 for key in zip(concepts, texts_a, texts_b)]

    rows = {(row["task"], row["metric"]): row["value"] for row in judge_accuracy(detect, rank, compare, 0.5, 0.0)}
    assert rows[("detection", "balanced_accuracy")] == 1.0 and rows[("detection", "auroc")] == 1.0
    assert rows[("ranking", "top1_accuracy")] == 1.0 and rows[("steering", "accuracy")] == 1.0
    coin = {(row["task"], row["metric"]): row["value"] for row in judge_accuracy(
        lambda e, c: [0.0] * len(e), lambda c, k: [0.0] * len(k), lambda k, a, b: [0.0] * len(k), 0.5, 0.0)}
    assert coin[("detection", "balanced_accuracy")] == 0.5 and coin[("detection", "auroc")] == 0.5
    assert auroc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]) == 0.75 and balanced_accuracy_at([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5], 0.45) == 0.5
    assert len(TOPICS) == 12


def test_likelihood_backend_explains_with_the_best_ranked_candidate_and_scores_by_threshold(monkeypatch):
    from sae_pipeline.features.mining import Context
    from sae_pipeline.judges import likelihood
    from sae_pipeline.judges.backends import LikelihoodBackend
    from sae_pipeline.judges.scorers import ClassifyTask

    vocabulary = {1: " the", 2: " dog", 3: " barked", 4: " ran"}

    class FakeScorer:
        tokens_scored = 0

    monkeypatch.setattr(likelihood, "rank_candidates", lambda scorer, excerpts, candidates: np.array([3.0 if c == "animals" else 0.0 for c in candidates]))
    monkeypatch.setattr(likelihood, "explanation_pmi", lambda scorer, explanations, texts: np.array([1.0 if "dog" in t else -1.0 for t in texts]))
    settings = LikelihoodJudgeSettings(wordnet_dir="/usr/share/wordnet")
    if not Path(settings.wordnet_dir, "index.noun").exists():
        pytest.skip("Debian's wordnet-base is not installed")
    backend = LikelihoodBackend(FakeScorer(), "fake", lambda token: vocabulary[int(token)], np.ones(5, dtype=np.int64), settings)
    context = Context(0, 1, np.array([1, 2, 3]), np.array([0.0, 2.0, 0.0], dtype=np.float32))
    explanation = backend.explain([7], [[context]])[0]
    assert explanation.value == "animals" and explanation.audit["candidates"][0] == {"candidate": "animals", "pmi": 3.0}
    other = Context(1, 1, np.array([1, 4]), np.array([0.0, 0.0], dtype=np.float32))
    task = ClassifyTask(7, "detection", "animals", [context, other], [None, None], [1, 0])
    assert backend.classify([task])[0].value == [1, 0]
