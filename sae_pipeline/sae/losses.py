"""Loss terms of the trainable SAEs (:mod:`sae_pipeline.sae.training_model`), per seed: shapes ``[S, ...] -> [S]``.

- :func:`weight_penalty`: ``w * (||W_enc||_F^2 + ||W_dec||_F^2)`` (l2) or the L1 sum, on the encoder, the decoder or both;
- :func:`sparsity_regularizer`: the Top-k regularizers of "Beyond the Hard Budget" (off-support L1, L1/L2 ratio);
- :func:`squared_error_mean`: the reconstruction loss with a one-pass backward (the top-k kernels path).
"""

from __future__ import annotations

import torch


def weight_penalty(W_enc: torch.Tensor, W_dec: torch.Tensor, kind: str, coefficient: float, on: str) -> torch.Tensor:
    """Per-seed weight penalty ``[S]`` for ``W_enc [S, d_in, d_sae]`` and ``W_dec [S, d_sae, d_in]``.

    ``l2``: coefficient * squared Frobenius norm; ``l1``: coefficient * sum of absolute values; summed
    over the matrices named by ``on`` (both | encoder | decoder).
    """
    if kind == "none" or coefficient == 0:
        return W_enc.new_zeros(W_enc.shape[0])
    matrices = {"both": (W_enc, W_dec), "encoder": (W_enc,), "decoder": (W_dec,)}[on]
    if kind == "l2":
        total = sum(matrix.square().sum(dim=(1, 2)) for matrix in matrices)
    elif kind == "l1":
        total = sum(matrix.abs().sum(dim=(1, 2)) for matrix in matrices)
    else:
        raise ValueError(f"unknown weight penalty kind {kind!r}")
    return coefficient * total


def sparsity_regularizer(pre_activations: torch.Tensor, active: torch.Tensor, support_l1: torch.Tensor, kind: str, coefficient: float) -> torch.Tensor:
    """Per-seed Top-k sparsity regularizer ``[S]`` ("Beyond the Hard Budget").

    Args:
        pre_activations: ``a [S, B, d_sae]`` before any top-k or ReLU.
        active: bool ``[S, d_sae]``, the batch-active units A (in the support of at least one token).
        support_l1: ``[S, B]``, sum of |a_ti| over the support S_t of each token (S_t is a subset of A).
        kind: ``off_support_l1`` (lambda * mean_t sum_{i in A \\ S_t} |a_ti|) or ``l1_l2_ratio``
            (lambda * mean_t ||a_tA||_1 / ||a_tA||_2).

    The sums over A are batched matrix-vector products with the 0/1 indicator of A, so no dense mask
    of shape ``[S, B, d_sae]`` is built.
    """
    if kind == "none" or coefficient == 0:
        return pre_activations.new_zeros(pre_activations.shape[0], dtype=torch.float32)
    indicator = active.to(pre_activations.dtype).unsqueeze(-1)
    active_l1 = torch.bmm(pre_activations.abs(), indicator).squeeze(-1).float()
    if kind == "off_support_l1":
        per_token = active_l1 - support_l1.float()
    elif kind == "l1_l2_ratio":
        active_l2 = torch.bmm(pre_activations.square(), indicator).squeeze(-1).float().clamp_min(1e-24).sqrt()
        per_token = active_l1 / active_l2
    else:
        raise ValueError(f"unknown regularizer kind {kind!r}")
    return coefficient * per_token.mean(dim=-1)


# The top-k kernels path's reconstruction loss through SquaredErrorMean (round 5 of issue 17; False: autograd's passes).
FUSED_SQUARED_ERROR = True


class SquaredErrorMean(torch.autograd.Function):
    """``(x_hat - x).square().sum(-1).mean(-1)`` (``[S, B, d] -> [S]``) with the gradient for ``x_hat`` formed in
    one elementwise pass from the saved difference, ``diff * (2 g / B)`` (the value autograd's three passes give:
    the power-of-two factor is exact); ``x`` gets none."""

    @staticmethod
    def forward(ctx, x_hat, x):
        difference = x_hat - x
        ctx.save_for_backward(difference)
        return difference.square().sum(dim=-1).mean(dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (difference,) = ctx.saved_tensors
        scale = (grad / difference.shape[1]) * 2
        return difference * scale.view(-1, *([1] * (difference.dim() - 1))).to(difference.dtype), None


def squared_error_mean(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-seed mean over tokens of the squared reconstruction error (see :class:`SquaredErrorMean`)."""
    return SquaredErrorMean.apply(x_hat, x)
