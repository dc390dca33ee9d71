"""Which cache rows are held out of SAE training, and which sequences lie wholly inside them.

The last ``holdout_rows`` rows of a cache (stored order, BOS rows included in the count) are never
trained on; the train stage measures held-out FVU and L0 on them, the evaluate
stage draws its rows before them or from them as the trained SAE's ``cfg.json`` says, and CE-loss
recovered runs on sequences whose every position is held out. Firing frequencies (who is dead, who is
rare) are counted over a window of training rows (:func:`iter_training_window`): the hold-out is too
short to tell a rare latent from a dead one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sae_pipeline.data.shards import ActivationStore, ShardData


@dataclass(frozen=True)
class ShardSpan:
    """Rows ``[0, kept_rows)`` of shard ``index`` are training rows (the rest are held out)."""

    index: int
    kept_rows: int


def training_spans(store: ActivationStore, holdout_rows: int) -> list[ShardSpan]:
    """Per shard, how many leading rows are training rows once the last ``holdout_rows`` rows are held out.

    Raises:
        ValueError: if the hold-out would leave fewer than half of the cache for training.
    """
    total = store.n_rows
    if holdout_rows < 0 or holdout_rows * 2 > total:
        raise ValueError(f"train.holdout_tokens={holdout_rows} must lie in [0, half of the cache's {total} rows]")
    remaining = total - holdout_rows
    spans = []
    for index, shard in enumerate(store.manifest["shards"]):
        kept = min(int(shard["rows"]), remaining)
        remaining -= kept
        if kept > 0:
            spans.append(ShardSpan(index, kept))
    return spans


def read_holdout(store: ActivationStore, holdout_rows: int) -> ShardData:
    """The last ``holdout_rows`` rows of the cache (stored order), BOS rows included."""
    parts = []
    start = store.n_rows - holdout_rows
    offset = 0
    for index, shard in enumerate(store.manifest["shards"]):
        rows = int(shard["rows"])
        if offset + rows > start:
            data = store.read_shard(index)
            skip = max(0, start - offset)
            parts.append(data.select(slice(skip, None)))
        offset += rows
    if not parts:
        raise ValueError("no hold-out rows: train.holdout_tokens must be at least 1")
    return ShardData(*(np.concatenate([getattr(part, name) for part in parts]) for name in ("activations", "doc_id", "position", "token_id", "is_bos", "is_outlier")))


def complete_holdout_documents(holdout: ShardData) -> np.ndarray:
    """Doc ids whose whole sequence lies in the hold-out rows (their position-0 row is in it)."""
    starts = holdout.doc_id[holdout.position == 0]
    return np.unique(starts)


def iter_training_window(store: ActivationStore, holdout_rows: int, max_rows: int | None) -> Iterator[np.ndarray]:
    """The first ``max_rows`` training rows of the cache, shard by shard: ``[rows, d_model]`` float arrays.

    Training rows are the rows before the last ``holdout_rows`` (:func:`training_spans`) without BOS and
    outlier positions, in stored order; ``max_rows`` None = all of them. Every shard read is verified.
    """
    remaining = None if max_rows is None else int(max_rows)
    for span in training_spans(store, holdout_rows):
        if remaining is not None and remaining <= 0:
            return
        rows = store.read_shard(span.index).select(slice(0, span.kept_rows)).training_rows().activations
        if remaining is not None:
            rows = rows[:remaining]
            remaining -= len(rows)
        if len(rows):
            yield rows
