"""The train stage: SAEs for one variant and one group of seeds, from the activation cache.

``train_saes`` is what the Snakemake rule calls. It trains every seed of the group in one process
(one pass over the data, parameters stacked along a seed dimension, see
:mod:`sae_pipeline.sae.training_model`), checkpoints periodically to a state folder so a killed job
resumes where it stopped, evaluates each SAE on the held-out rows of the cache (and, for a language
model, the cross-entropy loss recovered when the SAE reconstruction is spliced into the model), counts
firing frequencies over a window of training rows, and writes the group folder atomically::

    <output_dir>/seed<s>/cfg.json, sae_weights.safetensors, sparsity.safetensors (firing frequency
                   over the first ``firing_window_tokens`` training rows, as log10), metrics.json
    <output_dir>/curves.parquet     one row per (logged step, seed)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sae_pipeline.data.atomic import atomic_path, write_dataframe
from sae_pipeline.data.checkpoint import sae_config, save_sae
from sae_pipeline.data.holdout import complete_holdout_documents, iter_training_window, read_holdout
from sae_pipeline.data.loader import ActivationLoader
from sae_pipeline.data.shards import ActivationStore, ShardData
from sae_pipeline.layout import SAE_CURVES, SAE_METRICS
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.sae.metrics import firing_frequencies, reconstruction_metrics
from sae_pipeline.sae.initialization import geometric_median
from sae_pipeline.sae.model import SparseAutoencoder
from sae_pipeline.sae.trainer import STEP_STATISTICS, SeedBatchedTrainer
from sae_pipeline.sae.training_model import BATCH_TOPK, SeedBatchedSAE
from sae_pipeline.settings import TrainSettings

logger = logging.getLogger(__name__)

STATE_NAME = "state.pt"
EVAL_CHUNK_ROWS = 8192
# Rows the activation scale of normalize_activations is measured on.
SCALE_SAMPLE_ROWS = 16384
CE_BATCH_SEQUENCES = 16


class TrainingInterrupted(RuntimeError):
    """Raised by ``train_saes(stop_after_step=...)`` once the state at that step is checkpointed."""


def run_fingerprint(settings: TrainSettings, seeds: Sequence[int], manifest: Mapping[str, Any]) -> str:
    """Hash of everything a saved training state depends on (settings, seeds, cache contents)."""
    payload = {
        "settings": settings.as_dict(),
        "seeds": [int(seed) for seed in seeds],
        "shards": [shard.get("checksum") for shard in manifest["shards"]],
        "d_model": manifest["d_model"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def inference_sae(settings: TrainSettings, tensors: Mapping[str, torch.Tensor], device: str) -> SparseAutoencoder:
    """The trained SAE as the pipeline's inference module (our architecture names)."""
    return SparseAutoencoder({"architecture": settings.architecture, "k": settings.k}, tensors).to(device)


@torch.no_grad()
def cross_entropy_losses(bridge: Any, hook_name: str, tokens: torch.Tensor, saes: Sequence[SparseAutoencoder]) -> dict[str, Any]:
    """Next-token cross-entropy of the subject model on ``tokens [n, T]``: clean, with the activation
    at ``hook_name`` zeroed, and with it replaced by each SAE's reconstruction (positions >= 1; the
    BOS position, which the SAEs never saw in training, stays as it is).

    Returns ``{"clean": float, "zero_ablation": float, "with_sae": [float per SAE]}`` in nats/token.
    """
    from sae_pipeline.subject.model import ce_loss_with_replacement

    def loss(replace: Any) -> float:
        return ce_loss_with_replacement(bridge, tokens, hook_name, replace, batch_size=CE_BATCH_SEQUENCES)

    return {
        "clean": loss(None),
        "zero_ablation": loss(torch.zeros_like),
        "with_sae": [loss(lambda activation, sae=sae: sae(activation)) for sae in saes],
    }


def _load_state(state_path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not state_path.exists():
        return None
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as error:  # a corrupt state is not fatal: start over
        logger.warning("ignoring unreadable training state %s (%s)", state_path, error)
        return None
    if state.get("fingerprint") != fingerprint:
        logger.warning("ignoring training state %s: it was made with other settings, seeds or cache", state_path)
        return None
    return state


def _save_state(state_path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(state_path) as temporary:
        torch.save(payload, temporary)


def train_saes(
    cache_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    seeds: Sequence[int],
    state_dir: str | os.PathLike,
    variant: str = "",
    threads: int | None = None,
    stop_after_step: int | None = None,
    progress: bool = True,
) -> dict[int, dict[str, Any]]:
    """Train one SAE per seed (all seeds together) and write the group folder ``output_dir``.

    Args:
        cache_dir: folder holding the cache's ``manifest.json``.
        output_dir: group folder to create (replaced atomically when complete).
        settings: the variant's settings (``train.options`` overlaid with its grid axes); see
            :class:`~sae_pipeline.settings.TrainSettings` for keys and defaults.
        seeds: the seeds of this group; each seed fixes one SAE's initialisation (the data order is
            set by ``settings["data_seed"]`` and is the same for every seed).
        state_dir: folder for the resumable training state; removed after success.
        variant: variant name, recorded in ``cfg.json``.
        threads: torch CPU threads (None leaves torch's default).
        stop_after_step: checkpoint after this step and raise :class:`TrainingInterrupted`
            (to split a long job, and to test resuming).
        progress: show a tqdm progress bar (on stderr).

    Returns:
        ``{seed: metrics}`` as written to each ``metrics.json``.
    """
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    config = TrainSettings.from_mapping(settings)
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"train: seeds must be distinct and non-empty, got {seeds}")
    store = ActivationStore(cache_dir)
    manifest = store.manifest
    device = resolve_device(config.device)
    d_in = store.d_model
    state_path = Path(state_dir) / STATE_NAME
    fingerprint = run_fingerprint(config, seeds, manifest)
    state = _load_state(state_path, fingerprint)
    start_step = int(state["trainer"]["step_index"]) if state else 0

    loader = ActivationLoader(
        store, config.batch_size, config.total_steps, seed=config.data_seed, start_batch=start_step,
        shuffle_buffer_rows=config.shuffle_buffer_rows, holdout_rows=config.holdout_tokens, device=device,
    )
    logger.info(
        "training %s seeds %s: %d steps of %d tokens on %s (%.2f epochs of %d training rows)%s",
        variant or config.architecture, seeds, config.total_steps, config.batch_size, device,
        loader.epochs, loader.rows_per_epoch, f", resuming at step {start_step}" if state else "",
    )
    scale = activation_scale(store, config)
    batches = (batch * scale for batch in loader) if scale != 1.0 else iter(loader)
    first_batch = next(batches) if start_step < config.total_steps else None
    b_dec = None
    if state is None and first_batch is not None:
        b_dec = {"geometric_median": geometric_median, "mean": lambda rows: rows.mean(dim=0), "zeros": lambda rows: torch.zeros(rows.shape[1])}[config.b_dec_init](first_batch)
    model = SeedBatchedSAE(config, d_in, seeds, b_dec=b_dec).to(device)
    trainer = SeedBatchedTrainer(model, device)
    curves: list[dict[str, Any]] = []
    previous_wall = 0.0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        curves = list(state["curves"])
        previous_wall = float(state["wall_time_s"])
    run_started = time.perf_counter()

    def checkpoint() -> None:
        _save_state(state_path, {
            "fingerprint": fingerprint,
            "trainer": trainer.state_dict(),
            "curves": curves,
            "wall_time_s": previous_wall + time.perf_counter() - run_started,
        })

    bar = tqdm(total=config.total_steps, initial=start_step, desc=f"train {variant}", disable=not progress, mininterval=5)
    try:
        batch = first_batch
        while trainer.step_index < config.total_steps:
            if batch is None:
                batch = next(batches)
            lr = trainer.current_lr()
            step = trainer.step_index + 1
            logging_step = step == 1 or step % config.log_every == 0 or step == config.total_steps
            statistics = trainer.step(batch, statistics=logging_step)
            batch = None
            if logging_step:
                model.refresh_dead_flag()
                values = statistics.cpu().numpy()
                for index, seed in enumerate(seeds):
                    curves.append({"step": step, "seed": seed, "tokens": step * config.batch_size, "lr": lr,
                                   **{name: float(values[index, column]) for column, name in enumerate(STEP_STATISTICS)}})
                bar.set_postfix(fvu=f"{values[:, STEP_STATISTICS.index('fvu')].mean():.3f}",
                                l0=f"{values[:, STEP_STATISTICS.index('l0')].mean():.1f}", refresh=False)
            bar.update(1)
            if step % config.checkpoint_every == 0 and step < config.total_steps:
                checkpoint()
            if stop_after_step is not None and step >= stop_after_step and step < config.total_steps:
                checkpoint()
                raise TrainingInterrupted(f"stopped after step {step} as asked; state in {state_path}")
    finally:
        bar.close()
        loader.close()
    train_wall = previous_wall + time.perf_counter() - run_started

    metrics = _evaluate_and_save(config, store, manifest, cache_dir, output_dir, model, seeds, variant, device,
                                 curves, train_wall, loader.epochs, scale)
    if Path(state_dir).exists():
        shutil.rmtree(state_dir)
    logger.info("train %s done in %.1f s (training %.1f s)", variant, time.perf_counter() - started, train_wall)
    return metrics


def activation_scale(store: ActivationStore, config: TrainSettings) -> float:
    """The factor SAEs see activations multiplied by: 1, or with ``normalize_activations:
    mean_squared_norm`` ``sqrt(d_in / E||x||^2)`` over the first shard's training rows (at most
    ``SCALE_SAMPLE_ROWS``), so inputs have mean squared norm d_in whatever the model's scale (weight
    penalties and learning rates then mean the same on every model). Deterministic, so a resumed
    run uses the same factor."""
    if config.normalize_activations == "none":
        return 1.0
    rows = store.read_shard(0).training_rows().activations[:SCALE_SAMPLE_ROWS].astype(np.float64)
    return float(np.sqrt(store.d_model / np.mean(np.square(rows).sum(axis=1))))


def fold_activation_scale(tensors: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """SAE tensors trained on ``scale * x`` turned into tensors for ``x`` with the same codes:
    ``W_enc * s``, ``W_dec / s``, ``b_dec / s`` (pre-activations, ``b_enc`` and thresholds unchanged)."""
    folded = dict(tensors)
    folded["W_enc"], folded["W_dec"], folded["b_dec"] = tensors["W_enc"] * scale, tensors["W_dec"] / scale, tensors["b_dec"] / scale
    return folded


def _batch_topk_entry(config: TrainSettings, model: SeedBatchedSAE, index: int) -> dict[str, Any]:
    """BatchTopK's (and Matryoshka's) selection in metrics.json: ``batch_topk_selection`` (``candidates``: the k*B kept from each token's
    ``batch_topk_candidates`` largest, the sparse kernels; ``dense``: over the whole batch) and, for candidates,
    ``batch_topk_capped_tokens`` (tokens, over all steps, whose candidates were all kept: where the cap may have bound)."""
    if config.architecture not in BATCH_TOPK:
        return {}
    if not model.sparse_codes:
        return {"batch_topk_selection": "dense"}
    return {"batch_topk_selection": "candidates", "batch_topk_candidates": model.candidates_per_token,
            "batch_topk_capped_tokens": int(model.capped_tokens[index])}


def _evaluate_and_save(config: TrainSettings, store: ActivationStore, manifest: Mapping[str, Any], cache_dir: str | os.PathLike,
                       output_dir: str | os.PathLike, model: SeedBatchedSAE, seeds: list[int], variant: str, device: str,
                       curves: list[dict[str, Any]], train_wall: float, epochs: float, scale: float = 1.0) -> dict[int, dict[str, Any]]:
    """Held-out metrics, CE-loss recovered (language model only), firing frequencies over the first
    ``firing_window_tokens`` training rows (``sparsity.safetensors``: the held-out rows are too few to
    tell rare latents from dead ones), then the group folder (tensors for the activations as cached:
    the activation scale is folded into the weights)."""
    holdout = read_holdout(store, config.holdout_tokens)
    eval_rows = holdout.training_rows().activations
    all_tensors = [fold_activation_scale(model.inference_tensors(index), scale) for index in range(len(seeds))]
    saes = [inference_sae(config, tensors, device) for tensors in all_tensors]
    mean = torch.from_numpy(eval_rows.astype(np.float64).mean(axis=0))
    reconstruction = [reconstruction_metrics(sae, eval_rows, mean, batch_rows=EVAL_CHUNK_ROWS) for sae in saes]
    dead_fraction = model.dead_mask().float().mean(dim=-1).cpu().tolist()
    window_frequencies, window_rows = firing_frequencies(saes, iter_training_window(store, config.holdout_tokens, config.firing_window_tokens),
                                                         batch_rows=EVAL_CHUNK_ROWS)
    cross_entropy = _cross_entropy_for(config, store, manifest, holdout, saes, device)
    tokens_seen = config.total_steps * config.batch_size
    results: dict[int, dict[str, Any]] = {}
    with atomic_path(output_dir) as folder:
        folder.mkdir(parents=True)
        for index, seed in enumerate(seeds):
            tensors = all_tensors[index]
            measured = reconstruction[index]
            metrics = {
                "variant": variant,
                "seed": seed,
                "architecture": config.architecture,
                "eval_rows": measured["rows"],
                "fvu": measured["fvu"],
                "mse": measured["mse"],
                "reconstruction_loss": measured["reconstruction_loss"],
                "l0": measured["l0"],
                "dead_fraction": dead_fraction[index],
                "dead_window_tokens": config.dead_window_tokens,
                "never_fired_on_eval_fraction": float((measured["firing_frequency"] == 0).mean()),
                "firing_window_rows": window_rows,
                "never_fired_in_window_fraction": float((window_frequencies[index] == 0).mean()),
                **_cross_entropy_entry(cross_entropy, index),
                **_batch_topk_entry(config, model, index),
                "W_enc_norm": float(tensors["W_enc"].norm()),
                "W_dec_norm": float(tensors["W_dec"].norm()),
                "W_dec_row_norm_mean": float(tensors["W_dec"].norm(dim=1).mean()),
                "tokens_seen": tokens_seen,
                "steps": config.total_steps,
                "epochs": epochs,
                "wall_time_s": train_wall,
                "seeds_trained_together": len(seeds),
                "activation_scale": scale,
                "device": str(device),
            }
            cfg = sae_config(config, manifest, cache_dir, model.d_in, seed, variant,
                             {"tokens_seen": tokens_seen, "steps": config.total_steps, "activation_scale": scale})
            save_sae(folder / f"seed{seed}", tensors, cfg, firing_frequency=torch.from_numpy(window_frequencies[index]),
                     extra_files={SAE_METRICS: json.dumps(metrics, indent=2) + "\n"})
            results[seed] = metrics
        write_dataframe(folder / SAE_CURVES, pd.DataFrame(curves, columns=["step", "seed", "tokens", "lr", *STEP_STATISTICS]))
    for seed in seeds:
        metrics = results[seed]
        logger.info("seed %d: FVU %.4f, L0 %.2f, dead %.3f, CE recovered %s", seed, metrics["fvu"], metrics["l0"],
                    metrics["dead_fraction"], metrics["ce_loss_recovered"])
    return results


def _cross_entropy_for(config: TrainSettings, store: ActivationStore, manifest: Mapping[str, Any], holdout: ShardData,
                       saes: list[SparseAutoencoder], device: str) -> dict[str, Any] | None:
    """CE losses on the complete hold-out sequences, or None when the cache has no subject model."""
    if manifest.get("model") is None or config.ce_eval_sequences == 0:
        return None
    documents = complete_holdout_documents(holdout)[: config.ce_eval_sequences]
    if len(documents) == 0:
        logger.warning("no complete sequence in the %d hold-out rows: CE-loss recovered not measured", config.holdout_tokens)
        return None
    from sae_pipeline.subject.model import load_subject_model

    tokens = torch.from_numpy(store.sequences()[documents].astype(np.int64)).to(device)
    bridge = load_subject_model(str(manifest["model"]), device, dtype=manifest.get("model_dtype", "float32"))
    losses = cross_entropy_losses(bridge, str(manifest["hook_name"]), tokens, saes)
    losses["sequences"] = len(documents)
    return losses


def _cross_entropy_entry(losses: Mapping[str, Any] | None, index: int) -> dict[str, Any]:
    if losses is None:
        return {"ce_loss_clean": None, "ce_loss_with_sae": None, "ce_loss_zero_ablation": None, "ce_loss_recovered": None, "ce_eval_sequences": 0}
    from sae_pipeline.subject.model import ce_loss_recovered

    clean, zero, spliced = losses["clean"], losses["zero_ablation"], losses["with_sae"][index]
    recovered = ce_loss_recovered(clean, spliced, zero)
    recovered = None if math.isnan(recovered) else recovered  # NaN: zero ablation leaves the loss unchanged
    return {"ce_loss_clean": clean, "ce_loss_with_sae": spliced, "ce_loss_zero_ablation": zero,
            "ce_loss_recovered": recovered, "ce_eval_sequences": losses["sequences"]}
