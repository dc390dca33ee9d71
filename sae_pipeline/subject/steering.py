"""Steered generation: the subject model generates while a vector is added to its residual stream.

Exactly where the vector goes (``NewestPositionSteering``). Generation runs with a key/value cache:
the first forward call takes the whole (left-padded) prompt, every later call takes the one token
sampled last. In each call the hook adds the vector to the LAST position of that call's input only:
in the prompt call that is the last prompt token, afterwards it is the newest token. Because cached
keys/values are computed from the steered residual, this equals a cache-free forward over the full
sequence in which every position from the last prompt token onwards carries the vector and the prompt
tokens before it carry none (``tests/test_steer.py`` checks that equivalence on logits). The first
generated token is therefore already steered. (The artifact's ``APPLY_ONLY_GENERATION_STEPS`` skipped
the prompt call, so its first generated token was unsteered; ours steers it.)

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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


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
        cached = None if cache is None else cache.get_seq_length()
        if cached != batch.input_ids.shape[1]:
            raise RuntimeError(
                f"the key/value cache holds {cached} positions after a {batch.input_ids.shape[1]}-token prompt: the subject "
                "model's attention does not update it (see sae_pipeline.subject.model.pass_cache_to_attention)"
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

    from sae_pipeline.subject.model import bos_token_id

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
