"""Judge-accuracy stage: every configured judge scored on the held-out labelled cases (:mod:`judges.accuracy`)."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import pandas as pd

from sae_pipeline.data.atomic import write_dataframe
from sae_pipeline.judges.accuracy import embedding_judge_accuracy, likelihood_judge_accuracy
from sae_pipeline.settings import LikelihoodJudgeSettings

logger = logging.getLogger(__name__)
COLUMNS = ["judge", "model", "task", "metric", "value", "n"]


def measure_judge_accuracy(output_path: str, judges: Sequence[str], embedding_threshold: float,
                           lm_judge: LikelihoodJudgeSettings | Mapping[str, Any] | None = None, lm_model: str | None = None) -> pd.DataFrame:
    """Write ``accuracy.csv`` (columns :data:`COLUMNS`) for the ``embedding`` and ``lm`` judges among ``judges``."""
    rows: list[dict[str, Any]] = []
    if "embedding" in judges:
        from sae_pipeline.judges.embedding import EMBEDDING_MODEL_NAME, EmbeddingJudge

        judge = EmbeddingJudge(threshold=embedding_threshold)
        rows += [{"judge": "embedding", "model": EMBEDDING_MODEL_NAME, **row} for row in embedding_judge_accuracy(judge)]
    if "lm" in judges:
        from sae_pipeline.judges.likelihood import likelihood_scorer

        settings = LikelihoodJudgeSettings.from_mapping(lm_judge)
        scorer = likelihood_scorer(settings, lm_model)
        rows += [{"judge": "lm", "model": f"{lm_model} ({settings.dtype})", **row}
                 for row in likelihood_judge_accuracy(scorer, settings.detection_threshold, settings.steering_margin)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    for row in table.itertuples():
        logger.info("%s judge, %s: %s = %.3f (n = %d)", row.judge, row.task, row.metric, row.value, row.n)
    write_dataframe(output_path, table)
    return table
