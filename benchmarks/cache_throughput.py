"""Cache-stage throughput: text -> tokens -> forward to the hook -> finished Parquet shards.

Uses a Pythia-70M-shaped GPT-NeoX (d_model 512, 6 layers, 8 heads, d_mlp 2048, vocab ~50k; random
weights: the cost is the same) with a BPE tokenizer trained on the corpus, hook
``blocks.3.hook_resid_post``, float16 activations. Prints tokens/s end to end and the split between
tokenization, forward pass and writing.

    python benchmarks/cache_throughput.py --corpus results/lm/corpus/documents.jsonl --tokens 20000000   # GPU
    python benchmarks/cache_throughput.py --corpus results/lm/corpus/documents.jsonl --small             # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sae_pipeline.data.corpus import load_documents
from sae_pipeline.data.shards import ShardData, write_shard
from sae_pipeline.runtime.devices import resolve_device
from sae_pipeline.stages.cache import (
    HookActivations,
    cache_activations,
    tokenize_corpus,
)
from sae_pipeline.subject.model import load_subject_model
from sae_pipeline.subject.tiny import build_gpt_neox, build_tokenizer


def repeated_corpus(texts: list[str], target_characters: int, folder: Path) -> Path:
    """A JSON-lines corpus of at least ``target_characters``, repeating the documents ``texts``."""
    output = folder / "documents.jsonl"
    written = 0
    with open(output, "w") as stream:
        while written < target_characters:
            for text in texts:
                stream.write(json.dumps({"text": text}) + "\n")
                written += len(text)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="JSON-lines documents (the export_corpus output)")
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rows-per-shard", type=int, default=1 << 20)
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--small", action="store_true", help="CPU-sized run: d_model 64, 2 layers, 200k tokens")
    args = parser.parse_args()
    device = resolve_device("auto")
    if args.small:
        args.tokens, args.vocab_size, args.batch_size, args.rows_per_shard = 200_000, 4096, 64, 1 << 15
        shape = dict(d_model=64, n_layers=4, n_heads=4, d_mlp=256)
    else:
        shape = dict(d_model=512, n_layers=6, n_heads=8, d_mlp=2048)
    work = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    sample = [json.loads(line)["text"] for line in args.corpus.read_text().splitlines()]
    corpus_file = repeated_corpus(sample, args.tokens * 5, work)
    corpus_settings = {"source": "text_files", "max_documents": None}

    started = time.perf_counter()
    tokenizer = build_tokenizer(sample, args.vocab_size)
    model = build_gpt_neox(len(tokenizer), context_size=args.context_size, seed=0, **shape)
    model_folder = work / "model"
    model.save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    print(f"setup (tokenizer training, model init): {time.perf_counter() - started:.1f} s; device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))

    settings = {"context_size": args.context_size, "max_tokens": args.tokens, "batch_size": args.batch_size,
                "dtype": "float16", "rows_per_shard": args.rows_per_shard, "device": device}
    hook = "blocks.3.hook_resid_post"
    cache_dir = work / "cache"

    started = time.perf_counter()
    manifest = cache_activations(str(model_folder), hook, corpus_settings, str(corpus_file), str(cache_dir / "manifest.json"), settings)
    end_to_end = time.perf_counter() - started
    n_tokens = manifest["n_rows"]

    # Split: tokenization alone, forward alone (same batches), writing alone (same shard sizes, same pool).
    bridge = load_subject_model(str(model_folder), device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    started = time.perf_counter()
    sequences = tokenize_corpus(load_documents(corpus_settings, str(corpus_file)), bridge.tokenizer, args.context_size, args.tokens, 0)
    tokenize_s = time.perf_counter() - started

    forward = HookActivations(bridge, hook)
    batches = [torch.from_numpy(sequences[start : start + args.batch_size].astype(np.int64)) for start in range(0, len(sequences), args.batch_size)]
    forward(batches[0].to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        forward(batch.to(device, non_blocking=True))
    if device == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - started

    rows = args.rows_per_shard
    block = np.random.default_rng(0).standard_normal((rows, shape["d_model"])).astype(np.float16)
    n_shards = -(-n_tokens // rows)
    data = ShardData(block, np.zeros(rows, np.int64), np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, bool))
    write_dir = work / "write_only"
    write_dir.mkdir()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda index: write_shard(write_dir / f"s{index}.parquet", data, "float16"), range(n_shards)))
    write_s = time.perf_counter() - started

    print(f"tokens cached: {n_tokens:,} (context {args.context_size}, d_model {shape['d_model']}, float16, {len(manifest['shards'])} shards)")
    print(f"end to end (text -> finished Parquet): {end_to_end:.2f} s = {n_tokens / end_to_end / 1e6:.3f} M tokens/s")
    print(f"  tokenization alone: {tokenize_s:.2f} s = {n_tokens / tokenize_s / 1e6:.3f} M tokens/s")
    print(f"  forward to the hook alone: {forward_s:.2f} s = {n_tokens / forward_s / 1e6:.3f} M tokens/s")
    print(f"  Parquet writing alone (4 threads, checksum included): {write_s:.2f} s = {n_shards * rows / write_s / 1e6:.3f} M rows/s")
    print(f"  cache stage wall time recorded in manifest: {manifest['wall_time_s']:.2f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
