"""Time feature matching of 3 seeds of 16,384-latent SAEs (d = 512), the size the paper matches, and the
stability measures computed on its result (``--seeds 5`` for five seeds).

Target (issue 4): under 60 s per seed pair on the GPU machine; the CPU figure is reported.

The dictionaries are synthetic but shaped like trained SAEs: every seed keeps a permuted, noisy copy
of a share of a common dictionary (``--shared-fraction``) and fills the rest with its own random
directions; encoder directions are the decoder directions plus noise. What the timing depends on is
the size and how many rows have a clear partner, not where the directions came from.

    python benchmarks/match_speed.py                  # full size on CUDA when present, else CPU
    python benchmarks/match_speed.py --small          # 2,048 latents: a quick check
    python benchmarks/match_speed.py --compare-dense  # also time scipy's dense linear_sum_assignment
                                                      # on one similarity matrix and check equal totals

Prints one line per stage and a summary; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_pipeline.runtime.devices import resolve_device  # noqa: E402
from sae_pipeline.stability.assignment import max_similarity_matching  # noqa: E402
from sae_pipeline.stability.matching import (  # noqa: E402
    absolute_cosine,
    match_dictionaries,
    unit_rows,
)
from sae_pipeline.stability.measures import stability_measures  # noqa: E402


def synthetic_dictionaries(n_latents: int, d: int, n_seeds: int, shared_fraction: float, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per seed ``[n_latents, d]`` decoder and encoder directions with a common core (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(n_latents, d, generator=generator)
    n_shared = int(shared_fraction * n_latents)
    decoders, encoders = [], []
    for _ in range(n_seeds):
        decoder = torch.randn(n_latents, d, generator=generator)
        decoder[:n_shared] = common[:n_shared] + 0.4 * torch.randn(n_shared, d, generator=generator)
        decoder = decoder[torch.randperm(n_latents, generator=generator)]
        encoder = decoder + 0.5 * torch.randn(n_latents, d, generator=generator)
        decoders.append(decoder)
        encoders.append(encoder)
    return decoders, encoders


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shared-fraction", type=float, default=0.5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--solver", default="auto", choices=["auto", "dense", "sparse"])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="2,048 latents")
    parser.add_argument("--compare-dense", action="store_true", help="also time scipy's dense solver on one matrix")
    args = parser.parse_args()
    n_latents = 2048 if args.small else args.latents
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device {device} ({name}), {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"{args.seeds} seeds x {n_latents} latents x d={args.d}, shared fraction {args.shared_fraction}, solver {args.solver}")

    decoders, encoders = synthetic_dictionaries(n_latents, args.d, args.seeds, args.shared_fraction)

    # One pair, stage by stage.
    started = time.perf_counter()
    unit_a, unit_b = unit_rows(decoders[0], device), unit_rows(decoders[1], device)
    similarity = absolute_cosine(unit_a, unit_b)
    synchronize(device)
    similarity_s = time.perf_counter() - started
    print(f"one decoder similarity matrix ({n_latents}^2): {similarity_s:.2f} s")
    started = time.perf_counter()
    partner, report = max_similarity_matching(similarity, solver=args.solver, candidates=args.candidates)
    matching_s = time.perf_counter() - started
    total = float(similarity[torch.arange(n_latents, device=similarity.device), torch.from_numpy(partner).to(similarity.device)].double().sum())
    print(
        f"one matching: {matching_s:.2f} s (solver {report.solver}, rounds {report.rounds}, candidate edges {report.candidate_edges}, "
        f"Bellman-Ford sweeps {report.bellman_ford_iterations}, max dual violation {report.max_dual_violation:.2e}); total |cos| {total:.4f}"
    )
    if args.compare_dense:
        started = time.perf_counter()
        dense_partner, _ = max_similarity_matching(similarity, solver="dense")
        dense_s = time.perf_counter() - started
        dense_total = float(similarity[torch.arange(n_latents, device=similarity.device), torch.from_numpy(dense_partner).to(similarity.device)].double().sum())
        print(
            f"dense linear_sum_assignment: {dense_s:.2f} s; total |cos| {dense_total:.4f} (difference {total - dense_total:+.2e}); "
            f"same partner for {np.mean(partner == dense_partner):.4f} of rows"
        )
    del similarity

    # The whole configuration, as the match stage runs it.
    started = time.perf_counter()
    result = match_dictionaries(decoders, encoders, seeds=list(range(args.seeds)), solver=args.solver, candidates=args.candidates, device=device)
    synchronize(device)
    elapsed = time.perf_counter() - started
    n_pairs = len(result.pairs)
    print(f"match_dictionaries, {args.seeds} seeds ({n_pairs} pairs, decoder + encoder each): {elapsed:.1f} s total, {elapsed / n_pairs:.1f} s per pair")
    for pair in result.pairs:
        row = pair.summary
        print(
            f"  seeds {pair.seed_a}-{pair.seed_b}: MMCS dec {row['mmcs_decoder']:.3f} enc {row['mmcs_encoder']:.3f}, "
            f"shared {row['fraction_shared']:.3f}, solvers {row['decoder_solver']}/{row['encoder_solver']} "
            f"(rounds {row['decoder_solver_rounds']}/{row['encoder_solver_rounds']})"
        )
    # The stability measures the match stage adds (PW-MCC, threshold curve, reappearance, subspace overlaps at
    # ranks 8/32/128 and seed-resampled intervals with 1,000 draws), on the same result.
    started = time.perf_counter()
    features = result.feature_table(0)
    stability, _ = stability_measures(result, [decoder.numpy() for decoder in decoders], features, None, subspace_ranks=(8, 32, 128), n_resamples=1000)
    measures_s = time.perf_counter() - started
    print(
        f"stability measures: {measures_s:.1f} s ({100 * measures_s / (elapsed + measures_s):.0f}% of matching + measures); "
        f"PW-MCC dec {stability['pw_mcc']['decoder']['mean']:.3f}, subspace overlap r=32 {stability['subspace_overlap']['32']['overlap_mean']:.3f}"
    )
    print(f"RESULT per_pair_s={elapsed / n_pairs:.1f} measures_s={measures_s:.1f} target_gpu_s=60 device={device} latents={n_latents}")


if __name__ == "__main__":
    main()
