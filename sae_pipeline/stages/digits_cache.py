"""Digits-cache stage: the digit images written in the activation-shard format, so the generic train and
match stages run on them unchanged (claim 1).

Images are shuffled once (``shuffle_seed``) so the trainer's held-out rows (the last rows in stored
order) are a random sample. One row per image: ``doc_id`` is the image index in the cache,
``position`` 0, ``token_id`` -1 (there are no tokens) and ``is_bos`` False; the class labels are in
``labels.parquet`` beside the manifest.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_pipeline.data.atomic import atomic_path
from sae_pipeline.data.digits import HOOK_NAME, LABELS_NAME, load_digit_images
from sae_pipeline.data.shards import (
    SHARD_FOLDER,
    ShardData,
    write_manifest,
    write_numbered_shard,
)
from sae_pipeline.settings import DigitsDataSettings

logger = logging.getLogger(__name__)


def cache_digits(settings: DigitsDataSettings | Mapping[str, Any], manifest_path: str | os.PathLike) -> dict[str, Any]:
    """Write the digit images as an activation cache (shards, labels, manifest) beside ``manifest_path``.

    Args:
        settings: the config's ``digits.data`` section (source, hf_dataset, max_images, shuffle_seed,
            rows_per_shard, dtype).
        manifest_path: ``<cache>/manifest.json``, written last.

    Returns the manifest. It has ``model: null`` and ``hook_name: "pixels"``; ``d_model`` is the pixel
    count; ``context_size`` is 1 (each image is its own one-row "sequence") and there is no tokens table.
    """
    settings = DigitsDataSettings.from_mapping(settings)
    started = time.time()
    root = Path(manifest_path).parent
    pixels, labels, dataset_name = load_digit_images(settings)
    order = np.random.default_rng(settings.shuffle_seed).permutation(len(pixels))
    pixels, labels = pixels[order], labels[order]
    dtype = settings.dtype
    rows_per_shard = settings.rows_per_shard
    shard_folder = root / SHARD_FOLDER
    shard_folder.mkdir(parents=True, exist_ok=True)
    for stale in shard_folder.glob("shard-*.parquet*"):  # shards and their checksum files
        stale.unlink()
    shards = []
    for index, start in enumerate(range(0, len(pixels), rows_per_shard)):
        rows = slice(start, start + rows_per_shard)
        count = len(pixels[rows])
        data = ShardData(
            activations=pixels[rows],
            doc_id=np.arange(start, start + count, dtype=np.int64),
            position=np.zeros(count, dtype=np.int32),
            token_id=np.full(count, -1, dtype=np.int32),
            is_bos=np.zeros(count, dtype=bool),
        )
        shards.append(write_numbered_shard(root, index, data, dtype))
    labels_table = pa.table({"doc_id": pa.array(np.arange(len(labels), dtype=np.int64)), "label": pa.array(labels)})
    with atomic_path(root / LABELS_NAME) as temporary:
        pq.write_table(labels_table, temporary)
    manifest = write_manifest(
        root,
        model=None,
        hook_name=HOOK_NAME,
        dtype=dtype,
        d_model=int(pixels.shape[1]),
        context_size=1,
        rows_per_shard=rows_per_shard,
        shards=shards,
        n_sequences=int(len(pixels)),
        n_bos_rows=0,
        bos_token_id=None,
        prepend_bos=False,
        dataset=dataset_name,
        source=settings.source,
        pixel_range=[0.0, 1.0],
        shuffle_seed=settings.shuffle_seed,
        tokens=None,
        labels=LABELS_NAME,
        label_counts={str(label): int(count) for label, count in zip(*np.unique(labels, return_counts=True))},
        wall_time_s=time.time() - started,
    )
    logger.info("cached %d images of %d pixels (%s) in %d shards", len(pixels), pixels.shape[1], dataset_name, len(shards))
    return manifest
