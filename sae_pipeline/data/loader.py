"""Streaming training batches from the Parquet activation shards.

The stream is a pure function of (cache, ``seed``, ``batch_size``, ``shuffle_buffer_rows``,
``holdout_rows``), so a resumed run can start at any batch index and see exactly the batches an
uninterrupted run would have seen:

- the last ``holdout_rows`` rows of the cache (in stored order, BOS rows included in the count)
  are held out for evaluation and never trained on;
- BOS rows are dropped;
- epoch ``e`` visits the shards in a random order (``rng(seed, e)``), grouped into consecutive
  windows of at least ``shuffle_buffer_rows`` rows (at least one shard); each window's rows are
  loaded together and permuted (``rng(seed, e, w)``), which is the shuffle buffer across shards;
- batches are consecutive ``batch_size`` slices of the concatenated windows; once an epoch is used
  up the next begins (a run whose ``total_tokens`` exceeds the cache sees it several times).

A background thread reads the next shards while the model trains, the shards of a window on
``READ_THREADS`` threads (each shard's row groups also decode in parallel). On the CPU it also
permutes the rows and cuts batches. On CUDA it copies each window's raw row groups once into pinned
memory, uploads them and gathers the shuffled rows on a CUDA stream of its own (overlapping the
training kernels; an event orders the main stream after it), and the main thread cuts batches on
the GPU (a host-side gather of 1 KB rows would cap the stream near 1-2 M rows/s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sae_pipeline.data.holdout import ShardSpan, training_spans
from sae_pipeline.data.shards import (
    SHARD_FOLDER,
    ActivationStore,
    ShardData,
    write_manifest,
    write_numbered_shard,
    write_sequences,
)

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Shards of a shuffle window read at once (each also decodes its row groups on pyarrow's threads).
READ_THREADS = min(8, os.cpu_count() or 1)


class ActivationLoader:
    """Iterate ``n_batches`` training batches ``[batch_size, d_model]`` float32 on ``device``.

    Args:
        store: the activation cache.
        batch_size: rows per batch.
        n_batches: batches the iteration yields in total (counting from batch 0).
        seed: data-order seed.
        start_batch: first batch to yield (resume); earlier batches are skipped without reading
            their activations.
        shuffle_buffer_rows: rows loaded and permuted together (rounded up to whole shards).
        holdout_rows: rows at the end of the cache never used for training.
        device: where batches are delivered.
        prefetch_batches: batches prepared ahead by the background thread (host gather).
        gather_on_device: ship each window's raw rows (pinned on CUDA) and shuffle order to the
            device and cut batches there, instead of permuting on the host; default on CUDA. The
            stream is the same either way.
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        n_batches: int,
        seed: int = 0,
        start_batch: int = 0,
        shuffle_buffer_rows: int = 131072,
        holdout_rows: int = 0,
        device: str | torch.device = "cpu",
        prefetch_batches: int = 4,
        gather_on_device: bool | None = None,
    ):
        self.store = store
        self.batch_size = int(batch_size)
        self.n_batches = int(n_batches)
        self.seed = int(seed)
        self.start_batch = int(start_batch)
        self.shuffle_buffer_rows = int(shuffle_buffer_rows)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # the prefetch thread must select this device explicitly, which needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch_batches = max(1, int(prefetch_batches))
        self.gather_on_device = self.device.type == "cuda" if gather_on_device is None else bool(gather_on_device)
        self.spans = training_spans(store, holdout_rows)
        self._usable_rows: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.rows_per_epoch < self.batch_size:
            raise ValueError(f"the cache has {self.rows_per_epoch} training rows, fewer than train.batch_size={self.batch_size}")

    def usable_rows(self, span: ShardSpan) -> int:
        """Training rows of a shard once BOS and outlier rows are dropped (reads only those columns)."""
        if span.index not in self._usable_rows:
            excluded = self.store.read_exclusions(span.index)[: span.kept_rows]
            self._usable_rows[span.index] = int(span.kept_rows - excluded.sum())
        return self._usable_rows[span.index]

    @property
    def rows_per_epoch(self) -> int:
        """Training rows in one pass over the cache (BOS and hold-out excluded)."""
        return sum(self.usable_rows(span) for span in self.spans)

    @property
    def epochs(self) -> float:
        """How many passes over the training rows the ``n_batches`` batches make."""
        return self.n_batches * self.batch_size / self.rows_per_epoch

    def windows(self, epoch: int) -> list[list[ShardSpan]]:
        """Shard groups of an epoch, in visiting order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.spans))
        windows: list[list[ShardSpan]] = []
        current: list[ShardSpan] = []
        rows = 0
        for position in order:
            span = self.spans[int(position)]
            current.append(span)
            rows += span.kept_rows
            if rows >= self.shuffle_buffer_rows:
                windows.append(current)
                current, rows = [], 0
        if current:
            windows.append(current)
        return windows

    def _window_block(self, epoch: int, window_index: int, window: list[ShardSpan]) -> tuple[list[np.ndarray], np.ndarray]:
        """One window as ``(parts, order)``: ``parts`` are the shards' training rows in the cache dtype
        (BOS rows included; one array per row group, not copied) and ``order`` indexes their
        concatenation: the rows that are neither BOS nor outliers, shuffled."""
        parts, keeps = [], []
        with ThreadPoolExecutor(max_workers=min(len(window), READ_THREADS)) as pool:  # Parquet decoding releases the GIL
            shards = list(pool.map(lambda span: self.store.read_activation_parts(span.index), window))
        for span, (groups, excluded) in zip(window, shards):
            remaining = span.kept_rows
            for group in groups:
                if remaining <= 0:
                    break
                parts.append(group[:remaining])
                remaining -= len(group)
            keeps.append(~excluded[: span.kept_rows])
        usable = np.flatnonzero(np.concatenate(keeps))
        permutation = np.random.default_rng([self.seed, epoch, window_index]).permutation(len(usable))
        return parts, usable[permutation]

    def _blocks(self, start_row: int) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """Windows as ``(parts, order)`` whose ordered rows, concatenated, are the stream from global
        row ``start_row`` on (the first window's ``order`` is cut to start there)."""
        position = 0
        epoch = 0
        while True:
            for window_index, window in enumerate(self.windows(epoch)):
                size = sum(self.usable_rows(span) for span in window)
                if position + size <= start_row:
                    position += size
                    continue
                parts, order = self._window_block(epoch, window_index, window)
                skip = max(0, start_row - position)
                position += size
                yield parts, order[skip:]
            epoch += 1

    def numpy_batches(self) -> Iterator[np.ndarray]:
        """The batches ``start_batch .. n_batches-1`` as NumPy arrays in the cache dtype (no thread)."""
        pending: list[np.ndarray] = []
        pending_rows = 0
        produced = self.start_batch
        blocks = self._blocks(self.start_batch * self.batch_size)
        while produced < self.n_batches:
            while pending_rows < self.batch_size:
                parts, order = next(blocks)
                block = (np.concatenate(parts) if len(parts) > 1 else parts[0])[order]
                pending.append(block)
                pending_rows += len(block)
            merged = np.concatenate(pending) if len(pending) > 1 else pending[0]
            batch, rest = merged[: self.batch_size], merged[self.batch_size :]
            pending, pending_rows = ([rest] if len(rest) else []), len(rest)
            produced += 1
            yield np.ascontiguousarray(batch)

    def _put(self, out: "queue.Queue[tuple[str, object]]", item: tuple[str, object]) -> bool:
        """Put ``item`` unless the consumer stopped; False when stopped."""
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, out: "queue.Queue[tuple[str, object]]") -> None:
        """Background thread: batches (host gather) or whole windows (device gather) into ``out``."""
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if self.gather_on_device:
                on_cuda = self.device.type == "cuda"
                # Copies and the shuffle run on a stream of their own, overlapping the training kernels.
                stream = torch.cuda.Stream(self.device) if on_cuda else None
                for parts, order in self._blocks(self.start_batch * self.batch_size):
                    rows = torch.empty((sum(len(part) for part in parts), self.store.d_model), dtype=TORCH_DTYPES[self.store.dtype],
                                       pin_memory=on_cuda)
                    offset = 0
                    for part in parts:
                        rows[offset : offset + len(part)].copy_(torch.from_numpy(part))
                        offset += len(part)
                    indices = torch.from_numpy(order)
                    ready = None
                    with torch.cuda.stream(stream) if on_cuda else contextlib.nullcontext():
                        block = rows.to(self.device, non_blocking=True).index_select(0, indices.pin_memory().to(self.device, non_blocking=True) if on_cuda else indices)
                        if on_cuda:
                            ready = torch.cuda.Event()
                            ready.record(stream)
                    del rows
                    if not self._put(out, ("window", (block, ready))):
                        return
            else:
                for batch in self.numpy_batches():
                    if not self._put(out, ("batch", torch.from_numpy(batch).float())):
                        return
            out.put(("end", None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            out.put(("error", error))

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield float32 batches on the device, prepared by a background thread."""
        out: "queue.Queue[tuple[str, object]]" = queue.Queue(maxsize=2 if self.gather_on_device else self.prefetch_batches)
        self._stop.clear()
        self._thread = threading.Thread(target=self._produce, args=(out,), name="activation-loader", daemon=True)
        self._thread.start()
        produced = self.start_batch
        leftover: torch.Tensor | None = None  # rows of the previous window not yet in a batch (< batch_size)
        try:
            while produced < self.n_batches:
                kind, payload = out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise RuntimeError("activation loader thread failed") from payload  # type: ignore[arg-type]
                if kind == "batch":
                    produced += 1
                    yield payload.to(self.device)  # type: ignore[union-attr]
                    continue
                block, ready = payload  # type: ignore[misc]
                # the shuffled window stays in the cache dtype on the device; batches are cast as they leave
                if ready is not None:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(ready)
                    block.record_stream(consumer)  # made on the loader's stream, used on this one
                offset = 0
                if leftover is not None:
                    needed = self.batch_size - len(leftover)
                    if len(block) < needed:
                        leftover = torch.cat([leftover, block])
                        continue
                    produced += 1
                    yield torch.cat([leftover, block[:needed]]).float()
                    offset, leftover = needed, None
                while len(block) - offset >= self.batch_size and produced < self.n_batches:
                    produced += 1
                    yield block[offset : offset + self.batch_size].float()
                    offset += self.batch_size
                leftover = block[offset:] if offset < len(block) else None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def write_synthetic_cache(root: Path, activations: np.ndarray, context_size: int = 8, rows_per_shard: int = 64,
                          dtype: str = "float32", model: str | None = None, hook_name: str = "blocks.0.hook_resid_post") -> Path:
    """Write ``activations [rows, d]`` as a cache folder in the cache stage's format (for tests and
    benchmarks): rows are consecutive sequences of ``context_size`` positions (position 0 is BOS,
    token ids are placeholders), ``rows_per_shard`` rows per shard, plus tokens.parquet and the
    manifest. Returns the folder."""
    root = Path(root)
    (root / SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
    rows = len(activations)
    position = (np.arange(rows) % context_size).astype(np.int32)
    doc_id = np.arange(rows) // context_size
    token_id = (np.arange(rows) % 50).astype(np.int32)
    shards = []
    for index, start in enumerate(range(0, rows, rows_per_shard)):
        part = slice(start, start + rows_per_shard)
        data = ShardData(activations[part], doc_id[part], position[part], token_id[part], position[part] == 0)
        shards.append(write_numbered_shard(root, index, data, dtype))
    n_docs = -(-rows // context_size)
    write_sequences(root / "tokens.parquet", (np.arange(n_docs * context_size) % 50).reshape(n_docs, context_size))
    write_manifest(root, model=model, hook_name=hook_name, dtype=dtype, d_model=activations.shape[1], context_size=context_size,
                   rows_per_shard=rows_per_shard, shards=shards, tokens="tokens.parquet", bos_token_id=0)
    return root
