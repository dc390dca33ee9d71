"""SAE checkpoints on disk, in the layout SAELens publishes (the one module that knows the format).

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``, plus ``threshold [d_sae]`` for
batch-top-k variants) and optionally ``sparsity.safetensors`` (``sparsity [d_sae]``: log10 firing
frequency per latent, as SAELens stores it).

``cfg.json`` is SAELens 6.x's: ``architecture`` is the *inference* architecture SAELens computes the
same codes with (our ``relu`` is its ``standard``; our batch-top-k variants run as ``jumprelu`` with
the learned threshold), ``d_in``, ``d_sae``, ``k``, a ``metadata`` object (hook, model, context size,
dataset), and our own ``training`` object (our architecture name, variant, seed, every training
setting). :func:`sae_config` writes it and :func:`our_architecture` reads the architecture back, so
``sae_lens.SAE.load_from_disk(folder)`` loads our folders (checked against sae-lens 6.54) and
:func:`load_sae` loads SAELens's ``standard``/``jumprelu``/``topk`` folders.

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

from sae_pipeline.data.atomic import atomic_path
from sae_pipeline.sae.model import SparseAutoencoder
from sae_pipeline.settings import TrainSettings

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
REQUIRED_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")
# Our architecture -> the SAELens 6.x inference architecture that computes the same codes.
SAELENS_ARCHITECTURE = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
# SAELens's inference names we read without a `training` object (relu(a) * (a > t) equals a * (a > t) for t > 0).
FROM_SAELENS_ARCHITECTURE = {"standard": "relu", "jumprelu": "batchtopk", "topk": "topk"}
# The SAELens release whose loader this layout was checked against (SAE.load_from_disk reads
# `metadata` as given only when this says 6.x); SAELens did not train these SAEs.
SAELENS_FORMAT_VERSION = "6.54.12"


def sae_config(settings: TrainSettings, manifest: Mapping[str, Any], cache_dir: str | os.PathLike, d_in: int,
               seed: int, variant: str, training: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg.json`` of one trained SAE in SAELens 6.x layout, with our settings under ``training``.

    Args:
        manifest: the activation cache's manifest (hook, model, context size, dataset).
        training: extra entries of the ``training`` object (tokens seen, steps...).
    """
    cfg: dict[str, Any] = {
        "architecture": SAELENS_ARCHITECTURE[settings.architecture],
        "d_in": int(d_in),
        "d_sae": int(settings.d_sae),
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if settings.architecture != "relu":
        cfg["k"] = int(settings.k)
    if settings.architecture == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {
        "hook_name": manifest.get("hook_name"),
        "model_name": manifest.get("model"),
        "context_size": manifest.get("context_size"),
        "prepend_bos": bool(manifest.get("prepend_bos", manifest.get("bos_token_id") is not None)),
        "dataset_path": manifest.get("dataset") or str(cache_dir),
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
    }
    cfg["training"] = {"architecture": settings.architecture, "variant": variant, "seed": int(seed), "activation_cache": str(cache_dir),
                       "settings": settings.as_dict(), **training}
    return cfg


def our_architecture(cfg: Mapping[str, Any]) -> str:
    """The pipeline's architecture name of a ``cfg.json``: ours under ``training``, else SAELens's translated."""
    training = cfg.get("training")
    if isinstance(training, Mapping) and training.get("architecture"):
        return str(training["architecture"])
    return FROM_SAELENS_ARCHITECTURE.get(str(cfg["architecture"]), str(cfg["architecture"]))


def training_settings_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings recorded in a ``cfg.json`` (empty for an SAE this pipeline did not train)."""
    training = cfg.get("training")
    settings = training.get("settings") if isinstance(training, Mapping) else None
    return dict(settings) if isinstance(settings, Mapping) else {}


def firing_window_of(cfg: Mapping[str, Any]) -> str:
    """In words, the rows over which ``sparsity.safetensors``'s firing frequencies were counted."""
    settings = training_settings_of(cfg)
    if "firing_window_tokens" not in settings:
        return "rows not recorded (an SAE from elsewhere or an older version: possibly only the hold-out)"
    window = settings["firing_window_tokens"]
    return "every training row" if window is None else f"the first {int(window):,} training rows"


def holdout_rows_of(cfg: Mapping[str, Any]) -> int:
    """The training hold-out size (cache rows at the end never trained on) recorded in a ``cfg.json``; 0 if none."""
    return int(training_settings_of(cfg).get("holdout_tokens") or 0)


def inference_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``architecture`` replaced by the pipeline's name (what :class:`SparseAutoencoder` takes)."""
    return {**dict(cfg), "architecture": our_architecture(cfg)}


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
    return SparseAutoencoder(inference_config(cfg), tensors).to(device)


def load_firing_frequency(folder: str | os.PathLike) -> np.ndarray | None:
    """Per-latent firing frequency ``[d_sae]`` (fraction of tokens), or None when not saved."""
    path = Path(folder) / SPARSITY_NAME
    if not path.exists():
        return None
    return np.power(10.0, load_numpy_file(str(path))["sparsity"].astype(np.float64))
