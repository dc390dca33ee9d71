"""Digit images for the claim-1 experiment, and their class labels beside a digits cache.

Offline (the default) the images are scikit-learn's bundled digits -- 1,797 8x8 images with 17 grey
levels, a copy of the test set of the UCI optical-recognition digits data -- a stand-in for MNIST that
every result names as such. With ``source: hf_mnist`` the real MNIST (28x28) is read through
``datasets`` from the Hugging Face Hub (``ylecun/mnist``). Pixels are scaled to [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow.parquet as pq

from sae_pipeline.settings import DigitsDataSettings, HubImageDataset

LABELS_NAME = "labels.parquet"


HOOK_NAME = "pixels"


SKLEARN_DIGITS_NAME = "sklearn digits 8x8 (UCI optdigits test set, 1797 images; offline stand-in for MNIST)"


SKLEARN_DIGITS_MAX_VALUE = 16.0


MNIST_MAX_VALUE = 255.0


def load_digit_images(settings: DigitsDataSettings | Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    """The images of ``digits.data``: ``(pixels [n, d] float32 in [0, 1], labels [n] int64, dataset name)``.

    ``source: sklearn_digits`` gives d = 64 offline; ``source: hf_mnist`` gives d = 784 from the Hub.
    """
    settings = DigitsDataSettings.from_mapping(settings)
    source = settings.source
    if source == "sklearn_digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels = bunch.data.astype(np.float32) / SKLEARN_DIGITS_MAX_VALUE
        labels = bunch.target.astype(np.int64)
        name = SKLEARN_DIGITS_NAME
    elif source == "hf_mnist":
        pixels, labels, name = _load_hub_mnist(settings.hf_dataset)
    else:
        raise ValueError(f"digits.data.source must be sklearn_digits or hf_mnist, got {source!r}")
    max_images = settings.max_images
    if max_images is not None:
        pixels, labels = pixels[: int(max_images)], labels[: int(max_images)]
    return pixels, labels, name


def _load_hub_mnist(hub: HubImageDataset) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST from the Hugging Face Hub through ``datasets`` (images flattened to 784 pixels)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub.path, hub.name, split=hub.split)
    except Exception as error:  # the Hub is unreachable offline; say what to change
        raise RuntimeError(
            f"digits.data.source=hf_mnist could not load {hub.path!r} split {hub.split!r} from the Hugging Face Hub "
            f"({type(error).__name__}: {error}); use digits.data.source: sklearn_digits offline"
        ) from error
    images = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) for image in dataset[hub.image_field]])
    labels = np.asarray(dataset[hub.label_field], dtype=np.int64)
    return images / MNIST_MAX_VALUE, labels, f"MNIST ({hub.path}, split {hub.split}, {len(labels)} images 28x28)"


def read_labels(cache_dir: str | os.PathLike) -> np.ndarray:
    """Class label of every cached image, indexed by ``doc_id``."""
    table = pq.read_table(Path(cache_dir) / LABELS_NAME)
    return table.column("label").to_numpy()[np.argsort(table.column("doc_id").to_numpy())]
