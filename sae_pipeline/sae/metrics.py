"""Measures of a trained SAE (shapes: ``x``/``x_hat`` ``[tokens, d_in]``, codes ``z`` ``[tokens, d_sae]``).

- **reconstruction**: FVU ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, MSE, L0 and per-latent
  firing frequency over a set of rows (:func:`reconstruction_metrics`), at the trained or an
  inference-time k' (:func:`inference_ks`: ``k' = max(1, round(multiplier * k))``).
- **concentration**: per token with a nonzero code, the effective number of latents ``exp(H(p))``
  with ``p = |z| / ||z||_1`` (natural log; equals L0 when the active values are equal, less when the
  mass sits on few latents), and the ratio ``||z||_1 / ||z||_2`` (between 1 and sqrt(L0)).
- **latent usage**: firing frequency per latent (share of tokens with z_i > 0; :func:`firing_frequencies`
  counts it for several SAEs over one pass of rows); dead latents fire on no evaluated token; dense latents fire on more than ``dense_threshold`` of them.
- **monosemanticity proxies** (token level, no LLM), per latent: ``top_token_mass_share`` = the
  largest share of the latent's total activation mass that one token id receives (1 = it fires on a
  single token type); ``top_activation_token_entropy_bits`` = the entropy (bits) of the token ids of
  its ``top_activations`` largest activations (0 = all the same token). A latent that tracks a concept
  spread over many token types looks polysemantic by these proxies, so they compare configurations
  rather than grade single latents.
- **sparse probing**: for a token property derived from the decoded token strings (word_start,
  capitalised, punctuation), latents ranked on the train split by the absolute difference of their
  mean activation between classes; a logistic regression (scikit-learn, standardised inputs) on the
  top-m latents for each budget m; balanced test accuracy.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.sae.model import SparseAutoencoder
from sae_pipeline.settings import TOKEN_PROPERTIES


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


@torch.no_grad()
def firing_frequencies(saes: Sequence[SparseAutoencoder], chunks: Iterable[np.ndarray], batch_rows: int = 8192) -> tuple[list[np.ndarray], int]:
    """Share of rows on which each latent of each SAE is nonzero, over the rows of ``chunks``.

    ``chunks``: arrays ``[rows, d_in]`` (read once; every SAE sees every chunk). Returns one float64
    ``[d_sae]`` array per SAE (zeros when there are no rows) and the number of rows counted.
    """
    fired = [torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_enc.device) for sae in saes]
    rows = 0
    for chunk in chunks:
        rows += len(chunk)
        for start in range(0, len(chunk), batch_rows):
            for sae, counts in zip(saes, fired):
                batch = torch.as_tensor(chunk[start : start + batch_rows]).to(device=sae.W_enc.device, dtype=torch.float32)
                counts += (sae.encode(batch) != 0).sum(dim=0).double()
    return [(counts / max(rows, 1)).cpu().numpy() for counts in fired], rows


def reconstruction_metrics(sae: SparseAutoencoder, x: Any, mean: torch.Tensor, k: int | None = None, batch_rows: int = 8192) -> dict[str, Any]:
    """Reconstruction figures of ``sae`` (at inference ``k``, None = as trained) over ``x [rows, d_in]``.

    ``x`` is a tensor or array; chunks of ``batch_rows`` rows go to the SAE's device as float32 and
    the sums stay there (one host sync at the end). ``mean [d_in]`` is the centre for the variance.
    Returns ``fvu`` (sum of squared errors / sum of squared deviations from ``mean``), ``mse`` (mean
    over rows and dimensions), ``reconstruction_loss`` (squared error summed over d_in, mean over
    rows), ``l0`` (mean nonzero codes per row), ``firing_frequency`` (float64 ``[d_sae]``, share of
    rows on which each latent is nonzero) and ``rows``.
    """
    device = sae.W_enc.device
    rows, width = x.shape
    centre = mean.to(device=device, dtype=torch.float64)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, squared deviation, nonzero codes
    fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    for start in range(0, rows, batch_rows):
        batch = torch.as_tensor(x[start : start + batch_rows]).to(device=device, dtype=torch.float32)
        codes = sae.encode(batch, k)
        active = codes != 0
        sums += torch.stack([(sae.decode(codes).double() - batch.double()).square().sum(),
                             (batch.double() - centre).square().sum(), active.sum().double()])
        fired += active.sum(dim=0).double()
    squared_error, variance, nonzero = sums.tolist()
    return {
        "fvu": squared_error / max(variance, 1e-30),
        "mse": squared_error / (rows * width),
        "reconstruction_loss": squared_error / rows,
        "l0": nonzero / rows,
        "firing_frequency": (fired / rows).cpu().numpy(),
        "rows": rows,
    }
