"""The subject model: loading it through TransformerLens's ``TransformerBridge``, and training the
small offline GPT-NeoX that the default experiment uses in place of Pythia.

``load_subject_model`` accepts a Hugging Face Hub id (``EleutherAI/pythia-70m-deduped``, needs the
Hub) or a local Hugging Face folder (what :func:`train_subject_model` writes); both go through
``TransformerBridge.boot_transformers``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch


def hook_layer(hook_name: str) -> int:
    """Block index of a ``blocks.<i>.hook_*`` name, e.g. ``blocks.3.hook_resid_post`` -> 3."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_[a-z_]+", hook_name)
    if match is None:
        raise ValueError(f"hook name {hook_name!r} is not of the form blocks.<i>.hook_<name>")
    return int(match.group(1))


def load_subject_model(model_ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Boot a ``TransformerBridge`` from a Hub id or a local Hugging Face folder, in eval mode on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(model_ref, device=device, dtype=dtype)
    except OSError as error:
        raise OSError(
            f"could not load subject model {model_ref!r}: {error}. A Hub id needs network access to the "
            "Hugging Face Hub (or a warm HF cache); offline, use subject_model.source: train_local."
        ) from error
    bridge.eval()
    return bridge


def bos_token_id(bridge: Any) -> int:
    """The token id the pipeline puts at position 0 of every sequence."""
    tokenizer = bridge.tokenizer
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the subject model's tokenizer has neither a BOS nor an EOS token")
    return int(token_id)


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


def train_subject_model(documents_path: str, corpus_settings: dict, output_dir: str, settings: dict) -> dict:
    """Train the offline subject model on the corpus and save it as a Hugging Face folder.

    The folder (``config.json``, ``model.safetensors``, ``tokenizer.json``...) loads with
    ``TransformerBridge.boot_transformers(output_dir)``. ``training_metrics.json`` inside it records
    held-out next-token loss (nats/token; BOS targets excluded) against the unigram baseline.

    Returns the metrics dictionary.
    """
    import json
    import logging
    import math
    import time

    import numpy as np
    from tqdm import tqdm

    from sae_pipeline.atomic import atomic_path
    from sae_pipeline.config import resolve_device
    from sae_pipeline.corpus import is_heldout, load_documents, pack_sequences

    logger = logging.getLogger("sae_pipeline.subject")
    started = time.time()
    documents = list(load_documents(corpus_settings, documents_path))
    heldout_fraction = float(corpus_settings.get("heldout_fraction", 0.05))
    train_texts = [text for index, text in enumerate(documents) if not is_heldout(index, heldout_fraction)]
    heldout_texts = [text for index, text in enumerate(documents) if is_heldout(index, heldout_fraction)]
    if not heldout_texts:
        raise ValueError("corpus.heldout_fraction left no held-out documents; raise it or add documents")
    logger.info("corpus: %d training and %d held-out documents", len(train_texts), len(heldout_texts))

    tokenizer = build_tokenizer(train_texts, int(settings["vocab_size"]))
    context_size = int(settings["context_size"])
    bos = int(tokenizer.bos_token_id)
    train_sequences = pack_sequences(tokenizer(train_texts)["input_ids"], context_size, bos)
    heldout_sequences = pack_sequences(tokenizer(heldout_texts)["input_ids"], context_size, bos)
    logger.info("tokens: %d training sequences, %d held-out sequences of %d", len(train_sequences), len(heldout_sequences), context_size)

    device = resolve_device(settings.get("device", "auto"))
    seed = int(settings.get("seed", 0))
    model = build_gpt_neox(
        len(tokenizer), int(settings["d_model"]), int(settings["n_layers"]), int(settings["n_heads"]), int(settings["d_mlp"]), context_size, seed
    ).to(device)
    steps, batch_size = int(settings["steps"]), int(settings["batch_size"])
    warmup = int(settings.get("warmup_steps", 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
    )
    generator = np.random.default_rng(seed)
    train_tensor = torch.from_numpy(train_sequences.astype(np.int64))

    def sequence_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch).logits[:, :-1]
        targets = batch[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        keep = (targets != bos).reshape(-1).float()
        return (losses * keep).sum() / keep.sum()

    model.train()
    progress = tqdm(range(steps), desc="subject model", unit="step", mininterval=2.0)
    for step in progress:
        batch = train_tensor[generator.integers(0, len(train_tensor), batch_size)].to(device)
        loss = sequence_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}")
            logger.info("step %d loss %.4f", step, loss.item())

    model.eval()
    with torch.no_grad():
        heldout_tensor = torch.from_numpy(heldout_sequences.astype(np.int64))
        losses = [sequence_loss(heldout_tensor[start : start + 64].to(device)).item() for start in range(0, len(heldout_tensor), 64)]
    heldout_loss = float(np.mean(losses))
    body = lambda sequences: sequences[:, 1:][sequences[:, 1:] != bos]  # noqa: E731 - tokens scored by the LM
    unigram_loss = unigram_cross_entropy(body(train_sequences), body(heldout_sequences), len(tokenizer))
    metrics = {
        "heldout_loss_nats": heldout_loss,
        "unigram_baseline_loss_nats": unigram_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "unigram_perplexity": math.exp(unigram_loss),
        "n_parameters": int(sum(parameter.numel() for parameter in model.parameters())),
        "train_tokens_seen": steps * batch_size * context_size,
        "train_sequences": int(len(train_sequences)),
        "heldout_sequences": int(len(heldout_sequences)),
        "wall_time_s": time.time() - started,
        "settings": settings,
    }
    logger.info("held-out loss %.3f nats/token against unigram %.3f", heldout_loss, unigram_loss)
    with atomic_path(output_dir) as temporary:
        model.cpu().save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def ce_loss_with_replacement(
    bridge: Any,
    tokens: torch.Tensor,
    hook_name: str,
    replace_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    batch_size: int = 32,
    keep_first_position: bool = True,
) -> float:
    """Mean next-token cross-entropy (nats/token) of the subject model with the activation at ``hook_name`` replaced.

    Args:
        bridge: a ``TransformerBridge`` (see :func:`load_subject_model`).
        tokens: ``[n_sequences, seq_len]`` token ids (position 0 is the BOS token, as in the cache).
        hook_name: e.g. ``blocks.2.hook_resid_post``.
        replace_fn: maps the hook activation ``[batch, seq_len, d_model]`` to its replacement (same shape),
            e.g. an SAE reconstruction or ``torch.zeros_like`` (zero ablation); None gives the clean loss.
        batch_size: sequences per forward pass.
        keep_first_position: leave the position-0 (BOS) activation unchanged, as SAEs are trained without
            BOS rows; every other position gets the replacement.

    Returns:
        The cross-entropy averaged over all ``n_sequences * (seq_len - 1)`` predicted tokens.
    """

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        replacement = replace_fn(activation).to(activation.dtype)
        if keep_first_position:
            replacement = torch.cat([activation[:, :1], replacement[:, 1:]], dim=1)
        return replacement

    device = next(bridge.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
            hooks = [(hook_name, hook)] if replace_fn is not None else []
            per_token = bridge.run_with_hooks(batch, fwd_hooks=hooks, return_type="loss", loss_per_token=True)
            total_loss += float(per_token.double().sum())
            total_tokens += per_token.numel()
    if total_tokens == 0:
        raise ValueError("ce_loss_with_replacement: no tokens to predict (need sequences of length >= 2)")
    return total_loss / total_tokens


def ce_loss_recovered(clean_loss: float, replaced_loss: float, zero_ablation_loss: float) -> float:
    """Share of the zero-ablation loss increase that the replacement recovers: (zero - replaced) / (zero - clean).

    1 means the replacement is as good as the clean activation, 0 as bad as zeroing it. Returns NaN when
    zero ablation does not change the loss (the ratio is undefined).
    """
    gap = zero_ablation_loss - clean_loss
    if abs(gap) < 1e-12:
        return float("nan")
    return (zero_ablation_loss - replaced_loss) / gap
