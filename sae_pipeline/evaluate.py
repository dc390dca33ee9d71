"""Evaluate stage: the figures behind claim 4 (Top-k sparsity regularizers) for one trained SAE.

Everything is measured on the training hold-out: the last ``holdout_tokens`` rows of the activation
cache, which the train stage never trains on (the size is read from the SAE's ``cfg.json``), at most
``max_tokens`` non-BOS rows of it; CE-loss recovered runs the subject model on up to ``ce_sequences``
sequences lying wholly in the hold-out. An SAE without a recorded hold-out is evaluated on the first
cache rows instead, and ``metrics.json`` says so (``evaluation_rows``).

Metrics (shapes: ``x``/``x_hat`` ``[tokens, d_in]``, codes ``z`` ``[tokens, d_sae]``):

- **k-robustness**: for each inference-time k' = round(multiplier * k) (at least 1), the FVU
  ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (mean over the evaluated tokens), the mean L0, and
  CE-loss recovered ``(zero - spliced) / (zero - clean)`` with the reconstruction spliced in at the hook
  (BOS position left clean) versus the clean and the zero-ablated model.
- **concentration** at the trained k: per token with a nonzero code, the effective number of latents
  ``exp(H(p))`` with ``p = |z| / ||z||_1`` (natural log; equals L0 when the active values are equal,
  less when the mass sits on few latents), and the ratio ``||z||_1 / ||z||_2`` (between 1 and
  sqrt(L0)); both averaged over tokens.
- **latent usage**: firing frequency per latent (share of tokens with z_i > 0); dead latents fire on
  no evaluated token; dense latents fire on more than ``dense_threshold`` of them.
- **monosemanticity proxies** (token level, no LLM), per latent with at least ``min_activations``
  firings: ``top_token_mass_share`` = the largest share of the latent's total activation mass that one
  token id receives (1 = it fires on a single token type); ``top_activation_token_entropy_bits`` = the
  entropy (bits) of the token ids of its ``top_activations`` largest activations (0 = all the same
  token). A latent that tracks a concept spread over many token types looks polysemantic by these
  proxies, so they compare configurations rather than grade single latents.
- **sparse probing**: for each token property derived from the decoded token strings (word_start,
  capitalised, punctuation), a class-balanced sample split into train/test; latents ranked on the train
  split by the absolute difference of their mean activation between classes; a logistic regression
  (scikit-learn, standardised inputs) on the top-m latents for each budget m; balanced test accuracy.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.atomic import atomic_path, write_dataframe, write_json
from sae_pipeline.checkpoint import load_sae
from sae_pipeline.config import resolve_device
from sae_pipeline.sae import SparseAutoencoder, reconstruction_metrics
from sae_pipeline.shards import ActivationStore

logger = logging.getLogger("sae_pipeline.evaluate")

TOKEN_PROPERTIES = ("word_start", "capitalised", "punctuation")


# ----------------------------------------------------------------------------------------------
# Metrics on tensors (each tested against hand computation)


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor | None = None) -> float:
    """``sum ||x - x_hat||^2 / sum ||x - mean||^2`` over rows; ``mean`` defaults to the row mean of ``x``.

    ``x``, ``x_hat``: ``[tokens, d]``; ``mean``: ``[d]``.
    """
    x = x.double()
    centre = x.mean(dim=0) if mean is None else mean.double()
    return float(((x - x_hat.double()) ** 2).sum() / ((x - centre) ** 2).sum())


def code_concentration(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row effective number of latents and l1/l2 ratio of sparse codes ``[tokens, d_sae]``.

    Returns ``(effective_latents, l1_over_l2)``, each ``[rows with a nonzero code]`` (float64):
    ``exp(-sum p log p)`` with ``p = |z| / ||z||_1``, and ``||z||_1 / ||z||_2``. Rows whose code is all
    zero are dropped (both quantities are undefined there).
    """
    magnitude = codes.double().abs()
    l1 = magnitude.sum(dim=-1)
    keep = l1 > 0
    magnitude, l1 = magnitude[keep], l1[keep]
    share = magnitude / l1[:, None]
    entropy = -(share * torch.log(share.clamp_min(1e-300))).sum(dim=-1)
    l2 = magnitude.norm(dim=-1)
    return entropy.exp(), l1 / l2


def firing_summary(frequency: np.ndarray, dense_threshold: float) -> dict[str, Any]:
    """Dead (frequency 0) and dense (frequency > ``dense_threshold``) latents from ``frequency [d_sae]``."""
    frequency = np.asarray(frequency, dtype=np.float64)
    dead = frequency <= 0
    dense = frequency > dense_threshold
    return {
        "n_latents": int(frequency.size),
        "n_dead": int(dead.sum()),
        "dead_fraction": float(dead.mean()),
        "n_dense": int(dense.sum()),
        "dense_fraction": float(dense.mean()),
        "dense_threshold": float(dense_threshold),
    }


def monosemanticity_proxies(latent: np.ndarray, token_id: np.ndarray, value: np.ndarray, d_sae: int, top_activations: int) -> pd.DataFrame:
    """Token-level monosemanticity proxies from the nonzero activations of an SAE.

    Args:
        latent, token_id, value: ``[n_nonzero]`` one entry per (token position, firing latent): the
            latent index, the token id at that position, and the (positive) activation.
        d_sae: number of latents (latents that never fire get a row with NaN proxies).
        top_activations: how many of each latent's largest activations the entropy uses.

    Returns:
        One row per latent: ``latent``, ``n_activations``, ``activation_mass``, ``top_token_id``
        (-1 when it never fires), ``top_token_mass_share`` (largest per-token-id share of the mass),
        ``top_activation_token_entropy_bits`` (entropy of the token ids among its ``top_activations``
        largest activations; ties in value broken by order of appearance).
    """
    latent = np.asarray(latent, dtype=np.int64)
    token_id = np.asarray(token_id, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    n_activations = np.bincount(latent, minlength=d_sae)
    mass = np.bincount(latent, weights=value, minlength=d_sae)

    top_token = np.full(d_sae, -1, dtype=np.int64)
    top_share = np.full(d_sae, np.nan)
    if latent.size:
        token_span = int(token_id.max()) + 1
        unique_pairs, inverse = np.unique(latent * token_span + token_id, return_inverse=True)
        pair_mass = np.bincount(inverse, weights=value)
        pair_latent, pair_token = unique_pairs // token_span, unique_pairs % token_span
        # Largest pair mass per latent: sort pairs by (latent, -mass) and take each latent's first.
        order = np.lexsort((-pair_mass, pair_latent))
        first = order[np.r_[True, pair_latent[order][1:] != pair_latent[order][:-1]]]
        top_token[pair_latent[first]] = pair_token[first]
        top_share[pair_latent[first]] = pair_mass[first] / mass[pair_latent[first]]

    entropy = np.full(d_sae, np.nan)
    if latent.size:
        order = np.lexsort((np.arange(latent.size), -value, latent))
        sorted_latent = latent[order]
        starts = np.searchsorted(sorted_latent, np.arange(d_sae), side="left")
        ends = np.searchsorted(sorted_latent, np.arange(d_sae), side="right")
        for index in np.flatnonzero(ends > starts):
            tokens = token_id[order[starts[index] : min(ends[index], starts[index] + top_activations)]]
            counts = np.unique(tokens, return_counts=True)[1].astype(np.float64)
            share = counts / counts.sum()
            entropy[index] = max(0.0, float(-(share * np.log2(share)).sum()))
    return pd.DataFrame(
        {
            "latent": np.arange(d_sae),
            "n_activations": n_activations,
            "activation_mass": mass,
            "top_token_id": top_token,
            "top_token_mass_share": top_share,
            "top_activation_token_entropy_bits": entropy,
        }
    )


def token_property_labels(token_strings: Sequence[str], prop: str) -> np.ndarray:
    """Per vocabulary entry, whether its decoded string has property ``prop`` (``[vocab]`` bool).

    - ``word_start``: begins with whitespace followed by a letter or digit (" the", " 42").
    - ``capitalised``: the first non-space character is an uppercase letter ("The", " London").
    - ``punctuation``: non-empty after stripping whitespace, and every character is Unicode punctuation.
    """
    if prop not in TOKEN_PROPERTIES:
        raise ValueError(f"evaluate.probe.properties: unknown property {prop!r}; choose from {list(TOKEN_PROPERTIES)}")
    labels = np.zeros(len(token_strings), dtype=bool)
    for index, text in enumerate(token_strings):
        stripped = text.strip()
        if not stripped:
            continue
        if prop == "word_start":
            labels[index] = text[0].isspace() and stripped[0].isalnum()
        elif prop == "capitalised":
            labels[index] = stripped[0].isupper()
        else:
            labels[index] = all(unicodedata.category(char).startswith("P") for char in stripped)
    return labels


def rank_latents_by_class_difference(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Latent indices ordered by ``|mean(z | positive) - mean(z | negative)|``, largest first (stable)."""
    labels = np.asarray(labels, dtype=bool)
    difference = np.abs(codes[labels].mean(axis=0) - codes[~labels].mean(axis=0))
    return np.argsort(-difference, kind="stable")


def sparse_probe(
    codes: np.ndarray, labels: np.ndarray, budgets: Iterable[int], test_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Balanced test accuracy of logistic probes on the top-m latents, for each budget m.

    ``codes [examples, d_sae]`` and ``labels [examples]`` (bool) are split into train/test stratified by
    label; the ranking of latents uses the train split only. Returns one dict per budget with ``m``,
    ``latents`` (the chosen indices), ``train_balanced_accuracy`` and ``test_balanced_accuracy``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=bool)
    train_codes, test_codes, train_labels, test_labels = train_test_split(
        codes, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    ranking = rank_latents_by_class_difference(train_codes, train_labels)
    results = []
    for budget in budgets:
        chosen = ranking[: int(budget)]
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        probe.fit(train_codes[:, chosen], train_labels)
        results.append(
            {
                "m": int(budget),
                "latents": [int(index) for index in chosen],
                "train_balanced_accuracy": float(balanced_accuracy_score(train_labels, probe.predict(train_codes[:, chosen]))),
                "test_balanced_accuracy": float(balanced_accuracy_score(test_labels, probe.predict(test_codes[:, chosen]))),
                "n_train": int(train_labels.size),
                "n_test": int(test_labels.size),
            }
        )
    return results


def balanced_sample(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Row indices of a class-balanced sample: ``min(#positive, #negative, max_per_class)`` of each, sorted."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    per_class = min(int(labels.sum()), int((~labels).sum()), int(max_per_class))
    chosen = [rng.choice(np.flatnonzero(labels == value), size=per_class, replace=False) for value in (True, False)]
    return np.sort(np.concatenate(chosen))


def inference_ks(trained_k: int, multipliers: Sequence[float]) -> list[tuple[float, int]]:
    """``[(multiplier, k')]`` with ``k' = max(1, round(multiplier * trained_k))``."""
    return [(float(multiplier), max(1, int(round(float(multiplier) * trained_k)))) for multiplier in multipliers]


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class EvaluationSet:
    """What the SAE is evaluated on.

    Attributes:
        activations: ``[rows, d_model]`` float32, non-BOS rows.
        token_ids: ``[rows]`` the token at each row.
        ce_doc_ids: cached sequences (rows of ``ActivationStore.sequences()``) for CE-loss recovered.
        source: a sentence saying where the rows come from.
    """

    activations: np.ndarray
    token_ids: np.ndarray
    ce_doc_ids: np.ndarray
    source: str


def holdout_rows_of(sae_cfg: Mapping[str, Any]) -> int:
    """The training hold-out size (cache rows at the end never trained on) recorded in a ``cfg.json``; 0 if none."""
    settings = sae_cfg.get("training", {}).get("settings", {}) if isinstance(sae_cfg.get("training"), Mapping) else {}
    return int(settings.get("holdout_tokens") or 0)


def evaluation_set(store: ActivationStore, holdout_rows: int, max_tokens: int, ce_sequences: int, seed: int) -> EvaluationSet:
    """The rows and sequences to evaluate on.

    With a training hold-out (``holdout_rows > 0``: the last rows of the cache, which the train stage
    never trains on) the first ``max_tokens`` non-BOS hold-out rows, and for CE the first
    ``ce_sequences`` sequences that lie wholly in the hold-out. Without one (an SAE from elsewhere), the
    first ``max_tokens`` non-BOS cache rows and ``ce_sequences`` random cached sequences.
    """
    if holdout_rows > 0:
        from sae_pipeline.loader import read_holdout
        from sae_pipeline.train import complete_holdout_documents

        holdout = read_holdout(store, holdout_rows)
        rows = holdout.without_bos()
        documents = complete_holdout_documents(holdout)[:ce_sequences]
        source = f"training hold-out (last {holdout_rows} cache rows, never trained on)"
        activations, token_ids = rows.activations[:max_tokens], rows.token_id[:max_tokens]
    else:
        activations, token_ids, remaining = [], [], int(max_tokens)
        for shard in store.iter_shards(columns=["activation", "token_id", "is_bos"], drop_bos=True):
            take = min(remaining, len(shard))
            activations.append(shard.activations[:take])
            token_ids.append(shard.token_id[:take])
            remaining -= take
            if remaining <= 0:
                break
        activations = np.concatenate(activations) if activations else np.empty((0, store.d_model))
        token_ids = np.concatenate(token_ids) if token_ids else np.empty(0)
        n_sequences = store.sequences().shape[0]
        documents = np.sort(np.random.default_rng(seed).choice(n_sequences, size=min(ce_sequences, n_sequences), replace=False))
        source = "first cache rows (no training hold-out recorded in cfg.json: the SAE may have trained on them)"
    if len(activations) == 0:
        raise ValueError(f"{store.root}: no non-BOS rows to evaluate on")
    return EvaluationSet(np.asarray(activations, dtype=np.float32), np.asarray(token_ids, dtype=np.int64), np.asarray(documents, dtype=np.int64), source)


def _native_pass(sae: SparseAutoencoder, x: torch.Tensor, token_ids: np.ndarray, batch_size: int) -> dict[str, Any]:
    """One pass at the trained sparsity: firing counts, code concentration, and nonzero (latent, token, value) triplets."""
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=x.device)
    effective, ratio, zero_rows = [], [], 0
    latents, tokens, values = [], [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            codes = sae.encode(x[start : start + batch_size])
            fires += (codes > 0).sum(dim=0).double()
            batch_effective, batch_ratio = code_concentration(codes)
            effective.append(batch_effective.cpu())
            ratio.append(batch_ratio.cpu())
            zero_rows += int(codes.shape[0] - batch_effective.shape[0])
            row, column = torch.nonzero(codes > 0, as_tuple=True)
            latents.append(column.cpu().numpy())
            tokens.append(token_ids[start + row.cpu().numpy()])
            values.append(codes[row, column].cpu().numpy())
    return {
        "frequency": (fires / x.shape[0]).cpu().numpy(),
        "effective_latents": torch.cat(effective).numpy(),
        "l1_over_l2": torch.cat(ratio).numpy(),
        "zero_code_rows": zero_rows,
        "latent": np.concatenate(latents),
        "token_id": np.concatenate(tokens),
        "value": np.concatenate(values),
    }


def mean_with_interval(values: Iterable[float]) -> dict[str, Any]:
    """Mean and normal-approximation 95% interval (1.96 standard errors) of ``values`` (NaNs dropped).

    JSON-safe: ``mean`` is None without values, the interval is None with fewer than two.
    """
    values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else float("nan")
    mean = float(values.mean())
    return {
        "mean": mean,
        "ci_low": mean - half_width if values.size > 1 else None,
        "ci_high": mean + half_width if values.size > 1 else None,
        "n": int(values.size),
    }


def _decode_vocabulary(tokenizer: Any, vocab_size: int) -> list[str]:
    """The decoded string of every token id (what the model's tokenizer turns the id back into)."""
    return [tokenizer.decode([index]) for index in range(vocab_size)]


def _probe_all_properties(
    sae: SparseAutoencoder, x: torch.Tensor, token_ids: np.ndarray, token_strings: Sequence[str], settings: Mapping[str, Any], batch_size: int
) -> pd.DataFrame:
    """Sparse-probing rows for every configured property; a property with too few examples gets a message row."""
    rows = []
    for prop in settings["properties"]:
        vocabulary_labels = token_property_labels(token_strings, prop)
        labels = vocabulary_labels[np.clip(token_ids, 0, len(vocabulary_labels) - 1)]
        n_positive, n_negative = int(labels.sum()), int((~labels).sum())
        fewest = min(n_positive, n_negative)
        base = {"property": prop, "n_positive_tokens": n_positive, "n_negative_tokens": n_negative}
        if fewest < int(settings["min_examples_per_class"]):
            message = (
                f"skipped: {fewest} tokens in the smaller class, fewer than "
                f"evaluate.probe.min_examples_per_class={settings['min_examples_per_class']}"
            )
            logger.warning("probe %s: %s", prop, message)
            rows.append({**base, "message": message})
            continue
        sample = balanced_sample(labels, int(settings["max_examples_per_class"]), int(settings["seed"]))
        with torch.no_grad():
            sample_rows = torch.from_numpy(sample).to(x.device)
            codes = torch.cat(
                [sae.encode(x[sample_rows[start : start + batch_size]]).cpu() for start in range(0, sample_rows.numel(), batch_size)]
            ).numpy()
        for result in sparse_probe(codes, labels[sample], settings["latent_budgets"], float(settings["test_fraction"]), int(settings["seed"])):
            rows.append({**base, **result, "latents": " ".join(str(index) for index in result["latents"]), "message": ""})
    return pd.DataFrame(rows)


def _ce_rows(
    sae: SparseAutoencoder, bridge: Any, store: ActivationStore, doc_ids: np.ndarray, ks: Sequence[tuple[str, float | None, int | None]], settings: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``{inference label: CE figures}``: clean, zero-ablated and spliced CE loss on the cached sequences ``doc_ids``."""
    from sae_pipeline.subject import ce_loss_recovered, ce_loss_with_replacement

    tokens = torch.from_numpy(store.sequences()[doc_ids].astype(np.int64))
    if tokens.shape[0] == 0:
        logger.warning("no sequences for CE-loss recovered (no complete sequence in the hold-out); CE columns left empty")
        return {label: {"ce_loss": None, "clean_ce_loss": None, "zero_ablation_ce_loss": None, "ce_loss_recovered": None, "ce_sequences": 0} for label, _, _ in ks}
    hook_name = store.manifest["hook_name"]
    batch_size = int(settings["ce_batch_size"])
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


def plot_latent_frequency(path: str | Path, frequency: np.ndarray, dense_threshold: float, title: str) -> None:
    """Histogram of log10 firing frequency over live latents, with the dead count and the dense threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = frequency[frequency > 0]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        axis.hist(np.log10(alive), bins=50, color="tab:blue")
    axis.axvline(math.log10(dense_threshold), color="tab:red", linestyle="--", label=f"dense > {dense_threshold:g}")
    axis.set_xlabel("log10 firing frequency (share of tokens)")
    axis.set_ylabel("latents")
    axis.set_title(f"{title}\n{int((frequency <= 0).sum())} dead of {frequency.size}")
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def run_evaluation(
    sae_folder: str,
    cache_dir: str,
    outputs: Mapping[str, str],
    settings: Mapping[str, Any],
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
    device = resolve_device(settings.get("device", "auto"))
    store = ActivationStore(cache_dir)
    sae = load_sae(sae_folder, device)
    torch.manual_seed(int(settings["probe"]["seed"]))
    evaluation = evaluation_set(
        store, holdout_rows_of(sae.cfg), int(settings["max_tokens"]), int(settings["ce_sequences"]), int(settings["probe"]["seed"])
    )
    token_ids = evaluation.token_ids
    x = torch.from_numpy(evaluation.activations).to(device)
    mean = x.double().mean(dim=0)
    batch_size = int(settings["batch_size"])
    logger.info("evaluating %s on %d tokens of the %s (d_sae %d, k %s) on %s", sae_folder, x.shape[0], evaluation.source, sae.d_sae, sae.k, device)

    # (label, multiplier, k'): the grid always contains the trained k (multiplier 1); SAEs that are not
    # plain Top-k also get their own inference rule ("as_trained": threshold or ReLU).
    ks: list[tuple[str, float | None, int | None]] = []
    if sae.k is not None:
        multipliers = sorted({float(multiplier) for multiplier in settings["k_multipliers"]} | {1.0})
        ks += [(f"k'={k_prime}", multiplier, k_prime) for multiplier, k_prime in inference_ks(sae.k, multipliers)]
    trained_label = f"k'={sae.k}" if sae.architecture == "topk" else "as_trained"
    if sae.architecture != "topk":
        ks.append(("as_trained", None, None))
    from sae_pipeline.subject import load_subject_model

    bridge = load_subject_model(store.manifest["model"], device=device)
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
    latents = monosemanticity_proxies(native["latent"], native["token_id"], native["value"], sae.d_sae, int(settings["top_activations"]))
    latents.insert(1, "firing_frequency", native["frequency"])
    latents["top_token"] = [token_strings[index] if 0 <= index < len(token_strings) else "" for index in latents["top_token_id"]]
    latents["scored"] = latents["n_activations"] >= int(settings["min_activations"])
    for key, value in identity.items():
        latents[key] = value
    scored = latents[latents["scored"]]

    probing = _probe_all_properties(sae, x, token_ids, token_strings, settings["probe"], batch_size)
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
        "firing": firing_summary(native["frequency"], float(settings["dense_threshold"])),
        "monosemanticity": {
            "scored_latents": int(len(scored)),
            "min_activations": int(settings["min_activations"]),
            "top_activations": int(settings["top_activations"]),
            "top_token_mass_share": mean_with_interval(scored["top_token_mass_share"].to_numpy()),
            "top_activation_token_entropy_bits": mean_with_interval(scored["top_activation_token_entropy_bits"].to_numpy()),
        },
        "probing": [
            {key: row[key] for key in ("property", "m", "test_balanced_accuracy", "n_test", "message") if key in row and not _is_missing(row[key])}
            for row in probing.to_dict("records")
        ],
        "k_robustness": robustness[["inference", "multiplier", "k_prime", "fvu", "l0", "ce_loss_recovered"]].to_dict("records"),
        "settings": dict(settings),
    }
    write_dataframe(outputs["k_robustness"], robustness)
    write_dataframe(outputs["probing"], probing)
    write_dataframe(outputs["latents"], latents)
    plot_latent_frequency(outputs["frequency_plot"], native["frequency"], float(settings["dense_threshold"]), f"{variant} seed {seed}")
    write_json(outputs["metrics"], metrics)
    return metrics


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
