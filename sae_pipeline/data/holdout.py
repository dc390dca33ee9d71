"""Which cache rows are held out of SAE training, and which sequences lie wholly inside them.

The last ``holdout_rows`` rows of a cache (stored order, BOS rows included in the count) are never
trained on; the train stage measures held-out FVU, L0 and firing frequencies on them, the evaluate
stage draws its rows before them or from them as the trained SAE's ``cfg.json`` says, and CE-loss
recovered runs on sequences whose every position is held out.
"""

from __future__ import annotations

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
