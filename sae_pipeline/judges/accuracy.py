"""How well each judge recovers known answers on the held-out labelled cases (:mod:`judges.cases`).

Per judge and task: detection (balanced accuracy at the judge's decision threshold, and AUROC),
lexical detection (minimal pairs), explanation ranking (top-1 accuracy among the 12 topic names) and
steering comparison (accuracy of "B is more about the concept than A"), and, for a judge whose steering
success is an absolute threshold (the embedding judge), how well that threshold tells on-topic from
neutral sentences. The in-process likelihood
judge uses its configured thresholds; the embedding judge its cosine threshold for detection and
"cosine(B) > cosine(A)" for steering. Every run reports these beside its results, so a success rate
reads together with how often its judge is right.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sae_pipeline.judges.cases import detection_cases, lexical_detection_cases, ranking_cases, steering_cases


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (ties count half); NaN unless both classes occur."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    positive, negative = scores[labels == 1], scores[labels == 0]
    if not len(positive) or not len(negative):
        return float("nan")
    return float((positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean())


def balanced_accuracy_at(labels: Sequence[int], scores: Sequence[float], threshold: float) -> float:
    """Mean of the true-positive and true-negative rates of ``score > threshold``."""
    labels, predicted = np.asarray(labels), np.asarray(scores, dtype=float) > threshold
    return float(0.5 * (predicted[labels == 1].mean() + (~predicted[labels == 0]).mean()))


def judge_accuracy(
    detect: Callable[[list[str], list[str]], Sequence[float]],
    rank: Callable[[list[str], list[str]], Sequence[float]],
    compare: Callable[[list[str], list[str], list[str]], Sequence[float]],
    detection_threshold: float,
    steering_margin: float,
) -> list[dict[str, Any]]:
    """Rows ``{task, metric, value, n}`` for one judge given as three scoring functions:

    ``detect(explanations, contexts) -> [n]`` (higher = active), ``rank(contexts, candidates) ->
    [n_candidates]``, ``compare(concepts, texts_a, texts_b) -> [n]`` (positive = B more about it).
    """
    rows = []
    for task, cases in (("detection", detection_cases()), ("lexical_detection", lexical_detection_cases())):
        scores = detect([case.explanation for case in cases], [case.context for case in cases])
        labels = [case.label for case in cases]
        rows.append({"task": task, "metric": "balanced_accuracy", "value": balanced_accuracy_at(labels, scores, detection_threshold), "n": len(cases)})
        rows.append({"task": task, "metric": "auroc", "value": auroc(labels, scores), "n": len(cases)})
    ranks = []
    for case in ranking_cases():
        scores = np.asarray(rank(case.contexts, case.candidates), dtype=float)
        ranks.append(int((scores > scores[case.answer]).sum()) + 1)
    rows.append({"task": "ranking", "metric": "top1_accuracy", "value": float(np.mean([value == 1 for value in ranks])), "n": len(ranks)})
    cases = steering_cases()
    gains = np.asarray(compare([case.concept for case in cases], [case.text_a for case in cases], [case.text_b for case in cases]), dtype=float)
    correct = (gains > steering_margin) == (np.asarray([case.label for case in cases]) == 1)
    rows.append({"task": "steering", "metric": "accuracy", "value": float(correct.mean()), "n": len(cases)})
    return rows


def threshold_steering_accuracy(similarity: Callable[[list[str], list[str]], Sequence[float]], threshold: float) -> dict[str, Any]:
    """Balanced accuracy of "similarity(concept, text) >= threshold" telling each topic's on-topic
    sentences (label 1) from neutral sentences (label 0): the embedding judge's steering success rule."""
    from sae_pipeline.judges.cases import NEUTRAL, TOPICS

    concepts, texts, labels = [], [], []
    for name, (_, sentences, _) in TOPICS.items():
        for text, label in [(sentence, 1) for sentence in sentences[:4]] + [(neutral, 0) for neutral in NEUTRAL[:4]]:
            concepts.append(name)
            texts.append(text)
            labels.append(label)
    scores = np.asarray(similarity(concepts, texts), dtype=float)
    return {"task": "steering_threshold", "metric": "balanced_accuracy", "value": balanced_accuracy_at(labels, scores - threshold + 1e-12, 0.0), "n": len(labels)}


def likelihood_judge_accuracy(scorer: Any, detection_threshold: float, steering_margin: float) -> list[dict[str, Any]]:
    """:func:`judge_accuracy` of the in-process likelihood judge."""
    from sae_pipeline.judges.likelihood import concept_gain, explanation_pmi, rank_candidates

    return judge_accuracy(
        lambda explanations, contexts: explanation_pmi(scorer, explanations, contexts).tolist(),
        lambda contexts, candidates: rank_candidates(scorer, contexts, candidates).tolist(),
        lambda concepts, a, b: concept_gain(scorer, concepts, a, b).tolist(),
        detection_threshold, steering_margin,
    )


def embedding_judge_accuracy(judge: Any) -> list[dict[str, Any]]:
    """:func:`judge_accuracy` of the embedding judge (cosine; detection at its threshold)."""

    def rank(contexts: list[str], candidates: list[str]) -> list[float]:
        return [float(np.mean(judge.cosine([candidate] * len(contexts), contexts))) for candidate in candidates]

    def compare(concepts: list[str], texts_a: list[str], texts_b: list[str]) -> list[float]:
        return (np.asarray(judge.cosine(concepts, texts_b)) - np.asarray(judge.cosine(concepts, texts_a))).tolist()

    rows = judge_accuracy(lambda explanations, contexts: list(judge.cosine(explanations, contexts)), rank, compare, judge.threshold, 0.0)
    return rows + [threshold_steering_accuracy(lambda concepts, texts: list(judge.cosine(concepts, texts)), judge.threshold)]
