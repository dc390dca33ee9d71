"""Scorer tasks of autointerp (detection and fuzzing batches) and their score.

*Detection* mixes held-out activating contexts with non-activating ones and asks which contexts the
explanation says are active; *fuzzing* marks either the truly active tokens or as many random inactive
tokens of held-out activating contexts and asks whether the marks fit the explanation. Both scores are
balanced accuracies in [0, 1] (0.5 = chance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sae_pipeline.features.contexts import ExampleSplit
from sae_pipeline.features.mining import Context


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Mean of the true-positive rate and the true-negative rate; NaN unless both classes occur."""
    labels_array, predictions_array = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    positives, negatives = labels_array == 1, labels_array == 0
    if not positives.any() or not negatives.any():
        return float("nan")
    return float(0.5 * ((predictions_array[positives] == 1).mean() + (predictions_array[negatives] == 0).mean()))


@dataclass
class ClassifyTask:
    """One scorer batch: contexts (with marks for fuzzing) whose true labels the judge should recover.

    Attributes:
        scorer: ``detection`` or ``fuzzing``.
        contexts, marks: the batch; ``marks[i]`` is [n_i] bool (fuzzing) or None (detection).
        labels: [n] 1 = active (detection) / correctly marked (fuzzing).
    """

    feature: int
    scorer: str
    explanation: str
    contexts: list[Context]
    marks: list[np.ndarray | None]
    labels: list[int]


@dataclass
class Outcome:
    """A backend's answer to one task: ``value`` (explanation str or list of 0/1) or ``failure`` (with text)."""

    value: Any = None
    failure: str | None = None
    tokens: int = 0
    audit: dict[str, Any] = field(default_factory=dict)


def fuzzing_marks(context: Context, correct: bool, rng: np.random.Generator) -> np.ndarray | None:
    """Marks for a fuzzing excerpt: the active tokens, or as many random inactive ones (None if impossible)."""
    active = context.active
    if correct:
        return active.copy()
    inactive = np.flatnonzero(~active)
    if len(inactive) < active.sum() or not active.any():
        return None
    marks = np.zeros_like(active)
    marks[rng.choice(inactive, size=int(active.sum()), replace=False)] = True
    return marks


def scorer_tasks(feature: int, explanation: str, split: ExampleSplit, contexts_per_prompt: int, random_seed: int) -> list[ClassifyTask]:
    """Detection and fuzzing batches for one feature (shuffled, ``contexts_per_prompt`` excerpts each)."""
    rng = np.random.default_rng([int(random_seed), int(feature), 1])
    detection = [(context, None, 1) for context in split.score_activating] + [(context, None, 0) for context in split.score_non_activating]
    fuzzing = []
    for index, context in enumerate(split.score_activating):
        correct = index % 2 == 0
        marks = fuzzing_marks(context, correct, rng)
        if marks is not None:
            fuzzing.append((context, marks, int(correct)))
    tasks = []
    for scorer, items in (("detection", detection), ("fuzzing", fuzzing)):
        order = rng.permutation(len(items))
        for begin in range(0, len(items), contexts_per_prompt):
            batch = [items[index] for index in order[begin : begin + contexts_per_prompt]]
            tasks.append(ClassifyTask(feature, scorer, explanation, [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]))
    return tasks
