"""Automated interpretability of SAE features: mine examples, explain, score.

Three steps, delphi-style (explainer and scorers are separate, and scorers only see held-out contexts):

1. **Mining** (:func:`mine_examples`): one streaming pass over the cached activation shards encodes
   every token with the SAE and keeps, per selected feature,
   - the top activating contexts,
   - a uniform random sample of activating contexts (later split into activation quantiles),
   - a uniform random sample of non-activating contexts.
   A *context* is a window of ``window_before + 1 + window_after`` tokens of one cached sequence.
   Each sequence is cut into aligned buckets of that length; a bucket is activating when the feature
   fires on one of its tokens, and an activating context is the window centred (``window_before``
   tokens before, ``window_after`` after) on the bucket's peak token; a non-activating context is a
   bucket on which the feature never fires. Candidates are drawn at most once per bucket, and
   overlapping windows are removed afterwards, so no two contexts of a feature share a token.
   Random samples use random keys (bottom-k sampling), which stays uniform over the whole stream.

2. **Explanation**: the explainer sees top contexts plus some contexts from each activation
   quantile, with the feature's active tokens marked ``<<like this>>``.

3. **Scoring** on held-out contexts: *detection* mixes held-out activating contexts with
   non-activating ones and asks which contexts the explanation says are active; *fuzzing* marks
   either the truly active tokens or as many random inactive tokens of held-out activating contexts
   and asks whether the marks fit the explanation. Both scores are balanced accuracies in [0, 1]
   (0.5 = chance). Judge answers are parsed strictly; an unparseable answer is recorded in
   ``failures`` with its text and left out of the score, never counted as a zero.

Backends: ``llm`` (any OpenAI-compatible endpoint through :mod:`sae_pipeline.judge`) and
``offline`` — a **non-LLM baseline** for runs without a judge: its explanation is the feature's most
characteristic tokens (activation-weighted frequency in the explainer's contexts against corpus
frequency), detection says "active" when a context contains one of those tokens, fuzzing says
"correct" when most marked tokens are among them. Both write the same table.

Entry point for the rule: :func:`run_autointerp`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sae_pipeline.shards import ActivationStore

logger = logging.getLogger(__name__)

CATEGORIES = ("always", "sometimes", "never")
OFFLINE_BACKEND = "offline_token_baseline"
OFFLINE_JUDGE_MODEL = "none (non-LLM token-frequency baseline)"
LLM_BACKEND = "llm"
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
MARK_OPEN, MARK_CLOSE = "<<", ">>"


# ---------------------------------------------------------------------------------------------
# Mining
# ---------------------------------------------------------------------------------------------


@dataclass
class ContextSet:
    """Contexts of one feature, as stored by the miner.

    Attributes:
        doc_id: [n] int64 sequence (row of ``tokens.parquet``).
        start: [n] int64 position of the window's first slot (may be < 1 or run past the sequence;
            those slots have no token and are dropped when the context is built).
        activations: [n, window] float32, the feature's activation at each slot (0 where no token).
    """

    doc_id: np.ndarray
    start: np.ndarray
    activations: np.ndarray

    def __len__(self) -> int:
        return int(len(self.doc_id))

    def subset(self, index: np.ndarray | Sequence[int]) -> "ContextSet":
        index = np.asarray(index, dtype=np.int64)
        return ContextSet(self.doc_id[index], self.start[index], self.activations[index])


@dataclass
class FeatureExamples:
    """What mining found for one feature.

    Attributes:
        top: highest-activating contexts, strongest first.
        sampled: uniform random sample of activating contexts (none overlapping ``top``), any order.
        non_activating: uniform random sample of windows where the feature is zero on every token.
        n_firing_tokens: tokens (BOS excluded) on which the feature is > 0.
        max_activation: largest activation seen.
    """

    feature: int
    top: ContextSet
    sampled: ContextSet
    non_activating: ContextSet
    n_firing_tokens: int
    max_activation: float


@dataclass
class Context:
    """A window of tokens with the feature's activation on each (BOS and out-of-sequence slots removed).

    Attributes:
        doc_id: the sequence; start: position of ``token_ids[0]`` in it.
        token_ids: [n] int; activations: [n] float32.
    """

    doc_id: int
    start: int
    token_ids: np.ndarray
    activations: np.ndarray

    @property
    def active(self) -> np.ndarray:
        """[n] bool: where the feature fires."""
        return self.activations > 0


def _row_chunks(store: ActivationStore, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(activations [rows, d], doc_id [rows], position [rows])`` chunks of whole sequences, BOS dropped.

    Chunks hold about ``batch_rows`` rows (more when one sequence is longer). Rows of one sequence
    must be contiguous in the cache (the cache stage writes sequences in order).
    """
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pending_rows = 0
    last_doc = -1

    def merged() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(pending) == 1:
            return pending[0]  # slices of one shard stay views: no copy
        return tuple(np.concatenate([part[index] for part in pending]) for index in range(3))  # type: ignore[return-value]

    for shard in store.iter_shards(columns=["activation", "doc_id", "position", "is_bos"], drop_bos=True):
        if len(shard) == 0:
            continue
        doc_id = shard.doc_id
        if doc_id[0] < last_doc or np.any(np.diff(doc_id) < 0):
            raise ValueError(f"{store.root}: shard rows are not ordered by doc_id; mining needs each sequence's rows together")
        last_doc = int(doc_id[-1])
        pending.append((shard.activations, doc_id, shard.position))
        pending_rows += len(shard)
        while pending_rows > batch_rows:
            activations, docs, positions = merged()
            boundaries = np.flatnonzero(np.diff(docs)) + 1
            fitting = boundaries[boundaries <= batch_rows]
            if len(fitting):
                cut = int(fitting[-1])
            elif len(boundaries):
                cut = int(boundaries[0])
            else:
                break  # one sequence so far: wait for more rows
            yield activations[:cut], docs[:cut], positions[:cut]
            pending = [(activations[cut:], docs[cut:], positions[cut:])]
            pending_rows = len(docs) - cut
    if pending_rows:
        yield merged()


class _RunningTop:
    """Per-feature running top-``capacity`` of candidates by key (feature-major: keys ``[F, capacity]``).

    Carries per candidate its value (the bucket's peak activation), doc id, position and optionally
    a ``[W]`` activation window (``windows [F, capacity, W]``).
    """

    def __init__(self, capacity: int, n_features: int, window: int | None, device: torch.device):
        self.capacity = capacity
        self.keys = torch.full((n_features, capacity), -math.inf, device=device)
        self.values = torch.zeros((n_features, capacity), device=device)
        self.doc = torch.zeros((n_features, capacity), dtype=torch.long, device=device)
        self.position = torch.zeros((n_features, capacity), dtype=torch.long, device=device)
        self.windows = torch.zeros((n_features, capacity, window), device=device) if window else None

    def merge(self, keys: torch.Tensor, values: torch.Tensor, doc: torch.Tensor, position: torch.Tensor, windows: torch.Tensor | None) -> None:
        """Add candidates (``[F, n]`` each, ``windows [F, n, W]``) and keep the ``capacity`` largest keys per feature."""
        keys = torch.cat([self.keys, keys], dim=1)
        best = keys.topk(self.capacity, dim=1).indices
        self.keys = keys.gather(1, best)
        self.values = torch.cat([self.values, values], dim=1).gather(1, best)
        self.doc = torch.cat([self.doc, doc], dim=1).gather(1, best)
        self.position = torch.cat([self.position, position], dim=1).gather(1, best)
        if self.windows is not None and windows is not None:
            window = self.windows.shape[-1]
            self.windows = torch.cat([self.windows, windows], dim=1).gather(1, best[..., None].expand(-1, -1, window))


@dataclass
class MiningSettings:
    """How contexts are mined (the config's ``autointerp.mining`` section).

    Attributes:
        window_before, window_after: tokens shown before / after the peak token.
        n_top: top contexts kept per feature.
        n_activating_sample: size of the uniform sample of activating contexts (feeds the quantiles).
        n_non_activating: size of the uniform sample of non-activating contexts.
        batch_rows: token rows encoded at once.
        device: ``auto`` | ``cpu`` | ``cuda``...
    """

    window_before: int = 12
    window_after: int = 4
    n_top: int = 20
    n_activating_sample: int = 100
    n_non_activating: int = 20
    batch_rows: int = 8192
    device: str = "cpu"

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "MiningSettings":
        return cls(**{name: section[name] for name in cls.__dataclass_fields__ if name in section})


def _distinct(doc: torch.Tensor, position: torch.Tensor, usable: torch.Tensor, limit: int, window: int, blocked: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Greedy selection, per feature, of candidates whose windows do not overlap.

    ``doc``, ``position``, ``usable`` are ``[F, K]`` in priority order; a candidate is taken when usable,
    not within ``window`` positions of a taken one in the same doc, nor of any ``blocked`` ``([F, M] doc,
    [F, M] position)``, and fewer than ``limit`` are taken. Returns ``[F, K]`` bool.
    """
    taken = torch.zeros_like(usable)
    free = usable.clone()
    for blocked_doc, blocked_position in blocked:
        clash = (doc[:, :, None] == blocked_doc[:, None, :]) & ((position[:, :, None] - blocked_position[:, None, :]).abs() < window)
        free &= ~clash.any(dim=2)
    for index in range(doc.shape[1]):
        clash = (doc[:, :index] == doc[:, index : index + 1]) & ((position[:, :index] - position[:, index : index + 1]).abs() < window) & taken[:, :index]
        taken[:, index] = free[:, index] & ~clash.any(dim=1) & (taken[:, :index].sum(dim=1) < limit)
    return taken


def mine_examples(
    store: ActivationStore,
    sae: Any,
    features: Sequence[int],
    settings: MiningSettings,
    random_seed: int = 0,
    progress: bool = True,
) -> dict[int, FeatureExamples]:
    """One pass over ``store``: top, sampled activating and non-activating contexts of each feature.

    Args:
        store: the activation cache (its rows must be grouped by sequence, as the cache stage writes them).
        sae: a :class:`~sae_pipeline.sae.SparseAutoencoder` already on the mining device.
        features: SAE latent indices to mine.
        settings: windows, sample sizes, batch size.
        random_seed: seeds the random keys of the samples.

    Returns ``{feature: FeatureExamples}`` for every requested feature (dead ones with empty sets).
    """
    from tqdm.auto import tqdm

    device = next(sae.parameters()).device
    context_size = int(store.manifest["context_size"])
    window, before = settings.window, settings.window_before
    buckets_per_doc = -(-context_size // window)
    padded_length = buckets_per_doc * window
    feature_index = torch.as_tensor(list(features), dtype=torch.long, device=device)
    n_features = len(feature_index)
    all_features = n_features == sae.d_sae and bool((feature_index == torch.arange(sae.d_sae, device=device)).all())
    generator = torch.Generator(device=device).manual_seed(int(random_seed))
    top = _RunningTop(settings.n_top * 2, n_features, window, device)
    sampled = _RunningTop(settings.n_activating_sample + settings.n_top * 2, n_features, window, device)
    quiet = _RunningTop(settings.n_non_activating, n_features, None, device)
    firing_tokens = torch.zeros(n_features, dtype=torch.long, device=device)
    min_valid_in_bucket = (window + 1) // 2

    bar = tqdm(total=store.n_rows, desc="mining", unit="tok", unit_scale=True, mininterval=2.0, disable=not progress)
    with torch.no_grad():
        for activations, docs, positions in _row_chunks(store, settings.batch_rows):
            bar.update(len(docs))
            x = torch.from_numpy(np.array(activations)).to(device).float()  # copied in the stored dtype, widened on the device
            codes = sae.encode(x)
            if not all_features:
                codes = codes.index_select(1, feature_index)
            firing_tokens += (codes > 0).sum(dim=0)
            first_doc = int(docs[0])
            n_docs = int(docs[-1]) - first_doc + 1
            n_buckets = n_docs * buckets_per_doc
            # Feature-major grid: row f holds feature f's activation at every (doc, position) slot of the chunk.
            slot = torch.from_numpy((docs - first_doc) * padded_length + positions.astype(np.int64)).to(device)
            grid = torch.zeros((n_features, n_docs * padded_length), device=device)
            grid.index_copy_(1, slot, codes.T)
            valid = torch.zeros(n_docs * padded_length, dtype=torch.bool, device=device)
            valid[slot] = True
            bucket_max, bucket_argmax = grid.view(n_features, n_buckets, window).max(dim=2)  # [F, B]
            bucket_doc = torch.arange(n_buckets, device=device) // buckets_per_doc  # chunk-local
            bucket_start = (torch.arange(n_buckets, device=device) % buckets_per_doc) * window
            peak = bucket_start + bucket_argmax  # [F, B]
            bucket_valid = valid.view(n_buckets, window).sum(dim=1)
            stride = padded_length + window - 1
            padded = torch.nn.functional.pad(grid.view(n_features, n_docs, padded_length), (before, settings.window_after)).view(n_features, -1)
            offsets = torch.arange(window, device=device)

            def take(running: _RunningTop, keys: torch.Tensor, centred: bool) -> None:
                # Only candidates above a feature's smallest kept key can enter; late in the stream that is few.
                entering = int((keys > running.keys[:, -1:]).sum(dim=1).max())
                count = min(running.capacity, n_buckets, entering)
                if count == 0:
                    return
                chosen_keys, chosen = keys.topk(count, dim=1)  # [F, count]
                local_doc = bucket_doc[chosen]
                windows = None
                if centred:
                    position = peak.gather(1, chosen)
                    slots = (local_doc * stride + position)[..., None] + offsets  # padded slot j holds position - before + j
                    windows = padded.gather(1, slots.view(n_features, -1)).view(n_features, count, window)
                    start = position - before
                else:
                    start = bucket_start[chosen]
                running.merge(chosen_keys, bucket_max.gather(1, chosen), local_doc + first_doc, start, windows)

            take(top, bucket_max, centred=True)
            random_keys = torch.rand(bucket_max.shape, generator=generator, device=device)
            take(sampled, torch.where(bucket_max > 0, random_keys, -1.0), centred=True)
            random_keys = torch.rand(bucket_max.shape, generator=generator, device=device)
            quiet_ok = (bucket_max <= 0) & (bucket_valid >= min_valid_in_bucket)
            take(quiet, torch.where(quiet_ok, random_keys, -1.0), centred=False)
    bar.close()
    return _collect(features, top, sampled, quiet, firing_tokens, settings)


def _collect(features: Sequence[int], top: _RunningTop, sampled: _RunningTop, quiet: _RunningTop, firing_tokens: torch.Tensor, settings: MiningSettings) -> dict[int, FeatureExamples]:
    """Turn the running states into per-feature :class:`FeatureExamples` (distinct, non-overlapping windows)."""
    window = settings.window

    top_taken = _distinct(top.doc, top.position, top.keys > 0, settings.n_top, window, [])
    blocked_doc = torch.where(top_taken, top.doc, torch.full_like(top.doc, -1))
    sample_taken = _distinct(sampled.doc, sampled.position, sampled.keys > 0, settings.n_activating_sample, window, [(blocked_doc, top.position)])
    arrays = {
        "top_taken": top_taken,
        "top_doc": top.doc,
        "top_start": top.position,
        "top_windows": top.windows,
        "sample_taken": sample_taken,
        "sample_doc": sampled.doc,
        "sample_start": sampled.position,
        "sample_windows": sampled.windows,
        "quiet_taken": quiet.keys > 0,
        "quiet_doc": quiet.doc,
        "quiet_start": quiet.position,
        "firing": firing_tokens,
    }
    host = {name: value.cpu().numpy() for name, value in arrays.items()}
    examples = {}
    for column, feature in enumerate(features):

        def context_set(prefix: str, with_windows: bool) -> ContextSet:
            keep = np.flatnonzero(host[f"{prefix}_taken"][column])
            windows = host[f"{prefix}_windows"][column][keep].astype(np.float32) if with_windows else np.zeros((len(keep), window), np.float32)
            return ContextSet(host[f"{prefix}_doc"][column][keep].astype(np.int64), host[f"{prefix}_start"][column][keep].astype(np.int64), windows)

        top_set = context_set("top", True)
        examples[int(feature)] = FeatureExamples(
            feature=int(feature),
            top=top_set,
            sampled=context_set("sample", True),
            non_activating=context_set("quiet", False),
            n_firing_tokens=int(host["firing"][column]),
            max_activation=float(top_set.activations.max()) if len(top_set) else 0.0,
        )
    return examples


# ---------------------------------------------------------------------------------------------
# Splitting into explainer and scorer sets
# ---------------------------------------------------------------------------------------------


def build_contexts(contexts: ContextSet, sequences: np.ndarray) -> list[Context]:
    """Cut each window out of ``sequences`` ([n_sequences, context_size] token ids), dropping BOS and out-of-range slots."""
    context_size = sequences.shape[1]
    built = []
    for doc, start, activations in zip(contexts.doc_id, contexts.start, contexts.activations):
        first = max(int(start), 1)
        stop = min(int(start) + activations.shape[0], context_size)
        built.append(Context(int(doc), first, sequences[doc, first:stop].copy(), activations[first - int(start) : stop - int(start)].copy()))
    return built


@dataclass
class ExampleSplit:
    """Contexts of one feature, split so the scorers only see contexts the explainer did not.

    Attributes:
        explain: top contexts then quantile contexts, shown to the explainer.
        score_activating: held-out activating contexts (remaining top ones and quantile ones).
        score_non_activating: non-activating contexts.
    """

    explain: list[Context]
    score_activating: list[Context]
    score_non_activating: list[Context]

    @property
    def n_examples(self) -> int:
        return len(self.explain) + len(self.score_activating) + len(self.score_non_activating)


def split_examples(examples: FeatureExamples, sequences: np.ndarray, settings: Mapping[str, Any], random_seed: int) -> ExampleSplit:
    """Split mined contexts into explainer and scorer sets.

    ``settings`` keys: ``explain_top`` (top contexts for the explainer; the rest of the top contexts
    are held out), ``n_quantiles``, ``explain_per_quantile`` and ``score_per_quantile`` (contexts
    drawn from each equal-count activation quantile of the sampled activating contexts).
    The draw is seeded by ``(random_seed, feature)`` so it does not depend on which other features run.
    """
    rng = np.random.default_rng([int(random_seed), int(examples.feature)])
    n_explain_top = int(settings["explain_top"])
    explain_sets = [examples.top.subset(np.arange(min(n_explain_top, len(examples.top))))]
    score_sets = [examples.top.subset(np.arange(min(n_explain_top, len(examples.top)), len(examples.top)))]
    sampled = examples.sampled
    if len(sampled):
        order = np.argsort(sampled.activations.max(axis=1), kind="stable")
        for quantile in np.array_split(order, int(settings["n_quantiles"])):
            drawn = rng.permutation(quantile)
            n_explain = min(int(settings["explain_per_quantile"]), len(drawn))
            explain_sets.append(sampled.subset(drawn[:n_explain]))
            score_sets.append(sampled.subset(drawn[n_explain : n_explain + int(settings["score_per_quantile"])]))

    def joined(sets: list[ContextSet]) -> list[Context]:
        return [context for part in sets for context in build_contexts(part, sequences)]

    return ExampleSplit(joined(explain_sets), joined(score_sets), build_contexts(examples.non_activating, sequences))


# ---------------------------------------------------------------------------------------------
# Rendering, prompts and strict parsing
# ---------------------------------------------------------------------------------------------


class TokenText:
    """Decoded text of single token ids, memoised (newlines shown as ``\\n`` so excerpts stay on one line)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._text:
            text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            self._text[token_id] = text.replace("\r", "\\r").replace("\n", "\\n")
        return self._text[token_id]


def render_context(token_ids: Sequence[int], marks: Sequence[bool] | None, token_text: TokenText) -> str:
    """Join the tokens' text; runs of marked tokens are wrapped as ``<<...>>`` (leading spaces kept outside)."""
    pieces: list[str] = []
    inside = False
    for index, token_id in enumerate(token_ids):
        text = token_text(token_id)
        marked = bool(marks[index]) if marks is not None else False
        if marked and not inside:
            stripped = text.lstrip()
            pieces.append(text[: len(text) - len(stripped)] + MARK_OPEN + stripped)
            inside = True
        elif not marked and inside:
            pieces.append(MARK_CLOSE + text)
            inside = False
        else:
            pieces.append(text)
    if inside:
        pieces.append(MARK_CLOSE)
    return "".join(pieces)


def numbered(excerpts: Sequence[str]) -> str:
    return "\n".join(f"{number}. {text}" for number, text in enumerate(excerpts, start=1))


EXPLAIN_SYSTEM = (
    "You are an interpretability researcher explaining one feature (a latent direction) of a language model.\n"
    f"You will see numbered text excerpts. In each, the tokens on which the feature is active are marked {MARK_OPEN}like this{MARK_CLOSE}.\n"
    "Work out what the marked tokens have in common, using the surrounding text: a word or word family, a topic, "
    "a grammatical role, a pattern. Be specific and brief (a phrase or one sentence).\n"
    "End your reply with exactly one line of the form:\n"
    "EXPLANATION: <the explanation>"
)
DETECTION_SYSTEM = (
    "You are checking an explanation of one feature of a language model.\n"
    "You will get the explanation and numbered text excerpts. The feature is active somewhere in some excerpts and "
    "nowhere in the others. For each excerpt, decide from the explanation alone whether the feature is active in it.\n"
    "Reply with only a list with one number per excerpt, in order: 1 for active, 0 for inactive. Example: [1, 0, 0, 1]"
)
FUZZING_SYSTEM = (
    "You are checking an explanation of one feature of a language model.\n"
    f"You will get the explanation and numbered text excerpts in which some tokens are marked {MARK_OPEN}like this{MARK_CLOSE}. "
    "In some excerpts the marks sit on the tokens where the feature is active; in others they were put on other tokens. "
    "For each excerpt, decide from the explanation whether the marked tokens are the ones the feature responds to.\n"
    "Reply with only a list with one number per excerpt, in order: 1 for correctly marked, 0 for wrongly marked. Example: [1, 0, 0, 1]"
)
_EXPLANATION_LINE = re.compile(r"^\s*\**\s*EXPLANATION\s*\**\s*:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
MAX_EXPLANATION_CHARS = 500


def explain_messages(excerpts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of marked excerpts."""
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": f"Excerpts where the feature is active:\n\n{numbered(excerpts)}"},
    ]


def classify_messages(scorer: str, explanation: str, excerpts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages for one detection or fuzzing batch."""
    system = DETECTION_SYSTEM if scorer == "detection" else FUZZING_SYSTEM
    user = f"Explanation: {explanation}\n\n{len(excerpts)} excerpts:\n\n{numbered(excerpts)}\n\nAnswer with a list of {len(excerpts)} numbers (0 or 1)."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_explanation(text: str) -> str:
    """The explanation in the judge's last ``EXPLANATION: ...`` line.

    Raises ``ValueError`` (naming the problem) when there is no such line, it is empty, or it is too long.
    """
    matches = _EXPLANATION_LINE.findall(text)
    if not matches:
        raise ValueError("no line 'EXPLANATION: ...' in the answer")
    explanation = matches[-1].strip().strip("*").strip()
    if not explanation:
        raise ValueError("empty explanation")
    if len(explanation) > MAX_EXPLANATION_CHARS:
        raise ValueError(f"explanation longer than {MAX_EXPLANATION_CHARS} characters")
    return explanation


def parse_binary_list(text: str, expected_length: int) -> list[int]:
    """The last ``[...]`` list in ``text`` as 0/1 integers; it must have ``expected_length`` entries.

    Raises ``ValueError`` when there is no list, an entry is not 0 or 1, or the length differs.
    """
    matches = _BRACKETED.findall(text)
    if not matches:
        raise ValueError("no [...] list in the answer")
    items = [item.strip().strip("'\"") for item in matches[-1].split(",")] if matches[-1].strip() else []
    if any(item not in ("0", "1") for item in items):
        raise ValueError(f"list entries must be 0 or 1, got [{matches[-1]}]")
    if len(items) != expected_length:
        raise ValueError(f"list has {len(items)} entries, expected {expected_length}")
    return [int(item) for item in items]


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Mean of the true-positive rate and the true-negative rate; NaN unless both classes occur."""
    labels_array, predictions_array = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    positives, negatives = labels_array == 1, labels_array == 0
    if not positives.any() or not negatives.any():
        return float("nan")
    return float(0.5 * ((predictions_array[positives] == 1).mean() + (predictions_array[negatives] == 0).mean()))


# ---------------------------------------------------------------------------------------------
# Tasks and backends
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassifyTask:
    """One scorer batch: contexts (with marks for fuzzing) whose true labels the judge should recover.

    Attributes:
        scorer: ``detection`` or ``fuzzing``.
        contexts, marks: the batch; ``marks[i]`` is [n_i] bool (fuzzing) or None (detection).
        labels: [n] 1 = active (detection) / correctly marked (fuzzing).
    """

    feature: int
    scorer: str
    explanation: str
    contexts: list[Context]
    marks: list[np.ndarray | None]
    labels: list[int]


@dataclass
class Outcome:
    """A backend's answer to one task: ``value`` (explanation str or list of 0/1) or ``failure`` (with text)."""

    value: Any = None
    failure: str | None = None
    tokens: int = 0
    audit: dict[str, Any] = field(default_factory=dict)


def fuzzing_marks(context: Context, correct: bool, rng: np.random.Generator) -> np.ndarray | None:
    """Marks for a fuzzing excerpt: the active tokens, or as many random inactive ones (None if impossible)."""
    active = context.active
    if correct:
        return active.copy()
    inactive = np.flatnonzero(~active)
    if len(inactive) < active.sum() or not active.any():
        return None
    marks = np.zeros_like(active)
    marks[rng.choice(inactive, size=int(active.sum()), replace=False)] = True
    return marks


def scorer_tasks(feature: int, explanation: str, split: ExampleSplit, contexts_per_prompt: int, random_seed: int) -> list[ClassifyTask]:
    """Detection and fuzzing batches for one feature (shuffled, ``contexts_per_prompt`` excerpts each)."""
    rng = np.random.default_rng([int(random_seed), int(feature), 1])
    detection = [(context, None, 1) for context in split.score_activating] + [(context, None, 0) for context in split.score_non_activating]
    fuzzing = []
    for index, context in enumerate(split.score_activating):
        correct = index % 2 == 0
        marks = fuzzing_marks(context, correct, rng)
        if marks is not None:
            fuzzing.append((context, marks, int(correct)))
    tasks = []
    for scorer, items in (("detection", detection), ("fuzzing", fuzzing)):
        order = rng.permutation(len(items))
        for begin in range(0, len(items), contexts_per_prompt):
            batch = [items[index] for index in order[begin : begin + contexts_per_prompt]]
            tasks.append(ClassifyTask(feature, scorer, explanation, [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]))
    return tasks


class LLMBackend:
    """Explainer and scorers answered by an LLM through :class:`sae_pipeline.judge.JudgeClient`."""

    name = LLM_BACKEND

    def __init__(self, client: Any, token_text: TokenText):
        self.client = client
        self.token_text = token_text

    @property
    def judge_model(self) -> str:
        return str(self.client.settings.model)

    def _ask(self, conversations: list[list[dict[str, str]]], parse: Any, description: str) -> list[Outcome]:
        replies = self.client.complete_many(conversations, description=description)
        outcomes = []
        for messages, reply, parser in zip(conversations, replies, parse):
            audit = {
                "messages": messages,
                "answer": reply.text,
                "cached": reply.cached,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "request_hash": reply.request_hash,
            }
            if not reply.ok:
                outcomes.append(Outcome(failure=f"request failed: {reply.error}", tokens=reply.total_tokens, audit=audit))
                continue
            try:
                outcomes.append(Outcome(value=parser(reply.text), tokens=reply.total_tokens, audit=audit))
            except ValueError as error:
                outcomes.append(Outcome(failure=f"unparseable answer ({error}): {reply.text!r}", tokens=reply.total_tokens, audit=audit))
        return outcomes

    def explain(self, features: list[int], contexts: list[list[Context]]) -> list[Outcome]:
        conversations = [
            explain_messages([render_context(c.token_ids, c.active, self.token_text) for c in feature_contexts]) for feature_contexts in contexts
        ]
        return self._ask(conversations, [parse_explanation] * len(conversations), "explain")

    def classify(self, tasks: list[ClassifyTask]) -> list[Outcome]:
        conversations = [
            classify_messages(task.scorer, task.explanation, [render_context(c.token_ids, m, self.token_text) for c, m in zip(task.contexts, task.marks)])
            for task in tasks
        ]
        parsers = [lambda text, n=len(task.contexts): parse_binary_list(text, n) for task in tasks]
        return self._ask(conversations, parsers, "score")


class OfflineTokenBaseline:
    """The non-LLM baseline: explanations are characteristic tokens, scorers test for those tokens.

    A token's score for a feature is ``p_f(t) * log(p_f(t) / p(t))``: ``p_f`` is the share of the
    feature's activation (summed over the explainer's contexts) that falls on token ``t``, ``p`` the
    token's corpus frequency (add-one smoothed). The explanation lists up to ``n_tokens`` tokens with
    a positive score and at least ``min_weight_share`` of the activation.
    """

    name = OFFLINE_BACKEND
    judge_model = OFFLINE_JUDGE_MODEL

    def __init__(self, corpus_counts: np.ndarray, token_text: TokenText, n_tokens: int = 5, min_weight_share: float = 0.05):
        self.corpus_probability = (corpus_counts.astype(np.float64) + 1.0) / (corpus_counts.sum() + len(corpus_counts))
        self.token_text = token_text
        self.n_tokens = int(n_tokens)
        self.min_weight_share = float(min_weight_share)
        self.token_sets: dict[int, set[int]] = {}

    def characteristic_tokens(self, contexts: list[Context]) -> list[tuple[int, float, float]]:
        """``(token_id, activation share, score)`` of the chosen tokens, best first."""
        weights: dict[int, float] = {}
        for context in contexts:
            for token_id, activation in zip(context.token_ids[context.active], context.activations[context.active]):
                weights[int(token_id)] = weights.get(int(token_id), 0.0) + float(activation)
        total = sum(weights.values())
        if total <= 0:
            return []
        scored = []
        for token_id, weight in weights.items():
            share = weight / total
            score = share * math.log(share / self.corpus_probability[token_id])
            if score > 0 and share >= self.min_weight_share:
                scored.append((token_id, share, score))
        scored.sort(key=lambda item: (-item[2], item[0]))
        return scored[: self.n_tokens]

    def explain(self, features: list[int], contexts: list[list[Context]]) -> list[Outcome]:
        outcomes = []
        for feature, feature_contexts in zip(features, contexts):
            chosen = self.characteristic_tokens(feature_contexts)
            audit = {"token_scores": [{"token_id": t, "text": self.token_text(t), "activation_share": s, "score": v} for t, s, v in chosen]}
            if not chosen:
                outcomes.append(Outcome(failure="no characteristic token (no activation in the explainer's contexts)", audit=audit))
                continue
            self.token_sets[feature] = {token_id for token_id, _, _ in chosen}
            explanation = "tokens: " + ", ".join(json.dumps(self.token_text(token_id), ensure_ascii=False) for token_id, _, _ in chosen)
            outcomes.append(Outcome(value=explanation, audit=audit))
        return outcomes

    def classify(self, tasks: list[ClassifyTask]) -> list[Outcome]:
        outcomes = []
        for task in tasks:
            tokens = self.token_sets[task.feature]
            predictions = []
            for context, marks in zip(task.contexts, task.marks):
                hits = np.isin(context.token_ids, list(tokens))
                if task.scorer == "detection":
                    predictions.append(int(hits.any()))
                else:
                    predictions.append(int(hits[marks].mean() >= 0.5) if marks.any() else 0)
            outcomes.append(Outcome(value=predictions, audit={"predictions": predictions}))
        return outcomes


# ---------------------------------------------------------------------------------------------
# Feature selection and the stage
# ---------------------------------------------------------------------------------------------


def select_features(d_sae: int, sharedness: pd.DataFrame | None, settings: Mapping[str, Any], random_seed: int) -> list[int]:
    """Features to interpret, sorted.

    ``settings`` (the ``features`` section): ``selection`` = ``all`` | ``random`` (``n_features`` drawn
    uniformly) | ``category`` (up to ``n_features`` drawn from each of ``categories``, using the
    match stage's ``sharedness`` table with columns feature, share_count, category).
    """
    selection = settings["selection"]
    rng = np.random.default_rng(int(random_seed))
    if selection == "all":
        return list(range(d_sae))
    if selection == "random":
        count = min(int(settings["n_features"]), d_sae)
        return sorted(int(f) for f in rng.choice(d_sae, size=count, replace=False))
    if selection == "category":
        if sharedness is None:
            raise ValueError("autointerp.features.selection: category needs the match stage's features.parquet")
        chosen: list[int] = []
        for category in settings.get("categories", list(CATEGORIES)):
            members = sharedness.loc[sharedness["category"] == category, "feature"].to_numpy()
            count = min(int(settings["n_features"]), len(members))
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
) -> list[_FeatureRecord]:
    """Explain and score every feature in ``examples`` with ``backend``; appends audit records to ``audit``.

    ``settings`` is the whole autointerp section (uses ``explain``, ``score``, ``mining``).
    Features with fewer than ``score.min_activating_contexts`` activating contexts are not sent to
    the judge; they get a failure entry saying so.
    """
    split_settings = {
        "explain_top": settings["explain"]["n_top"],
        "explain_per_quantile": settings["explain"]["n_per_quantile"],
        "n_quantiles": settings["score"]["n_quantiles"],
        "score_per_quantile": settings["score"]["n_per_quantile"],
    }
    minimum = int(settings["score"]["min_activating_contexts"])
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

    tasks = [
        task
        for feature in ready
        if records[feature].explanation is not None
        for task in scorer_tasks(feature, records[feature].explanation, records[feature].split, int(settings["score"]["contexts_per_prompt"]), random_seed)
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
) -> pd.DataFrame:
    """The ``autointerp`` rule: select features, mine, explain, score; write ``scores.parquet`` and ``audit.jsonl``.

    Args:
        cache_dir: the activation cache folder (``manifest.json`` inside; its ``model`` names the tokenizer).
        sae_folder: one SAE folder (``cfg.json`` + weights).
        sharedness_path: the match stage's ``features.parquet`` (or None: no categories).
        settings: the ``autointerp`` config section.
        judge_cache_dir: the LLM judge's response cache (LLM backend only).
        threads: CPU threads for mining.

    Returns the scores table as written.
    """
    from transformers import AutoTokenizer

    from sae_pipeline.atomic import json_default, write_dataframe, write_text
    from sae_pipeline.checkpoint import load_sae
    from sae_pipeline.config import resolve_device

    if threads:
        torch.set_num_threads(int(threads))
    backend_name = settings["backend"]
    if backend_name not in ("offline", "llm"):
        raise ValueError(f"autointerp.backend must be offline or llm, got {backend_name!r}")
    client = None
    if backend_name == "llm":
        from sae_pipeline.judge import JudgeClient, JudgeSettings

        if judge_cache_dir is None:
            raise ValueError("autointerp with backend llm needs a judge cache folder")
        client = JudgeClient(JudgeSettings.from_config(settings["llm"], judge_cache_dir))  # fails now if the key is missing
        if client.cache.is_empty():
            client.check_endpoint()  # nothing can come from the cache: fail before mining if the endpoint is down

    store = ActivationStore(cache_dir)
    model_ref = store.manifest["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    token_text = TokenText(tokenizer)
    random_seed = int(settings.get("random_seed", 0))
    mining = MiningSettings.from_config(settings["mining"])
    device = resolve_device(mining.device)
    sae = load_sae(sae_folder, device)
    if sae.d_in != store.d_model:
        raise ValueError(f"SAE {sae_folder} has d_in {sae.d_in} but the cache at {cache_dir} has d_model {store.d_model}")
    sharedness = read_sharedness(sharedness_path, sae.d_sae, int(settings.get("seed", 0)))
    features = select_features(sae.d_sae, sharedness, settings["features"], random_seed)
    logger.info("autointerp: %d features of %s, backend %s, mining on %s", len(features), sae_folder, backend_name, device)

    examples = mine_examples(store, sae, features, mining, random_seed)
    sequences = store.sequences()
    if backend_name == "llm":
        backend: Any = LLMBackend(client, token_text)
    else:
        offline = settings.get("offline", {})
        vocab_size = max(len(tokenizer), int(sequences.max()) + 1)
        backend = OfflineTokenBaseline(corpus_token_counts(sequences, vocab_size), token_text, offline.get("n_tokens", 5), offline.get("min_weight_share", 0.05))
    audit: list[dict[str, Any]] = []
    records = interpret_features(examples, sequences, backend, settings, random_seed, audit)
    table = scores_table(records, sharedness, backend)
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
    scored = table["detection_score"].notna()
    logger.info(
        "autointerp: %d/%d features scored; mean detection %.3f, mean fuzzing %.3f",
        int(scored.sum()), len(table), float(table["detection_score"].mean()), float(table["fuzzing_score"].mean()),
    )
    return table

