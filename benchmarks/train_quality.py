"""The train stage end to end on planted features: each decoder mode trains as well, and how fast.

Writes a Parquet cache of synthetic activations (every row is ``--active`` of ``--features`` random
unit directions with magnitudes in [1, 3], a constant offset and a little noise), then runs the real
stage, ``sae_pipeline.stages.train.train_saes`` (loader, logging steps, checkpoints, held-out evaluation),
once per decoder mode for ``--seeds`` fused seeds and once for the first seed alone. Prints per run:
wall time, tokens/s, held-out FVU, L0, dead fraction and the mean over planted features of the best
cosine with a decoder row (1.0 = every planted feature recovered).

    python benchmarks/train_quality.py                      # GPU size: d=256, 4096 features, k=16, 8 M tokens
    python benchmarks/train_quality.py --small              # CPU size
    python benchmarks/train_quality.py --widths 4096,16384 --seeds 1   # SAEs of two widths on the same planted features
    python benchmarks/train_quality.py --architecture batchtopk --seeds 1   # BatchTopK: candidates (kernels) against dense

The kernels mode on CUDA is the sparse update (weight gradients from the selected entries, fused
projection / clipping / Adam / renormalisation); dense is autograd with dense products and torch's Adam.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_pipeline.data.checkpoint import load_sae_arrays  # noqa: E402
from sae_pipeline.data.loader import write_synthetic_cache  # noqa: E402
from sae_pipeline.runtime.devices import resolve_device  # noqa: E402
from sae_pipeline.stages.train import train_saes  # noqa: E402

FULL = dict(d_in=256, features=4096, active=16, rows=1_048_576, tokens=8_388_608, batch=4096)
SMALL = dict(d_in=32, features=128, active=4, rows=32_768, tokens=262_144, batch=512)
MODES = {"kernels": "kernels", "dense": False, "embedding_bag": True}


def planted_activations(sizes: dict, device: torch.device, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [rows, d_in] float16, dictionary [features, d_in])``, generated in chunks on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dictionary = torch.randn(sizes["features"], sizes["d_in"], generator=generator, device=device)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chunks = []
    for start in range(0, sizes["rows"], 65536):
        rows = min(65536, sizes["rows"] - start)
        chosen = torch.rand(rows, sizes["features"], generator=generator, device=device).topk(sizes["active"], dim=1).indices
        magnitudes = 1.0 + 2.0 * torch.rand(rows, sizes["active"], generator=generator, device=device)
        x = torch.einsum("ra,rad->rd", magnitudes, dictionary[chosen]) + 0.4
        x += 0.01 * torch.randn(rows, sizes["d_in"], generator=generator, device=device)
        chunks.append(x.half().cpu().numpy())
    return np.concatenate(chunks), dictionary.cpu().numpy()


def recovery(dictionary: np.ndarray, decoder: np.ndarray) -> float:
    """Mean over planted features of the largest |cosine| with any decoder row."""
    decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    best = np.zeros(len(dictionary))
    for start in range(0, len(dictionary), 1024):
        best[start:start + 1024] = np.abs(dictionary[start:start + 1024] @ decoder.T).max(axis=1)
    return float(best.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized problem")
    parser.add_argument("--modes", default="kernels,dense", help=f"comma-separated decoder modes: {', '.join(MODES)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds fused in one run (plus a run of the first seed alone)")
    parser.add_argument("--widths", help="comma-separated SAE widths (d_sae) to train; default: as many latents as planted features")
    parser.add_argument("--tokens", type=int, help="training tokens per run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--architecture", default="topk", help="topk, batchtopk or matryoshka_batchtopk (prefixes at 1/8 and 1/2 of the width)")
    args = parser.parse_args()
    sizes = dict(SMALL if args.small else FULL)
    if args.tokens:
        sizes["tokens"] = args.tokens
    widths = [int(width) for width in args.widths.split(",")] if args.widths else [sizes["features"]]
    device = torch.device(resolve_device(args.device))
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}; sizes {sizes}")

    folder = Path(tempfile.mkdtemp(prefix="train_quality_"))
    try:
        start = time.perf_counter()
        x, dictionary = planted_activations(sizes, device)
        cache = write_synthetic_cache(folder / "cache", x, context_size=128, rows_per_shard=131072, dtype="float16")
        print(f"wrote {len(x)} rows of planted activations in {time.perf_counter() - start:.1f} s")
        settings = dict(architecture=args.architecture, k=sizes["active"], batch_size=sizes["batch"],
                        total_tokens=sizes["tokens"], lr=4e-3, lr_scale_with_width=False, warmup_steps=100, decay_fraction=0.2,
                        holdout_tokens=min(65536, sizes["rows"] // 8), shuffle_buffer_rows=262144, dead_window_tokens=1_000_000, log_every=200,
                        checkpoint_every=1000, device=str(device))
        summary = []
        for width, mode in ((width, mode) for width in widths for mode in modes):
            for seeds in ([list(range(args.seeds)), [0]] if args.seeds > 1 else [[0]]):
                run = folder / f"{width}-{mode}-{len(seeds)}"
                start = time.perf_counter()
                variant = {**settings, "d_sae": width, "sparse_decoder": MODES[mode], "matryoshka_prefixes": [width // 8, width // 2]}
                metrics = train_saes(cache, run / "out", variant, seeds, run / "state", progress=False)
                elapsed = time.perf_counter() - start
                for seed in seeds:
                    found = recovery(dictionary, load_sae_arrays(run / "out" / f"seed{seed}")["W_dec"])
                    summary.append((width, mode, len(seeds), seed, metrics[seed]["fvu"], found, metrics[seed]["l0"], metrics[seed]["dead_fraction"]))
                    print(f"d_sae {width:6d} {mode:<13} {len(seeds)} seed(s) in one job: {elapsed:6.1f} s for the stage, "
                          f"training loop (with checkpoints) {metrics[seed]['tokens_seen'] / metrics[seed]['wall_time_s'] / 1e6:5.2f} M tokens/s; "
                          f"seed {seed}: FVU {metrics[seed]['fvu']:.4f}, L0 {metrics[seed]['l0']:.2f}, "
                          f"dead {metrics[seed]['dead_fraction']:.4f}, planted features recovered (mean max cos) {found:.3f}"
                          + (f"; selection {metrics[seed]['batch_topk_selection']}, capped tokens {metrics[seed].get('batch_topk_capped_tokens', 0)}"
                             if "batch_topk_selection" in metrics[seed] else ""))
        print("| d_sae | mode | seeds in job | seed | held-out FVU | planted recovered (mean max cos) | L0 | dead |")
        print("|---|---|---|---|---|---|---|---|")
        for width, mode, n_seeds, seed, fvu, found, l0, dead in summary:
            print(f"| {width} | {mode} | {n_seeds} | {seed} | {fvu:.4f} | {found:.3f} | {l0:.2f} | {dead:.4f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
