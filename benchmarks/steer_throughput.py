"""Steering-stage generation throughput: (feature, prompt) steered generations per second, batched
(the stage's path: whole features x all prompts per batch, KV cache, left padding) against
one (feature, prompt) at a time through the same code.

Uses a Pythia-70M-shaped GPT-NeoX (d_model 512, 6 layers, 8 heads, d_mlp 2048, vocab 50304, random
weights) loaded through ``TransformerBridge`` like the stage does, steering at
``blocks.3.hook_resid_post`` with random unit directions, sampling (temperature 0.7, top_p 0.9; or
``--greedy``). The forward passes cost what trained weights cost; sampling is the worst case, since a
random model's next-token distribution is nearly flat and every row's nucleus needs the full sort of
the vocabulary. The batched figure includes the unsteered original of every prompt and decoding to
text; judging is not included. Target: batched >= 10x one-at-a-time.

    python benchmarks/steer_throughput.py            # GPU: 256 features x 8 prompts x 30 tokens
    python benchmarks/steer_throughput.py --small    # CPU: 16 features x 8 prompts x 10 tokens
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.subject.model import bos_token_id, load_subject_model
from sae_pipeline.subject.steering import (
    SamplingSettings,
    generate_continuations,
    prompt_token_ids,
    sampling_uniforms,
    steer_features,
)
from sae_pipeline.subject.tiny import build_gpt_neox, build_tokenizer

PROMPTS = [
    "The most important thing is",
    "A common example of",
    "Many people believe that",
    "In recent years,",
    "The main reason for",
    "It is well known that",
    "According to experts,",
    "One thing that matters is",
]
HOOK = "blocks.3.hook_resid_post"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(folder: Path, shape: dict, vocab_size: int) -> None:
    """Save a random GPT-NeoX of ``shape`` and a small BPE tokenizer (ids it lacks decode to nothing)."""
    tokenizer = build_tokenizer(PROMPTS * 20, vocab_size=400)
    model = build_gpt_neox(vocab_size, context_size=2048, seed=0, **shape)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=256, help="features steered in the batched run")
    parser.add_argument("--single-pairs", type=int, default=32, help="(feature, prompt) pairs timed one at a time")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512, help="rows per batch (the stage's steer.batch_size)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--small", action="store_true", help="CPU-sized run: 16 features, 8 single pairs, 10 tokens")
    args = parser.parse_args()
    if args.small:
        args.features, args.single_pairs, args.new_tokens, args.batch_size = 16, 8, 10, 128
    device = resolve_device("auto")
    shape = dict(d_model=512, n_layers=6, n_heads=8, d_mlp=2048)
    sampling = SamplingSettings(greedy=args.greedy, temperature=0.7, top_p=0.9)

    with tempfile.TemporaryDirectory() as scratch:
        build_model(Path(scratch), shape, vocab_size=50304)
        bridge = load_subject_model(scratch, device=device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: GPT-NeoX {shape}, vocab 50304, fp32; hook {HOOK}; {args.new_tokens} new tokens; {'greedy' if args.greedy else 'sampling (T 0.7, top_p 0.9)'}")

    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(args.features, shape["d_model"], generator=generator)
    directions /= directions.norm(dim=-1, keepdim=True)
    strengths = np.full(args.features, 5.0)

    # warm-up (kernels, allocator)
    steer_features(bridge, HOOK, PROMPTS, directions[:2], strengths[:2], 2, sampling, sampling_seed=0, batch_size=args.batch_size)
    synchronize()
    start = time.perf_counter()
    texts = steer_features(bridge, HOOK, PROMPTS, directions, strengths, args.new_tokens, sampling, sampling_seed=0, batch_size=args.batch_size)
    synchronize()
    batched_seconds = time.perf_counter() - start
    pairs = args.features * len(PROMPTS)
    assert len(texts.steered) == args.features
    batched_rate = pairs / batched_seconds

    tokens = prompt_token_ids(bridge.tokenizer, PROMPTS, bos_token_id(bridge))
    uniforms = sampling_uniforms(0, len(PROMPTS), args.new_tokens)
    synchronize()
    start = time.perf_counter()
    for pair in range(args.single_pairs):
        feature, prompt = pair // len(PROMPTS), pair % len(PROMPTS)
        vector = (strengths[feature] * directions[feature]).unsqueeze(0)
        generate_continuations(bridge, HOOK, [tokens[prompt]], args.new_tokens, sampling, vector, uniforms[prompt : prompt + 1], bos_token_id(bridge))
    synchronize()
    single_seconds = time.perf_counter() - start
    single_rate = args.single_pairs / single_seconds

    print(f"batched:          {pairs} (feature, prompt) pairs in {batched_seconds:.2f} s = {batched_rate:.1f} pairs/s "
          f"(batch {args.batch_size} rows, {args.batch_size // len(PROMPTS)} features per batch)")
    print(f"one at a time:    {args.single_pairs} pairs in {single_seconds:.2f} s = {single_rate:.2f} pairs/s")
    print(f"speed-up:         {batched_rate / single_rate:.1f}x (target >= 10x)")
    print(f"generated tokens: batched {batched_rate * args.new_tokens:.0f} tokens/s, one at a time {single_rate * args.new_tokens:.0f} tokens/s")


if __name__ == "__main__":
    main()
