"""An in-process judge that is a real language model, scored by likelihood rather than by prompting.

A small base model (the default experiment's google/gemma-3-270m) answers prompted questions at
chance, but the probabilities it gives to text are informative. Every judgement here is a pointwise
mutual information (PMI): how much more likely a continuation is after the evidence than after a
content-free version of the same prompt. The primitive is ``log p(target | BOS + prefix)`` summed
over the target's tokens (:meth:`LikelihoodScorer.logprobs`); only the positions that predict target
tokens go through the unembedding (262k rows for Gemma), the decoder runs without its output layer,
batches are right-padded (a causal model's real tokens never see right pads), sorted by length and
cut by a token budget, and a prefix shared by many targets runs once with its key/value cache
repeated over them (:meth:`LikelihoodScorer.suffix_logprobs`).

Judgements (nats; higher = "yes"):

- :func:`explanation_pmi` (detection): ``[log p(" E" | "Text: C\\nThis text is about") -
  log p(" E" | "Text: \\nThis text is about")] / n_tokens(E)``.
- :func:`marked_words_pmi` (fuzzing): the same with "The marked words: W\\nThey are about" for the
  words W marked in an excerpt, against no words.
- :func:`rank_candidates` (explanation): ``log p(" c" | contexts + "These texts are all about") -
  log p(" c" | an empty list + the same)`` for every candidate c, one shared prefix per feature.
- :func:`concept_gain` (steering): ``log p(" C" | "Text: B\\nThis text is about") - log p(" C" |
  "Text: A\\nThis text is about")``: positive when B is more about the concept C than A.

Their accuracy on held-out labelled cases (:mod:`sae_pipeline.judges.cases`) is measured in every run
(:mod:`sae_pipeline.judges.accuracy`).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

TEXT_ABOUT = "Text: {}\nThis text is about"
MARKED_ABOUT = "The marked words: {}\nThey are about"
LIST_ABOUT = "Texts:\n{}These texts are all about"


def load_causal_lm(model_ref: str, dtype: str = "float32", threads: int | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face causal LM (local folder or Hub id) in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(int(threads))
    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(model_ref)


def likelihood_scorer(settings: Any, model_ref: str | None) -> "LikelihoodScorer":
    """The scorer of the ``lm_judge`` settings (:class:`~sae_pipeline.settings.LikelihoodJudgeSettings`) on ``model_ref``."""
    if model_ref is None:
        raise ValueError("the lm judge needs its model (lm_judge.model, or the subject model)")
    return LikelihoodScorer(*load_causal_lm(model_ref, settings.dtype, settings.threads), token_budget=settings.token_budget)


def _cache_argument(module: Any) -> str:
    """The keyword a transformers module takes its key/value cache under (``cache`` from 5.24 on)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class LikelihoodScorer:
    """Log-probabilities of continuations under a causal LM, computed where they are needed.

    Args:
        model: a transformers causal LM (``get_decoder()``, ``get_output_embeddings()``).
        tokenizer: its tokenizer; a BOS token (or EOS) starts every sequence.
        token_budget: most tokens (rows x padded length) in one forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, token_budget: int = 4096):
        self.model, self.tokenizer, self.token_budget = model.eval(), tokenizer, int(token_budget)
        self.decoder = model.get_decoder()
        self.unembedding = model.get_output_embeddings().weight
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokens_scored = 0

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = (hidden @ self.unembedding.T).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def logprobs(self, prefixes: Sequence[str], targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of log p(target tokens | BOS + prefix), target token counts)``, each ``[n]`` float64 / int64."""
        rows = [([self.bos] + self.ids(prefix), self.ids(target)) for prefix, target in zip(prefixes, targets)]
        totals = torch.zeros(len(rows), dtype=torch.float64)
        counts = torch.tensor([len(target) for _, target in rows], dtype=torch.int64)
        order = sorted(range(len(rows)), key=lambda index: len(rows[index][0]) + len(rows[index][1]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * sum(map(len, rows[order[end]])) <= self.token_budget:
                end += 1
            batch = [rows[index] for index in order[start:end]]
            length = max(len(prefix) + len(target) for prefix, target in batch)
            ids = torch.full((len(batch), length), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            row_of, position_of, target_of = [], [], []
            for row, (prefix, target) in enumerate(batch):
                sequence = prefix + target
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
                for offset, token in enumerate(target):
                    row_of.append(row)
                    position_of.append(len(prefix) + offset - 1)
                    target_of.append(token)
            hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            self.tokens_scored += int(mask.sum())
            log_p = self._log_softmax(hidden[row_of, position_of])[torch.arange(len(target_of)), target_of].double()
            sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, torch.tensor(row_of, dtype=torch.long), log_p)
            totals[torch.tensor(order[start:end])] = sums
            start = end
        return totals, counts

    @torch.no_grad()
    def suffix_logprobs(self, prefix: str, suffixes: Sequence[str]) -> torch.Tensor:
        """``log p(suffix | BOS + prefix)`` ``[n]`` for every suffix; the prefix runs once and its cache is shared."""
        prefix_ids = torch.tensor([[self.bos] + self.ids(prefix)])
        output = self.decoder(input_ids=prefix_ids, use_cache=True)
        cache, last = output.past_key_values, output.last_hidden_state[0, -1]
        suffix_ids = [self.ids(suffix) for suffix in suffixes]
        n, length, prefix_length = len(suffixes), max(map(len, suffix_ids)), prefix_ids.shape[1]
        ids = torch.full((n, length), self.pad, dtype=torch.long)
        mask = torch.zeros((n, prefix_length + length), dtype=torch.long)
        mask[:, :prefix_length] = 1
        for row, suffix in enumerate(suffix_ids):
            ids[row, : len(suffix)] = torch.tensor(suffix)
            mask[row, prefix_length : prefix_length + len(suffix)] = 1
        cache.batch_repeat_interleave(n)
        positions = torch.arange(prefix_length, prefix_length + length).expand(n, -1)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, **{_cache_argument(self.decoder): cache}).last_hidden_state
        self.tokens_scored += prefix_length + int(mask[:, prefix_length:].sum())
        # the state predicting suffix token j: the prefix's last state for j = 0, else suffix state j - 1
        states = torch.cat([last.expand(n, 1, -1), hidden[:, :-1]], dim=1)
        log_p = self._log_softmax(states).gather(-1, ids[..., None])[..., 0].double()
        return (log_p * mask[:, prefix_length:]).sum(dim=-1)


def _pmi_per_token(scorer: LikelihoodScorer, evidence_prefixes: Sequence[str], empty_prefix: str, targets: Sequence[str]) -> torch.Tensor:
    """``[log p(" t" | evidence) - log p(" t" | empty)] / n_tokens(t)`` per row; each distinct target's prior once."""
    spaced = [" " + target for target in targets]
    conditioned, counts = scorer.logprobs(evidence_prefixes, spaced)
    distinct = list(dict.fromkeys(spaced))
    prior, _ = scorer.logprobs([empty_prefix] * len(distinct), distinct)
    lookup = dict(zip(distinct, prior.tolist()))
    return (conditioned - torch.tensor([lookup[target] for target in spaced], dtype=torch.float64)) / counts.clamp_min(1)


def explanation_pmi(scorer: LikelihoodScorer, explanations: Sequence[str], contexts: Sequence[str]) -> torch.Tensor:
    """Per-token PMI ``[n]`` of each explanation as what its context is about (detection: > threshold = active)."""
    return _pmi_per_token(scorer, [TEXT_ABOUT.format(context) for context in contexts], TEXT_ABOUT.format(""), explanations)


def marked_words_pmi(scorer: LikelihoodScorer, explanations: Sequence[str], marked_words: Sequence[str]) -> torch.Tensor:
    """Per-token PMI ``[n]`` of each explanation as what an excerpt's marked words are about (fuzzing)."""
    return _pmi_per_token(scorer, [MARKED_ABOUT.format(words) for words in marked_words], MARKED_ABOUT.format(""), explanations)


def rank_candidates(scorer: LikelihoodScorer, contexts: Sequence[str], candidates: Sequence[str]) -> torch.Tensor:
    """PMI ``[n_candidates]`` of each candidate as what all ``contexts`` are about (sum over its tokens)."""
    suffixes = [" " + candidate for candidate in candidates]
    listed = "".join(f"- {context}\n" for context in contexts)
    return scorer.suffix_logprobs(LIST_ABOUT.format(listed), suffixes) - scorer.suffix_logprobs(LIST_ABOUT.format("- \n"), suffixes)


def concept_gain(scorer: LikelihoodScorer, concepts: Sequence[str], texts_a: Sequence[str], texts_b: Sequence[str]) -> torch.Tensor:
    """``[n]`` nats: how much more likely " concept" is as what text B is about than as what text A is about."""
    prompts = [TEXT_ABOUT.format(text) for text in [*texts_a, *texts_b]]
    log_p, _ = scorer.logprobs(prompts, [" " + concept for concept in [*concepts, *concepts]])
    return log_p[len(concepts):] - log_p[: len(concepts)]
