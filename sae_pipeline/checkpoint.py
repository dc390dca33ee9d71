"""SAE checkpoints on disk in the layout SAELens publishes: a folder with ``cfg.json`` and
``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``, plus ``threshold`` for batch-top-k variants) and optionally
``sparsity.safetensors`` (``sparsity [d_sae]``: log10 firing frequency per latent, as SAELens stores it).

Folders are written to a temporary name and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy_file
from safetensors.torch import load_file, save_file

from sae_pipeline.atomic import atomic_path
from sae_pipeline.sae import SparseAutoencoder

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
REQUIRED_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


def save_sae(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    firing_frequency: torch.Tensor | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write one SAE folder atomically and return its path.

    Args:
        tensors: at least ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` (SAELens shapes, see module doc).
        cfg: the ``cfg.json`` content; ``d_in``/``d_sae`` are checked against the tensors.
        firing_frequency: ``[d_sae]`` fraction of tokens on which each latent fired, stored as log10.
        extra_files: ``{file name: text}`` written into the folder as well (e.g. ``metrics.json``).
    """
    missing = [name for name in REQUIRED_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"save_sae: missing tensors {missing}")
    d_in, d_sae = tensors["W_enc"].shape
    if tuple(tensors["W_dec"].shape) != (d_sae, d_in):
        raise ValueError(f"save_sae: W_dec has shape {tuple(tensors['W_dec'].shape)}, expected {(d_sae, d_in)}")
    cfg = dict(cfg)
    cfg.update(d_in=int(d_in), d_sae=int(d_sae))
    with atomic_path(folder) as temporary:
        temporary.mkdir(parents=True)
        save_file({name: value.detach().contiguous().cpu() for name, value in tensors.items()}, str(temporary / WEIGHTS_NAME))
        if firing_frequency is not None:
            sparsity = torch.log10(firing_frequency.detach().float().cpu().clamp_min(1e-10))
            save_file({"sparsity": sparsity.contiguous()}, str(temporary / SPARSITY_NAME))
        (temporary / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
    return Path(folder)


def load_sae_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``cfg.json`` of an SAE folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} is not an SAE folder")
    return json.loads(path.read_text())


def load_sae_arrays(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an SAE folder as float32 NumPy arrays (``W_enc [d_in, d_sae]`` etc.)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} is not an SAE folder")
    return {name: value.astype(np.float32) for name, value in load_numpy_file(str(path)).items()}


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder as a :class:`SparseAutoencoder` on ``device`` (float32)."""
    cfg = load_sae_config(folder)
    tensors = {name: value.float() for name, value in load_file(str(Path(folder) / WEIGHTS_NAME)).items()}
    return SparseAutoencoder(cfg, tensors).to(device)


def load_firing_frequency(folder: str | os.PathLike) -> np.ndarray | None:
    """Per-latent firing frequency ``[d_sae]`` (fraction of tokens), or None when not saved."""
    path = Path(folder) / SPARSITY_NAME
    if not path.exists():
        return None
    return np.power(10.0, load_numpy_file(str(path))["sparsity"].astype(np.float64))
