"""Feature contexts as text, and their split between the explainer and the held-out scorers.

The explainer sees top contexts plus some contexts from each activation quantile, with the feature's
active tokens marked ``<<like this>>``; the scorers see only held-out contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from sae_pipeline.features.mining import Context, ContextSet, FeatureExamples

# How active tokens are marked in an excerpt shown to a judge.
MARK_OPEN, MARK_CLOSE = "<<", ">>"


def build_contexts(contexts: ContextSet, sequences: np.ndarray) -> list[Context]:
    """Cut each window out of ``sequences`` ([n_sequences, context_size] token ids), dropping BOS and out-of-range slots."""
    context_size = sequences.shape[1]
    built = []
    for doc, start, activations in zip(contexts.doc_id, contexts.start, contexts.activations):
        first = max(int(start), 1)
        stop = min(int(start) + activations.shape[0], context_size)
        built.append(Context(int(doc), first, sequences[doc, first:stop].copy(), activations[first - int(start) : stop - int(start)].copy()))
    return built


@dataclass
class ExampleSplit:
    """Contexts of one feature, split so the scorers only see contexts the explainer did not.

    Attributes:
        explain: top contexts then quantile contexts, shown to the explainer.
        score_activating: held-out activating contexts (remaining top ones and quantile ones).
        score_non_activating: non-activating contexts.
    """

    explain: list[Context]
    score_activating: list[Context]
    score_non_activating: list[Context]

    @property
    def n_examples(self) -> int:
        return len(self.explain) + len(self.score_activating) + len(self.score_non_activating)


def split_examples(examples: FeatureExamples, sequences: np.ndarray, settings: Mapping[str, Any], random_seed: int) -> ExampleSplit:
    """Split mined contexts into explainer and scorer sets.

    ``settings`` keys: ``explain_top`` (top contexts for the explainer; the rest of the top contexts
    are held out), ``n_quantiles``, ``explain_per_quantile`` and ``score_per_quantile`` (contexts
    drawn from each equal-count activation quantile of the sampled activating contexts).
    The draw is seeded by ``(random_seed, feature)`` so it does not depend on which other features run.
    """
    rng = np.random.default_rng([int(random_seed), int(examples.feature)])
    n_explain_top = int(settings["explain_top"])
    explain_sets = [examples.top.subset(np.arange(min(n_explain_top, len(examples.top))))]
    score_sets = [examples.top.subset(np.arange(min(n_explain_top, len(examples.top)), len(examples.top)))]
    sampled = examples.sampled
    if len(sampled):
        order = np.argsort(sampled.activations.max(axis=1), kind="stable")
        for quantile in np.array_split(order, int(settings["n_quantiles"])):
            drawn = rng.permutation(quantile)
            n_explain = min(int(settings["explain_per_quantile"]), len(drawn))
            explain_sets.append(sampled.subset(drawn[:n_explain]))
            score_sets.append(sampled.subset(drawn[n_explain : n_explain + int(settings["score_per_quantile"])]))

    def joined(sets: list[ContextSet]) -> list[Context]:
        return [context for part in sets for context in build_contexts(part, sequences)]

    return ExampleSplit(joined(explain_sets), joined(score_sets), build_contexts(examples.non_activating, sequences))


class TokenText:
    """Decoded text of single token ids, memoised (newlines shown as ``\\n`` so excerpts stay on one line)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._text:
            text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            self._text[token_id] = text.replace("\r", "\\r").replace("\n", "\\n")
        return self._text[token_id]


def render_context(token_ids: Sequence[int], marks: Sequence[bool] | None, token_text: TokenText) -> str:
    """Join the tokens' text; runs of marked tokens are wrapped as ``<<...>>`` (leading spaces kept outside)."""
    pieces: list[str] = []
    inside = False
    for index, token_id in enumerate(token_ids):
        text = token_text(token_id)
        marked = bool(marks[index]) if marks is not None else False
        if marked and not inside:
            stripped = text.lstrip()
            pieces.append(text[: len(text) - len(stripped)] + MARK_OPEN + stripped)
            inside = True
        elif not marked and inside:
            pieces.append(MARK_CLOSE + text)
            inside = False
        else:
            pieces.append(text)
    if inside:
        pieces.append(MARK_CLOSE)
    return "".join(pieces)
