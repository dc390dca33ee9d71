"""Autointerp throughput: judge-bound features/minute and example-mining time.

1. Features per minute through the LLM backend (explain + detection + fuzzing requests, real
   ``openai`` client over HTTP) against the local fake OpenAI-compatible server with a simulated
   latency per request, at judge concurrency 1, 8 and 32. Fresh response cache for each run, so every
   request is sent.
2. Example mining (one streaming pass: read shards, encode with a Top-k SAE, keep top / sampled /
   non-activating contexts of every latent) over N cached tokens of a synthetic cache.

Prints one line per figure. On the GPU machine (the issue's target: 10M tokens, Pythia-70M-sized)::

    python benchmarks/autointerp_throughput.py --tokens 10000000 --d-model 512 --d-sae 16384 --k 40 --device cuda

On a CPU (small)::

    python benchmarks/autointerp_throughput.py --small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from sae_pipeline.data.checkpoint import load_sae, save_sae  # noqa: E402
from sae_pipeline.data.shards import (  # noqa: E402
    ActivationStore,
    ShardData,
    write_manifest,
    write_numbered_shard,
    write_sequences,
)
from sae_pipeline.features.contexts import TokenText  # noqa: E402
from sae_pipeline.features.mining import ContextSet, FeatureExamples, mine_examples  # noqa: E402
from sae_pipeline.judges.backends import LLMBackend  # noqa: E402
from sae_pipeline.judges.client import JudgeClient  # noqa: E402
from sae_pipeline.runtime.devices import resolve_device  # noqa: E402
from sae_pipeline.settings import (
    JudgeSettings,  # noqa: E402
    MiningSettings,  # noqa: E402
)
from sae_pipeline.stages.autointerp import interpret_features  # noqa: E402
from tests.fake_openai_server import FakeOpenAIServer, autointerp_responder  # noqa: E402

AUTOINTERP_SETTINGS = {
    "explain": {"n_top": 10, "n_per_quantile": 2},
    "score": {"n_quantiles": 4, "n_per_quantile": 3, "contexts_per_prompt": 10, "min_activating_contexts": 8},
}


class WordTokenizer:
    """Stands in for a Hugging Face tokenizer: token i decodes to `` w<i>``."""

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(f" w{int(i)}" for i in ids)


def synthetic_examples(n_features: int, window: int, context_size: int, n_sequences: int, seed: int = 0) -> dict[int, FeatureExamples]:
    """Mined-looking examples: 20 top, 100 sampled activating and 20 non-activating contexts per feature."""
    rng = np.random.default_rng(seed)

    def contexts(n: int, active: bool) -> ContextSet:
        activations = np.zeros((n, window), np.float32)
        if active:
            activations[:, window // 2] = rng.uniform(0.5, 5.0, n)
        return ContextSet(rng.integers(0, n_sequences, n), rng.integers(1, context_size - window, n), activations)

    return {f: FeatureExamples(f, contexts(20, True), contexts(100, True), contexts(20, False), 120, 5.0) for f in range(n_features)}


def judge_throughput(n_features: int, concurrency: int, latency_s: float) -> tuple[float, int]:
    """(features per minute, requests sent) for the LLM backend at one judge concurrency."""
    sequences = np.random.default_rng(1).integers(0, 5000, size=(256, 64)).astype(np.int32)
    examples = synthetic_examples(n_features, 17, 64, 256)
    with FakeOpenAIServer(responder=autointerp_responder, latency_s=latency_s) as server, tempfile.TemporaryDirectory() as cache_dir:
        client = JudgeClient(
            JudgeSettings(base_url=server.base_url, model="fake-judge", api_key_env=None, cache_dir=cache_dir, max_concurrency=concurrency, timeout_s=30)
        )
        backend = LLMBackend(client, TokenText(WordTokenizer()))
        start = time.perf_counter()
        interpret_features(examples, sequences, backend, AUTOINTERP_SETTINGS, 0, [])
        elapsed = time.perf_counter() - start
        return n_features / elapsed * 60.0, server.completion_requests


def build_cache(root: Path, tokens: int, d_model: int, context_size: int, rows_per_shard: int, device: str) -> None:
    """A synthetic cache of ``tokens`` rows (random fp16 activations, random token ids)."""
    n_sequences = tokens // context_size
    generator = torch.Generator(device=device).manual_seed(0)
    sequences = np.random.default_rng(0).integers(1, 50000, size=(n_sequences, context_size)).astype(np.int32)
    sequences[:, 0] = 0
    write_sequences(root / "tokens.parquet", sequences)
    sequences_per_shard = max(1, rows_per_shard // context_size)
    shards = []
    for index, first in enumerate(range(0, n_sequences, sequences_per_shard)):
        count = min(sequences_per_shard, n_sequences - first)
        rows = count * context_size
        activations = torch.randn((rows, d_model), generator=generator, device=device).half().cpu().numpy()
        positions = np.tile(np.arange(context_size, dtype=np.int32), count)
        data = ShardData(activations, np.repeat(np.arange(first, first + count), context_size), positions, sequences[first : first + count].reshape(-1), positions == 0)
        shards.append(write_numbered_shard(root, index, data, "float16"))
    write_manifest(
        root, model="synthetic", hook_name="blocks.0.hook_resid_post", dtype="float16", d_model=d_model, context_size=context_size,
        rows_per_shard=rows_per_shard, shards=shards, tokens="tokens.parquet", bos_token_id=0,
    )


def mining_time(args: argparse.Namespace, device: str) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        root = Path(folder)
        start = time.perf_counter()
        build_cache(root / "cache", args.tokens, args.d_model, args.context_size, args.rows_per_shard, device)
        print(f"synthetic cache: {args.tokens:,} tokens x d_model {args.d_model} fp16 written in {time.perf_counter() - start:.1f} s", flush=True)
        generator = torch.Generator().manual_seed(0)
        w_dec = torch.randn(args.d_sae, args.d_model, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        save_sae(
            root / "sae",
            {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(args.d_sae), "b_dec": torch.zeros(args.d_model)},
            {"architecture": "topk", "k": args.k},
        )
        store = ActivationStore(root / "cache")
        sae = load_sae(root / "sae", device)
        settings = MiningSettings(batch_rows=args.batch_rows, device=device)
        features = list(range(args.d_sae))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        examples = mine_examples(store, sae, features, settings, random_seed=0, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        found = np.mean([len(e.top) for e in examples.values()])
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else ""
        print(
            f"mining: {store.n_rows:,} tokens, d_model {args.d_model}, d_sae {args.d_sae} (top-{args.k}), all {len(features)} latents, "
            f"device {device}, batch_rows {args.batch_rows}: {elapsed:.2f} s = {store.n_rows / elapsed / 1e6:.3f} M tokens/s "
            f"(mean top contexts found per latent {found:.1f}{memory})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized defaults: 200k tokens, d_model 64, d_sae 1024, 32 features")
    parser.add_argument("--tokens", type=int, default=None, help="cached tokens to mine (default 10M, or 200k with --small)")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--d-sae", type=int, default=None)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--rows-per-shard", type=int, default=65536)
    parser.add_argument("--batch-rows", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--features", type=int, default=None, help="features for the judge throughput runs (default 128, 32 with --small)")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated seconds per judge request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--skip-judge", action="store_true")
    parser.add_argument("--skip-mining", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the synthetic cache is written (default: system temp)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.tokens = args.tokens or (200_000 if args.small else 10_000_000)
    args.d_model = args.d_model or (64 if args.small else 512)
    args.d_sae = args.d_sae or (1024 if args.small else 16384)
    args.features = args.features or (32 if args.small else 128)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else f", {torch.get_num_threads()} CPU threads"), flush=True)

    if not args.skip_judge:
        for concurrency in args.concurrency:
            per_minute, requests = judge_throughput(args.features, concurrency, args.latency)
            print(
                f"judge: {args.features} features, {requests} requests ({requests / args.features:.1f}/feature), simulated latency {args.latency * 1000:.0f} ms, "
                f"concurrency {concurrency}: {per_minute:,.0f} features/minute",
                flush=True,
            )
    if not args.skip_mining:
        mining_time(args, device)


if __name__ == "__main__":
    main()
