"""A trained sparse autoencoder at inference time (one SAE, SAELens tensor layout).

Shapes: ``x`` is ``[..., d_in]``; ``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_in]``,
``b_enc`` ``[d_sae]``, ``b_dec`` ``[d_in]``; codes ``z`` are ``[..., d_sae]``.

Architectures (``cfg["architecture"]``):

- ``topk``: z = ReLU(TopK_k(pre)) with pre = (x - b_dec) W_enc + b_enc
- ``batchtopk`` / ``matryoshka_batchtopk``: trained with a batch-level top-k; at inference
  z = pre * (pre > threshold) with the learned threshold (one per latent in the saved file)
- ``relu`` (SAELens "standard"): z = ReLU(pre)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sae_pipeline.settings import ARCHITECTURES


def topk_codes(pre_activations: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest pre-activations of each row (ReLU applied to them), zero elsewhere.

    ``pre_activations`` is ``[..., d_sae]``; the result has the same shape and at most ``k`` nonzeros
    per row (exactly ``k`` kept slots, some may be zero after the ReLU).
    """
    values, indices = pre_activations.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_activations).scatter_(-1, indices, values.relu())


class SparseAutoencoder(nn.Module):
    """One SAE for inference, evaluation, matching and steering.

    Attributes:
        cfg: the ``cfg.json`` dictionary with the pipeline's ``architecture`` name (``d_in``, ``d_sae``, ``k``,
            ``metadata``...); :func:`sae_pipeline.data.checkpoint.load_sae` translates SAELens's names.
    """

    def __init__(self, cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.cfg = dict(cfg)
        architecture = self.cfg["architecture"]
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r}; expected one of {ARCHITECTURES}")
        self.W_enc = nn.Parameter(tensors["W_enc"].detach().clone(), requires_grad=False)
        self.W_dec = nn.Parameter(tensors["W_dec"].detach().clone(), requires_grad=False)
        self.b_enc = nn.Parameter(tensors["b_enc"].detach().clone(), requires_grad=False)
        self.b_dec = nn.Parameter(tensors["b_dec"].detach().clone(), requires_grad=False)
        threshold = tensors.get("threshold")
        self.register_buffer("threshold", threshold.detach().clone() if threshold is not None else torch.zeros(()))

    @property
    def architecture(self) -> str:
        return str(self.cfg["architecture"])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def k(self) -> int | None:
        value = self.cfg.get("k")
        return int(value) if value is not None else None

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc``: ``[..., d_in]`` -> ``[..., d_sae]``."""
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Sparse codes ``[..., d_sae]``. ``k`` overrides the trained k of Top-k SAEs (inference-time k').

        For batchtopk-style SAEs, passing ``k`` switches from the learned threshold to per-row Top-k.
        """
        pre = self.pre_activations(x)
        if self.architecture == "topk" or (k is not None and self.architecture != "relu"):
            return topk_codes(pre, int(k if k is not None else self.k))
        if self.architecture in ("batchtopk", "matryoshka_batchtopk"):
            return pre * (pre > self.threshold)
        return pre.relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z W_dec + b_dec``: ``[..., d_sae]`` -> ``[..., d_in]``."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Reconstruction of ``x`` (same shape)."""
        return self.decode(self.encode(x, k))

    def unit_decoder_directions(self) -> torch.Tensor:
        """Decoder rows scaled to unit L2 norm, ``[d_sae, d_in]``."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


