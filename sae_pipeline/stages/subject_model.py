"""Subject-model stage: train the small offline GPT-NeoX on the corpus and save it as a Hugging Face folder."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from sae_pipeline.data.atomic import atomic_path
from sae_pipeline.data.corpus import is_heldout, load_documents, pack_sequences
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.settings import CorpusSettings, TinyModelSettings
from sae_pipeline.subject.tiny import (
    build_gpt_neox,
    build_tokenizer,
    unigram_cross_entropy,
)

logger = logging.getLogger(__name__)


def train_subject_model(documents_path: str, corpus_settings: CorpusSettings | Mapping[str, Any], output_dir: str, settings: TinyModelSettings | Mapping[str, Any]) -> dict:
    """Train the offline subject model on the corpus and save it as a Hugging Face folder.

    The folder (``config.json``, ``model.safetensors``, ``tokenizer.json``...) loads with
    ``TransformerBridge.boot_transformers(output_dir)``. ``training_metrics.json`` inside it records
    held-out next-token loss (nats/token; BOS targets excluded) against the unigram baseline.

    Returns the metrics dictionary.
    """
    corpus_settings = CorpusSettings.from_mapping(corpus_settings)
    settings = TinyModelSettings.from_mapping(settings)
    started = time.time()
    documents = list(load_documents(corpus_settings, documents_path))
    heldout_fraction = float(corpus_settings.heldout_fraction)
    train_texts = [text for index, text in enumerate(documents) if not is_heldout(index, heldout_fraction)]
    heldout_texts = [text for index, text in enumerate(documents) if is_heldout(index, heldout_fraction)]
    if not heldout_texts:
        raise ValueError("corpus.heldout_fraction left no held-out documents; raise it or add documents")
    logger.info("corpus: %d training and %d held-out documents", len(train_texts), len(heldout_texts))

    tokenizer = build_tokenizer(train_texts, settings.vocab_size)
    context_size = settings.context_size
    bos = int(tokenizer.bos_token_id)
    train_sequences = pack_sequences(tokenizer(train_texts)["input_ids"], context_size, bos)
    heldout_sequences = pack_sequences(tokenizer(heldout_texts)["input_ids"], context_size, bos)
    logger.info("tokens: %d training sequences, %d held-out sequences of %d", len(train_sequences), len(heldout_sequences), context_size)

    device = resolve_device(settings.device)
    seed = settings.seed
    model = build_gpt_neox(
        len(tokenizer), settings.d_model, settings.n_layers, settings.n_heads, settings.d_mlp, context_size, seed
    ).to(device)
    steps, batch_size = settings.steps, settings.batch_size
    warmup = settings.warmup_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings.lr), weight_decay=0.01, betas=(0.9, 0.95))
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
        "settings": settings.as_dict(),
    }
    logger.info("held-out loss %.3f nats/token against unigram %.3f", heldout_loss, unigram_loss)
    with atomic_path(output_dir) as temporary:
        model.cpu().save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
