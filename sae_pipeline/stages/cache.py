"""The cache stage: run the subject model over the text and store the hook's activations as Parquet.

Output folder (see :mod:`sae_pipeline.data.shards` for the format)::

    manifest.json      declared Snakemake output, written last
    tokens.parquet     the token ids of every sequence (contexts for autointerp and steering)
    shards/            shard-00000.parquet ... each ``sequences_per_shard * context_size`` rows
    .fingerprint.json  settings the shards were made with (a changed setting discards them)

Sharding is deterministic (shard ``i`` holds sequences ``[i*S, (i+1)*S)``) and each shard is written
to a temporary name and renamed, so a rerun after a kill finds the complete shards, skips them and
resumes at the first missing one. The forward pass stops after the hooked block
(``stop_at_layer``); finished batches move to the host asynchronously and shards are written by a
thread pool from reusable (pinned) host buffers, so tokenization, forward
passes and Parquet writing overlap.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from sae_pipeline.data.atomic import write_json
from sae_pipeline.data.corpus import load_documents
from sae_pipeline.data.shards import (
    SHARD_FOLDER,
    TOKENS_NAME,
    ShardData,
    checksum_path,
    read_exclusions,
    recorded_checksums,
    shard_name,
    verified_shard_record,
    write_manifest,
    write_numbered_shard,
    write_sequences,
)
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.settings import CacheSettings, CorpusSettings
from sae_pipeline.subject.model import bos_token_id, hook_layer, load_subject_model

logger = logging.getLogger("sae_pipeline.stages.cache")
FINGERPRINT_NAME = ".fingerprint.json"
WRITER_THREADS = 8


def iter_sequence_blocks(
    documents: Iterator[str], tokenizer: Any, context_size: int, max_sequences: int, bos: int, block_sequences: int, chunk_documents: int = 1024
) -> Iterator[np.ndarray]:
    """Stream documents into blocks of ``block_sequences`` packed sequences, ``[<=block_sequences, context_size]`` int32.

    Documents are tokenized in chunks with the fast tokenizer's batch path (Rust, parallel, GIL
    released), joined with BOS/EOS between documents and cut into BOS-prefixed sequences as in
    :func:`sae_pipeline.data.corpus.pack_sequences`. Stops after ``max_sequences`` sequences.
    """
    body = context_size - 1
    carry = np.zeros(0, dtype=np.int32)
    pending: list[np.ndarray] = []
    pending_count = produced = 0

    def chunks() -> Iterator[list[str]]:
        chunk: list[str] = []
        for document in documents:
            chunk.append(document)
            if len(chunk) == chunk_documents:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    for chunk in chunks():
        token_lists = encode_batch(tokenizer, chunk)
        n_tokens = sum(len(tokens) + 1 for tokens in token_lists)
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(zip(token_lists, itertools.repeat((bos,))))), dtype=np.int32, count=n_tokens)
        stream = np.concatenate([carry, flat])
        n_new = min(len(stream) // body, max_sequences - produced)
        if n_new > 0:
            bodies = stream[: n_new * body].reshape(n_new, body)
            pending.append(np.concatenate([np.full((n_new, 1), bos, dtype=np.int32), bodies], axis=1))
            pending_count += n_new
            produced += n_new
        carry = stream[n_new * body :]
        while pending_count >= block_sequences:
            merged = np.concatenate(pending)
            yield merged[:block_sequences]
            pending = [merged[block_sequences:]]
            pending_count -= block_sequences
        if produced >= max_sequences:
            break
    if pending_count:
        yield np.concatenate(pending)


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens.

    Fast (Rust) tokenizers are called through their backend's ``encode_batch``, which tokenizes in
    parallel with the GIL released (the forward pass keeps running meanwhile) and skips the Python-side
    BatchEncoding work of ``tokenizer(...)``; other tokenizers go through ``tokenizer(...)``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_corpus(documents: Iterator[str], tokenizer: Any, context_size: int, max_tokens: int, bos: int) -> np.ndarray:
    """All packed sequences of the corpus up to ``max_tokens`` tokens, ``[n, context_size]`` int32."""
    blocks = list(iter_sequence_blocks(documents, tokenizer, context_size, max(1, max_tokens // context_size), bos, block_sequences=1 << 16))
    if not blocks:
        raise ValueError(f"the corpus yields no complete sequence of {context_size} tokens")
    return np.concatenate(blocks)


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a background thread, keeping up to ``depth`` items ready; re-raises its errors."""
    import queue
    import threading

    items: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in iterator:
                items.put(("item", item))
            items.put(("done", None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            items.put(("error", error))

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    while True:
        kind, value = items.get()
        if kind == "done":
            return
        if kind == "error":
            raise value
        yield value


def settings_fingerprint(model_ref: str, hook_name: str, settings: CacheSettings, corpus_settings: CorpusSettings, model_dtype: str) -> str:
    """Hash of everything that determines the shard contents."""
    relevant = {key: value for key, value in settings.as_dict().items() if key in ("context_size", "max_tokens", "dtype", "rows_per_shard", "outlier_norm_factor")}
    payload = json.dumps({"model": model_ref, "hook": hook_name, "cache": relevant, "corpus": corpus_settings.as_dict(), "model_dtype": model_dtype}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def outlier_rows(activations: np.ndarray, is_bos: np.ndarray, factor: float | None) -> np.ndarray:
    """``[rows]`` bool: non-BOS rows whose L2 norm exceeds ``factor`` times the median non-BOS norm of
    ``activations [rows, d_model]`` (one shard); all False when ``factor`` is None.

    Raises:
        ValueError: when a non-BOS activation is not finite (e.g. overflowed float16).
    """
    norms = np.linalg.norm(activations.astype(np.float32), axis=1)
    if not np.isfinite(norms[~is_bos]).all():
        raise ValueError("non-finite activations at non-BOS positions: cache.dtype float16 overflows at this hook; use float32")
    if factor is None or (~is_bos).sum() == 0:
        return np.zeros(len(activations), dtype=bool)
    return ~is_bos & (norms > float(factor) * float(np.median(norms[~is_bos])))


class HookActivations:
    """Forward passes that stop after the hooked block and return the hook's activations.

    ``__call__(tokens [B, T] int64 on the model device) -> [B, T, d_model]`` tensor on the device.
    """

    def __init__(self, bridge: Any, hook_name: str):
        self.bridge = bridge
        self.hook_name = hook_name
        self.stop_at_layer = hook_layer(hook_name) + 1

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        _, cache = self.bridge.run_with_cache(tokens, names_filter=lambda name: name == self.hook_name, stop_at_layer=self.stop_at_layer)
        return cache[self.hook_name]


def cache_activations(
    model_ref: str,
    hook_name: str,
    corpus_settings: CorpusSettings | Mapping[str, Any],
    documents_path: str | None,
    manifest_path: str,
    settings: CacheSettings | Mapping[str, Any],
    model_dtype: str = "auto",
) -> dict:
    """Cache activations of ``hook_name`` over the corpus into the folder of ``manifest_path``.

    Args:
        model_ref: Hub id or local Hugging Face folder of the subject model.
        hook_name: TransformerLens hook, e.g. ``blocks.3.hook_resid_post``.
        corpus_settings: the config's ``corpus`` section; ``documents_path`` the exported local corpus
            (None for a Hub dataset).
        manifest_path: where the manifest goes; shards and tokens go beside it.
        settings: the config's ``cache`` section (context_size, max_tokens, batch_size, dtype,
            rows_per_shard, outlier_norm_factor, device).
        model_dtype: ``subject_model.dtype``: what the model computes in (``auto``: float16 on CUDA
            when the cache stores float16, else float32); recorded in the manifest for later stages.

    Returns the manifest dictionary.
    """
    settings = CacheSettings.from_mapping(settings)
    corpus_settings = CorpusSettings.from_mapping(corpus_settings)
    started = time.time()
    root = Path(manifest_path).parent
    shard_folder = root / SHARD_FOLDER
    dtype = settings.dtype
    context_size = settings.context_size
    sequences_per_shard = max(1, settings.rows_per_shard // context_size)
    batch_size = settings.batch_size
    device = resolve_device(settings.device)

    if model_dtype == "auto":
        model_dtype = "float16" if (dtype == "float16" and device.startswith("cuda")) else "float32"
    fingerprint = settings_fingerprint(model_ref, hook_name, settings, corpus_settings, model_dtype)
    fingerprint_path = root / FINGERPRINT_NAME
    if fingerprint_path.exists() and json.loads(fingerprint_path.read_text()).get("fingerprint") != fingerprint:
        logger.info("settings changed since the shards in %s were written: discarding them", shard_folder)
        shutil.rmtree(shard_folder, ignore_errors=True)
    shard_folder.mkdir(parents=True, exist_ok=True)
    write_json(fingerprint_path, {"fingerprint": fingerprint})
    known_checksums = recorded_checksums(root)

    bridge = load_subject_model(model_ref, device=device, dtype=model_dtype)
    bos = bos_token_id(bridge)
    max_sequences = max(1, settings.max_tokens // context_size)
    blocks = prefetch(
        iter_sequence_blocks(load_documents(corpus_settings, documents_path), bridge.tokenizer, context_size, max_sequences, bos, sequences_per_shard)
    )
    forward = HookActivations(bridge, hook_name)

    all_sequences: list[np.ndarray] = []
    progress = tqdm(total=max_sequences * context_size, desc="cache", unit="tok", unit_scale=True, mininterval=2.0)
    pool = HostBufferPool(WRITER_THREADS + 1, pinned=device.startswith("cuda"))
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as writers:
        record_futures = []
        for shard_index, shard_sequences in enumerate(blocks):
            all_sequences.append(shard_sequences)
            if (shard_folder / shard_name(shard_index)).exists():
                record = verified_shard_record(root, shard_index, known_checksums)
                if record is not None:
                    record_futures.append(writers.submit(dict, record))
                    progress.update(shard_sequences.size)
                    continue
                logger.warning("%s cannot be verified (its checksum matches neither %s nor the manifest): recomputing it",
                               shard_folder / shard_name(shard_index), checksum_path(shard_folder / shard_name(shard_index)).name)
            activations = _forward_shard(forward, shard_sequences, batch_size, device, dtype, progress, pool)
            first_doc = shard_index * sequences_per_shard
            doc_ids = np.repeat(np.arange(first_doc, first_doc + len(shard_sequences)), context_size)
            positions = np.tile(np.arange(context_size, dtype=np.int32), len(shard_sequences))
            rows = activations.numpy()
            data = ShardData(rows, doc_ids, positions, shard_sequences.reshape(-1), positions == 0, outlier_rows(rows, positions == 0, settings.outlier_norm_factor))
            future = writers.submit(write_numbered_shard, root, shard_index, data, dtype)
            future.add_done_callback(lambda _, buffer=activations: pool.give_back(buffer))
            record_futures.append(future)
        shard_records = [future.result() for future in record_futures]
    progress.close()
    if not all_sequences:
        raise ValueError(f"the corpus yields no complete sequence of {context_size} tokens")
    sequences = np.concatenate(all_sequences)
    write_sequences(root / TOKENS_NAME, sequences)
    n_shards = len(shard_records)

    elapsed = time.time() - started
    manifest = write_manifest(
        root,
        model=model_ref,
        hook_name=hook_name,
        dtype=dtype,
        d_model=int(bridge.cfg.d_model),
        context_size=context_size,
        rows_per_shard=sequences_per_shard * context_size,
        shards=shard_records,
        n_sequences=int(len(sequences)),
        n_bos_rows=int(len(sequences)),
        n_outlier_rows=int(sum(read_exclusions(root / record["path"]).sum() for record in shard_records) - len(sequences)),
        bos_token_id=bos,
        prepend_bos=True,
        model_dtype=model_dtype,
        outlier_norm_factor=settings.outlier_norm_factor,
        dataset=corpus_settings.hf_dataset.path if corpus_settings.source == "hf_dataset" else corpus_settings.source,
        tokens=TOKENS_NAME,
        fingerprint=fingerprint,
        wall_time_s=elapsed,
    )
    logger.info("cached %d tokens in %d shards in %.1f s (%.0f tokens/s); %d BOS and %d outlier-norm rows left out of training",
                sequences.size, n_shards, elapsed, sequences.size / elapsed, manifest["n_bos_rows"], manifest["n_outlier_rows"])
    return manifest


class HostBufferPool:
    """Reusable host buffers for shard activations, ``[rows, d_model]`` of the cache dtype.

    On CUDA the buffers are pinned, so device-to-host copies run asynchronously straight into the
    buffer the writer thread later reads (no per-batch pinned allocation, no concatenation copy).
    ``take`` blocks while every buffer is still being written, which bounds host memory to
    ``size`` shards and applies back-pressure to the forward pass.
    """

    def __init__(self, size: int, pinned: bool):
        import queue

        self.pinned = pinned
        self._free: "queue.Queue[torch.Tensor]" = queue.Queue()
        self._created = 0
        self._size = size

    def take(self, rows: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer with at least ``rows`` rows (a view of exactly ``rows`` rows is returned)."""
        if self._free.empty() and self._created < self._size:
            self._created += 1
            return torch.empty((rows, d_model), dtype=dtype, pin_memory=self.pinned)
        buffer = self._free.get()
        if buffer.shape[0] < rows or buffer.shape[1] != d_model or buffer.dtype != dtype:
            buffer = torch.empty((rows, d_model), dtype=dtype, pin_memory=self.pinned)
        return buffer[:rows]

    def give_back(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)


def _forward_shard(
    forward: HookActivations, shard_sequences: np.ndarray, batch_size: int, device: str, dtype: str, progress: tqdm, pool: HostBufferPool
) -> torch.Tensor:
    """Activations ``[len(shard_sequences) * T, d_model]`` (host tensor from ``pool``, ``dtype``) of one shard's sequences."""
    target_dtype = torch.float16 if dtype == "float16" else torch.float32
    context_size = shard_sequences.shape[1]
    buffer: torch.Tensor | None = None
    for start in range(0, len(shard_sequences), batch_size):
        tokens = torch.from_numpy(shard_sequences[start : start + batch_size].astype(np.int64)).to(device, non_blocking=True)
        activations = forward(tokens).to(target_dtype)
        if buffer is None:
            buffer = pool.take(len(shard_sequences) * context_size, activations.shape[-1], target_dtype)
        buffer[start * context_size : start * context_size + tokens.numel()].copy_(activations.reshape(-1, activations.shape[-1]), non_blocking=True)
        progress.update(tokens.numel())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert buffer is not None
    return buffer
