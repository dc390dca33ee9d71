"""Evaluate stage: the figures behind claim 4 (Top-k sparsity regularizers) for one trained SAE.

Everything is measured on the training hold-out: the last ``holdout_tokens`` rows of the activation
cache, which the train stage never trains on (the size is read from the SAE's ``cfg.json``), at most
``max_tokens`` non-BOS rows of it; CE-loss recovered runs the subject model on up to ``ce_sequences``
sequences lying wholly in the hold-out. An SAE without a recorded hold-out is evaluated on the first
cache rows instead, and ``metrics.json`` says so (``evaluation_rows``).

The measures themselves are defined (with their formulas) in :mod:`sae_pipeline.sae.metrics`: k-robustness,
concentration, latent usage, monosemanticity proxies and sparse probing. With ``embedding_proxy.enabled`` also the
embedding monosemanticity proxy (:mod:`sae_pipeline.features.coherence`: activation-weighted all-MiniLM-L6-v2
similarity of a latent's top-activating contexts) for a sample of the scored latents.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.data.atomic import write_dataframe, write_json
from sae_pipeline.data.checkpoint import holdout_rows_of, load_sae
from sae_pipeline.data.holdout import complete_holdout_documents, read_holdout
from sae_pipeline.data.shards import ActivationStore
from sae_pipeline.features.coherence import embedding_similarity_table, sample_latents
from sae_pipeline.report.plots import plot_latent_frequency
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.sae.metrics import (
    balanced_sample,
    code_concentration,
    firing_summary,
    inference_ks,
    monosemanticity_proxies,
    reconstruction_metrics,
    sparse_probe,
    token_property_labels,
)
from sae_pipeline.sae.model import SparseAutoencoder
from sae_pipeline.settings import EmbeddingProxySettings, EvaluateSettings, ProbeSettings
from sae_pipeline.stats.intervals import mean_with_interval

logger = logging.getLogger("sae_pipeline.stages.evaluate")


@dataclass
class EvaluationSet:
    """What the SAE is evaluated on.

    Attributes:
        activations: ``[rows, d_model]`` float32, non-BOS rows.
        token_ids: ``[rows]`` the token at each row.
        ce_doc_ids: cached sequences (rows of ``ActivationStore.sequences()``) for CE-loss recovered.
        source: a sentence saying where the rows come from.
        doc_ids, positions: ``[rows]`` the cached sequence and position of each row (the contexts of the embedding proxy).
    """

    activations: np.ndarray
    token_ids: np.ndarray
    ce_doc_ids: np.ndarray
    source: str
    doc_ids: np.ndarray | None = None
    positions: np.ndarray | None = None


def evaluation_set(store: ActivationStore, holdout_rows: int, max_tokens: int, ce_sequences: int, seed: int) -> EvaluationSet:
    """The rows and sequences to evaluate on.

    With a training hold-out (``holdout_rows > 0``: the last rows of the cache, which the train stage
    never trains on) the first ``max_tokens`` non-BOS hold-out rows, and for CE the first
    ``ce_sequences`` sequences that lie wholly in the hold-out. Without one (an SAE from elsewhere), the
    first ``max_tokens`` non-BOS cache rows and ``ce_sequences`` random cached sequences.
    """
    if holdout_rows > 0:

        holdout = read_holdout(store, holdout_rows)
        rows = holdout.training_rows()
        documents = complete_holdout_documents(holdout)[:ce_sequences]
        source = f"training hold-out (last {holdout_rows} cache rows, never trained on)"
        activations, token_ids = rows.activations[:max_tokens], rows.token_id[:max_tokens]
        doc_ids, positions = rows.doc_id[:max_tokens], rows.position[:max_tokens]
    else:
        activations, token_ids, doc_ids, positions, remaining = [], [], [], [], int(max_tokens)
        for shard in store.iter_shards(columns=["activation", "token_id", "doc_id", "position"], drop_excluded=True):
            take = min(remaining, len(shard))
            activations.append(shard.activations[:take])
            token_ids.append(shard.token_id[:take])
            doc_ids.append(shard.doc_id[:take])
            positions.append(shard.position[:take])
            remaining -= take
            if remaining <= 0:
                break
        activations = np.concatenate(activations) if activations else np.empty((0, store.d_model))
        token_ids = np.concatenate(token_ids) if token_ids else np.empty(0)
        doc_ids = np.concatenate(doc_ids) if doc_ids else np.empty(0)
        positions = np.concatenate(positions) if positions else np.empty(0)
        n_sequences = store.sequences().shape[0]
        documents = np.sort(np.random.default_rng(seed).choice(n_sequences, size=min(ce_sequences, n_sequences), replace=False))
        source = "first cache rows (no training hold-out recorded in cfg.json: the SAE may have trained on them)"
    if len(activations) == 0:
        raise ValueError(f"{store.root}: no non-BOS rows to evaluate on")
    return EvaluationSet(
        np.asarray(activations, dtype=np.float32), np.asarray(token_ids, dtype=np.int64), np.asarray(documents, dtype=np.int64), source,
        np.asarray(doc_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64),
    )


def _native_pass(sae: SparseAutoencoder, x: torch.Tensor, token_ids: np.ndarray, batch_size: int) -> dict[str, Any]:
    """One pass at the trained sparsity: firing counts, code concentration, nonzero (latent, token, value)
    triplets, and each latent's reconstruction contribution.

    The contribution of latent ``i`` is the share of the total variance ``sum_t ||x_t - mean||^2`` that the
    reconstruction loses when that latent alone is dropped (codes of the others kept):
    ``sum_t ||z_ti d_i||^2 + 2 z_ti d_i . (x_t - x_hat_t)`` over the evaluation rows, divided by the total.
    """
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=x.device)
    drop_one = torch.zeros(sae.d_sae, dtype=torch.float64, device=x.device)
    total_variance = float(((x.double() - x.double().mean(dim=0)) ** 2).sum())
    decoder_norms_squared = (sae.W_dec.double() ** 2).sum(dim=1)
    effective, ratio, zero_rows = [], [], 0
    latents, tokens, values, rows = [], [], [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            codes = sae.encode(x[start : start + batch_size])
            fires += (codes > 0).sum(dim=0).double()
            error = (x[start : start + batch_size] - sae.decode(codes)).double()
            drop_one += (codes.double() ** 2).sum(dim=0) * decoder_norms_squared + 2 * (codes.double() * (error @ sae.W_dec.double().T)).sum(dim=0)
            batch_effective, batch_ratio = code_concentration(codes)
            effective.append(batch_effective.cpu())
            ratio.append(batch_ratio.cpu())
            zero_rows += int(codes.shape[0] - batch_effective.shape[0])
            row, column = torch.nonzero(codes > 0, as_tuple=True)
            latents.append(column.cpu().numpy())
            tokens.append(token_ids[start + row.cpu().numpy()])
            rows.append(start + row.cpu().numpy())
            values.append(codes[row, column].cpu().numpy())
    return {
        "frequency": (fires / x.shape[0]).cpu().numpy(),
        "reconstruction_contribution": (drop_one / max(total_variance, 1e-30)).cpu().numpy(),
        "effective_latents": torch.cat(effective).numpy(),
        "l1_over_l2": torch.cat(ratio).numpy(),
        "zero_code_rows": zero_rows,
        "latent": np.concatenate(latents),
        "token_id": np.concatenate(tokens),
        "value": np.concatenate(values),
        "row": np.concatenate(rows),
    }


def _embedding_proxy(native: Mapping[str, Any], evaluation: EvaluationSet, store: ActivationStore, tokenizer: Any, candidates: Sequence[int], settings: EmbeddingProxySettings) -> pd.DataFrame:
    """The embedding monosemanticity proxy (:mod:`sae_pipeline.features.coherence`) of a sample of ``candidates``
    under all-MiniLM-L6-v2: ``latent``, ``embedding_contexts``, ``embedding_similarity``."""
    from sae_pipeline.judges.embedding import load_embedding_model

    chosen = sample_latents(candidates, settings.max_latents, settings.seed)
    model = load_embedding_model(settings.device)

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=settings.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)

    table = embedding_similarity_table(
        native["latent"], native["row"], native["value"], evaluation.doc_ids, evaluation.positions, store.sequences(), chosen,
        settings.contexts, settings.window_before, settings.window_after, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), embed,
    )
    logger.info("embedding proxy: %d latents, mean similarity %.4f", len(table), float(table["embedding_similarity"].mean()) if len(table) else float("nan"))
    return table


def _decode_vocabulary(tokenizer: Any, vocab_size: int) -> list[str]:
    """The decoded string of every token id (what the model's tokenizer turns the id back into)."""
    return [tokenizer.decode([index]) for index in range(vocab_size)]


def _probe_all_properties(
    sae: SparseAutoencoder, x: torch.Tensor, token_ids: np.ndarray, token_strings: Sequence[str], settings: ProbeSettings, batch_size: int
) -> pd.DataFrame:
    """Sparse-probing rows for every configured property; a property with too few examples gets a message row."""
    rows = []
    for prop in settings.properties:
        vocabulary_labels = token_property_labels(token_strings, prop)
        labels = vocabulary_labels[np.clip(token_ids, 0, len(vocabulary_labels) - 1)]
        n_positive, n_negative = int(labels.sum()), int((~labels).sum())
        fewest = min(n_positive, n_negative)
        base = {"property": prop, "n_positive_tokens": n_positive, "n_negative_tokens": n_negative}
        if fewest < settings.min_examples_per_class:
            message = (
                f"skipped: {fewest} tokens in the smaller class, fewer than "
                f"evaluate.probe.min_examples_per_class={settings.min_examples_per_class}"
            )
            logger.warning("probe %s: %s", prop, message)
            rows.append({**base, "message": message})
            continue
        sample = balanced_sample(labels, settings.max_examples_per_class, settings.seed)
        with torch.no_grad():
            sample_rows = torch.from_numpy(sample).to(x.device)
            codes = torch.cat(
                [sae.encode(x[sample_rows[start : start + batch_size]]).cpu() for start in range(0, sample_rows.numel(), batch_size)]
            ).numpy()
        for result in sparse_probe(codes, labels[sample], settings.latent_budgets, settings.test_fraction, settings.seed):
            rows.append({**base, **result, "latents": " ".join(str(index) for index in result["latents"]), "message": ""})
    return pd.DataFrame(rows)


def _ce_rows(
    sae: SparseAutoencoder, bridge: Any, store: ActivationStore, doc_ids: np.ndarray, ks: Sequence[tuple[str, float | None, int | None]], settings: EvaluateSettings
) -> dict[str, dict[str, Any]]:
    """``{inference label: CE figures}``: clean, zero-ablated and spliced CE loss on the cached sequences ``doc_ids``."""
    from sae_pipeline.subject.model import ce_loss_recovered, ce_loss_with_replacement

    tokens = torch.from_numpy(store.sequences()[doc_ids].astype(np.int64))
    if tokens.shape[0] == 0:
        logger.warning("no sequences for CE-loss recovered (no complete sequence in the hold-out); CE columns left empty")
        return {label: {"ce_loss": None, "clean_ce_loss": None, "zero_ablation_ce_loss": None, "ce_loss_recovered": None, "ce_sequences": 0} for label, _, _ in ks}
    hook_name = store.manifest["hook_name"]
    batch_size = settings.ce_batch_size
    clean = ce_loss_with_replacement(bridge, tokens, hook_name, None, batch_size=batch_size)
    zero = ce_loss_with_replacement(bridge, tokens, hook_name, torch.zeros_like, batch_size=batch_size)
    results = {}
    for label, _, k in ks:
        spliced = ce_loss_with_replacement(bridge, tokens, hook_name, lambda activation, k=k: sae(activation, k), batch_size=batch_size)
        results[label] = {
            "ce_loss": spliced,
            "clean_ce_loss": clean,
            "zero_ablation_ce_loss": zero,
            "ce_loss_recovered": ce_loss_recovered(clean, spliced, zero),
            "ce_sequences": int(tokens.shape[0]),
        }
    return results


def run_evaluation(
    sae_folder: str,
    cache_dir: str,
    outputs: Mapping[str, str],
    settings: EvaluateSettings | Mapping[str, Any],
    variant: str = "",
    seed: int = 0,
    condition: str = "",
) -> dict[str, Any]:
    """Evaluate one trained SAE and write its outputs.

    Args:
        sae_folder: the SAE folder (``cfg.json`` + ``sae_weights.safetensors``).
        cache_dir: the activation cache folder (``manifest.json``); its manifest names the subject model.
        outputs: paths for ``metrics`` (JSON), ``k_robustness`` (CSV), ``probing`` (CSV),
            ``latents`` (Parquet, one row per latent), ``frequency_plot`` (PNG).
        settings: the ``evaluate`` config section.
        variant, seed, condition: recorded in every table so the regress stage can join them.

    Returns:
        The metrics dictionary written to ``outputs["metrics"]``.
    """
    settings = EvaluateSettings.from_mapping(settings)
    device = resolve_device(settings.device)
    store = ActivationStore(cache_dir)
    sae = load_sae(sae_folder, device)
    torch.manual_seed(settings.probe.seed)
    evaluation = evaluation_set(
        store, holdout_rows_of(sae.cfg), settings.max_tokens, settings.ce_sequences, settings.probe.seed
    )
    token_ids = evaluation.token_ids
    x = torch.from_numpy(evaluation.activations).to(device)
    mean = x.double().mean(dim=0)
    batch_size = settings.batch_size
    logger.info("evaluating %s on %d tokens of the %s (d_sae %d, k %s) on %s", sae_folder, x.shape[0], evaluation.source, sae.d_sae, sae.k, device)

    # (label, multiplier, k'): the grid always contains the trained k (multiplier 1); SAEs that are not
    # plain Top-k also get their own inference rule ("as_trained": threshold or ReLU).
    ks: list[tuple[str, float | None, int | None]] = []
    if sae.k is not None:
        multipliers = sorted({float(multiplier) for multiplier in settings.k_multipliers} | {1.0})
        ks += [(f"k'={k_prime}", multiplier, k_prime) for multiplier, k_prime in inference_ks(sae.k, multipliers)]
    trained_label = f"k'={sae.k}" if sae.architecture == "topk" else "as_trained"
    if sae.architecture != "topk":
        ks.append(("as_trained", None, None))
    from sae_pipeline.subject.model import load_subject_model

    bridge = load_subject_model(store.manifest["model"], device=device, dtype=store.manifest.get("model_dtype", "float32"))
    ce_results = _ce_rows(sae, bridge, store, evaluation.ce_doc_ids, ks, settings)
    identity = {"variant": variant, "seed": int(seed), "condition": condition, "architecture": sae.architecture, "trained_k": sae.k}
    robustness_rows = []
    for label, multiplier, k in ks:
        measured = reconstruction_metrics(sae, x, mean, k, batch_size)
        reconstruction = {key: measured[key] for key in ("fvu", "mse", "l0")}
        robustness_rows.append({**identity, "inference": label, "multiplier": multiplier, "k_prime": k, **reconstruction, **ce_results[label]})
        logger.info("%s: FVU %.4f, CE-loss recovered %s", label, reconstruction["fvu"], ce_results[label]["ce_loss_recovered"])
    robustness = pd.DataFrame(robustness_rows)

    native = _native_pass(sae, x, token_ids, batch_size)
    token_strings = _decode_vocabulary(bridge.tokenizer, int(bridge.cfg.d_vocab))
    latents = monosemanticity_proxies(native["latent"], native["token_id"], native["value"], sae.d_sae, settings.top_activations)
    latents.insert(1, "firing_frequency", native["frequency"])
    latents.insert(2, "reconstruction_contribution", native["reconstruction_contribution"])
    latents["top_token"] = [token_strings[index] if 0 <= index < len(token_strings) else "" for index in latents["top_token_id"]]
    latents["scored"] = latents["n_activations"] >= settings.min_activations
    if settings.embedding_proxy.enabled:
        proxy = _embedding_proxy(native, evaluation, store, bridge.tokenizer, latents.loc[latents["scored"], "latent"].tolist(), settings.embedding_proxy)
        latents = latents.merge(proxy, on="latent", how="left")
    for key, value in identity.items():
        latents[key] = value
    scored = latents[latents["scored"]]

    probing = _probe_all_properties(sae, x, token_ids, token_strings, settings.probe, batch_size)
    for key, value in reversed(list(identity.items())):
        probing.insert(0, key, value)

    at_trained = robustness[robustness["inference"] == trained_label]
    metrics = {
        **identity,
        "sae_folder": str(sae_folder),
        "n_tokens": int(x.shape[0]),
        "evaluation_rows": evaluation.source,
        "at_trained_k": {key: None if _is_missing(at_trained.iloc[0][key]) else float(at_trained.iloc[0][key]) for key in ("fvu", "mse", "l0", "ce_loss", "ce_loss_recovered")},
        "effective_latents_per_token": mean_with_interval(native["effective_latents"]),
        "l1_over_l2": mean_with_interval(native["l1_over_l2"]),
        "zero_code_tokens": int(native["zero_code_rows"]),
        "firing": firing_summary(native["frequency"], settings.dense_threshold),
        "monosemanticity": {
            "scored_latents": int(len(scored)),
            "min_activations": settings.min_activations,
            "top_activations": settings.top_activations,
            "top_token_mass_share": mean_with_interval(scored["top_token_mass_share"].to_numpy()),
            "top_activation_token_entropy_bits": mean_with_interval(scored["top_activation_token_entropy_bits"].to_numpy()),
            **({"embedding_similarity": mean_with_interval(scored["embedding_similarity"].to_numpy())} if "embedding_similarity" in scored else {}),
        },
        "probing": [
            {key: row[key] for key in ("property", "m", "test_balanced_accuracy", "n_test", "message") if key in row and not _is_missing(row[key])}
            for row in probing.to_dict("records")
        ],
        "k_robustness": robustness[["inference", "multiplier", "k_prime", "fvu", "l0", "ce_loss_recovered"]].to_dict("records"),
        "settings": settings.as_dict(),
    }
    write_dataframe(outputs["k_robustness"], robustness)
    write_dataframe(outputs["probing"], probing)
    write_dataframe(outputs["latents"], latents)
    plot_latent_frequency(outputs["frequency_plot"], native["frequency"], settings.dense_threshold, f"{variant} seed {seed}")
    write_json(outputs["metrics"], metrics)
    return metrics


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
