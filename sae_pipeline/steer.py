"""Steering evaluation: add an SAE feature's unit decoder direction to the subject model's residual
stream while it generates, and judge whether the text moves towards the feature's explanation.

Protocol (../shared/SPEC.md, after the paper's artifact):

1. Take one seed's SAE of a variant and its autointerp table; sample up to ``features_per_category``
   features with an explanation from each sharedness category (always / sometimes / never).
2. For every (feature, neutral prompt) generate ``new_tokens`` tokens unsteered and steered, where
   steering adds ``strength * unit(W_dec[f])`` at the hook named in the activation-cache manifest
   (e.g. ``blocks.2.hook_resid_post``) at the newest position only.
3. Judge each pair: the embedding judge (cosine between explanation and steered text, success when
   >= 0.45) and/or the LLM judge (strict 1-5 "is the steered text MORE related to the concept than the
   original?", success when >= 4).

Exactly where the vector goes (``NewestPositionSteering``). Generation runs with a key/value cache:
the first forward call takes the whole (left-padded) prompt, every later call takes the one token
sampled last. In each call the hook adds the vector to the LAST position of that call's input only:
in the prompt call that is the last prompt token, afterwards it is the newest token. Because cached
keys/values are computed from the steered residual, this equals a cache-free forward over the full
sequence in which every position from the last prompt token onwards carries the vector and the prompt
tokens before it carry none (``tests/test_steer.py`` checks that equivalence on logits). The first
generated token is therefore already steered. (The artifact's ``APPLY_ONLY_GENERATION_STEPS`` skipped
the prompt call, so its first generated token was unsteered; ours steers it.)

Strength (one scalar per feature, ``strength_mode``):

- ``fixed``: ``fixed_strength``.
- ``resid_rms``: ``strength_multiple * r`` where ``r`` is the residual RMS at the hook measured on the
  prompts: for each prompt the root-mean-square over the ``d_model`` entries of the unsteered
  activation at its last token, averaged over prompts (as the artifact measures it).
- ``target_rise``: the strength that raises the feature's pre-activation by ``target_rise``:
  ``delta = strength * (W_enc[:, f] . unit_dir)``, so ``strength = target_rise / (W_enc[:, f] . unit_dir)``.
  Features whose projection is below 1e-8 in magnitude cannot be steered this way and are dropped
  with a warning.

Batching: all rows (feature x prompt) of several features are generated in one batch; prompts of
different lengths are left-padded with an attention mask and positions counted from each row's first
real token, so a row's tokens do not depend on its neighbours (up to floating-point reduction order).

Sampling: ``greedy`` takes the argmax. Otherwise tokens are drawn by inverse-CDF sampling from the
temperature-scaled, nucleus(top_p)-truncated distribution (``sample_next_tokens``), using one uniform number per (prompt,
step) drawn from ``torch.Generator().manual_seed(sampling_seed)`` as a table ``[n_prompts,
new_tokens]``. Every row of a prompt (the unsteered row and each feature's steered row) uses the same
uniforms, so steered and original text differ only through the steering (common random numbers),
strength 0 reproduces the original exactly, and the result does not depend on batch composition.
Each row is generated for all ``new_tokens`` steps; its text is cut at the first end-of-text token.

Texts: ``original`` and ``steered`` hold the generated continuation only; the judges see
``prompt + continuation`` (the artifact judged the full decoded sequence).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger("sae_pipeline.steer")

STRENGTH_MODES = ("fixed", "resid_rms", "target_rise")
JUDGES = ("embedding", "llm")
CATEGORY_ORDER = ("always", "sometimes", "never")
UNKNOWN_CATEGORY = "unknown"
SCORES_COLUMNS = ("feature", "category", "share_count", "explanation", "detection_score")
MIN_TARGET_PROJECTION = 1e-8
_JUDGE_COLUMNS = ("embedding_score", "embedding_success", "llm_score", "llm_success", "llm_answer", "llm_error")
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
    "sampling_seed",
    "greedy",
)


# ---------------------------------------------------------------------------------------------
# The steering hook and generation
# ---------------------------------------------------------------------------------------------


class NewestPositionSteering:
    """Forward hook that adds one vector per batch row at the last position of the current input.

    Args:
        vectors: ``[rows, d_model]`` the vector added to row ``b`` (``strength_b * unit_dir_b``; zeros
            for unsteered rows). Activations are ``[rows, positions, d_model]``; only
            ``activation[:, -1, :]`` changes.
    """

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors

    def __call__(self, activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if activation.ndim != 3 or activation.shape[0] != self.vectors.shape[0]:
            raise ValueError(
                f"steering hook expected activations [rows={self.vectors.shape[0]}, positions, d_model], "
                f"got {tuple(activation.shape)}"
            )
        steered = activation.clone()
        steered[:, -1, :] += self.vectors.to(device=activation.device, dtype=activation.dtype)
        return steered


@dataclass
class PaddedPrompts:
    """Left-padded prompt batch.

    Attributes:
        input_ids: ``[rows, length]`` int64, pads on the left.
        attention_mask: ``[rows, length]`` int64, 1 on real tokens.
        position_ids: ``[rows, length]`` int64, 0 at each row's first real token (pads get 0).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def left_pad(token_rows: Sequence[Sequence[int]], pad_token_id: int, device: str | torch.device) -> PaddedPrompts:
    """Left-pad token id lists into one batch with an attention mask and per-row positions."""
    length = max(len(row) for row in token_rows)
    input_ids = torch.full((len(token_rows), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(token_rows), length), dtype=torch.long)
    for index, row in enumerate(token_rows):
        if len(row) == 0:
            raise ValueError("cannot generate from an empty prompt")
        input_ids[index, length - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[index, length - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return PaddedPrompts(input_ids.to(device), attention_mask.to(device), position_ids.to(device))


@dataclass
class SamplingSettings:
    """How the next token is chosen. ``greedy`` ignores the rest."""

    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9


NUCLEUS_CANDIDATES = 1024


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds ``u * total weight``.

    ``weights`` ``[rows, n]`` non-negative (float64), ``uniforms`` ``[rows]`` in [0, 1); never returns an
    index past the row's last positive weight. Returns ``[rows]`` int64.
    """
    cumulative = weights.cumsum(dim=-1)
    thresholds = (uniforms * cumulative[:, -1]).unsqueeze(-1)
    chosen = torch.searchsorted(cumulative, thresholds, right=True).squeeze(-1)
    last_positive = (weights > 0).long().cumsum(dim=-1).argmax(dim=-1)
    return torch.minimum(chosen, last_positive)


def nucleus(sorted_probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities sorted in descending order with everything after the smallest prefix of mass
    >= ``top_p`` set to zero (a token is kept when the mass before it is below ``top_p``)."""
    mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
    return torch.where(mass_before < top_p, sorted_probabilities, torch.zeros_like(sorted_probabilities))


def sample_next_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, sampling: SamplingSettings) -> torch.Tensor:
    """Choose one token per row. ``logits`` ``[rows, vocab]``; ``uniforms`` ``[rows]`` in [0, 1).

    Greedy: argmax. Sampling: inverse CDF of ``p = softmax(logits / temperature)`` (float64) with one
    uniform per row. With ``top_p >= 1`` the CDF runs over token ids in order. Otherwise it runs over
    the nucleus: tokens sorted by descending probability (ties by token id), truncated to the smallest
    prefix whose mass reaches ``top_p``. The nucleus is looked for among the ``NUCLEUS_CANDIDATES`` most
    probable tokens (``topk``; a full sort costs ~1 s per step for 128 rows x 50k tokens on a CPU); a
    row whose candidates hold less than ``top_p`` of the mass, or whose least probable nucleus token
    ties with a token left out, is fully sorted instead. So the result is the full sort's, row by row,
    independent of the rest of the batch. Returns ``[rows]`` int64.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling needs one uniform number per row")
    probabilities = torch.softmax(logits.double() / float(sampling.temperature), dim=-1)
    uniforms = uniforms.to(device=logits.device, dtype=torch.float64)
    top_p = float(sampling.top_p)
    if top_p >= 1.0:
        return inverse_cdf(probabilities, uniforms)
    vocab = probabilities.shape[-1]
    n_candidates = min(NUCLEUS_CANDIDATES, vocab)
    values, token_ids = probabilities.topk(min(n_candidates + 1, vocab), dim=-1)
    # the most probable token left out of the candidates (probability -1 when none is)
    best_left_out = values[:, n_candidates] if n_candidates < vocab else torch.full_like(values[:, 0], -1.0)
    token_ids, by_id = token_ids[:, :n_candidates].sort(dim=-1)
    values, by_probability = values[:, :n_candidates].gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    token_ids = token_ids.gather(-1, by_probability)
    kept = nucleus(values, top_p)
    picks = inverse_cdf(kept, uniforms)
    tokens = token_ids.gather(-1, picks.unsqueeze(-1)).squeeze(-1)
    # exact only when the nucleus ends inside the candidates and no token tied with a nucleus token was
    # left out (which of several tied tokens topk returns is unspecified)
    smallest_kept = values.gather(-1, (kept > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)).squeeze(-1)
    uncovered = ((values.sum(dim=-1) < top_p) | (smallest_kept <= best_left_out)).nonzero().squeeze(-1)
    if uncovered.numel():
        full_values, full_order = probabilities[uncovered].sort(dim=-1, descending=True, stable=True)
        picks = inverse_cdf(nucleus(full_values, top_p), uniforms[uncovered]).unsqueeze(-1)
        tokens[uncovered] = full_order.gather(-1, picks).squeeze(-1)
    return tokens


def sampling_uniforms(sampling_seed: int, n_prompts: int, new_tokens: int) -> torch.Tensor:
    """The ``[n_prompts, new_tokens]`` float64 table of uniforms every row of prompt ``p`` samples with."""
    generator = torch.Generator().manual_seed(int(sampling_seed))
    return torch.rand((n_prompts, new_tokens), generator=generator, dtype=torch.float64)


@dataclass
class Generation:
    """Output of :func:`generate_continuations`.

    Attributes:
        tokens: ``[rows, new_tokens]`` int64 generated token ids (on CPU).
        logits: ``[rows, new_tokens, vocab]`` float32 logits each token was chosen from, when requested.
    """

    tokens: torch.Tensor
    logits: torch.Tensor | None = None


@torch.no_grad()
def generate_continuations(
    bridge: Any,
    hook_name: str,
    prompt_tokens: Sequence[Sequence[int]],
    new_tokens: int,
    sampling: SamplingSettings,
    steering_vectors: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    pad_token_id: int = 0,
    return_logits: bool = False,
) -> Generation:
    """Generate ``new_tokens`` tokens for every row, adding ``steering_vectors[b]`` at ``hook_name``
    at the newest position of every forward call (see the module docstring).

    Args:
        bridge: the subject model (``TransformerBridge``).
        prompt_tokens: per row the prompt's token ids (BOS included), any lengths.
        steering_vectors: ``[rows, d_model]`` or None (no hook at all).
        uniforms: ``[rows, new_tokens]`` uniforms for sampling (ignored when greedy).
    """
    device = bridge.cfg.device
    batch = left_pad(prompt_tokens, pad_token_id, device)
    rows = batch.input_ids.shape[0]
    if steering_vectors is not None and steering_vectors.shape[0] != rows:
        raise ValueError(f"{steering_vectors.shape[0]} steering vectors for {rows} rows")
    hooks = [] if steering_vectors is None else [(hook_name, NewestPositionSteering(steering_vectors.to(device)))]
    # chosen tokens and the sampling uniforms live on the device: no host round trip per step
    chosen = torch.empty((rows, new_tokens), dtype=torch.long, device=device)
    uniforms = None if uniforms is None else uniforms.to(device=device, dtype=torch.float64)
    step_logits = []
    attention_mask = batch.attention_mask
    next_positions = batch.position_ids[:, -1:] + 1
    with bridge.hooks(fwd_hooks=hooks), warnings.catch_warnings():
        # transformers 5 renames past_key_values -> cache; the bridge still passes the old name.
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        logits, cache = bridge(
            batch.input_ids,
            return_type="logits_and_cache",
            attention_mask=attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
        )
        for step in range(new_tokens):
            last_logits = logits[:, -1, :]
            step_uniforms = None if uniforms is None else uniforms[:, step]
            tokens = sample_next_tokens(last_logits, step_uniforms, sampling)
            chosen[:, step] = tokens
            if return_logits:
                step_logits.append(last_logits.float().cpu())
            if step == new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=1)
            logits, cache = bridge(
                tokens.unsqueeze(-1),
                return_type="logits_and_cache",
                attention_mask=attention_mask,
                position_ids=next_positions,
                past_key_values=cache,
                use_cache=True,
            )
            next_positions = next_positions + 1
    return Generation(chosen.cpu(), torch.stack(step_logits, dim=1) if return_logits else None)


@torch.no_grad()
def last_prompt_activations(bridge: Any, hook_name: str, prompt_tokens: Sequence[Sequence[int]], pad_token_id: int = 0) -> torch.Tensor:
    """Unsteered activation at ``hook_name`` of each prompt's last token, ``[n_prompts, d_model]`` float32."""
    batch = left_pad(prompt_tokens, pad_token_id, bridge.cfg.device)
    captured: list[torch.Tensor] = []

    def capture(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        captured.append(activation[:, -1, :].detach().float().cpu())
        return activation

    with bridge.hooks(fwd_hooks=[(hook_name, capture)]):
        bridge(batch.input_ids, return_type="logits", attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    if len(captured) != 1:
        raise RuntimeError(f"hook {hook_name!r} fired {len(captured)} times in one forward pass")
    return captured[0]


def residual_rms(last_activations: torch.Tensor) -> float:
    """Mean over prompts of the RMS over ``d_model`` of each ``[n_prompts, d_model]`` activation."""
    return float(last_activations.float().pow(2).mean(dim=-1).sqrt().mean())


def feature_strengths(
    mode: str,
    unit_directions: torch.Tensor,
    encoder_columns: torch.Tensor,
    settings: Mapping[str, Any],
    resid_rms: float | None = None,
) -> np.ndarray:
    """Steering strength per feature, ``[n_features]`` float64 (residual-stream units).

    Args:
        mode: one of ``STRENGTH_MODES`` (module docstring).
        unit_directions: ``[n_features, d_model]`` unit decoder rows.
        encoder_columns: ``[n_features, d_model]`` the features' ``W_enc[:, f]``.
        resid_rms: residual RMS at the hook (needed for ``resid_rms``).
    """
    n_features = unit_directions.shape[0]
    if mode == "fixed":
        return np.full(n_features, float(settings["fixed_strength"]))
    if mode == "resid_rms":
        if resid_rms is None:
            raise ValueError("strength_mode resid_rms needs the residual RMS at the hook")
        return np.full(n_features, float(settings["strength_multiple"]) * float(resid_rms))
    if mode == "target_rise":
        projections = (encoder_columns.double() * unit_directions.double()).sum(dim=-1).numpy()
        with np.errstate(divide="ignore"):
            strengths = float(settings["target_rise"]) / projections
        strengths[np.abs(projections) < MIN_TARGET_PROJECTION] = np.nan
        return strengths
    raise ValueError(f"steer.strength_mode must be one of {STRENGTH_MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Feature sampling
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# LLM judge: prompt and strict parser (the request goes through sae_pipeline.judge)
# ---------------------------------------------------------------------------------------------

LLM_JUDGE_SYSTEM = (
    "You are a strict evaluator. You will be given:\n"
    "- an expected concept\n"
    "- an original (unsteered) text\n"
    "- a steered text\n\n"
    "Score ONLY whether the steered text is MORE related to the expected concept than the original text.\n"
    "Use this 1-5 scale:\n"
    "1 = steered is much LESS related than original\n"
    "2 = steered is slightly LESS related\n"
    "3 = no meaningful change\n"
    "4 = steered is slightly MORE related\n"
    "5 = steered is much MORE related\n\n"
    "Respond with exactly one integer (1-5) and nothing else."
)

_SCORE_PATTERN = re.compile(r"\s*([1-5])\s*\.?\s*")


def llm_judge_messages(concept: str, original_text: str, steered_text: str) -> list[dict[str, str]]:
    """Chat messages asking the judge to rate, 1-5, whether the steered text is more related to ``concept``."""
    user = (
        f'Expected concept: "{concept}"\n\n'
        f'Original text: "{original_text}"\n\n'
        f'Steered text: "{steered_text}"\n\n'
        "Question: Compared to the original, is the steered text more related to the expected concept? Rate 1-5."
    )
    return [{"role": "system", "content": LLM_JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_llm_score(answer: str | None) -> int | None:
    """The judge's 1-5 score, or None when the answer is not exactly one digit 1-5 (optionally with a
    trailing period and surrounding whitespace). Anything else, e.g. ``"4/5"`` or ``"Score: 4"``, is
    unparseable and recorded as such rather than guessed."""
    if answer is None:
        return None
    match = _SCORE_PATTERN.fullmatch(answer)
    return int(match.group(1)) if match else None


def llm_success(score: int | None, threshold: int) -> bool | None:
    """``score >= threshold``; None for an unparseable answer."""
    return None if score is None else bool(score >= int(threshold))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str], bos_id: int) -> list[list[int]]:
    """BOS followed by each prompt's tokens (no other special tokens)."""
    return [[int(bos_id)] + list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]


def decode_continuation(tokenizer: Any, tokens: Sequence[int], eos_id: int | None) -> str:
    """Text of generated tokens, cut before the first end-of-text token."""
    tokens = [int(t) for t in tokens]
    if eos_id is not None and int(eos_id) in tokens:
        tokens = tokens[: tokens.index(int(eos_id))]
    return tokenizer.decode(tokens)


@dataclass
class SteeringTexts:
    """Generated texts of one run.

    Attributes:
        originals: per prompt the unsteered continuation.
        steered: ``[n_features][n_prompts]`` steered continuations.
    """

    originals: list[str]
    steered: list[list[str]]


def steer_features(
    bridge: Any,
    hook_name: str,
    prompts: Sequence[str],
    directions: torch.Tensor,
    strengths: np.ndarray,
    new_tokens: int,
    sampling: SamplingSettings,
    sampling_seed: int,
    batch_size: int,
    progress: bool = False,
) -> SteeringTexts:
    """Unsteered and steered continuations for every (feature, prompt).

    Args:
        directions: ``[n_features, d_model]`` unit steering directions.
        strengths: ``[n_features]`` strength per feature.
        batch_size: rows per generation batch; each batch holds whole features
            (``max(1, batch_size // n_prompts)`` features x all prompts).
    """
    from tqdm.auto import tqdm

    from sae_pipeline.subject import bos_token_id

    tokenizer = bridge.tokenizer
    bos_id = bos_token_id(bridge)
    eos_id = tokenizer.eos_token_id
    tokens = prompt_token_ids(tokenizer, prompts, bos_id)
    n_prompts = len(prompts)
    uniforms = sampling_uniforms(sampling_seed, n_prompts, new_tokens)
    original = generate_continuations(bridge, hook_name, tokens, new_tokens, sampling, None, uniforms, bos_id)
    originals = [decode_continuation(tokenizer, row, eos_id) for row in original.tokens.tolist()]
    vectors = directions.float() * torch.as_tensor(strengths, dtype=torch.float32).unsqueeze(-1)
    features_per_batch = max(1, int(batch_size) // n_prompts)
    steered: list[list[str]] = []
    starts = range(0, vectors.shape[0], features_per_batch)
    for start in tqdm(starts, desc="steering batches", disable=not progress):
        chunk = vectors[start : start + features_per_batch]
        row_vectors = chunk.repeat_interleave(n_prompts, dim=0)
        generation = generate_continuations(
            bridge, hook_name, tokens * chunk.shape[0], new_tokens, sampling, row_vectors, uniforms.repeat(chunk.shape[0], 1), bos_id
        )
        texts = [decode_continuation(tokenizer, row, eos_id) for row in generation.tokens.tolist()]
        steered.extend(texts[i : i + n_prompts] for i in range(0, len(texts), n_prompts))
    return SteeringTexts(originals, steered)


def steering_rows(features: pd.DataFrame, prompts: Sequence[str], texts: SteeringTexts, strengths: np.ndarray, settings: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (feature, prompt) with judge columns left empty (see ``ROW_COLUMNS``)."""
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
                    "strength_mode": str(settings["strength_mode"]),
                    "sampling_seed": int(settings["sampling_seed"]),
                    "greedy": bool(settings["greedy"]),
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
    return rows[list(ROW_COLUMNS)]


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def judged_texts(rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``prompt + original`` and ``prompt + steered`` per row: what the judges read."""
    return (rows["prompt"] + rows["original"]).tolist(), (rows["prompt"] + rows["steered"]).tolist()


def apply_embedding_judge(rows: pd.DataFrame, threshold: float, device: str) -> None:
    """Fill ``embedding_score`` / ``embedding_success`` in place."""
    from sae_pipeline.embedding_judge import EmbeddingJudge

    judge = EmbeddingJudge(device=device, threshold=threshold)
    _, steered = judged_texts(rows)
    scores = judge.cosine(rows["explanation"].tolist(), steered)
    rows["embedding_score"] = scores.astype("float64")
    rows["embedding_success"] = pd.array(judge.successes(scores), dtype="boolean")


def apply_llm_judge(rows: pd.DataFrame, client: Any, threshold: int) -> None:
    """Fill ``llm_score`` / ``llm_success`` / ``llm_answer`` / ``llm_error`` in place.

    ``client`` is a :class:`sae_pipeline.judge.JudgeClient`. A request that failed (``reply.text`` is
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
    settings: Mapping[str, Any],
    llm_settings: Mapping[str, Any] | None = None,
    llm_cache_dir: str | Path | None = None,
) -> pd.DataFrame:
    """The ``steer`` rule: sample features, generate, judge, write ``rows.parquet`` and ``features.csv``.

    Args:
        manifest_path: the activation cache's ``manifest.json``; its ``model`` is the subject model
            (Hub id or local folder) and its ``hook_name`` the steering hook.
        sae_folder: one seed's SAE folder.
        scores_path: autointerp ``scores.parquet`` (``SCORES_COLUMNS``).
        settings: the ``steer`` config section.
        llm_settings: the judge endpoint section (``JudgeSettings`` keys: base_url, model, api_key_env,
            ...) shared with autointerp; required when ``"llm"`` is in ``settings["judges"]``.
        llm_cache_dir: the judge's response cache folder.

    Returns the rows table (as written).
    """
    import json

    from sae_pipeline.atomic import write_dataframe
    from sae_pipeline.checkpoint import load_sae
    from sae_pipeline.config import resolve_device
    from sae_pipeline.subject import load_subject_model

    judges = list(settings.get("judges", ["embedding"]))
    unknown = [j for j in judges if j not in JUDGES]
    if unknown:
        raise ValueError(f"steer.judges has unknown judges {unknown}; expected a subset of {JUDGES}")
    client = None
    if "llm" in judges:
        from sae_pipeline.judge import JudgeClient, JudgeSettings

        if llm_settings is None or llm_cache_dir is None:
            raise ValueError("steer.judges includes 'llm' but no judge endpoint settings (autointerp llm section) were given")
        client = JudgeClient(JudgeSettings.from_config(llm_settings, llm_cache_dir))
    mode = str(settings["strength_mode"])
    if mode not in STRENGTH_MODES:
        raise ValueError(f"steer.strength_mode must be one of {STRENGTH_MODES}, got {mode!r}")
    device = resolve_device(str(settings.get("device", "auto")))
    manifest = json.loads(Path(manifest_path).read_text())
    hook_name = manifest["hook_name"]
    prompts = list(settings["prompts"])

    scores = pd.read_parquet(scores_path)
    features = sample_features(scores, int(settings["features_per_category"]), int(settings["sampling_seed"]))
    logger.info("steering %d features (%s) at %s", len(features), features["category"].value_counts().to_dict(), hook_name)
    if features.empty:
        logger.warning("no feature in %s has an explanation: the steering tables will be empty", scores_path)

    sae = load_sae(sae_folder, device="cpu")
    if sae.d_in != int(manifest["d_model"]):
        raise ValueError(f"SAE {sae_folder} has d_in {sae.d_in} but the cache manifest's d_model is {manifest['d_model']}")
    indices = torch.tensor(features["feature"].to_numpy(dtype=np.int64), dtype=torch.long)
    directions = sae.unit_decoder_directions()[indices]
    encoder_columns = sae.W_enc.T[indices]

    bridge = load_subject_model(manifest["model"], device=device)
    resid_rms = None
    if mode == "resid_rms":
        from sae_pipeline.subject import bos_token_id

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

    sampling = SamplingSettings(greedy=bool(settings["greedy"]), temperature=float(settings["temperature"]), top_p=float(settings["top_p"]))
    texts = steer_features(
        bridge, hook_name, prompts, directions, strengths, int(settings["new_tokens"]), sampling, int(settings["sampling_seed"]), int(settings["batch_size"]), progress=True
    )
    del bridge
    rows = steering_rows(features, prompts, texts, strengths, settings)
    if len(rows) and "embedding" in judges:
        apply_embedding_judge(rows, float(settings["embedding_threshold"]), device)
    if len(rows) and "llm" in judges:
        apply_llm_judge(rows, client, int(settings["llm_success_threshold"]))
    write_dataframe(rows_path, rows)
    write_dataframe(features_path, feature_summary(rows))
    _log_summary(rows)
    return rows


def _log_summary(rows: pd.DataFrame) -> None:
    for category, group in rows.groupby("category", sort=False):
        logger.info(
            "%s: %d rows, embedding success %.3f, LLM success %s",
            category,
            len(group),
            float(group["embedding_success"].astype("Float64").mean()) if group["embedding_success"].notna().any() else math.nan,
            f"{float(group['llm_success'].astype('Float64').mean()):.3f}" if group["llm_success"].notna().any() else "n/a",
        )
