"""Autointerp backends behind one small interface (delphi's explainer/scorer split).

A backend has ``name``, ``judge_model``, ``explain(features, contexts) -> [Outcome]`` (one explanation
per feature from its explainer contexts) and ``classify(tasks) -> [Outcome]`` (one 0/1 list per
:class:`~sae_pipeline.judges.scorers.ClassifyTask`). An outcome carries its value or a failure with
the answer's text; the stage never counts a failure as a score.

- :class:`LLMBackend`: any OpenAI-compatible endpoint through :mod:`sae_pipeline.judges.client`.
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
        self.corpus_probability = (corpus_counts.astype(np.float64) + 1.0) / (corpus_counts.sum() + len(corpus_counts))
        self.token_text = token_text
        self.n_tokens = int(n_tokens)
        self.min_weight_share = float(min_weight_share)
        self.token_sets: dict[int, set[int]] = {}

    def characteristic_tokens(self, contexts: list[Context]) -> list[tuple[int, float, float]]:
        """``(token_id, activation share, score)`` of the chosen tokens, best first."""
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
            score = share * math.log(share / self.corpus_probability[token_id])
            if score > 0 and share >= self.min_weight_share:
                scored.append((token_id, share, score))
        scored.sort(key=lambda item: (-item[2], item[0]))
        return scored[: self.n_tokens]

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
