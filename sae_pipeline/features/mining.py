"""Mining examples of SAE features from the activation cache (one streaming pass).

Every cached token is encoded with the SAE and, per selected feature, three sets are kept:

- the top activating contexts,
- a uniform random sample of activating contexts (later split into activation quantiles),
- a uniform random sample of non-activating contexts.

A *context* is a window of ``window_before + 1 + window_after`` tokens of one cached sequence. Each
sequence is cut into aligned buckets of that length; a bucket is activating when the feature fires on
one of its tokens, and an activating context is the window centred (``window_before`` tokens before,
``window_after`` after) on the bucket's peak token; a non-activating context is a bucket on which the
feature never fires. Candidates are drawn at most once per bucket, and overlapping windows are removed
afterwards, so no two contexts of a feature share a token. Random samples use random keys (bottom-k
sampling), which stays uniform over the whole stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from sae_pipeline.data.shards import ActivationStore
from sae_pipeline.settings import MiningSettings


@dataclass
class ContextSet:
    """Contexts of one feature, as stored by the miner.

    Attributes:
        doc_id: [n] int64 sequence (row of ``tokens.parquet``).
        start: [n] int64 position of the window's first slot (may be < 1 or run past the sequence;
            those slots have no token and are dropped when the context is built).
        activations: [n, window] float32, the feature's activation at each slot (0 where no token).
    """

    doc_id: np.ndarray
    start: np.ndarray
    activations: np.ndarray

    def __len__(self) -> int:
        return int(len(self.doc_id))

    def subset(self, index: np.ndarray | Sequence[int]) -> "ContextSet":
        index = np.asarray(index, dtype=np.int64)
        return ContextSet(self.doc_id[index], self.start[index], self.activations[index])


@dataclass
class FeatureExamples:
    """What mining found for one feature.

    Attributes:
        top: highest-activating contexts, strongest first.
        sampled: uniform random sample of activating contexts (none overlapping ``top``), any order.
        non_activating: uniform random sample of windows where the feature is zero on every token.
        n_firing_tokens: tokens (BOS excluded) on which the feature is > 0.
        max_activation: largest activation seen.
    """

    feature: int
    top: ContextSet
    sampled: ContextSet
    non_activating: ContextSet
    n_firing_tokens: int
    max_activation: float


@dataclass
class Context:
    """A window of tokens with the feature's activation on each (BOS and out-of-sequence slots removed).

    Attributes:
        doc_id: the sequence; start: position of ``token_ids[0]`` in it.
        token_ids: [n] int; activations: [n] float32.
    """

    doc_id: int
    start: int
    token_ids: np.ndarray
    activations: np.ndarray

    @property
    def active(self) -> np.ndarray:
        """[n] bool: where the feature fires."""
        return self.activations > 0


def _row_chunks(store: ActivationStore, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(activations [rows, d], doc_id [rows], position [rows])`` chunks of whole sequences, BOS dropped.

    Chunks hold about ``batch_rows`` rows (more when one sequence is longer). Rows of one sequence
    must be contiguous in the cache (the cache stage writes sequences in order).
    """
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pending_rows = 0
    last_doc = -1

    def merged() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(pending) == 1:
            return pending[0]  # slices of one shard stay views: no copy
        return tuple(np.concatenate([part[index] for part in pending]) for index in range(3))  # type: ignore[return-value]

    for shard in store.iter_shards(columns=["activation", "doc_id", "position"], drop_excluded=True):
        if len(shard) == 0:
            continue
        doc_id = shard.doc_id
        if doc_id[0] < last_doc or np.any(np.diff(doc_id) < 0):
            raise ValueError(f"{store.root}: shard rows are not ordered by doc_id; mining needs each sequence's rows together")
        last_doc = int(doc_id[-1])
        pending.append((shard.activations, doc_id, shard.position))
        pending_rows += len(shard)
        while pending_rows > batch_rows:
            activations, docs, positions = merged()
            boundaries = np.flatnonzero(np.diff(docs)) + 1
            fitting = boundaries[boundaries <= batch_rows]
            if len(fitting):
                cut = int(fitting[-1])
            elif len(boundaries):
                cut = int(boundaries[0])
            else:
                break  # one sequence so far: wait for more rows
            yield activations[:cut], docs[:cut], positions[:cut]
            pending = [(activations[cut:], docs[cut:], positions[cut:])]
            pending_rows = len(docs) - cut
    if pending_rows:
        yield merged()


class _RunningTop:
    """Per-feature running top-``capacity`` of candidates by key (feature-major: keys ``[F, capacity]``).

    Carries per candidate its value (the bucket's peak activation), doc id, position and optionally
    a ``[W]`` activation window (``windows [F, capacity, W]``).
    """

    def __init__(self, capacity: int, n_features: int, window: int | None, device: torch.device):
        self.capacity = capacity
        self.keys = torch.full((n_features, capacity), -math.inf, device=device)
        self.values = torch.zeros((n_features, capacity), device=device)
        self.doc = torch.zeros((n_features, capacity), dtype=torch.long, device=device)
        self.position = torch.zeros((n_features, capacity), dtype=torch.long, device=device)
        self.windows = torch.zeros((n_features, capacity, window), device=device) if window else None

    def merge(self, keys: torch.Tensor, values: torch.Tensor, doc: torch.Tensor, position: torch.Tensor, windows: torch.Tensor | None) -> None:
        """Add candidates (``[F, n]`` each, ``windows [F, n, W]``) and keep the ``capacity`` largest keys per feature."""
        keys = torch.cat([self.keys, keys], dim=1)
        best = keys.topk(self.capacity, dim=1).indices
        self.keys = keys.gather(1, best)
        self.values = torch.cat([self.values, values], dim=1).gather(1, best)
        self.doc = torch.cat([self.doc, doc], dim=1).gather(1, best)
        self.position = torch.cat([self.position, position], dim=1).gather(1, best)
        if self.windows is not None and windows is not None:
            window = self.windows.shape[-1]
            self.windows = torch.cat([self.windows, windows], dim=1).gather(1, best[..., None].expand(-1, -1, window))


def _distinct(doc: torch.Tensor, position: torch.Tensor, usable: torch.Tensor, limit: int, window: int, blocked: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Greedy selection, per feature, of candidates whose windows do not overlap.

    ``doc``, ``position``, ``usable`` are ``[F, K]`` in priority order; a candidate is taken when usable,
    not within ``window`` positions of a taken one in the same doc, nor of any ``blocked`` ``([F, M] doc,
    [F, M] position)``, and fewer than ``limit`` are taken. Returns ``[F, K]`` bool.
    """
    taken = torch.zeros_like(usable)
    free = usable.clone()
    for blocked_doc, blocked_position in blocked:
        clash = (doc[:, :, None] == blocked_doc[:, None, :]) & ((position[:, :, None] - blocked_position[:, None, :]).abs() < window)
        free &= ~clash.any(dim=2)
    for index in range(doc.shape[1]):
        clash = (doc[:, :index] == doc[:, index : index + 1]) & ((position[:, :index] - position[:, index : index + 1]).abs() < window) & taken[:, :index]
        taken[:, index] = free[:, index] & ~clash.any(dim=1) & (taken[:, :index].sum(dim=1) < limit)
    return taken


def mine_examples(
    store: ActivationStore,
    sae: Any,
    features: Sequence[int],
    settings: MiningSettings,
    random_seed: int = 0,
    progress: bool = True,
) -> dict[int, FeatureExamples]:
    """One pass over ``store``: top, sampled activating and non-activating contexts of each feature.

    Args:
        store: the activation cache (its rows must be grouped by sequence, as the cache stage writes them).
        sae: a :class:`~sae_pipeline.sae.SparseAutoencoder` already on the mining device.
        features: SAE latent indices to mine.
        settings: windows, sample sizes, batch size.
        random_seed: seeds the random keys of the samples.

    Returns ``{feature: FeatureExamples}`` for every requested feature (dead ones with empty sets).
    """
    from tqdm.auto import tqdm

    device = next(sae.parameters()).device
    context_size = int(store.manifest["context_size"])
    window, before = settings.window, settings.window_before
    buckets_per_doc = -(-context_size // window)
    padded_length = buckets_per_doc * window
    feature_index = torch.as_tensor(list(features), dtype=torch.long, device=device)
    n_features = len(feature_index)
    all_features = n_features == sae.d_sae and bool((feature_index == torch.arange(sae.d_sae, device=device)).all())
    generator = torch.Generator(device=device).manual_seed(int(random_seed))
    top = _RunningTop(settings.n_top * 2, n_features, window, device)
    sampled = _RunningTop(settings.n_activating_sample + settings.n_top * 2, n_features, window, device)
    quiet = _RunningTop(settings.n_non_activating, n_features, None, device)
    firing_tokens = torch.zeros(n_features, dtype=torch.long, device=device)
    min_valid_in_bucket = (window + 1) // 2

    bar = tqdm(total=store.n_rows, desc="mining", unit="tok", unit_scale=True, mininterval=2.0, disable=not progress)
    with torch.no_grad():
        for activations, docs, positions in _row_chunks(store, settings.batch_rows):
            bar.update(len(docs))
            x = torch.from_numpy(np.array(activations)).to(device).float()  # copied in the stored dtype, widened on the device
            codes = sae.encode(x)
            if not all_features:
                codes = codes.index_select(1, feature_index)
            firing_tokens += (codes > 0).sum(dim=0)
            first_doc = int(docs[0])
            n_docs = int(docs[-1]) - first_doc + 1
            n_buckets = n_docs * buckets_per_doc
            # Feature-major grid: row f holds feature f's activation at every (doc, position) slot of the chunk.
            slot = torch.from_numpy((docs - first_doc) * padded_length + positions.astype(np.int64)).to(device)
            grid = torch.zeros((n_features, n_docs * padded_length), device=device)
            grid.index_copy_(1, slot, codes.T)
            valid = torch.zeros(n_docs * padded_length, dtype=torch.bool, device=device)
            valid[slot] = True
            bucket_max, bucket_argmax = grid.view(n_features, n_buckets, window).max(dim=2)  # [F, B]
            bucket_doc = torch.arange(n_buckets, device=device) // buckets_per_doc  # chunk-local
            bucket_start = (torch.arange(n_buckets, device=device) % buckets_per_doc) * window
            peak = bucket_start + bucket_argmax  # [F, B]
            bucket_valid = valid.view(n_buckets, window).sum(dim=1)
            stride = padded_length + window - 1
            padded = torch.nn.functional.pad(grid.view(n_features, n_docs, padded_length), (before, settings.window_after)).view(n_features, -1)
            offsets = torch.arange(window, device=device)

            def take(running: _RunningTop, keys: torch.Tensor, centred: bool) -> None:
                # Only candidates above a feature's smallest kept key can enter; late in the stream that is few.
                entering = int((keys > running.keys[:, -1:]).sum(dim=1).max())
                count = min(running.capacity, n_buckets, entering)
                if count == 0:
                    return
                chosen_keys, chosen = keys.topk(count, dim=1)  # [F, count]
                local_doc = bucket_doc[chosen]
                windows = None
                if centred:
                    position = peak.gather(1, chosen)
                    slots = (local_doc * stride + position)[..., None] + offsets  # padded slot j holds position - before + j
                    windows = padded.gather(1, slots.view(n_features, -1)).view(n_features, count, window)
                    start = position - before
                else:
                    start = bucket_start[chosen]
                running.merge(chosen_keys, bucket_max.gather(1, chosen), local_doc + first_doc, start, windows)

            take(top, bucket_max, centred=True)
            random_keys = torch.rand(bucket_max.shape, generator=generator, device=device)
            take(sampled, torch.where(bucket_max > 0, random_keys, -1.0), centred=True)
            random_keys = torch.rand(bucket_max.shape, generator=generator, device=device)
            quiet_ok = (bucket_max <= 0) & (bucket_valid >= min_valid_in_bucket)
            take(quiet, torch.where(quiet_ok, random_keys, -1.0), centred=False)
    bar.close()
    return _collect(features, top, sampled, quiet, firing_tokens, settings)


def _collect(features: Sequence[int], top: _RunningTop, sampled: _RunningTop, quiet: _RunningTop, firing_tokens: torch.Tensor, settings: MiningSettings) -> dict[int, FeatureExamples]:
    """Turn the running states into per-feature :class:`FeatureExamples` (distinct, non-overlapping windows)."""
    window = settings.window

    top_taken = _distinct(top.doc, top.position, top.keys > 0, settings.n_top, window, [])
    blocked_doc = torch.where(top_taken, top.doc, torch.full_like(top.doc, -1))
    sample_taken = _distinct(sampled.doc, sampled.position, sampled.keys > 0, settings.n_activating_sample, window, [(blocked_doc, top.position)])
    arrays = {
        "top_taken": top_taken,
        "top_doc": top.doc,
        "top_start": top.position,
        "top_windows": top.windows,
        "sample_taken": sample_taken,
        "sample_doc": sampled.doc,
        "sample_start": sampled.position,
        "sample_windows": sampled.windows,
        "quiet_taken": quiet.keys > 0,
        "quiet_doc": quiet.doc,
        "quiet_start": quiet.position,
        "firing": firing_tokens,
    }
    host = {name: value.cpu().numpy() for name, value in arrays.items()}
    examples = {}
    for column, feature in enumerate(features):

        def context_set(prefix: str, with_windows: bool) -> ContextSet:
            keep = np.flatnonzero(host[f"{prefix}_taken"][column])
            windows = host[f"{prefix}_windows"][column][keep].astype(np.float32) if with_windows else np.zeros((len(keep), window), np.float32)
            return ContextSet(host[f"{prefix}_doc"][column][keep].astype(np.int64), host[f"{prefix}_start"][column][keep].astype(np.int64), windows)

        top_set = context_set("top", True)
        examples[int(feature)] = FeatureExamples(
            feature=int(feature),
            top=top_set,
            sampled=context_set("sample", True),
            non_activating=context_set("quiet", False),
            n_firing_tokens=int(host["firing"][column]),
            max_activation=float(top_set.activations.max()) if len(top_set) else 0.0,
        )
    return examples


def token_indicator_examples(sequences: np.ndarray, token_id: int, feature: int, settings: MiningSettings, random_seed: int) -> FeatureExamples:
    """Examples of a planted single-token feature: active (1.0) exactly where ``token_id`` occurs.

    The autointerp stage's positive control: mined like an SAE feature from the cached sequences
    (``[n_sequences, context_size]``, position 0 is BOS), so a working explainer and scorer must score it
    high. ``top`` and ``sampled`` are disjoint random occurrences (windows centred as for SAE features);
    ``non_activating`` are aligned windows without the token.
    """
    rng = np.random.default_rng([int(random_seed), int(token_id)])
    window, before = settings.window, settings.window_before
    hits = sequences == int(token_id)
    hits[:, 0] = False
    docs, positions = np.nonzero(hits)
    order = rng.permutation(len(docs))
    picks = order[: settings.n_top + settings.n_activating_sample]

    def windows(chosen: np.ndarray) -> ContextSet:
        starts = positions[chosen] - before
        slots = starts[:, None] + np.arange(window)[None, :]
        inside = (slots >= 1) & (slots < sequences.shape[1])
        tokens = np.take_along_axis(sequences[docs[chosen]], np.clip(slots, 0, sequences.shape[1] - 1), axis=1)
        return ContextSet(docs[chosen].astype(np.int64), starts.astype(np.int64), ((tokens == int(token_id)) & inside).astype(np.float32))

    buckets = [(doc, start) for doc in range(sequences.shape[0]) for start in range(1, sequences.shape[1] - window + 1, window)
               if not hits[doc, start : start + window].any()]
    quiet = [buckets[index] for index in rng.permutation(len(buckets))[: settings.n_non_activating]]
    non_activating = ContextSet(np.array([doc for doc, _ in quiet], dtype=np.int64), np.array([start for _, start in quiet], dtype=np.int64),
                                np.zeros((len(quiet), window), dtype=np.float32))
    return FeatureExamples(int(feature), windows(picks[: settings.n_top]), windows(picks[settings.n_top :]), non_activating, int(hits.sum()), 1.0 if len(docs) else 0.0)
