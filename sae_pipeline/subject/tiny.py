"""The small offline subject model: a GPT-NeoX (Pythia's architecture) with a byte-level BPE tokenizer,
both built here from the corpus; the unigram baseline its held-out loss is compared with."""

from __future__ import annotations

from typing import Any

import torch


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (GPT-NeoX style, ``<|endoftext|>`` as BOS/EOS, id 0) on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")



def build_gpt_neox(vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_mlp: int, context_size: int, seed: int) -> Any:
    """A randomly initialised GPT-NeoX causal LM (Pythia's architecture: rotary on 25% of dims, parallel residual)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=d_mlp,
        max_position_embeddings=context_size,
        rotary_pct=0.25,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config)



def unigram_cross_entropy(train_tokens: "Any", heldout_tokens: "Any", vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under the add-one-smoothed unigram distribution of the training tokens."""
    import numpy as np

    counts = np.bincount(np.asarray(train_tokens).reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(heldout_tokens).reshape(-1)].mean())
