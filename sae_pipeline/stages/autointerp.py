"""Automated interpretability of SAE features: mine examples, explain, score.

Three steps, delphi-style (explainer and scorers are separate, and scorers only see held-out contexts):

1. **Mining** (:mod:`sae_pipeline.features.mining`): top, sampled and non-activating contexts per
   feature from one streaming pass over the cache.
2. **Explanation** (:mod:`sae_pipeline.features.contexts` splits the contexts): the explainer sees top
   contexts plus some from each activation quantile, the active tokens marked ``<<like this>>``.
3. **Scoring** (:mod:`sae_pipeline.judges.scorers`) on held-out contexts: detection and fuzzing,
   balanced accuracies in [0, 1] (0.5 = chance). Judge answers are parsed strictly
   (:mod:`sae_pipeline.judges.prompts`); an unparseable answer is recorded in ``failures`` with its
   text and left out of the score, never counted as a zero.

Backends (:mod:`sae_pipeline.judges.backends`): ``llm`` (any OpenAI-compatible endpoint) and
``offline``, a **non-LLM baseline** for runs without a judge. Both write the same table.

Entry point for the rule: :func:`run_autointerp`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.data.atomic import json_default, write_dataframe, write_text
from sae_pipeline.data.checkpoint import load_sae
from sae_pipeline.data.shards import ActivationStore
from sae_pipeline.data.wordnet import DEFAULT_WORDNET_DIR, is_noun_or_verb
from sae_pipeline.features.contexts import ExampleSplit, TokenText, split_examples
from sae_pipeline.features.mining import FeatureExamples, mine_examples, token_indicator_examples
from sae_pipeline.judges.backends import LikelihoodBackend, LLMBackend, OfflineTokenBaseline
from sae_pipeline.judges.scorers import balanced_accuracy, scorer_tasks
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.settings import (
    AUTOINTERP_BACKENDS,
    AutointerpSettings,
    FeatureSelectionSettings,
    JudgeSettings,
    LikelihoodJudgeSettings,
)

logger = logging.getLogger(__name__)
# Feature ids of the positive controls (planted features): far above any dictionary's latents.
CONTROL_FEATURE_IDS = 1_000_000_000

SCORE_COLUMNS = (
    "feature",
    "category",
    "share_count",
    "explanation",
    "detection_score",
    "fuzzing_score",
    "n_examples",
    "tokens_spent",
    "judge_model",
    "backend",
    "failures",
)


def select_features(d_sae: int, sharedness: pd.DataFrame | None, settings: FeatureSelectionSettings | Mapping[str, Any], random_seed: int) -> list[int]:
    """Features to interpret, sorted.

    ``settings`` (the ``features`` section): ``selection`` = ``all`` | ``random`` (``n_features`` drawn
    uniformly) | ``category`` (up to ``n_features`` drawn from each of ``categories``, using the
    match stage's ``sharedness`` table with columns feature, share_count, category).
    """
    settings = FeatureSelectionSettings.from_mapping(settings)
    selection = settings.selection
    rng = np.random.default_rng(int(random_seed))
    if selection == "all":
        return list(range(d_sae))
    if selection == "random":
        count = min(int(settings.n_features), d_sae)
        return sorted(int(f) for f in rng.choice(d_sae, size=count, replace=False))
    if selection == "category":
        if sharedness is None:
            raise ValueError("autointerp.features.selection: category needs the match stage's features.parquet")
        chosen: list[int] = []
        for category in settings.categories:
            members = sharedness.loc[sharedness["category"] == category, "feature"].to_numpy()
            count = min(int(settings.n_features), len(members))
            chosen.extend(int(f) for f in rng.choice(members, size=count, replace=False))
        return sorted(chosen)
    raise ValueError(f"autointerp.features.selection must be all, random or category, got {selection!r}")


def read_sharedness(path: str | os.PathLike | None, d_sae: int, seed: int) -> pd.DataFrame | None:
    """The match stage's per-feature table (feature, share_count, category) of this SAE seed.

    The match stage describes one reference seed's features (its ``seed`` column); that seed must be
    the one interpreted here, because latent indices of different seeds are unrelated.
    Categories: always / sometimes / never, and ``dead`` for latents the match stage left out.
    """
    if path is None:
        return None
    table = pd.read_parquet(path)
    missing = {"feature", "share_count", "category"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (expected feature, share_count, category)")
    if "seed" in table.columns:
        described = sorted(int(value) for value in table["seed"].unique())
        table = table[table["seed"] == int(seed)]
        if table.empty:
            raise ValueError(
                f"{path} describes the features of seed(s) {described}, but autointerp.seed is {seed}: "
                f"set match.reference_seed to {seed} (or autointerp.seed to one of {described})"
            )
    table = table[["feature", "share_count", "category"]].drop_duplicates("feature")
    if len(table) and int(table["feature"].max()) >= d_sae:
        raise ValueError(f"{path}: feature index {int(table['feature'].max())} is out of range for an SAE with {d_sae} latents")
    return table


@dataclass
class _FeatureRecord:
    feature: int
    split: ExampleSplit | None = None
    explanation: str | None = None
    labels: dict[str, list[int]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})
    predictions: dict[str, list[int]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})
    tokens: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)


def interpret_features(
    examples: Mapping[int, FeatureExamples],
    sequences: np.ndarray,
    backend: Any,
    settings: Mapping[str, Any],
    random_seed: int,
    audit: list[dict[str, Any]],
    explain_only: bool = False,
) -> list[_FeatureRecord]:
    """Explain and score every feature in ``examples`` with ``backend``; appends audit records to ``audit``.
    With ``explain_only`` the explanations are not scored.

    ``settings`` is the whole autointerp section (uses ``explain``, ``score``, ``mining``).
    Features with fewer than ``score.min_activating_contexts`` activating contexts are not sent to
    the judge; they get a failure entry saying so.
    """
    settings = AutointerpSettings.from_mapping(settings)
    split_settings = {
        "explain_top": settings.explain.n_top,
        "explain_per_quantile": settings.explain.n_per_quantile,
        "n_quantiles": settings.score.n_quantiles,
        "score_per_quantile": settings.score.n_per_quantile,
    }
    minimum = int(settings.score.min_activating_contexts)
    records = {feature: _FeatureRecord(feature) for feature in examples}
    ready = []
    for feature, found in examples.items():
        n_activating = len(found.top) + len(found.sampled)
        if n_activating < minimum:
            records[feature].failures.append({"step": "mining", "reason": f"only {n_activating} activating contexts (< {minimum}); not interpreted"})
            continue
        records[feature].split = split_examples(found, sequences, split_settings, random_seed)
        ready.append(feature)

    explained = backend.explain(ready, [records[feature].split.explain for feature in ready])
    for feature, outcome in zip(ready, explained):
        record = records[feature]
        record.tokens += outcome.tokens
        audit.append({"feature": feature, "task": "explain", "failure": outcome.failure, "parsed": outcome.value, **outcome.audit})
        if outcome.failure is not None:
            record.failures.append({"step": "explain", "reason": outcome.failure})
        else:
            record.explanation = outcome.value

    if explain_only:
        return [records[feature] for feature in examples]
    tasks = [
        task
        for feature in ready
        if records[feature].explanation is not None
        for task in scorer_tasks(feature, records[feature].explanation, records[feature].split, int(settings.score.contexts_per_prompt), random_seed)
    ]
    for task, outcome in zip(tasks, backend.classify(tasks)):
        record = records[task.feature]
        record.tokens += outcome.tokens
        audit.append({"feature": task.feature, "task": task.scorer, "labels": task.labels, "failure": outcome.failure, "parsed": outcome.value, **outcome.audit})
        if outcome.failure is not None:
            record.failures.append({"step": task.scorer, "reason": outcome.failure})
            continue
        record.labels[task.scorer].extend(task.labels)
        record.predictions[task.scorer].extend(outcome.value)
    for record in records.values():
        for scorer, labels in record.labels.items():
            if labels and len(set(labels)) < 2:
                record.failures.append({"step": scorer, "reason": f"all scored contexts have label {labels[0]} (e.g. no non-activating context found): score undefined"})
    return [records[feature] for feature in examples]


def scores_table(records: Sequence[_FeatureRecord], sharedness: pd.DataFrame | None, backend: Any) -> pd.DataFrame:
    """The per-feature output table (columns :data:`SCORE_COLUMNS`)."""
    rows = []
    for record in records:
        rows.append(
            {
                "feature": record.feature,
                "explanation": record.explanation,
                "detection_score": balanced_accuracy(record.labels["detection"], record.predictions["detection"]),
                "fuzzing_score": balanced_accuracy(record.labels["fuzzing"], record.predictions["fuzzing"]),
                "n_examples": record.split.n_examples if record.split is not None else 0,
                "tokens_spent": record.tokens,
                "judge_model": backend.judge_model,
                "backend": backend.name,
                "failures": json.dumps(record.failures, ensure_ascii=False),
            }
        )
    table = pd.DataFrame(rows, columns=[c for c in SCORE_COLUMNS if c not in ("category", "share_count")])
    table["feature"] = table["feature"].astype("int64")
    table["tokens_spent"] = table["tokens_spent"].astype("int64")
    table["n_examples"] = table["n_examples"].astype("int64")
    table["explanation"] = table["explanation"].astype("string")
    if sharedness is not None:
        table = table.merge(sharedness, on="feature", how="left")
    else:
        table["share_count"] = pd.NA
        table["category"] = pd.NA
    table["share_count"] = table["share_count"].astype("Int64")
    table["category"] = table["category"].astype("string")
    return table[list(SCORE_COLUMNS)]


def likelihood_backend(lm_judge: LikelihoodJudgeSettings | Mapping[str, Any] | None, lm_model: str | None, token_text: TokenText,
                       corpus_counts: np.ndarray) -> LikelihoodBackend:
    """The in-process language-model backend on ``lm_model`` (a Hugging Face folder or Hub id)."""
    from sae_pipeline.judges.likelihood import likelihood_scorer

    judge = LikelihoodJudgeSettings.from_mapping(lm_judge)
    return LikelihoodBackend(likelihood_scorer(judge, lm_model), f"{lm_model} (likelihood, {judge.dtype})", token_text, corpus_counts, judge)


def control_tokens(sequences: np.ndarray, token_text: TokenText, count: int, wordnet_dir: str | os.PathLike = DEFAULT_WORDNET_DIR) -> list[int]:
    """The ``count`` commonest tokens (BOS positions excluded) that are whole alphabetic words of 4+ letters
    which WordNet lists as nouns or verbs (content words: a function word such as " that" has no meaning an
    explanation could name, so it would test the judge's lexical matching rather than its reading)."""
    counts = np.bincount(sequences[:, 1:].reshape(-1))
    chosen = []
    for token_id in np.argsort(-counts, kind="stable"):
        if len(chosen) == count or counts[token_id] == 0:
            break
        text = token_text(int(token_id))
        if text.startswith(" ") and text.strip().isalpha() and len(text.strip()) >= 4 and is_noun_or_verb(text, wordnet_dir):
            chosen.append(int(token_id))
    return chosen


def control_scores(sequences: np.ndarray, token_text: TokenText, backend: Any, settings: AutointerpSettings, random_seed: int,
                   audit: list[dict[str, Any]]) -> pd.DataFrame:
    """Positive controls: planted single-token features explained and scored like SAE features.

    Returns the scores table of :data:`SCORE_COLUMNS` (feature ids from :data:`CONTROL_FEATURE_IDS`, never an SAE latent's) plus
    ``control_token`` (the token's text); audit records are appended to ``audit``.
    """
    tokens = control_tokens(sequences, token_text, settings.controls.n_tokens)
    examples = {CONTROL_FEATURE_IDS + index: token_indicator_examples(sequences, token_id, CONTROL_FEATURE_IDS + index, settings.mining, random_seed)
                for index, token_id in enumerate(tokens)}
    records = interpret_features(examples, sequences, backend, settings, random_seed, audit)
    table = scores_table(records, None, backend)
    table.insert(1, "control_token", pd.array([token_text(token_id) for token_id in tokens], dtype="string"))
    logger.info("positive controls (single-token features %s): detection %s", [token_text(t) for t in tokens], table["detection_score"].round(3).tolist())
    return table


def partner_explanations(store: ActivationStore, sequences: np.ndarray, table: pd.DataFrame, sharedness_path: str | os.PathLike,
                         partner_sae_dirs: Mapping[int, str | os.PathLike], backend: Any, settings: AutointerpSettings, random_seed: int,
                         audit: list[dict[str, Any]], device: str) -> pd.DataFrame:
    """Explanation agreement across seeds: each interpreted feature's one-to-one decoder partner in every seed of
    ``partner_sae_dirs`` (``decoder_partner_seed{s}`` of the match stage's table) is mined and explained by the same
    backend, and the two explanations compared by the sentence model's cosine (all-MiniLM-L6-v2).

    Returns ``table`` with ``partner_seed{s}``, ``partner_explanation_seed{s}``, ``explanation_agreement_seed{s}`` per
    partner seed and ``explanation_agreement`` (their mean), NaN where a partner is missing or was not explained.
    """
    from sae_pipeline.judges.embedding import EmbeddingJudge

    matched = pd.read_parquet(sharedness_path)
    judge = EmbeddingJudge(device="cpu")
    agreement_columns = []
    for seed, folder in partner_sae_dirs.items():
        column = f"decoder_partner_seed{seed}"
        if column not in matched.columns:
            raise ValueError(f"{sharedness_path} has no column {column}: autointerp.partner_seeds {seed} is not a matched seed of this variant")
        partner_of = dict(zip(matched["feature"].astype(int), matched[column].astype(int)))
        partners = {int(feature): partner_of.get(int(feature), -1) for feature, explanation in zip(table["feature"], table["explanation"]) if pd.notna(explanation)}
        wanted = sorted({partner for partner in partners.values() if partner >= 0})
        partner_sae = load_sae(folder, device)
        examples = mine_examples(store, partner_sae, wanted, settings.mining, random_seed)
        partner_audit: list[dict[str, Any]] = []
        records = {record.feature: record for record in interpret_features(examples, sequences, backend, settings, random_seed, partner_audit, explain_only=True)}
        audit.extend({**entry, "partner_seed": int(seed)} for entry in partner_audit)
        explanations = [records[partners[feature]].explanation if partners.get(feature, -1) in records else None for feature in table["feature"]]
        own = table["explanation"].tolist()
        pairs = [(index, str(mine), str(theirs)) for index, (mine, theirs) in enumerate(zip(own, explanations)) if isinstance(mine, str) and isinstance(theirs, str)]
        agreement = np.full(len(table), np.nan)
        if pairs:
            first, second = judge.embed([mine for _, mine, _ in pairs]), judge.embed([theirs for _, _, theirs in pairs])
            agreement[[index for index, _, _ in pairs]] = np.sum(first * second, axis=1)
        table[f"partner_seed{seed}"] = pd.array([partners.get(feature, -1) for feature in table["feature"]], dtype="Int64")
        table[f"partner_explanation_seed{seed}"] = pd.array(explanations, dtype="string")
        table[f"explanation_agreement_seed{seed}"] = agreement
        agreement_columns.append(f"explanation_agreement_seed{seed}")
        logger.info("autointerp: partners in seed %d explained for %d features; mean explanation agreement %.3f", seed, len(pairs), float(np.nanmean(agreement)) if pairs else float("nan"))
    table["explanation_agreement"] = table[agreement_columns].mean(axis=1) if agreement_columns else np.nan
    return table


def corpus_token_counts(sequences: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id in the cached sequences, BOS positions excluded: [vocab_size] int64."""
    return np.bincount(sequences[:, 1:].reshape(-1), minlength=vocab_size).astype(np.int64)


def run_autointerp(
    cache_dir: str | os.PathLike,
    sae_folder: str | os.PathLike,
    sharedness_path: str | os.PathLike | None,
    scores_path: str | os.PathLike,
    audit_path: str | os.PathLike,
    settings: Mapping[str, Any],
    judge_cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    controls_path: str | os.PathLike | None = None,
    lm_judge: LikelihoodJudgeSettings | Mapping[str, Any] | None = None,
    lm_model: str | None = None,
    partner_sae_dirs: Mapping[int, str | os.PathLike] | None = None,
) -> pd.DataFrame:
    """The ``autointerp`` rule: select features, mine, explain, score; write ``scores.parquet`` and ``audit.jsonl``.

    Args:
        cache_dir: the activation cache folder (``manifest.json`` inside; its ``model`` names the tokenizer).
        sae_folder: one SAE folder (``cfg.json`` + weights).
        sharedness_path: the match stage's ``features.parquet`` (or None: no categories).
        settings: the ``autointerp`` config section.
        judge_cache_dir: the LLM judge's response cache (LLM backend only).
        threads: CPU threads for mining.
        controls_path: where the positive controls' table goes (``controls.parquet``): planted
            single-token features (``controls.n_tokens`` of the commonest words), explained and scored
            by the same backend; a working judge scores them high.
        lm_judge, lm_model: the ``lm_judge`` section and the judge model (Hub id or folder), backend ``lm`` only.
        partner_sae_dirs: ``{seed: SAE folder}`` of ``autointerp.partner_seeds``: their matched partners of the
            interpreted features are explained too, for explanation agreement (:func:`partner_explanations`).

    Returns the scores table as written.
    """
    from transformers import AutoTokenizer

    settings = AutointerpSettings.from_mapping(settings)
    if threads:
        torch.set_num_threads(int(threads))
    backend_name = settings.backend
    if backend_name not in AUTOINTERP_BACKENDS:
        raise ValueError(f"autointerp.backend must be one of {list(AUTOINTERP_BACKENDS)}, got {backend_name!r}")
    client = None
    if backend_name == "llm":
        from sae_pipeline.judges.client import JudgeClient

        if judge_cache_dir is None:
            raise ValueError("autointerp with backend llm needs a judge cache folder")
        client = JudgeClient(JudgeSettings.from_config(settings.llm, judge_cache_dir))  # fails now if the key is missing
        if client.cache.is_empty():
            client.check_endpoint()  # nothing can come from the cache: fail before mining if the endpoint is down

    store = ActivationStore(cache_dir)
    model_ref = store.manifest["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    token_text = TokenText(tokenizer)
    random_seed = int(settings.random_seed)
    mining = settings.mining
    device = resolve_device(mining.device)
    sae = load_sae(sae_folder, device)
    if sae.d_in != store.d_model:
        raise ValueError(f"SAE {sae_folder} has d_in {sae.d_in} but the cache at {cache_dir} has d_model {store.d_model}")
    sharedness = read_sharedness(sharedness_path, sae.d_sae, int(settings.seed))
    features = select_features(sae.d_sae, sharedness, settings.features, random_seed)
    logger.info("autointerp: %d features of %s, backend %s, mining on %s", len(features), sae_folder, backend_name, device)

    examples = mine_examples(store, sae, features, mining, random_seed)
    sequences = store.sequences()
    if backend_name == "llm":
        backend: Any = LLMBackend(client, token_text)
    elif backend_name == "lm":
        backend = likelihood_backend(lm_judge, lm_model, token_text, corpus_token_counts(sequences, max(len(tokenizer), int(sequences.max()) + 1)))
    else:
        vocab_size = max(len(tokenizer), int(sequences.max()) + 1)
        backend = OfflineTokenBaseline(corpus_token_counts(sequences, vocab_size), token_text, settings.offline.n_tokens, settings.offline.min_weight_share)
    audit: list[dict[str, Any]] = []
    records = interpret_features(examples, sequences, backend, settings, random_seed, audit)
    table = scores_table(records, sharedness, backend)
    if partner_sae_dirs:
        if sharedness_path is None:
            raise ValueError("autointerp.partner_seeds needs the match stage's features table (their partners come from it)")
        table = partner_explanations(store, sequences, table, sharedness_path, partner_sae_dirs, backend, settings, random_seed, audit, device)
    failure_steps = [failure["step"] for record in records for failure in record.failures]
    summary = {
        "task": "run_summary",
        "backend": backend.name,
        "judge_model": backend.judge_model,
        "n_features": len(features),
        "failures_by_step": {step: failure_steps.count(step) for step in sorted(set(failure_steps))},
    }
    if client is not None:
        summary["usage"] = client.usage.as_dict()
        logger.info("judge usage: %s", client.usage.as_dict())
    audit.append(summary)
    write_text(audit_path, "".join(json.dumps(record, ensure_ascii=False, default=json_default) + "\n" for record in audit))
    write_dataframe(scores_path, table)
    if controls_path is not None:
        write_dataframe(controls_path, control_scores(sequences, token_text, backend, settings, random_seed, audit))
        write_text(audit_path, "".join(json.dumps(record, ensure_ascii=False, default=json_default) + "\n" for record in audit))
    scored = table["detection_score"].notna()
    logger.info(
        "autointerp: %d/%d features scored; mean detection %.3f, mean fuzzing %.3f",
        int(scored.sum()), len(table), float(table["detection_score"].mean()), float(table["fuzzing_score"].mean()),
    )
    return table

