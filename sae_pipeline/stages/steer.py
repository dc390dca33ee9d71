"""Steering evaluation: add an SAE feature's unit decoder direction to the subject model's residual
stream while it generates, and judge whether the text moves towards the feature's explanation.

Protocol (../shared/SPEC.md, after the paper's artifact):

1. Take one seed's SAE of a variant and its autointerp table; sample up to ``features_per_category``
   features with an explanation from each sharedness category (always / sometimes / never).
2. For every (feature, neutral prompt) generate ``new_tokens`` tokens unsteered and steered, where
   steering adds ``strength * unit(W_dec[f])`` at the hook named in the activation-cache manifest
   (e.g. ``blocks.2.hook_resid_post``) at the newest position only.
   Generation, the steering hook and sampling: :mod:`sae_pipeline.subject.steering`.
3. Judge each pair: the embedding judge (cosine between explanation and steered text, success when
   >= 0.45) and/or the LLM judge (strict 1-5 "is the steered text MORE related to the concept than the
   original?", success when >= 4).

Strength (one scalar per feature, ``strength_mode``):

- ``fixed``: ``fixed_strength``.
- ``resid_rms``: ``strength_multiple * r`` where ``r`` is the residual RMS at the hook measured on the
  prompts: for each prompt the root-mean-square over the ``d_model`` entries of the unsteered
  activation at its last token, averaged over prompts (as the artifact measures it).
- ``target_rise``: the strength that raises the feature's pre-activation by ``target_rise``:
  ``delta = strength * (W_enc[:, f] . unit_dir)``, so ``strength = target_rise / (W_enc[:, f] . unit_dir)``.
  Features whose projection is below 1e-8 in magnitude cannot be steered this way and are dropped
  with a warning.

Texts: ``original`` and ``steered`` hold the generated continuation only; the judges see
``prompt + continuation`` (the artifact judged the full decoded sequence).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.data.atomic import write_dataframe
from sae_pipeline.data.checkpoint import load_sae
from sae_pipeline.judges.prompts import llm_judge_messages, llm_success, parse_llm_score
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.settings import (
    SHAREDNESS_CATEGORIES,
    STEER_JUDGES,
    STRENGTH_MODES,
    JudgeSettings,
    LikelihoodJudgeSettings,
    SteerSettings,
)
from sae_pipeline.subject.model import bos_token_id, load_subject_model
from sae_pipeline.subject.steering import (
    SamplingSettings,
    SteeringTexts,
    last_prompt_activations,
    prompt_token_ids,
    residual_rms,
    steer_features,
)

logger = logging.getLogger("sae_pipeline.stages.steer")

CATEGORY_ORDER = SHAREDNESS_CATEGORIES
UNKNOWN_CATEGORY = "unknown"
SCORES_COLUMNS = ("feature", "category", "share_count", "explanation", "detection_score")
MIN_TARGET_PROJECTION = 1e-8
_JUDGE_COLUMNS = ("embedding_score", "embedding_success", "llm_score", "llm_success", "llm_answer", "llm_error", "lm_score", "lm_success")
CONTROL_CATEGORY = "control"
# Feature ids of the positive controls (directions that are no SAE latent): far above any dictionary's latents.
CONTROL_FEATURE_IDS = 1_000_000_000
LLM_JUDGE_MAX_TOKENS = 20

ROW_COLUMNS = (
    "feature",
    "category",
    "share_count",
    "interp_score",
    "fuzzing_score",
    "explanation",
    "prompt",
    "original",
    "steered",
    "strength",
    "strength_mode",
    "embedding_score",
    "embedding_success",
    "llm_score",
    "llm_success",
    "llm_answer",
    "llm_error",
    "lm_score",
    "lm_success",
    "sampling_seed",
    "greedy",
)


def feature_strengths(
    mode: str,
    unit_directions: torch.Tensor,
    encoder_columns: torch.Tensor,
    settings: SteerSettings | Mapping[str, Any],
    resid_rms: float | None = None,
) -> np.ndarray:
    """Steering strength per feature, ``[n_features]`` float64 (residual-stream units).

    Args:
        mode: one of ``STRENGTH_MODES`` (module docstring).
        unit_directions: ``[n_features, d_model]`` unit decoder rows.
        encoder_columns: ``[n_features, d_model]`` the features' ``W_enc[:, f]``.
        resid_rms: residual RMS at the hook (needed for ``resid_rms``).
    """
    settings = SteerSettings.from_mapping(settings)
    n_features = unit_directions.shape[0]
    if mode == "fixed":
        return np.full(n_features, float(settings.fixed_strength))
    if mode == "resid_rms":
        if resid_rms is None:
            raise ValueError("strength_mode resid_rms needs the residual RMS at the hook")
        return np.full(n_features, float(settings.strength_multiple) * float(resid_rms))
    if mode == "target_rise":
        projections = (encoder_columns.double() * unit_directions.double()).sum(dim=-1).numpy()
        with np.errstate(divide="ignore"):
            strengths = float(settings.target_rise) / projections
        strengths[np.abs(projections) < MIN_TARGET_PROJECTION] = np.nan
        return strengths
    raise ValueError(f"steer.strength_mode must be one of {STRENGTH_MODES}, got {mode!r}")


def has_explanation(explanations: pd.Series) -> pd.Series:
    """True where an explanation is a non-empty string other than ``N/A``."""
    text = explanations.astype("string").str.strip()
    return text.notna() & (text != "") & (text.str.upper() != "N/A")


def sample_features(scores: pd.DataFrame, per_category: int, seed: int) -> pd.DataFrame:
    """Up to ``per_category`` features with an explanation from each sharedness category.

    ``scores`` is the autointerp table (columns ``SCORES_COLUMNS`` at least). Categories are taken in
    the order always, sometimes, never, then any other value sorted (a missing category, when autointerp
    ran without the match table, counts as ``unknown``); within a category features are
    drawn without replacement by ``numpy.random.default_rng(seed)`` and returned sorted by index.
    """
    missing = [column for column in SCORES_COLUMNS if column not in scores.columns]
    if missing:
        raise ValueError(f"autointerp scores table lacks columns {missing}")
    candidates = scores[has_explanation(scores["explanation"])].copy()
    candidates["category"] = candidates["category"].astype("string").fillna(UNKNOWN_CATEGORY)
    present = list(candidates["category"].astype(str).unique())
    categories = [c for c in CATEGORY_ORDER if c in present] + sorted(c for c in present if c not in CATEGORY_ORDER)
    rng = np.random.default_rng(int(seed))
    chosen = []
    for category in categories:
        members = candidates[candidates["category"].astype(str) == category].sort_values("feature")
        count = min(int(per_category), len(members))
        picks = np.sort(rng.choice(len(members), size=count, replace=False)) if count else np.array([], dtype=int)
        chosen.append(members.iloc[picks])
    if not chosen:
        return candidates.iloc[0:0].reset_index(drop=True)
    return pd.concat(chosen).reset_index(drop=True)


def steering_rows(features: pd.DataFrame, prompts: Sequence[str], texts: SteeringTexts, strengths: np.ndarray, settings: SteerSettings | Mapping[str, Any]) -> pd.DataFrame:
    """One row per (feature, prompt) with judge columns left empty (see ``ROW_COLUMNS``)."""
    settings = SteerSettings.from_mapping(settings)
    records = []
    for index, feature in enumerate(features.itertuples(index=False)):
        for prompt_index, prompt in enumerate(prompts):
            records.append(
                {
                    "feature": int(feature.feature),
                    "category": str(feature.category),
                    "share_count": feature.share_count,
                    "interp_score": _float_or_nan(feature.detection_score),
                    "fuzzing_score": _float_or_nan(getattr(feature, "fuzzing_score", None)),
                    "explanation": str(feature.explanation),
                    "prompt": prompt,
                    "original": texts.originals[prompt_index],
                    "steered": texts.steered[index][prompt_index],
                    "strength": float(strengths[index]),
                    "strength_mode": str(settings.strength_mode),
                    "sampling_seed": int(settings.sampling_seed),
                    "greedy": bool(settings.greedy),
                }
            )
    rows = pd.DataFrame.from_records(records, columns=[c for c in ROW_COLUMNS if c not in _JUDGE_COLUMNS])
    rows["feature"] = rows["feature"].astype("int64")
    rows["share_count"] = rows["share_count"].astype("Int64")
    rows["interp_score"] = rows["interp_score"].astype("float64")
    rows["fuzzing_score"] = rows["fuzzing_score"].astype("float64")
    rows["embedding_score"] = pd.Series([np.nan] * len(rows), dtype="float64")
    rows["embedding_success"] = pd.Series([pd.NA] * len(rows), dtype="boolean")
    rows["llm_score"] = pd.Series([pd.NA] * len(rows), dtype="Int64")
    rows["llm_success"] = pd.Series([pd.NA] * len(rows), dtype="boolean")
    rows["llm_answer"] = pd.Series([pd.NA] * len(rows), dtype="string")
    rows["llm_error"] = pd.Series([pd.NA] * len(rows), dtype="string")
    rows["lm_score"] = pd.Series([np.nan] * len(rows), dtype="float64")
    rows["lm_success"] = pd.Series([pd.NA] * len(rows), dtype="boolean")
    return rows[list(ROW_COLUMNS)]


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def judged_texts(rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``prompt + original`` and ``prompt + steered`` per row: what the judges read."""
    return (rows["prompt"] + rows["original"]).tolist(), (rows["prompt"] + rows["steered"]).tolist()


def apply_embedding_judge(rows: pd.DataFrame, threshold: float, device: str) -> None:
    """Fill ``embedding_score`` / ``embedding_success`` in place."""
    from sae_pipeline.judges.embedding import EmbeddingJudge

    judge = EmbeddingJudge(device=device, threshold=threshold)
    _, steered = judged_texts(rows)
    scores = judge.cosine(rows["explanation"].tolist(), steered)
    rows["embedding_score"] = scores.astype("float64")
    rows["embedding_success"] = pd.array(judge.successes(scores), dtype="boolean")


def apply_llm_judge(rows: pd.DataFrame, client: Any, threshold: int) -> None:
    """Fill ``llm_score`` / ``llm_success`` / ``llm_answer`` / ``llm_error`` in place.

    ``client`` is a :class:`sae_pipeline.judges.client.JudgeClient`. A request that failed (``reply.text`` is
    None) keeps its error in ``llm_error``; an answer that is not a single digit 1-5 keeps its text in
    ``llm_answer`` and an empty score. Neither is counted as a 0 or as a failure to steer.
    """
    originals, steered = judged_texts(rows)
    requests = [llm_judge_messages(c, o, s) for c, o, s in zip(rows["explanation"], originals, steered)]
    replies = client.complete_many(requests, max_tokens=LLM_JUDGE_MAX_TOKENS, temperature=0.0, description="steering judge")
    if len(replies) != len(requests):
        raise RuntimeError(f"LLM judge returned {len(replies)} replies for {len(requests)} requests")
    scores = [parse_llm_score(reply.text) for reply in replies]
    rows["llm_answer"] = pd.array([reply.text for reply in replies], dtype="string")
    rows["llm_error"] = pd.array([reply.error for reply in replies], dtype="string")
    rows["llm_score"] = pd.array(scores, dtype="Int64")
    rows["llm_success"] = pd.array([llm_success(s, threshold) for s in scores], dtype="boolean")
    unscored = sum(score is None for score in scores)
    if unscored:
        logger.warning("LLM judge: %d of %d answers were not a single digit 1-5 (or failed); kept unscored", unscored, len(scores))
    logger.info("LLM judge usage: %s", client.usage.as_dict())


def apply_lm_judge(rows: pd.DataFrame, scorer: Any, margin: float) -> None:
    """Fill ``lm_score`` (nats: :func:`~sae_pipeline.judges.likelihood.concept_gain` of the explanation,
    steered against original text) and ``lm_success`` (score > ``margin``) in place."""
    from sae_pipeline.judges.likelihood import concept_gain

    originals, steered = judged_texts(rows)
    scores = concept_gain(scorer, rows["explanation"].tolist(), originals, steered).numpy()
    rows["lm_score"] = scores.astype("float64")
    rows["lm_success"] = pd.array(scores > float(margin), dtype="boolean")


def control_directions(bridge: Any, words: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Positive-control steering directions: the unit unembedding vector ``[d_model]`` of each word's
    first token (with a leading space), as ``(words, [n, d_model])``."""
    unembedding = bridge.W_U.detach().float().cpu()  # [d_model, vocab]
    vectors = []
    for word in words:
        token = bridge.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
        column = unembedding[:, int(token)]
        vectors.append(column / column.norm().clamp_min(1e-12))
    return list(words), torch.stack(vectors) if vectors else torch.zeros(0, unembedding.shape[0])


def control_features(words: Sequence[str]) -> pd.DataFrame:
    """The table :func:`steering_rows` takes, for control directions (explanation = the word)."""
    return pd.DataFrame({"feature": CONTROL_FEATURE_IDS + np.arange(len(words)), "category": CONTROL_CATEGORY, "share_count": pd.array([pd.NA] * len(words), dtype="Int64"),
                         "explanation": list(words), "detection_score": np.nan, "fuzzing_score": np.nan})


def feature_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-feature success rates: one row per feature with ``n_prompts``, embedding and LLM success
    rates and mean scores (rates over scored rows; NaN where a judge did not run), ``n_llm_scored``."""
    keys = ["feature", "category", "share_count", "interp_score", "fuzzing_score", "explanation", "strength", "strength_mode"]
    grouped = rows.groupby("feature", sort=False)
    summary = grouped[keys].first().reset_index(drop=True)
    summary["n_prompts"] = grouped.size().to_numpy()
    summary["embedding_success_rate"] = grouped["embedding_success"].agg(lambda s: s.astype("Float64").mean()).to_numpy(dtype=float, na_value=np.nan)
    summary["mean_embedding_score"] = grouped["embedding_score"].mean().to_numpy()
    summary["llm_success_rate"] = grouped["llm_success"].agg(lambda s: s.astype("Float64").mean()).to_numpy(dtype=float, na_value=np.nan)
    summary["mean_llm_score"] = grouped["llm_score"].agg(lambda s: s.astype("Float64").mean()).to_numpy(dtype=float, na_value=np.nan)
    summary["n_llm_scored"] = grouped["llm_score"].count().to_numpy()
    return summary


def run_steering(
    manifest_path: str | Path,
    sae_folder: str | Path,
    scores_path: str | Path,
    rows_path: str | Path,
    features_path: str | Path,
    settings: SteerSettings | Mapping[str, Any],
    llm_settings: JudgeSettings | Mapping[str, Any] | None = None,
    llm_cache_dir: str | Path | None = None,
    controls_path: str | Path | None = None,
    lm_judge: LikelihoodJudgeSettings | Mapping[str, Any] | None = None,
    lm_model: str | None = None,
) -> pd.DataFrame:
    """The ``steer`` rule: sample features, generate, judge, write ``rows.parquet`` and ``features.csv``.

    Args:
        manifest_path: the activation cache's ``manifest.json``; its ``model`` is the subject model
            (Hub id or local folder) and its ``hook_name`` the steering hook.
        sae_folder: one seed's SAE folder.
        scores_path: autointerp ``scores.parquet`` (``SCORES_COLUMNS``).
        settings: the ``steer`` config section.
        llm_settings: the judge endpoint section (``JudgeSettings`` keys: base_url, model, api_key_env,
            ...) shared with autointerp; required when ``"llm"`` is in ``settings.judges``.
        llm_cache_dir: the judge's response cache folder.
        controls_path: where the positive controls' rows go (``controls.parquet``): steering along the
            unit unembedding vector of each of ``controls.words`` at the features' (median) strength,
            judged like the features, so a zero success rate of features reads as a finding.
        lm_judge, lm_model: the ``lm_judge`` section and its model, when ``"lm"`` is among the judges.

    Returns the rows table (as written).
    """
    settings = SteerSettings.from_mapping(settings)
    judges = list(settings.judges)
    unknown = [j for j in judges if j not in STEER_JUDGES]
    if unknown:
        raise ValueError(f"steer.judges has unknown judges {unknown}; expected a subset of {STEER_JUDGES}")
    client = None
    if "llm" in judges:
        from sae_pipeline.judges.client import JudgeClient

        if llm_settings is None or llm_cache_dir is None:
            raise ValueError("steer.judges includes 'llm' but no judge endpoint settings (autointerp llm section) were given")
        client = JudgeClient(JudgeSettings.from_config(llm_settings, llm_cache_dir))
    mode = str(settings.strength_mode)
    if mode not in STRENGTH_MODES:
        raise ValueError(f"steer.strength_mode must be one of {STRENGTH_MODES}, got {mode!r}")
    device = resolve_device(settings.device)
    manifest = json.loads(Path(manifest_path).read_text())
    hook_name = manifest["hook_name"]
    prompts = list(settings.prompts)

    scores = pd.read_parquet(scores_path)
    features = sample_features(scores, settings.features_per_category, settings.sampling_seed)
    logger.info("steering %d features (%s) at %s", len(features), features["category"].value_counts().to_dict(), hook_name)
    if features.empty:
        logger.warning("no feature in %s has an explanation: the steering tables will be empty", scores_path)

    sae = load_sae(sae_folder, device="cpu")
    if sae.d_in != int(manifest["d_model"]):
        raise ValueError(f"SAE {sae_folder} has d_in {sae.d_in} but the cache manifest's d_model is {manifest['d_model']}")
    indices = torch.tensor(features["feature"].to_numpy(dtype=np.int64), dtype=torch.long)
    directions = sae.unit_decoder_directions()[indices]
    encoder_columns = sae.W_enc.T[indices]

    bridge = load_subject_model(manifest["model"], device=device, dtype=manifest.get("model_dtype", "float32"))
    resid_rms = None
    if mode == "resid_rms":
        bos_id = bos_token_id(bridge)
        last = last_prompt_activations(bridge, hook_name, prompt_token_ids(bridge.tokenizer, prompts, bos_id), bos_id)
        resid_rms = residual_rms(last)
        logger.info("residual RMS at %s over %d prompts: %.4f", hook_name, len(prompts), resid_rms)
    strengths = feature_strengths(mode, directions, encoder_columns, settings, resid_rms)
    steerable = ~np.isnan(strengths)
    if not steerable.all():
        logger.warning("dropping features %s: |W_enc[:, f] . unit_dir| < %g, no finite target_rise strength", features["feature"][~steerable].tolist(), MIN_TARGET_PROJECTION)
        features = features[steerable].reset_index(drop=True)
        directions, strengths = directions[torch.as_tensor(steerable)], strengths[steerable]

    sampling = SamplingSettings(greedy=settings.greedy, temperature=settings.temperature, top_p=settings.top_p)
    texts = steer_features(
        bridge, hook_name, prompts, directions, strengths, settings.new_tokens, sampling, settings.sampling_seed, settings.batch_size, progress=True
    )
    rows = steering_rows(features, prompts, texts, strengths, settings)
    controls = None
    if controls_path is not None:
        words, control_vectors = control_directions(bridge, settings.controls.words)
        # resid_rms: the features' strength, also when no feature was sampled; otherwise the features' median,
        # and fixed_strength when there are none (so target_rise keeps fixed_strength among its settings)
        if mode == "resid_rms":
            control_strength = float(settings.strength_multiple) * float(resid_rms)
        else:
            control_strength = float(np.median(strengths)) if len(strengths) else float(settings.fixed_strength)
        control_strengths = np.full(len(words), control_strength)
        control_texts = steer_features(bridge, hook_name, prompts, control_vectors, control_strengths, settings.new_tokens, sampling,
                                       settings.sampling_seed, settings.batch_size)
        controls = steering_rows(control_features(words), prompts, control_texts, control_strengths, settings)
    del bridge
    scorer = None
    if "lm" in judges:
        from sae_pipeline.judges.likelihood import likelihood_scorer

        judge = LikelihoodJudgeSettings.from_mapping(lm_judge)
        scorer = likelihood_scorer(judge, lm_model)
    for table in (rows, controls):
        if table is None or not len(table):
            continue
        if "embedding" in judges:
            apply_embedding_judge(table, settings.embedding_threshold, device)
        if "llm" in judges:
            apply_llm_judge(table, client, settings.llm_success_threshold)
        if "lm" in judges:
            apply_lm_judge(table, scorer, judge.steering_margin)
    write_dataframe(rows_path, rows)
    if controls is not None:
        write_dataframe(controls_path, controls)
        _log_summary(controls)
    write_dataframe(features_path, feature_summary(rows))
    _log_summary(rows)
    return rows


def _log_summary(rows: pd.DataFrame) -> None:
    for category, group in rows.groupby("category", sort=False):
        logger.info(
            "%s: %d rows, success rate by judge: %s", category, len(group),
            {judge: round(float(group[f"{judge}_success"].astype("Float64").mean()), 3) for judge in STEER_JUDGES if group[f"{judge}_success"].notna().any()},
        )
