"""The embedding monosemanticity proxy of latents: how alike, in an independent sentence-embedding space,
the contexts are on which a latent fires most strongly (README "Claim 4").

For latent ``i``: its ``n`` top-activating contexts, at most one per cached sequence (the largest activation
in each sequence; windows of one sequence overlap and would share text), each the window of tokens
``[position - window_before, position + window_after]`` of the sequence, decoded to text and embedded by the
sentence model; with activations ``a_j`` and embeddings ``e_j`` the proxy is
:func:`sae_pipeline.stats.tradeoff.activation_weighted_similarity`,
``sum_{j<l} a_j a_l cos(e_j, e_l) / sum_{j<l} a_j a_l``.

Pure numpy: the sentence model and the tokenizer come in as functions (``embed``, ``decode``), so the
evaluate stage passes all-MiniLM-L6-v2 and the tests a hand-made embedding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from sae_pipeline.stats.tradeoff import activation_weighted_similarity


def top_contexts(latent: np.ndarray, row: np.ndarray, value: np.ndarray, doc_id: np.ndarray, latents: Sequence[int], n_contexts: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per latent of ``latents``: ``(rows, activations)`` of its ``n_contexts`` largest activations, one per sequence.

    ``latent``, ``row``, ``value``: ``[n_nonzero]`` the nonzero codes (latent index, evaluation row, activation);
    ``doc_id``: ``[rows]`` the cached sequence of each evaluation row. Ties in value keep the earlier row.
    """
    latent = np.asarray(latent, dtype=np.int64)
    row = np.asarray(row, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    order = np.lexsort((row, -value, latent))
    sorted_latent = latent[order]
    chosen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for index in latents:
        start, end = np.searchsorted(sorted_latent, [index, index + 1])
        entries = order[start:end]
        docs = doc_id[row[entries]]
        _, first = np.unique(docs, return_index=True)  # first = largest activation of each sequence
        keep = entries[np.sort(first)][:n_contexts]
        chosen[int(index)] = (row[keep], value[keep])
    return chosen


def context_windows(rows: np.ndarray, doc_id: np.ndarray, position: np.ndarray, sequences: np.ndarray, window_before: int, window_after: int) -> list[np.ndarray]:
    """The token window of each evaluation row: ``sequences[doc, position - window_before : position + window_after + 1]`` (clipped)."""
    windows = []
    for index in np.asarray(rows, dtype=np.int64):
        sequence = sequences[int(doc_id[index])]
        centre = int(position[index])
        windows.append(np.asarray(sequence[max(0, centre - window_before) : centre + window_after + 1]))
    return windows


def embedding_similarity_table(
    latent: np.ndarray,
    row: np.ndarray,
    value: np.ndarray,
    doc_id: np.ndarray,
    position: np.ndarray,
    sequences: np.ndarray,
    latents: Sequence[int],
    n_contexts: int,
    window_before: int,
    window_after: int,
    decode: Callable[[list[int]], str],
    embed: Callable[[list[str]], np.ndarray],
) -> pd.DataFrame:
    """One row per latent of ``latents``: ``latent``, ``embedding_contexts`` (contexts used) and ``embedding_similarity``.

    Each distinct context (evaluation row) is decoded and embedded once, however many latents it is a top
    context of. A latent with fewer than two contexts gets NaN.
    """
    chosen = top_contexts(latent, row, value, doc_id, latents, n_contexts)
    distinct = np.unique(np.concatenate([rows for rows, _ in chosen.values()])) if chosen else np.zeros(0, dtype=np.int64)
    vectors = np.zeros((0, 0))
    if distinct.size:
        texts = [decode([int(token) for token in window]) for window in context_windows(distinct, doc_id, position, sequences, window_before, window_after)]
        vectors = np.asarray(embed(texts), dtype=np.float64)
    lookup = {int(context): index for index, context in enumerate(distinct)}
    records = []
    for index, (rows, activations) in chosen.items():
        similarity = activation_weighted_similarity(activations, vectors[[lookup[int(r)] for r in rows]]) if rows.size >= 2 else float("nan")
        records.append({"latent": index, "embedding_contexts": int(rows.size), "embedding_similarity": similarity})
    return pd.DataFrame(records, columns=["latent", "embedding_contexts", "embedding_similarity"])


def sample_latents(candidates: Sequence[int], max_latents: int | None, seed: int) -> list[int]:
    """``candidates`` (sorted), or a seeded random sample of ``max_latents`` of them (sorted)."""
    candidates = np.asarray(sorted(int(index) for index in candidates), dtype=np.int64)
    if max_latents is None or candidates.size <= max_latents:
        return candidates.tolist()
    return np.sort(np.random.default_rng(seed).choice(candidates, size=int(max_latents), replace=False)).tolist()
