"""The in-process likelihood judge against hand-computed probabilities (full forward + log-softmax)."""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.judges.likelihood import (
    LIST_ABOUT,
    TEXT_ABOUT,
    LikelihoodScorer,
    concept_gain,
    explanation_pmi,
    load_causal_lm,
    rank_candidates,
)


@pytest.fixture(scope="module", params=["gpt_neox", "gemma3"])
def scorer(request, tiny_subject_model, tmp_path_factory):
    """A scorer on the tiny GPT-NeoX and on a tiny random Gemma-3 (tied unembedding), small token budget (several batches)."""
    if request.param == "gpt_neox":
        folder = tiny_subject_model
    else:
        pytest.importorskip("gguf")
        from sae_pipeline.subject.gguf import gguf_to_hf_folder
        from tests.tiny_gguf import write_tiny_gguf

        root = tmp_path_factory.mktemp("tiny_gemma_judge")
        write_tiny_gguf(root / "tiny.gguf", seed=2)
        gguf_to_hf_folder(root / "tiny.gguf", root / "hf")
        folder = root / "hf"
    model, tokenizer = load_causal_lm(str(folder))
    return LikelihoodScorer(model, tokenizer, token_budget=40)


def by_hand(scorer: LikelihoodScorer, prefix: str, target: str) -> float:
    """Sum of log-softmax over the full vocabulary of a full forward pass, at the target's tokens."""
    prefix_ids, target_ids = [scorer.bos] + scorer.ids(prefix), scorer.ids(target)
    with torch.no_grad():
        logits = scorer.model(torch.tensor([prefix_ids + target_ids])).logits[0].double()
    log_p = torch.log_softmax(logits, dim=-1)
    return float(sum(log_p[len(prefix_ids) + offset - 1, token] for offset, token in enumerate(target_ids)))


PREFIXES = ["the cat", "a", "the cat sat and", "of the king"]
TARGETS = [" sat.", " river and the", " the", " city with gold"]


def test_logprobs_equal_the_full_forward(scorer):
    got, counts = scorer.logprobs(PREFIXES, TARGETS)
    for prefix, target, value, count in zip(PREFIXES, TARGETS, got.tolist(), counts.tolist()):
        assert count == len(scorer.ids(target))
        assert value == pytest.approx(by_hand(scorer, prefix, target), abs=1e-4)
        assert value < 0


def test_shared_prefix_suffixes_equal_the_full_forward(scorer):
    suffixes = [" sat.", " and the king", " river"]
    got = scorer.suffix_logprobs("the cat", suffixes)
    for suffix, value in zip(suffixes, got.tolist()):
        assert value == pytest.approx(by_hand(scorer, "the cat", suffix), abs=1e-4)


def test_judgements_are_the_stated_differences(scorer):
    pmi = explanation_pmi(scorer, ["gold", "gold"], ["the king sent gold", "the river ran"])
    prior = by_hand(scorer, TEXT_ABOUT.format(""), " gold")
    for context, value in zip(["the king sent gold", "the river ran"], pmi.tolist()):
        assert value == pytest.approx((by_hand(scorer, TEXT_ABOUT.format(context), " gold") - prior) / len(scorer.ids(" gold")), abs=1e-4)
    gain = concept_gain(scorer, ["sheep"], ["he slept"], ["he counted the sheep"])
    expected = by_hand(scorer, TEXT_ABOUT.format("he counted the sheep"), " sheep") - by_hand(scorer, TEXT_ABOUT.format("he slept"), " sheep")
    assert float(gain[0]) == pytest.approx(expected, abs=1e-4)
    ranks = rank_candidates(scorer, ["the ship sailed", "across the sea"], ["sea", "bread"])
    listed, empty = LIST_ABOUT.format("- the ship sailed\n- across the sea\n"), LIST_ABOUT.format("- \n")
    for candidate, value in zip(["sea", "bread"], ranks.tolist()):
        assert value == pytest.approx(by_hand(scorer, listed, " " + candidate) - by_hand(scorer, empty, " " + candidate), abs=1e-4)
