"""Initial values of a trainable SAE: the decoder bias's geometric median and the seeded initial weights."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 100, tolerance: float = 1e-6) -> torch.Tensor:
    """Geometric median of ``points [n, d]`` by Weiszfeld's iteration (float64), returned as float32 ``[d]``."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm() / median.norm().clamp_min(1e-12)
        median = updated
        if moved < tolerance:
            break
    return median.float()


def initial_weights(seed: int, d_in: int, d_sae: int, tied_init: bool, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_enc [d_in, d_sae], W_dec [d_sae, d_in])`` for one seed, float32 on ``device`` (the CPU by default).

    Decoder rows are Gaussian directions of unit norm. With ``tied_init`` the encoder is the
    decoder's transpose; otherwise its columns are independent unit-norm Gaussian directions.
    The result depends only on ``seed`` (a private generator), never on the global RNG; drawn on
    another device (fast for wide dictionaries) it depends on that device's generator too.
    """
    generator = torch.Generator(device=device).manual_seed(int(seed))
    decoder = torch.randn(d_sae, d_in, generator=generator, device=device)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    if tied_init:
        encoder = decoder.t().clone()
    else:
        encoder = torch.randn(d_in, d_sae, generator=generator, device=device)
        encoder = encoder / encoder.norm(dim=0, keepdim=True)
    return encoder, decoder
