"""Autointerp backends behind one small interface (delphi's explainer/scorer split).

A backend has ``name``, ``judge_model``, ``explain(features, contexts) -> [Outcome]`` (one explanation
per feature from its explainer contexts) and ``classify(tasks) -> [Outcome]`` (one 0/1 list per
:class:`~sae_pipeline.judges.scorers.ClassifyTask`). An outcome carries its value or a failure with
the answer's text; the stage never counts a failure as a score.

- :class:`LLMBackend`: any OpenAI-compatible endpoint through :mod:`sae_pipeline.judges.client`.
- :class:`LikelihoodBackend`: a real language model in-process (the subject model by default), whose
  likelihoods rank candidate explanations and score them (PMI); its accuracy on held-out labelled cases
  is measured every run.
- :class:`OfflineTokenBaseline`: a **non-LLM baseline** for runs without a judge: its explanation is
  the feature's most characteristic tokens (activation-weighted frequency in the explainer's contexts
  against corpus frequency), detection says "active" when a context contains one of those tokens,
  fuzzing says "correct" when most marked tokens are among them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from sae_pipeline.features.contexts import TokenText, render_context
from sae_pipeline.features.mining import Context
from sae_pipeline.judges.prompts import (
    classify_messages,
    explain_messages,
    parse_binary_list,
    parse_explanation,
)
from sae_pipeline.judges.scorers import ClassifyTask, Outcome

OFFLINE_BACKEND = "offline_token_baseline"
OFFLINE_JUDGE_MODEL = "none (non-LLM token-frequency baseline)"
LLM_BACKEND = "llm"
LIKELIHOOD_BACKEND = "lm_likelihood"


def corpus_probability(corpus_counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed token frequencies ``[vocab]`` from occurrence counts."""
    return (corpus_counts.astype(np.float64) + 1.0) / (corpus_counts.sum() + len(corpus_counts))


def characteristic_tokens(contexts: list[Context], probability: np.ndarray, n_tokens: int, min_weight_share: float) -> list[tuple[int, float, float]]:
    """A feature's most characteristic tokens in ``contexts``: ``(token_id, activation share, score)``, best first.

    A token's score is ``p_f(t) * log(p_f(t) / p(t))``: ``p_f`` is the share of the feature's activation
    (summed over the contexts) that falls on token ``t``, ``p`` its corpus frequency; kept when the score
    is positive and the share at least ``min_weight_share``; at most ``n_tokens``.
    """
    weights: dict[int, float] = {}
    for context in contexts:
        for token_id, activation in zip(context.token_ids[context.active], context.activations[context.active]):
            weights[int(token_id)] = weights.get(int(token_id), 0.0) + float(activation)
    total = sum(weights.values())
    if total <= 0:
        return []
    scored = []
    for token_id, weight in weights.items():
        share = weight / total
        score = share * math.log(share / probability[token_id])
        if score > 0 and share >= min_weight_share:
            scored.append((token_id, share, score))
    scored.sort(key=lambda item: (-item[2], item[0]))
    return scored[:n_tokens]


class LLMBackend:
    """Explainer and scorers answered by an LLM through :class:`sae_pipeline.judges.client.JudgeClient`."""

    name = LLM_BACKEND

    def __init__(self, client: Any, token_text: TokenText):
        self.client = client
        self.token_text = token_text

    @property
    def judge_model(self) -> str:
        return str(self.client.settings.model)

    def _ask(self, conversations: list[list[dict[str, str]]], parse: Any, description: str) -> list[Outcome]:
        replies = self.client.complete_many(conversations, description=description)
        outcomes = []
        for messages, reply, parser in zip(conversations, replies, parse):
            audit = {
                "messages": messages,
                "answer": reply.text,
                "cached": reply.cached,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "request_hash": reply.request_hash,
            }
            if not reply.ok:
                outcomes.append(Outcome(failure=f"request failed: {reply.error}", tokens=reply.total_tokens, audit=audit))
                continue
            try:
                outcomes.append(Outcome(value=parser(reply.text), tokens=reply.total_tokens, audit=audit))
            except ValueError as error:
                outcomes.append(Outcome(failure=f"unparseable answer ({error}): {reply.text!r}", tokens=reply.total_tokens, audit=audit))
        return outcomes

    def explain(self, features: list[int], contexts: list[list[Context]]) -> list[Outcome]:
        conversations = [
            explain_messages([render_context(c.token_ids, c.active, self.token_text) for c in feature_contexts]) for feature_contexts in contexts
        ]
        return self._ask(conversations, [parse_explanation] * len(conversations), "explain")

    def classify(self, tasks: list[ClassifyTask]) -> list[Outcome]:
        conversations = [
            classify_messages(task.scorer, task.explanation, [render_context(c.token_ids, m, self.token_text) for c, m in zip(task.contexts, task.marks)])
            for task in tasks
        ]
        parsers = [lambda text, n=len(task.contexts): parse_binary_list(text, n) for task in tasks]
        return self._ask(conversations, parsers, "score")


class OfflineTokenBaseline:
    """The non-LLM baseline: explanations are characteristic tokens, scorers test for those tokens.

    A token's score for a feature is ``p_f(t) * log(p_f(t) / p(t))``: ``p_f`` is the share of the
    feature's activation (summed over the explainer's contexts) that falls on token ``t``, ``p`` the
    token's corpus frequency (add-one smoothed). The explanation lists up to ``n_tokens`` tokens with
    a positive score and at least ``min_weight_share`` of the activation.
    """

    name = OFFLINE_BACKEND
    judge_model = OFFLINE_JUDGE_MODEL

    def __init__(self, corpus_counts: np.ndarray, token_text: TokenText, n_tokens: int = 5, min_weight_share: float = 0.05):
        self.corpus_probability = corpus_probability(corpus_counts)
        self.token_text = token_text
        self.n_tokens = int(n_tokens)
        self.min_weight_share = float(min_weight_share)
        self.token_sets: dict[int, set[int]] = {}

    def characteristic_tokens(self, contexts: list[Context]) -> list[tuple[int, float, float]]:
        """``(token_id, activation share, score)`` of the chosen tokens, best first."""
        return characteristic_tokens(contexts, self.corpus_probability, self.n_tokens, self.min_weight_share)

    def explain(self, features: list[int], contexts: list[list[Context]]) -> list[Outcome]:
        outcomes = []
        for feature, feature_contexts in zip(features, contexts):
            chosen = self.characteristic_tokens(feature_contexts)
            audit = {"token_scores": [{"token_id": t, "text": self.token_text(t), "activation_share": s, "score": v} for t, s, v in chosen]}
            if not chosen:
                outcomes.append(Outcome(failure="no characteristic token (no activation in the explainer's contexts)", audit=audit))
                continue
            self.token_sets[feature] = {token_id for token_id, _, _ in chosen}
            explanation = "tokens: " + ", ".join(json.dumps(self.token_text(token_id), ensure_ascii=False) for token_id, _, _ in chosen)
            outcomes.append(Outcome(value=explanation, audit=audit))
        return outcomes

    def classify(self, tasks: list[ClassifyTask]) -> list[Outcome]:
        outcomes = []
        for task in tasks:
            tokens = self.token_sets[task.feature]
            predictions = []
            for context, marks in zip(task.contexts, task.marks):
                hits = np.isin(context.token_ids, list(tokens))
                if task.scorer == "detection":
                    predictions.append(int(hits.any()))
                else:
                    predictions.append(int(hits[marks].mean() >= 0.5) if marks.any() else 0)
            outcomes.append(Outcome(value=predictions, audit={"predictions": predictions}))
        return outcomes


class LikelihoodBackend:
    """Explainer and scorers answered in-process by a language model's likelihoods (:mod:`judges.likelihood`).

    - explain: candidate explanations (:func:`candidate_explanations`: the feature's characteristic
      words, their WordNet categories, and general categories such as "punctuation" or "numbers"),
      ranked by :func:`~sae_pipeline.judges.likelihood.rank_candidates` over the explainer's contexts
      (active tokens marked); the best one is the explanation.
    - detection: a context is predicted active when :func:`~sae_pipeline.judges.likelihood.explanation_pmi`
      exceeds ``detection_threshold``; fuzzing: marks are predicted correct when
      :func:`~sae_pipeline.judges.likelihood.marked_words_pmi` of the marked words exceeds ``fuzzing_threshold``.
    """

    name = LIKELIHOOD_BACKEND

    def __init__(self, scorer: Any, model_name: str, token_text: TokenText, corpus_counts: np.ndarray, settings: Any):
        self.scorer = scorer
        self.judge_model = model_name
        self.token_text = token_text
        self.corpus_probability = corpus_probability(corpus_counts)
        self.settings = settings

    def explain(self, features: list[int], contexts: list[list[Context]]) -> list[Outcome]:
        from sae_pipeline.judges.likelihood import rank_candidates

        outcomes = []
        for feature_contexts in contexts:
            tokens = characteristic_tokens(feature_contexts, self.corpus_probability, self.settings.n_candidate_tokens, 0.0)
            candidates = candidate_explanations([self.token_text(token_id) for token_id, _, _ in tokens], self.settings.wordnet_dir)
            excerpts = [render_context(context.token_ids, context.active, self.token_text) for context in feature_contexts]
            before = self.scorer.tokens_scored
            scores = rank_candidates(self.scorer, excerpts, candidates).tolist()
            ranked = sorted(zip(scores, candidates), key=lambda item: -item[0])
            outcomes.append(Outcome(value=ranked[0][1], tokens=self.scorer.tokens_scored - before,
                                    audit={"candidates": [{"candidate": candidate, "pmi": score} for score, candidate in ranked[:10]]}))
        return outcomes

    def classify(self, tasks: list[ClassifyTask]) -> list[Outcome]:
        from sae_pipeline.judges.likelihood import explanation_pmi, marked_words_pmi

        outcomes = []
        for task in tasks:
            before = self.scorer.tokens_scored
            explanations = [task.explanation] * len(task.contexts)
            if task.scorer == "detection":
                texts = [render_context(context.token_ids, None, self.token_text) for context in task.contexts]
                scores, threshold = explanation_pmi(self.scorer, explanations, texts), self.settings.detection_threshold
            else:
                words = [" ".join(self.token_text(token).strip() for token in context.token_ids[marks]) for context, marks in zip(task.contexts, task.marks)]
                scores, threshold = marked_words_pmi(self.scorer, explanations, words), self.settings.fuzzing_threshold
            predictions = [int(score > threshold) for score in scores.tolist()]
            outcomes.append(Outcome(value=predictions, tokens=self.scorer.tokens_scored - before,
                                    audit={"pmi": scores.tolist(), "threshold": threshold, "predictions": predictions}))
        return outcomes


# Candidate explanations every feature gets, beside its own words and their categories.
GENERAL_CANDIDATES = (
    "punctuation", "numbers", "names of people", "names of places", "the start of a sentence", "the end of a sentence",
    "plural nouns", "verbs in the past tense", "questions", "negation", "time and dates", "colours", "comparisons",
    "the word the", "the word and", "the word of", "pronouns", "definitions", "quotations", "jokes",
)


def candidate_explanations(words: list[str], wordnet_dir: str) -> list[str]:
    """Distinct candidates: each alphabetic word itself, its WordNet categories, then :data:`GENERAL_CANDIDATES`."""
    from sae_pipeline.data.wordnet import word_categories

    candidates: list[str] = []
    for word in (text.strip() for text in words):
        if word.isalpha():
            candidates.append(word)
            candidates.extend(word_categories(word, wordnet_dir))
    candidates.extend(GENERAL_CANDIDATES)
    return list(dict.fromkeys(candidates))
