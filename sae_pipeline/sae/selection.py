"""Which latents a token keeps: per-token top-k (:func:`topk_indices`) and BatchTopK, the k*B largest
ReLU pre-activations of a batch of B tokens, per seed.

BatchTopK, two ways to get the same codes:

- :func:`dense_batch_codes`: ``topk`` over the whole flattened ``[B * d_sae]`` row of each seed
  (what SAELens and dictionary_learning do), then a dense ``[S, B, d_sae]`` code matrix for autograd.
- :func:`keep_candidates`: from ``C`` per-token candidates (each token's C largest pre-activations,
  ``C = batch_topk_cap_multiple * k``, selected by the top-k program), the k*B largest of the
  ``B * C`` candidates. Those are the batch's k*B largest (up to ties) unless a token's (C+1)-th
  value beats the smallest kept one, which needs all its C candidates kept and its smallest
  candidate above the smallest kept value; such *capped* tokens are counted (``capped_tokens``)
  so a run says whether the cap may have bound.
  The codes are then sparse (``[S, B, C]`` with the dropped candidates zero), which is what lets
  BatchTopK train through the sparse kernels of :mod:`sae_pipeline.sae.kernels`.

Both update the inference threshold the same way: an exponential moving average (rate
``threshold_lr``) of the smallest positive kept value (SAELens's rule).
"""

from __future__ import annotations

import torch

from sae_pipeline.sae import kernels as sparse_kernels
from sae_pipeline.sae.kernels import programs as kernel_programs

# topk_indices preselects whole chunks of this many latents when d_sae >= TOPK_CHUNK_MIN_RATIO * k * TOPK_CHUNK.
TOPK_CHUNK = 32
TOPK_CHUNK_MIN_RATIO = 4


@torch.no_grad()
def update_threshold(threshold: torch.Tensor, kept_values: torch.Tensor, rate: float) -> None:
    """In place: ``threshold [S] <- (1 - rate) * threshold + rate * min(positive kept_values [S, N])``,
    per seed; a seed with no positive kept value keeps its threshold."""
    smallest = torch.where(kept_values > 0, kept_values, torch.full_like(kept_values, float("inf"))).amin(dim=-1).float()
    updated = (1 - rate) * threshold + rate * smallest
    threshold.copy_(torch.where(torch.isfinite(smallest), updated, threshold))


def dense_batch_codes(pre: torch.Tensor, k: int, threshold: torch.Tensor, rate: float) -> torch.Tensor:
    """Dense codes ``[S, B, d_sae]`` keeping the k*B largest ReLU(pre) of each seed's batch ``pre [S, B, d_sae]``
    (differentiable through the kept entries); updates ``threshold [S]``."""
    n_seeds, batch, width = pre.shape
    flat = pre.relu().reshape(n_seeds, batch * width)
    values, indices = flat.topk(min(k * batch, batch * width), dim=-1, sorted=False)
    update_threshold(threshold, values.detach(), rate)
    return torch.zeros_like(flat).scatter(-1, indices, values).view(n_seeds, batch, width)


@torch.no_grad()
def keep_candidates(values: torch.Tensor, k: int, threshold: torch.Tensor, rate: float,
                    capped_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of each token's candidates the batch keeps.

    Args:
        values: float32 ``[S, B, C]``, each token's C largest pre-activations (any order).
        k: latents per token on average; ``k * B`` candidates are kept per seed (all, if fewer).
        threshold: ``[S]``, the inference threshold, updated in place.
        rate: the threshold's moving-average rate.
        capped_tokens: ``[S]`` (int64), when given: in place, plus the tokens of this batch whose
            C candidates were all kept, the smallest above the smallest kept value (where the cap may have bound).

    Returns:
        ``keep`` float32 ``[S, B, C]`` (1 kept, 0 dropped; codes are ``relu(values) * keep``) and
        ``positions`` int64 ``[S, k * B]``: the kept candidates' flat positions ``b * C + j``, ascending.
    """
    n_seeds, batch, cap = values.shape
    flat = values.relu().reshape(n_seeds, batch * cap)
    kept_values, positions = flat.topk(min(k * batch, batch * cap), dim=-1, sorted=False)
    positions = positions.sort(dim=-1).values  # token order: the gradient sums run in the same order every step
    update_threshold(threshold, kept_values, rate)
    keep = torch.zeros_like(flat).scatter_(-1, positions, 1.0).view(n_seeds, batch, cap)
    # A token's next value is at most its smallest candidate: it could displace a kept value only if that candidate is larger.
    if capped_tokens is not None:
        above_smallest_kept = flat.view(n_seeds, batch, cap).amin(dim=-1) > kept_values.amin(dim=-1, keepdim=True)
        capped_tokens.add_(((keep.amin(dim=-1) > 0) & above_smallest_kept).sum(dim=-1))
    return keep, positions


def topk_indices(pre_activations: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[..., k]`` of the k largest entries in each row of ``pre_activations [S, ..., n]``
    (plus ``bias [S, n]`` when given), in no particular order, without gradient.

    Selects the same values as ``torch.topk`` (ties may pick other indices of equal value) but,
    for wide rows, faster on a GPU: the row is cut into ``n / TOPK_CHUNK`` interleaved chunks
    (chunk c holds entries c, c + n/TOPK_CHUNK, ...), and the k chunks with the largest maxima hold
    every top-k entry (an entry above the k-th largest chunk maximum lies in a chunk whose maximum
    beats it, and those k chunks hold at least k entries no smaller than that maximum). So the
    top k of their ``k * TOPK_CHUNK`` entries are the top k of the row; the chunk maxima are one
    coalesced reduction and both selections are over short rows. Narrow rows use ``torch.topk``.
    Where Triton runs (CUDA), wide rows go to :func:`sae_pipeline.sae.kernels.topk_columns`, the
    same two-stage selection (over contiguous chunks) fused into one pass over the row.
    """
    width = pre_activations.shape[-1]
    with torch.no_grad():
        wide = _wide_rows(width, k)
        if wide and kernel_programs.triton_usable(pre_activations):
            return sparse_kernels.topk_columns(pre_activations, k, bias)
        if bias is not None:
            pre_activations = pre_activations + bias.view(bias.shape[0], *([1] * (pre_activations.dim() - 2)), width)
        if not wide:
            return pre_activations.topk(k, dim=-1, sorted=False).indices
        n_chunks = width // TOPK_CHUNK
        chunk_maxima = pre_activations.unflatten(-1, (TOPK_CHUNK, n_chunks)).amax(dim=-2)
        chunks = chunk_maxima.topk(k, dim=-1, sorted=False).indices
        members = torch.arange(0, width, n_chunks, device=pre_activations.device)
        candidates = (chunks.unsqueeze(-1) + members).flatten(-2)
        best = pre_activations.gather(-1, candidates).topk(k, dim=-1, sorted=False).indices
        return candidates.gather(-1, best)


def topk_program_runs(pre_activations: torch.Tensor, k: int, any_width: bool = False) -> bool:
    """Whether :func:`topk_indices` selects from ``pre_activations [S, ..., n]`` with the top-k program (wide rows, Triton
    usable); ``any_width``: whether the program can select k from these rows at all (at least k chunks of
    ``programs.TOPK_CHUNK`` columns; BatchTopK's candidates, more than :func:`_wide_rows` allows at 16k latents)."""
    width = pre_activations.shape[-1]
    fits = width >= k * kernel_programs.TOPK_CHUNK if any_width else _wide_rows(width, k)
    return fits and kernel_programs.triton_usable(pre_activations)


def _wide_rows(width: int, k: int) -> bool:
    """Whether rows of ``width`` entries are wide enough for the chunked top-k selection of :func:`topk_indices`."""
    return width % TOPK_CHUNK == 0 and width >= TOPK_CHUNK_MIN_RATIO * k * TOPK_CHUNK


@torch.no_grad()
def kept_first(keep: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor | None = None,
               n_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A slot order that puts each token's kept candidates first, so the sparse programs visit only those slots.

    Args:
        keep: float32 ``[S, B, C]`` from :func:`keep_candidates`; ``positions``: its kept positions ``[S, N]``.
        groups: int64 ``[S, B, C]`` in ``0 .. n_groups - 1`` (Matryoshka's latent groups), when the kept slots
            should also come group by group; None: one group.

    Returns:
        ``order`` int64 ``[S, B, C]`` (new slot j holds old slot ``order[..., j]``: kept ones first, in group order
        and stably, the dropped ones last), ``positions`` in the new order ``[S, N]``, and each token's slot
        range per group, int32 ``starts, ends [S, B, n_groups]``.
    """
    n_seeds, batch, cap = keep.shape
    key = torch.where(keep > 0, groups if groups is not None else torch.zeros_like(keep, dtype=torch.int64), n_groups)
    # A stable counting partition by key (n_groups + 1 values): no sort (torch.sort of the [S*B, C] rows cost 0.16 ms
    # at 4096 x 160 on the H200). Slot j goes to its key's first slot plus the number of earlier slots with its key.
    one_hot = (key.unsqueeze(-1) == torch.arange(n_groups + 1, device=key.device)).to(torch.int32)  # [S, B, C, G + 1] (no sync)
    earlier = ((one_hot.cumsum(dim=2, dtype=torch.int32) - one_hot) * one_hot).sum(dim=-1)
    counts = one_hot.sum(dim=2, dtype=torch.int32)  # [S, B, G + 1]
    firsts = counts.cumsum(dim=-1, dtype=torch.int32) - counts
    destination = (firsts.gather(-1, key) + earlier).long()
    order = torch.empty_like(destination).scatter_(-1, destination, torch.arange(cap, device=keep.device).expand(n_seeds, batch, cap))
    moved = positions - positions % cap + destination.view(n_seeds, -1).gather(1, positions)
    return order, moved, firsts[..., :n_groups].contiguous(), (firsts + counts)[..., :n_groups].contiguous()
