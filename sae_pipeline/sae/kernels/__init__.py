"""Sparse forward and backward passes of a top-k SAE, and a fused top-k selection (Triton on CUDA).

A top-k SAE selects ``K`` latents per token. Dense autograd then spends, besides the encoder's
``[B, d_in] x [d_in, d_sae]`` product, a decoder product, three gradient products and several
passes over ``[B, d_sae]`` matrices on codes that are zero but for K entries a row. Here:

- :func:`topk_columns`: one program per row finds the k largest entries (encoder bias added on the
  fly): the maxima of chunks of ``TOPK_CHUNK`` columns, the K-th largest maximum by bisection over
  order-preserving integer keys, the K chunks that must hold the top k, then the K-th largest of
  their entries the same way; winners are placed by prefix sums, so nothing is sorted. In training it
  also writes the selected values and adds the step's firing counts (round 6).
- :func:`sparse_decode`: ``out[s,b] = sum_j codes[s,b,j] * W_dec[s, indices[s,b,j]]`` gathers the K
  rows (read in autocast's dtype); its gradient for the codes is the matching gathered dot product
  ``<g[s,b], W_dec[s, indices[s,b,j]]>``; for W_dec it is ``codes^T g``.
- :func:`selected_preactivations`: the selected pre-activations, read from a pre-activation matrix
  computed without autograd; the backward gives W_enc ``(x - b_dec)^T g``, b_enc the per-latent sum
  of g and b_dec ``-W_enc`` times that sum, from the K selected entries.

In training (:func:`sparse_adam_step`, used by ``SeedBatchedTrainer`` for top-k with these kernels) the
two weight gradients are not returned by autograd: the Functions leave the selected entries
(:class:`DeferredWeightGradients`), which are sorted by latent, and :func:`latent_gradients` forms both
gradients from them (one-hot tensor-core products over latent blocks; blocks of latents that fired on
thousands of tokens are split into work items whose partial tiles are added in order; bf16 under autocast,
as the dense path's bf16 products give them), writing every element, so no dense ``[B, d_sae]`` code matrix is zero-filled or multiplied, with per-latent statistics
that give the clipping norm. Two optimizer programs then do the decoder-gradient projection, per-seed
clipping, Adam, decoder renormalisation and the bf16 weight copies the next forward reads, one pass
over each weight. (Before this, the transposed products ran as batched matrix products on dense code
matrices, :func:`scatter_rows`, which costs ``O(B * d_sae * d)``; on the H200, sparse wins from ~16
entries per latent down, see ``updates.GRAD_DENSE_ENTRIES_PER_LATENT``.)

Off CUDA the same arithmetic runs as PyTorch operations (``embedding_bag``, ``index_add_``). With
``TRITON_INTERPRET=1`` set before Triton is imported and ``programs.INTERPRET_ON_CPU`` on, the Triton programs
run on CPU tensors in Triton's interpreter (how the tests check them).
"""

from sae_pipeline.sae.kernels.ops import (
    DeferredWeightGradients,
    advance_tokens_since_fired,
    autocast_dtype,
    decode_rows,
    embedding_bag_rows,
    scatter_rows,
    selected_dots,
    selected_preactivations,
    sparse_decode,
    topk_columns,
)
from sae_pipeline.sae.kernels.programs import triton, triton_interpreting
from sae_pipeline.sae.kernels.entries import sort_entries_by_latent
from sae_pipeline.sae.kernels.updates import latent_gradients, sparse_adam_step

__all__ = [
    "DeferredWeightGradients", "advance_tokens_since_fired", "autocast_dtype", "decode_rows", "embedding_bag_rows",
    "latent_gradients", "scatter_rows", "selected_dots", "selected_preactivations", "sort_entries_by_latent",
    "sparse_adam_step", "sparse_decode", "topk_columns", "triton", "triton_interpreting",
]
