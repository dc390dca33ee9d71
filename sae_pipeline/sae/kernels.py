"""Sparse forward and backward passes of a top-k SAE, and a fused top-k selection (Triton on CUDA).

A top-k SAE selects ``K`` latents per token. Dense autograd then spends, besides the encoder's
``[B, d_in] x [d_in, d_sae]`` product, a decoder product, three gradient products and several
passes over ``[B, d_sae]`` matrices on codes that are zero but for K entries a row. Here:

- :func:`topk_columns`: one program per row finds the k largest entries (encoder bias added on the
  fly): the maxima of chunks of ``TOPK_CHUNK`` columns, the K-th largest maximum by bisection over
  order-preserving integer keys, the K chunks that must hold the top k, then the K-th largest of
  their entries the same way; winners are placed by prefix sums, so nothing is sorted.
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
thousands of tokens are split into work items whose partial tiles are added in order), writing every
element, so no dense ``[B, d_sae]`` code matrix is zero-filled or multiplied, with per-latent statistics
that give the clipping norm. Two optimizer programs then do the decoder-gradient projection, per-seed
clipping, Adam, decoder renormalisation and the bf16 weight copies the next forward reads, one pass
over each weight. (Before this, the transposed products ran as batched matrix products on dense code
matrices, :func:`scatter_rows`, which costs ``O(B * d_sae * d)``; on the H200, sparse wins from ~12
entries per latent down, see ``GRAD_DENSE_ENTRIES_PER_LATENT``.)

Off CUDA the same arithmetic runs as PyTorch operations (``embedding_bag``, ``index_add_``). With
``TRITON_INTERPRET=1`` set before Triton is imported and ``INTERPRET_ON_CPU`` on, the Triton programs
run on CPU tensors in Triton's interpreter (how the tests check them).
"""

import functools
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path serves; the programs below are then never compiled

    class tl:  # stands in for triton.language in the programs' annotations
        constexpr = int

    triton = None

# Columns of d_in one program handles at a time.
COLUMN_BLOCK = 128
# Selected rows the decode and dot programs load at once (all K up to this many).
MAX_ROW_BLOCK = 64
# Column blocks one decode program covers (wider rows: more programs per token; 0.43 ms for d_in 2304 in one).
DECODE_COLUMN_BLOCKS = 4
# Key below that of -inf (see _sortable_keys): marks candidate slots past the row's end.
BELOW_ALL_KEYS = tl.constexpr(-2139095042)
# Top-k: columns per chunk, chunks whose maxima one load covers, warps per row.
TOPK_CHUNK = 16
TOPK_CHUNK_BLOCK = 128
TOPK_WARPS = 1
# Wide rows: at most this many chunks (wider chunks beyond), and keys per thread (more warps beyond).
TOPK_MAX_CHUNKS = 4096
TOPK_KEYS_PER_THREAD = 32


# Run the Triton programs on CPU tensors too (tests only; needs TRITON_INTERPRET=1 set before Triton is imported).
INTERPRET_ON_CPU = False


def triton_interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(tensor: torch.Tensor) -> bool:
    """Whether the Triton programs run on ``tensor``: on CUDA, or on the CPU when ``INTERPRET_ON_CPU``
    and Triton's interpreter is on."""
    return triton is not None and (tensor.is_cuda or (INTERPRET_ON_CPU and triton_interpreting()))


def _decode_program(values, indices, table, out, n_tokens, K, table_rows, D,
                    ROWS: tl.constexpr, COLUMNS: tl.constexpr, COLUMN_BLOCKS: tl.constexpr):
    """One program per (seed, token) and group of ``COLUMN_BLOCKS`` column blocks (grid axis 1):
    ``out[t] = sum_j values[t, j] * table[seed, indices[t, j]]``, ``ROWS`` selected rows at a time, the
    group's column blocks together (unrolled)."""
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    seed = token // n_tokens
    table_seed = table + seed * table_rows * D
    for column_block in tl.static_range(COLUMN_BLOCKS):
        columns = (group * COLUMN_BLOCKS + column_block) * COLUMNS + tl.arange(0, COLUMNS)
        column_mask = columns < D
        total = tl.zeros([COLUMNS], dtype=tl.float32)
        for row_start in range(0, K, ROWS):
            slots = row_start + tl.arange(0, ROWS)
            slot_mask = slots < K
            rows = tl.load(indices + token * K + slots, mask=slot_mask, other=0).to(tl.int64)
            weights = tl.load(values + token * K + slots, mask=slot_mask, other=0.0).to(tl.float32)
            tile = tl.load(table_seed + rows[:, None] * D + columns[None, :],
                           mask=slot_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
            total += tl.sum(tile * weights[:, None], axis=0)
        tl.store(out + token * D + columns, total, mask=column_mask)


def _selected_dot_program(dense, indices, table, out, n_tokens, K, table_rows, D,
                          ROWS: tl.constexpr, COLUMNS: tl.constexpr, COLUMN_BLOCKS: tl.constexpr):
    """One program per (seed, token): ``out[t, j] = <dense[t], table[seed, indices[t, j]]>``, ``ROWS`` at a time."""
    token = tl.program_id(0).to(tl.int64)
    seed = token // n_tokens
    table_seed = table + seed * table_rows * D
    for row_start in range(0, K, ROWS):
        slots = row_start + tl.arange(0, ROWS)
        slot_mask = slots < K
        rows = tl.load(indices + token * K + slots, mask=slot_mask, other=0).to(tl.int64)
        dots = tl.zeros([ROWS], dtype=tl.float32)
        for column_block in tl.static_range(COLUMN_BLOCKS):
            columns = column_block * COLUMNS + tl.arange(0, COLUMNS)
            column_mask = columns < D
            row = tl.load(dense + token * D + columns, mask=column_mask, other=0.0).to(tl.float32)
            tile = tl.load(table_seed + rows[:, None] * D + columns[None, :],
                           mask=slot_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
            dots += tl.sum(tile * row[None, :], axis=1)
        tl.store(out + token * K + slots, dots, mask=slot_mask)


def _sortable_keys(values):
    """int32 keys that order like the float32 ``values`` (negative floats get their magnitude bits flipped);
    -inf maps to -2139095041, above every key :data:`BELOW_ALL_KEYS` marks."""
    bits = values.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_largest_key(keys, K):
    """The K-th largest of ``keys`` (ties counted), by bisection: 33 halvings cover any range of width <= 2**33."""
    low = tl.min(keys, axis=0).to(tl.int64)
    high = tl.max(keys, axis=0).to(tl.int64)
    for _ in range(33):
        middle = low + (high - low + 1) // 2
        enough = tl.sum((keys >= middle.to(tl.int32)).to(tl.int32), axis=0) >= K
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle - 1)
    return low.to(tl.int32)


def _top_k_slots(keys, K):
    """For the K largest of ``keys`` (ties broken by position): each entry's output slot ``rank``
    (0..K-1 where ``chosen``) and the mask ``chosen``; slots are filled by prefix sums, not sorting."""
    threshold = _kth_largest_key(keys, K)
    above = keys > threshold
    tied = keys == threshold
    n_above = tl.sum(above.to(tl.int32), axis=0)
    rank = tl.where(above, tl.cumsum(above.to(tl.int32), axis=0) - 1, n_above + tl.cumsum(tied.to(tl.int32), axis=0) - 1)
    return rank, (above | tied) & (rank < K)


def _topk_program(pre, bias, chunk_maxima, chosen_chunks, out, n, K, rows_per_bias,
                  N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr, CHUNK_BLOCK: tl.constexpr, K_PAD: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """One program per row of ``pre [rows, n]``: the K largest entries' columns into ``out [rows, K]``.
    With ``HAS_BIAS`` the row is ``pre[row] + bias[row // rows_per_bias]`` (the bias added on the fly).

    Chunk c is columns ``[c*CHUNK, (c+1)*CHUNK)``. With T the K-th largest chunk maximum, the K
    chunks made of every chunk whose maximum exceeds T plus the first chunks whose maximum equals
    T hold a top-k set (see :func:`sae_pipeline.sae.training_model.topk_indices`); the K largest of their
    ``K*CHUNK`` entries are chosen with ties broken by position. Both selections find the K-th
    largest value by bisection over order-preserving integer keys and place the winners by a
    prefix sum, so nothing is sorted.
    """
    row = tl.program_id(0).to(tl.int64)
    row_start = pre + row * n
    bias_start = bias + (row // rows_per_bias) * n
    members = tl.arange(0, CHUNK)
    for block_start in range(0, N_CHUNKS, CHUNK_BLOCK):
        chunk_ids = block_start + tl.arange(0, CHUNK_BLOCK)
        columns = chunk_ids[:, None] * CHUNK + members[None, :]
        tile = tl.load(row_start + columns, mask=columns < n, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            tile += tl.load(bias_start + columns, mask=columns < n, other=0.0).to(tl.float32)
        tl.store(chunk_maxima + row * N_CHUNKS + chunk_ids, tl.max(tile, axis=1))
    tl.debug_barrier()
    chunk_ids = tl.arange(0, N_CHUNKS)
    keys = _sortable_keys(tl.load(chunk_maxima + row * N_CHUNKS + chunk_ids))
    rank, chosen = _top_k_slots(keys, K)
    tl.store(chosen_chunks + row * K_PAD + rank, chunk_ids, mask=chosen)
    tl.debug_barrier()
    slots = tl.arange(0, K_PAD)
    chunks = tl.load(chosen_chunks + row * K_PAD + slots, mask=slots < K, other=0)
    columns = chunks[:, None] * CHUNK + members[None, :]
    valid = (slots < K)[:, None] & (columns < n)
    candidates = tl.load(row_start + columns, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        candidates += tl.load(bias_start + columns, mask=valid, other=0.0).to(tl.float32)
    columns = tl.reshape(columns, [K_PAD * CHUNK])
    keys = tl.where(tl.reshape(valid, [K_PAD * CHUNK]), _sortable_keys(tl.reshape(candidates, [K_PAD * CHUNK])), BELOW_ALL_KEYS)
    rank, chosen = _top_k_slots(keys, K)
    tl.store(out + row * K + rank, columns, mask=chosen)


def _gradient_tiles(keys, rows, decoder_weights, encoder_weights, decoder_dense, encoder_dense, lo, hi, global_latents,
                    columns, column_mask, dense_offset, D, LATENTS: tl.constexpr, ENTRIES: tl.constexpr, COLUMNS: tl.constexpr,
                    LOW_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Tiles of both weight gradients from the sorted entries ``lo .. hi``: the decoder's ``[LATENTS, COLUMNS]``
    and the encoder's ``[COLUMNS, LATENTS]`` (its layout in memory, latents contiguous: stored as is, coalesced),
    products of the entries' one-hot latent matrix (weighted) with their gathered dense rows, ``ENTRIES`` at a
    time (tensor cores; bf16 operands with ``LOW_PRECISION`` as autocast gives the dense product, float32 ``ieee`` else)."""
    acc_dec = tl.zeros([LATENTS, COLUMNS], dtype=tl.float32)
    acc_enc = tl.zeros([COLUMNS, LATENTS], dtype=tl.float32)
    for entry_start in range(lo, hi, ENTRIES):
        entries = entry_start + tl.arange(0, ENTRIES)
        entry_mask = entries < hi
        key = tl.load(keys + entries, mask=entry_mask, other=-1).to(tl.int64)
        row = tl.load(rows + entries, mask=entry_mask, other=0).to(tl.int64)
        a = tl.load(decoder_weights + entries, mask=entry_mask, other=0.0).to(tl.float32)
        c = tl.load(encoder_weights + entries, mask=entry_mask, other=0.0).to(tl.float32)
        hit = key[:, None] == global_latents[None, :]
        gather_mask = entry_mask[:, None] & column_mask[None, :]
        offsets = dense_offset + row[:, None] * D + columns[None, :]
        dec_rows = tl.load(decoder_dense + offsets, mask=gather_mask, other=0.0)
        enc_rows = tl.load(encoder_dense + offsets, mask=gather_mask, other=0.0)
        a_hot = tl.where(hit, a[:, None], 0.0)
        c_hot = tl.where(hit, c[:, None], 0.0)
        if LOW_PRECISION and not EMULATE_BF16:
            acc_dec = tl.dot(tl.trans(a_hot.to(tl.bfloat16)), dec_rows.to(tl.bfloat16), acc_dec)
            acc_enc = tl.dot(tl.trans(enc_rows.to(tl.bfloat16)), c_hot.to(tl.bfloat16), acc_enc)
        elif LOW_PRECISION:  # the same products (bf16 x bf16 is exact in float32); Triton's interpreter mis-computes bf16 dots
            acc_dec = tl.dot(tl.trans(a_hot.to(tl.bfloat16).to(tl.float32)), dec_rows.to(tl.float32), acc_dec, input_precision="ieee")
            acc_enc = tl.dot(tl.trans(enc_rows.to(tl.float32)), c_hot.to(tl.bfloat16).to(tl.float32), acc_enc, input_precision="ieee")
        else:
            acc_dec = tl.dot(tl.trans(a_hot), dec_rows.to(tl.float32), acc_dec, input_precision="ieee")
            acc_enc = tl.dot(tl.trans(enc_rows.to(tl.float32)), c_hot, acc_enc, input_precision="ieee")
    return acc_dec, acc_enc


def _store_gradient_tiles(acc_dec, acc_enc, seed, latents, latent_mask, global_latents, columns, column_mask, column_block,
                          W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents,
                          LATENTS: tl.constexpr, WITH_W_DEC: tl.constexpr):
    """Store finished tiles (``grad_dec [S, d_sae, D]``, ``grad_enc [S, D, d_sae]``) and their per-latent
    statistics ``row_statistics[column_block, s * d_sae + i] = (|g_dec|^2, <g_dec, W_dec>, |W_dec|^2, |g_enc|^2)``
    over these columns (the W_dec terms 0 and 1 without ``WITH_W_DEC``)."""
    out_mask = latent_mask[:, None] & column_mask[None, :]
    tl.store(grad_dec + (seed * d_sae + latents[:, None]) * D + columns[None, :], acc_dec, mask=out_mask)
    tl.store(grad_enc + seed * D * d_sae + columns[:, None] * d_sae + latents[None, :], acc_enc, mask=column_mask[:, None] & latent_mask[None, :])
    statistics = row_statistics + (column_block * total_latents + global_latents) * 4
    tl.store(statistics, tl.sum(acc_dec * acc_dec, axis=1), mask=latent_mask)
    if WITH_W_DEC:
        w = tl.load(W_dec + (seed * d_sae + latents[:, None]) * D + columns[None, :], mask=out_mask, other=0.0).to(tl.float32)
        tl.store(statistics + 1, tl.sum(acc_dec * w, axis=1), mask=latent_mask)
        tl.store(statistics + 2, tl.sum(w * w, axis=1), mask=latent_mask)
    else:
        tl.store(statistics + 1, tl.zeros([LATENTS], dtype=tl.float32), mask=latent_mask)
        tl.store(statistics + 2, tl.full([LATENTS], 1.0, dtype=tl.float32), mask=latent_mask)
    tl.store(statistics + 3, tl.sum(acc_enc * acc_enc, axis=0), mask=latent_mask)


def _latent_gradients_program(item_block, item_chunk, block_items, block_slot, segments, keys, rows, decoder_weights, encoder_weights,
                              decoder_dense, encoder_dense, W_dec, grad_dec, grad_enc, row_statistics, partial_dec, partial_enc,
                              d_sae, D, n_rows, total_latents, total_blocks,
                              LATENTS: tl.constexpr, ENTRIES: tl.constexpr, COLUMNS: tl.constexpr, CHUNK: tl.constexpr,
                              LOW_PRECISION: tl.constexpr, WITH_W_DEC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One program per (work item, block of ``COLUMNS`` columns of d): both weight gradients of a block of
    ``LATENTS`` latents from up to ``CHUNK`` of its entries (sorted by latent; ``segments`` marks each
    latent's range), so a block whose latents fired on thousands of tokens is shared by several items:

    - ``grad_dec[s, i] = sum_e decoder_weights[e] * decoder_dense[s, rows[e]]`` (layout ``[S, d_sae, D]``),
    - ``grad_enc[s, :, i] = sum_e encoder_weights[e] * encoder_dense[s, rows[e]]`` (layout ``[S, D, d_sae]``).

    A block of one item stores its tiles (every element, so nothing is zero-filled first) and statistics;
    the items of a shared block store partial tiles in ``partial_*[block_slot[block] + chunk]`` (``[LATENTS, D]``
    for the decoder, ``[D, LATENTS]`` for the encoder), which
    :func:`_combine_gradients_program` adds in order (deterministic: no atomics)."""
    item = tl.program_id(0)
    column_block = tl.program_id(1).to(tl.int64)
    block = tl.load(item_block + item).to(tl.int64)
    if block < total_blocks:
        chunk = tl.load(item_chunk + item)
        n_blocks = tl.cdiv(d_sae, LATENTS)
        seed = block // n_blocks
        first = (block % n_blocks) * LATENTS
        latents = first + tl.arange(0, LATENTS)
        latent_mask = latents < d_sae
        global_latents = seed * d_sae + latents
        columns = column_block * COLUMNS + tl.arange(0, COLUMNS)
        column_mask = columns < D
        start = tl.load(segments + seed * d_sae + first)
        end = tl.load(segments + seed * d_sae + tl.minimum(first + LATENTS, d_sae))
        lo = start + chunk * CHUNK
        hi = tl.minimum(end, lo + CHUNK)
        acc_dec, acc_enc = _gradient_tiles(keys, rows, decoder_weights, encoder_weights, decoder_dense, encoder_dense, lo, hi,
                                           global_latents, columns, column_mask, seed * n_rows * D, D,
                                           LATENTS, ENTRIES, COLUMNS, LOW_PRECISION, EMULATE_BF16)
        if tl.load(block_items + block) == 1:
            _store_gradient_tiles(acc_dec, acc_enc, seed, latents, latent_mask, global_latents, columns, column_mask, column_block,
                                  W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents, LATENTS, WITH_W_DEC)
        else:
            slot = (tl.load(block_slot + block) + chunk).to(tl.int64)
            tile = slot * LATENTS * D + tl.arange(0, LATENTS)[:, None] * D + columns[None, :]
            tl.store(partial_dec + tile, acc_dec, mask=column_mask[None, :])
            tile_t = slot * LATENTS * D + columns[:, None] * LATENTS + tl.arange(0, LATENTS)[None, :]
            tl.store(partial_enc + tile_t, acc_enc, mask=column_mask[:, None])


def _combine_gradients_program(item_block, item_chunk, block_items, block_slot, W_dec, grad_dec, grad_enc, row_statistics,
                               partial_dec, partial_enc, d_sae, D, total_latents, total_blocks,
                               LATENTS: tl.constexpr, COLUMNS: tl.constexpr, WITH_W_DEC: tl.constexpr):
    """For each block shared by several work items (its first item's program): the sum of their partial
    tiles, in item order, stored with its statistics as :func:`_latent_gradients_program` stores a whole block."""
    item = tl.program_id(0)
    column_block = tl.program_id(1).to(tl.int64)
    block = tl.load(item_block + item).to(tl.int64)
    if block < total_blocks:
        n_items = tl.load(block_items + block)
        if (tl.load(item_chunk + item) == 0) & (n_items > 1):
            n_blocks = tl.cdiv(d_sae, LATENTS)
            seed = block // n_blocks
            latents = (block % n_blocks) * LATENTS + tl.arange(0, LATENTS)
            columns = column_block * COLUMNS + tl.arange(0, COLUMNS)
            column_mask = columns < D
            first_slot = tl.load(block_slot + block).to(tl.int64)
            acc_dec = tl.zeros([LATENTS, COLUMNS], dtype=tl.float32)
            acc_enc = tl.zeros([COLUMNS, LATENTS], dtype=tl.float32)
            for part in range(0, n_items):
                tile = (first_slot + part) * LATENTS * D + tl.arange(0, LATENTS)[:, None] * D + columns[None, :]
                acc_dec += tl.load(partial_dec + tile, mask=column_mask[None, :], other=0.0)
                tile_t = (first_slot + part) * LATENTS * D + columns[:, None] * LATENTS + tl.arange(0, LATENTS)[None, :]
                acc_enc += tl.load(partial_enc + tile_t, mask=column_mask[:, None], other=0.0)
            _store_gradient_tiles(acc_dec, acc_enc, seed, latents, latents < d_sae, seed * d_sae + latents, columns, column_mask,
                                  column_block, W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents, LATENTS, WITH_W_DEC)


def _adam_moments(w, g, m, v, step_size, bias_correction2_sqrt, beta1, beta2, eps):
    """One Adam update in torch.optim.Adam's order of operations: returns the new (w, m, v)."""
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denominator = tl.sqrt(v) / bias_correction2_sqrt + eps
    return w - step_size * (m / denominator), m, v


def _adam_scalars(lr, step, log2_beta1, log2_beta2):
    """``(lr / (1 - beta1**step), sqrt(1 - beta2**step))`` from the device-side learning rate and step."""
    learning_rate = tl.load(lr).to(tl.float32)
    steps = tl.load(step).to(tl.float32)
    return learning_rate / (1.0 - tl.exp2(steps * log2_beta1)), tl.sqrt(1.0 - tl.exp2(steps * log2_beta2))


def _adam_rows_program(W, G, M, V, W_low, clip_scale, lr, step, n_rows, rows_per_seed, D, beta1, beta2, eps, log2_beta1, log2_beta2,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, PROJECT: tl.constexpr, NORMALIZE: tl.constexpr,
                       CLIP: tl.constexpr, LOW_COPY: tl.constexpr):
    """Adam on whole rows of ``W [S*rows_per_seed, D]`` (the decoder), ``ROWS`` rows per program: with ``PROJECT``
    the gradient's component along its (unit-norm) row is removed first, with ``CLIP`` it is scaled by
    ``clip_scale[seed]``, and with ``NORMALIZE`` the updated row is rescaled to unit norm; ``LOW_COPY`` also
    writes the row in bf16 to ``W_low`` (what the next step reads)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    columns = tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (columns < D)[None, :]
    offsets = rows[:, None] * D + columns[None, :]
    w = tl.load(W + offsets, mask=mask, other=0.0)
    g = tl.load(G + offsets, mask=mask, other=0.0)
    if PROJECT:
        direction = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-12)[:, None]
        g = g - tl.sum(g * direction, axis=1)[:, None] * direction
    if CLIP:
        g = g * tl.load(clip_scale + rows // rows_per_seed, mask=row_mask, other=1.0)[:, None]
    step_size, bias_correction2_sqrt = _adam_scalars(lr, step, log2_beta1, log2_beta2)
    m = tl.load(M + offsets, mask=mask, other=0.0)
    v = tl.load(V + offsets, mask=mask, other=0.0)
    w, m, v = _adam_moments(w, g, m, v, step_size, bias_correction2_sqrt, beta1, beta2, eps)
    if NORMALIZE:
        w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-12)[:, None]
    tl.store(W + offsets, w, mask=mask)
    tl.store(M + offsets, m, mask=mask)
    tl.store(V + offsets, v, mask=mask)
    if LOW_COPY:
        tl.store(W_low + offsets, w.to(tl.bfloat16), mask=mask)


def _adam_flat_program(W, G, M, V, W_low, clip_scale, lr, step, numel, per_seed, beta1, beta2, eps, log2_beta1, log2_beta2,
                       BLOCK: tl.constexpr, CLIP: tl.constexpr, LOW_COPY: tl.constexpr):
    """Elementwise Adam over ``W`` (``per_seed`` elements a seed), the gradient scaled by ``clip_scale[seed]``
    with ``CLIP``; ``LOW_COPY`` also writes the result in bf16 to ``W_low``."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    w = tl.load(W + offsets, mask=mask, other=0.0)
    g = tl.load(G + offsets, mask=mask, other=0.0)
    if CLIP:
        g = g * tl.load(clip_scale + offsets // per_seed, mask=mask, other=1.0)
    step_size, bias_correction2_sqrt = _adam_scalars(lr, step, log2_beta1, log2_beta2)
    m = tl.load(M + offsets, mask=mask, other=0.0)
    v = tl.load(V + offsets, mask=mask, other=0.0)
    w, m, v = _adam_moments(w, g, m, v, step_size, bias_correction2_sqrt, beta1, beta2, eps)
    tl.store(W + offsets, w, mask=mask)
    tl.store(M + offsets, m, mask=mask)
    tl.store(V + offsets, v, mask=mask)
    if LOW_COPY:
        tl.store(W_low + offsets, w.to(tl.bfloat16), mask=mask)


def _source(function):
    """The plain Python function behind a function or a ``triton.jit`` wrapper of it."""
    return getattr(function, "fn", function)


@functools.lru_cache(maxsize=None)
def _programs(interpreting: bool) -> tuple[dict, dict]:
    """The helpers and programs compiled by ``triton.jit`` (separately for the CPU interpreter)."""
    # The interpreter runs helpers as plain Python (with triton.language patched); compiled programs need them jitted.
    helpers = {name: _source(globals()[name]) if interpreting else triton.jit(_source(globals()[name]))
               for name in ("_sortable_keys", "_kth_largest_key", "_top_k_slots", "_adam_moments", "_adam_scalars",
                            "_gradient_tiles", "_store_gradient_tiles")}
    programs = {name: triton.jit(_source(function)) for name, function in
                (("decode", _decode_program), ("selected_dot", _selected_dot_program), ("topk", _topk_program),
                 ("latent_gradients", _latent_gradients_program), ("combine_gradients", _combine_gradients_program),
                 ("adam_rows", _adam_rows_program), ("adam_flat", _adam_flat_program))}
    return helpers, programs


def _launch(name: str, grid: tuple[int, ...], *args, **meta) -> None:
    helpers, programs = _programs(triton_interpreting())
    globals().update(helpers)  # a program finds its helpers among the module's globals when compiled or interpreted
    programs[name][grid](*args, **meta)


def _per_token_program(name: str, operand: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, out_width: int,
                       max_column_blocks: int | None = None) -> torch.Tensor:
    """Launch a one-program-per-(seed, token) program (``decode`` or ``selected_dot``) over
    ``indices [S,B,K]`` into table ``[S,n,d]``; returns its float32 output ``[S,B,out_width]``. With
    ``max_column_blocks`` (decode) a program covers at most that many column blocks (grid axis 1 over the groups)."""
    n_seeds, batch, k = indices.shape
    n_rows, width = table.shape[1:]
    columns = min(COLUMN_BLOCK, triton.next_power_of_2(width))
    blocks = triton.cdiv(width, columns)
    groups = 1 if max_column_blocks is None else triton.cdiv(blocks, max_column_blocks)
    out = torch.empty(n_seeds, batch, out_width, dtype=torch.float32, device=table.device)
    _launch(name, (n_seeds * batch, groups), operand.contiguous(), indices.contiguous(), table.contiguous(), out, batch, k, n_rows, width,
            ROWS=min(MAX_ROW_BLOCK, triton.next_power_of_2(k)), COLUMNS=columns, COLUMN_BLOCKS=triton.cdiv(blocks, groups))
    return out


def decode_rows(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[s,b] = sum_j values[s,b,j] * table[s, indices[s,b,j]]``: ``[S,B,K]`` x ``[S,n,d]`` -> float32 ``[S,B,d]``."""
    if triton_usable(table):
        return _per_token_program("decode", values, indices, table, table.shape[2], max_column_blocks=DECODE_COLUMN_BLOCKS)
    return embedding_bag_rows(values.float(), indices, table.float())


def embedding_bag_rows(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The same sum with PyTorch's ``embedding_bag`` (differentiable; output in ``table``'s dtype):
    ``values [S,B,K]`` (in ``table``'s dtype), ``indices [S,B,K]``, ``table [S,n,d]`` -> ``[S,B,d]``."""
    n_seeds, batch, k = values.shape
    n_rows, width = table.shape[1:]
    offsets = (torch.arange(n_seeds, device=table.device) * n_rows).view(n_seeds, 1, 1)
    flat = F.embedding_bag((indices + offsets).reshape(n_seeds * batch, k), table.reshape(n_seeds * n_rows, width),
                           per_sample_weights=values.reshape(n_seeds * batch, k), mode="sum")
    return flat.view(n_seeds, batch, width)


def selected_dots(dense: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[s,b,j] = <dense[s,b], table[s, indices[s,b,j]]>``: ``[S,B,d]`` x ``[S,n,d]`` -> float32 ``[S,B,K]``."""
    n_seeds, batch, k = indices.shape
    width = table.shape[2]
    if triton_usable(table):
        return _per_token_program("selected_dot", dense, indices, table, k)
    rows = table.float().gather(1, indices.reshape(n_seeds, batch * k, 1).expand(-1, -1, width)).view(n_seeds, batch, k, width)
    return torch.einsum("sbkd,sbd->sbk", rows, dense.float())


def scatter_rows(weights: torch.Tensor, indices: torch.Tensor, d_sae: int, dense: torch.Tensor, transposed: bool = False,
                 low_precision: bool = False) -> torch.Tensor:
    """``out[s,i] = sum_{(b,j): indices[s,b,j]=i} weights[s,b,j] * dense[s,b]``: float32 ``[S, d_sae, d]``,
    or with ``transposed`` the same sums laid out ``[S, d, d_sae]``.

    On CUDA one batched matrix product with the codes scattered into a dense ``[S, B, d_sae]`` matrix
    (bf16 operands with ``low_precision``, as autocast would give a dense SAE); tensor cores beat every
    sparse reduction tried here (see the module docstring). Elsewhere ``index_add_`` over the
    ``B*K`` entries.
    """
    n_seeds, batch = indices.shape[:2]
    width = dense.shape[-1]
    if dense.is_cuda:
        dtype = torch.bfloat16 if low_precision else torch.float32
        codes = torch.zeros(n_seeds, batch, d_sae, dtype=dtype, device=dense.device).scatter_(-1, indices, weights.to(dtype))
        operand = dense.to(dtype)
        product = torch.bmm(operand.transpose(1, 2), codes) if transposed else torch.bmm(codes.transpose(1, 2), operand)
        return product.float()
    offsets = (torch.arange(n_seeds, device=dense.device) * d_sae).view(n_seeds, 1, 1)
    rows = dense.float().unsqueeze(2) * weights.float().unsqueeze(-1)
    by_latent = torch.zeros(n_seeds * d_sae, width, dtype=torch.float32, device=dense.device)
    by_latent.index_add_(0, (indices + offsets).reshape(-1), rows.reshape(-1, width))
    by_latent = by_latent.view(n_seeds, d_sae, width)
    return by_latent.transpose(1, 2).contiguous() if transposed else by_latent


def topk_columns(pre: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Columns ``[..., k]`` (int64, unordered) of the k largest entries in each row of ``pre [S, ..., n]``
    (plus ``bias [S, n]`` when given, added without materialising the sum) by the Triton top-k program
    (CUDA or interpreter). Needs ``ceil(n / TOPK_CHUNK) >= k``."""
    width = pre.shape[-1]
    rows = pre.reshape(-1, width).contiguous()
    # Wide rows: wider chunks past TOPK_MAX_CHUNKS chunks, and more warps so no thread holds more than
    # TOPK_KEYS_PER_THREAD keys of either selection (one warp over 8,192 chunk maxima spilled: 3.3 ms at 131k
    # latents; 16 warps over 16,384 took 1.86 ms at 262k, the bisection's block-wide sums).
    k_pad = triton.next_power_of_2(k)
    chunk = TOPK_CHUNK
    while triton.cdiv(width, chunk) > TOPK_MAX_CHUNKS and k_pad * chunk * 2 <= triton.cdiv(width, chunk):
        chunk *= 2  # both selections over at most max(TOPK_MAX_CHUNKS, ~sqrt(width * k)) keys
    n_chunks = triton.next_power_of_2(triton.cdiv(width, chunk))
    if triton.cdiv(width, chunk) < k:
        raise ValueError(f"topk_columns needs at least k={k} chunks of {chunk} columns, got width {width}")
    keys = max(n_chunks, k_pad * chunk)
    warps = TOPK_WARPS if keys <= 32 * TOPK_KEYS_PER_THREAD * TOPK_WARPS else min(16, triton.next_power_of_2(triton.cdiv(keys, 32 * TOPK_KEYS_PER_THREAD)))
    chunk_maxima = torch.empty(rows.shape[0], n_chunks, dtype=torch.float32, device=pre.device)
    chosen_chunks = torch.empty(rows.shape[0], k_pad, dtype=torch.int32, device=pre.device)
    out = torch.empty(rows.shape[0], k, dtype=torch.int64, device=pre.device)
    rows_per_bias = rows.shape[0] // bias.shape[0] if bias is not None else rows.shape[0]
    bias_rows = bias.contiguous() if bias is not None else rows
    _launch("topk", (rows.shape[0],), rows, bias_rows, chunk_maxima, chosen_chunks, out, width, k, rows_per_bias,
            N_CHUNKS=n_chunks, CHUNK=chunk, CHUNK_BLOCK=min(TOPK_CHUNK_BLOCK * warps, n_chunks), K_PAD=k_pad,
            HAS_BIAS=bias is not None, num_warps=warps)
    return out.view(*pre.shape[:-1], k)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives matrix products on this device now, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class DeferredWeightGradients:
    """What the sparse autograd Functions leave, during backward, for :func:`sparse_adam_step` to form the
    weight gradients from (instead of returning dense W_enc / W_dec gradients).

    One record per set of selected entries (the top-k codes, and AuxK's when it runs): ``indices [S,B,K]``,
    and from the backward passes the decoder's per-entry weights (the codes) with the decode's output
    gradient ``[S,B,d]``, and the encoder's per-entry weights (the selected pre-activations' gradients)
    with ``centered = x - b_dec [S,B,d]``. ``low_precision``: gradients from bf16 operands, as autocast
    gives the dense products."""

    def __init__(self, low_precision: bool):
        self.low_precision = low_precision
        self.records: list[dict] = []

    def record(self, indices: torch.Tensor) -> dict:
        entry = {"indices": indices}
        self.records.append(entry)
        return entry


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, W_dec, indices, table, record):
        if table is None:
            # Under autocast the rows are read in its dtype, as a dense product would read them (half the bytes).
            low_dtype = _autocast_dtype(W_dec.device.type)
            table = W_dec.to(low_dtype) if low_dtype is not None else W_dec
        ctx.low_precision = table.dtype != W_dec.dtype
        ctx.weight_dtype = W_dec.dtype
        ctx.d_sae = W_dec.shape[1]
        ctx.record = record
        ctx.save_for_backward(codes, table, indices)
        return decode_rows(codes, indices, table)

    @staticmethod
    def backward(ctx, grad_out):
        codes, table, indices = ctx.saved_tensors
        grad_codes = selected_dots(grad_out, indices, table) if ctx.needs_input_grad[0] else None
        grad_W_dec = None
        if ctx.record is not None:
            # Detached, and the ctx lets go of the record: a record referring back to the graph would keep the
            # step's autograd graph (its AccumulateGrad nodes) alive into the next step and break CUDA-graph capture.
            record, ctx.record = ctx.record, None
            record["decoder_weights"], record["decoder_dense"] = codes.detach(), grad_out.detach()
        elif ctx.needs_input_grad[1]:
            grad_W_dec = scatter_rows(codes, indices, ctx.d_sae, grad_out, low_precision=ctx.low_precision).to(ctx.weight_dtype)
        return grad_codes, grad_W_dec, None, None, None


class _SelectedPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, centered, W_enc, b_enc, b_dec, indices, bias_separate, encoder_table, record):
        ctx.low_precision = _autocast_dtype(W_enc.device.type) is not None
        ctx.record = record
        ctx.save_for_backward(centered, W_enc if encoder_table is None else encoder_table, indices)
        selected = pre.gather(-1, indices).float()
        if bias_separate:
            selected = selected + b_enc.detach().float().gather(1, indices.flatten(1)).view_as(selected)
        return selected

    @staticmethod
    def backward(ctx, grad_values):
        centered, W_enc, indices = ctx.saved_tensors
        n_seeds, d_sae = W_enc.shape[0], W_enc.shape[2]
        grad_W_enc = None
        if ctx.record is not None:
            record, ctx.record = ctx.record, None
            record["encoder_weights"], record["encoder_dense"] = grad_values.detach(), centered.detach()
        elif ctx.needs_input_grad[2]:
            grad_W_enc = scatter_rows(grad_values, indices, d_sae, centered, transposed=True, low_precision=ctx.low_precision).to(W_enc.dtype)
        per_latent = grad_values.new_zeros(n_seeds, d_sae, dtype=torch.float32).scatter_add_(
            1, indices.reshape(n_seeds, -1), grad_values.reshape(n_seeds, -1).float())
        grad_b_dec = None
        if ctx.needs_input_grad[4]:
            # With a bf16 encoder copy this is the bf16 product autocast gives the dense path's b_dec gradient.
            grad_b_dec = -torch.bmm(W_enc, per_latent.to(W_enc.dtype).unsqueeze(-1)).squeeze(-1).float()
        return None, None, grad_W_enc, per_latent if ctx.needs_input_grad[3] else None, grad_b_dec, None, None, None, None


def sparse_decode(codes: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor, table: torch.Tensor | None = None,
                  record: dict | None = None) -> torch.Tensor:
    """Differentiable ``sum_j codes[s,b,j] * W_dec[s, indices[s,b,j]]``: codes ``[S,B,K]``, W_dec
    ``[S, d_sae, d]``, indices ``[S,B,K]`` int64 -> float32 ``[S,B,d]`` (no bias).

    ``table``: the rows to read instead of ``W_dec`` (a bf16 copy kept by the optimizer); ``record`` (from
    :class:`DeferredWeightGradients`): leave W_dec's gradient to :func:`sparse_adam_step` instead of returning it."""
    return _SparseDecode.apply(codes, W_dec, indices, table, record)


def selected_preactivations(pre: torch.Tensor, centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                            b_dec: torch.Tensor, indices: torch.Tensor, bias_separate: bool = False,
                            encoder_table: torch.Tensor | None = None, record: dict | None = None) -> torch.Tensor:
    """The pre-activations ``a = centered W_enc + b_enc`` (``centered = x - b_dec``, ``[S,B,d]``) at
    ``indices [S,B,K]``, float32 ``[S,B,K]``, read from ``pre [S,B,d_sae]`` computed without autograd (``a``
    itself, or with ``bias_separate`` the product alone, b_enc then added here), with the gradients they
    would have had through the dense product flowing to W_enc, b_enc and b_dec.

    ``encoder_table``: a bf16 copy of W_enc for b_dec's gradient; ``record``: leave W_enc's gradient to
    :func:`sparse_adam_step` (see :class:`DeferredWeightGradients`)."""
    return _SelectedPreactivations.apply(pre, centered, W_enc, b_enc, b_dec, indices, bias_separate, encoder_table, record)


# Latent-sorted weight gradients: latents per block, entries per product, columns of d per program (wider
# from GRAD_WIDE_D on), entries per work item (at least; more when there are many entries, so that the
# partial tiles of shared blocks need at most GRAD_MAX_SLOTS slots).
GRAD_LATENTS = 32
GRAD_ENTRIES = 64
GRAD_COLUMNS = 64
GRAD_WIDE_D = 512
GRAD_CHUNK = 256
GRAD_MAX_SLOTS = 1024
# Past this many entries per latent (per seed) the weight gradients are two dense products instead: on the
# H200 the sparse program costs ~2e-12 s per entry and column of d, the bf16 products ~5.7e-15 s per
# B * d_sae * d (cuBLAS at ~700 TFLOP/s), equal at ~12 entries per latent for B = 4096 (top-k k=40 at 16k
# latents: 0.19 ms sparse vs 0.25 dense; an AuxK step's 512 extra entries per token favour the products below ~190k latents).
GRAD_DENSE_ENTRIES_PER_LATENT = 12
# Adam over decoder rows: at most this many elements (rows x next_power_of_2(d)) per program.
ADAM_ROW_ELEMENTS = 4096
ADAM_BLOCK = 2048


def sort_entries_by_latent(indices: list[torch.Tensor], d_sae: int) -> dict[str, torch.Tensor]:
    """The entries of several ``indices [S,B,K_p]`` tensors sorted by (seed, latent), stably.

    Returns ``keys`` (int32 ``s * d_sae + latent`` per sorted entry), ``order`` (each sorted entry's
    position in the concatenation of the flattened tensors, per seed), ``rows`` (int32 ``p * B + token``,
    the entry's row in the stacked dense operands) and ``segments`` (int32 ``[S * d_sae + 1]``: latent
    ``s * d_sae + i`` owns sorted entries ``segments[i] .. segments[i+1]``)."""
    n_seeds, batch = indices[0].shape[:2]
    device = indices[0].device
    if n_seeds * d_sae >= 2**31:
        raise ValueError("sort_entries_by_latent: seeds x d_sae must stay below 2**31")
    offsets, rows, queries = _entry_constants(n_seeds, batch, tuple(chosen.shape[2] for chosen in indices), d_sae, device)
    flat = indices[0].reshape(n_seeds, -1) if len(indices) == 1 else torch.cat([chosen.reshape(n_seeds, -1) for chosen in indices], dim=1)
    keys = (flat.to(torch.int32) + offsets).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    sorted_rows = rows.reshape(-1)[order]
    segments = torch.searchsorted(sorted_keys, queries, out_int32=True)
    return {"keys": sorted_keys, "order": order, "rows": sorted_rows, "segments": segments}


@functools.lru_cache(maxsize=16)
def _entry_constants(n_seeds: int, batch: int, ks: tuple[int, ...], d_sae: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For :func:`sort_entries_by_latent`: per-seed key offsets ``[S, 1]``, each entry's dense row ``[S, N]``
    (``p * B + token`` for set p) and the segment queries ``0 .. S * d_sae`` (int32; made once per layout)."""
    offsets = (torch.arange(n_seeds, device=device, dtype=torch.int32) * d_sae).view(n_seeds, 1)
    tokens = torch.arange(batch, device=device, dtype=torch.int32).view(batch, 1)
    rows = torch.cat([(tokens + part * batch).expand(batch, k).reshape(-1) for part, k in enumerate(ks)])
    queries = torch.arange(n_seeds * d_sae + 1, device=device, dtype=torch.int32)
    return offsets, rows.expand(n_seeds, -1).contiguous(), queries


def _dense_latent_gradients(entries: dict[str, torch.Tensor], decoder_weights: torch.Tensor, encoder_weights: torch.Tensor,
                            decoder_dense: torch.Tensor, encoder_dense: torch.Tensor, W_dec: torch.Tensor, operand_dtype: torch.dtype,
                            with_W_dec: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`latent_gradients` as two batched products on the entries scattered into a dense ``[S, R, d_sae]``
    code matrix (in ``operand_dtype``, as autocast gives the dense path), for steps with many entries per latent."""
    n_seeds, d_sae, width = W_dec.shape
    keys = entries["keys"].long()
    seeds, rows = keys // d_sae, entries["rows"].long()
    latents = keys - seeds * d_sae
    codes = torch.zeros(n_seeds, decoder_dense.shape[1], d_sae, dtype=operand_dtype, device=W_dec.device)
    codes[seeds, rows, latents] = decoder_weights.to(operand_dtype)
    grad_dec = torch.bmm(codes.transpose(1, 2), decoder_dense).float()
    codes[seeds, rows, latents] = encoder_weights.to(operand_dtype)  # the same positions: every entry is overwritten
    grad_enc = torch.bmm(encoder_dense.transpose(1, 2), codes).float()
    weights = W_dec.float()
    statistics = torch.stack([
        grad_dec.square().sum(-1),
        (grad_dec * weights).sum(-1) if with_W_dec else torch.zeros(n_seeds, d_sae, device=W_dec.device),
        weights.square().sum(-1) if with_W_dec else torch.ones(n_seeds, d_sae, device=W_dec.device),
        grad_enc.square().sum(1),
    ], dim=-1)
    return grad_dec, grad_enc, statistics


@functools.lru_cache(maxsize=16)
def _block_bounds(n_seeds: int, d_sae: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the segments of each latent block's first latent and of the latent after its last."""
    blocks = torch.arange(n_seeds * triton.cdiv(d_sae, GRAD_LATENTS), device=device)
    per_seed = triton.cdiv(d_sae, GRAD_LATENTS)
    seed, first = blocks // per_seed, (blocks % per_seed) * GRAD_LATENTS
    return seed * d_sae + first, seed * d_sae + (first + GRAD_LATENTS).clamp(max=d_sae)


def _gradient_work_items(segments: torch.Tensor, n_seeds: int, d_sae: int, n_entries: int) -> dict:
    """Work items of :func:`_latent_gradients_program`: each latent block is cut into items of at most
    ``chunk`` entries (one item for an empty block). Static sizes (for CUDA graphs): ``capacity`` items,
    those past the real count marked by block ``total_blocks``; ``slots`` partial tiles for shared blocks."""
    chunk = max(GRAD_CHUNK, triton.next_power_of_2(triton.cdiv(n_entries, GRAD_MAX_SLOTS // 2)))
    first, after = _block_bounds(n_seeds, d_sae, segments.device)
    total_blocks = first.numel()
    counts = (segments[after] - segments[first]).long()
    n_items = ((counts + chunk - 1) // chunk).clamp_min(1)
    inclusive = n_items.cumsum(0)
    capacity = total_blocks + triton.cdiv(n_entries, chunk)  # sum of max(1, ceil(count / chunk)) over blocks
    items = torch.arange(capacity, device=segments.device)
    item_block = torch.searchsorted(inclusive, items, right=True)
    item_chunk = items - (inclusive - n_items)[item_block.clamp(max=total_blocks - 1)]
    shared = torch.where(n_items > 1, n_items, 0)
    return {"item_block": item_block.to(torch.int32), "item_chunk": item_chunk.to(torch.int32), "block_items": n_items.to(torch.int32),
            "block_slot": (shared.cumsum(0) - shared).to(torch.int32), "capacity": capacity, "total_blocks": total_blocks,
            "chunk": chunk, "slots": max(1, 2 * triton.cdiv(n_entries, chunk))}  # a shared block has > chunk entries


def latent_gradients(entries: dict[str, torch.Tensor], decoder_weights: torch.Tensor, encoder_weights: torch.Tensor,
                     decoder_dense: torch.Tensor, encoder_dense: torch.Tensor, W_dec: torch.Tensor, low_precision: bool,
                     with_W_dec: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both weight gradients of a top-k SAE from its selected entries, without dense code matrices.

    ``entries`` from :func:`sort_entries_by_latent`; ``decoder_weights`` / ``encoder_weights`` (float32, in
    the sorted order) weigh the rows ``decoder_dense[s, rows[e]]`` / ``encoder_dense[s, rows[e]]`` (``[S, R, d]``).
    Returns float32 ``grad_dec [S, d_sae, d]``, ``grad_enc [S, d, d_sae]`` and per-latent statistics
    ``[S, d_sae, 4]``: ``|grad_dec row|^2``, ``<grad_dec row, W_dec row>``, ``|W_dec row|^2`` (the last two
    0 and 1 without ``with_W_dec``) and ``|grad_enc column|^2``.

    On CUDA (or Triton's interpreter) one program per work item (a block of latents, or part of one) and block
    of columns, or, past ``GRAD_DENSE_ENTRIES_PER_LATENT`` entries per latent (an AuxK step at moderate widths),
    two dense products on the scattered entries; elsewhere ``index_add_``."""
    n_seeds, d_sae, width = W_dec.shape
    operand_dtype = torch.bfloat16 if low_precision else torch.float32
    decoder_dense = decoder_dense.to(operand_dtype).contiguous()
    encoder_dense = encoder_dense.to(operand_dtype).contiguous()
    if triton_usable(W_dec) and entries["keys"].numel() > GRAD_DENSE_ENTRIES_PER_LATENT * n_seeds * d_sae:
        return _dense_latent_gradients(entries, decoder_weights, encoder_weights, decoder_dense, encoder_dense, W_dec, operand_dtype, with_W_dec)
    if not triton_usable(W_dec):
        seeds = entries["keys"].long() // d_sae
        gathered = (seeds * decoder_dense.shape[1] + entries["rows"].long())
        dec_rows = decoder_dense.float().reshape(-1, width)[gathered] * decoder_weights.to(operand_dtype).float().unsqueeze(-1)
        enc_rows = encoder_dense.float().reshape(-1, width)[gathered] * encoder_weights.to(operand_dtype).float().unsqueeze(-1)
        grad_dec = torch.zeros(n_seeds * d_sae, width, device=W_dec.device).index_add_(0, entries["keys"].long(), dec_rows).view(n_seeds, d_sae, width)
        grad_enc_rows = torch.zeros(n_seeds * d_sae, width, device=W_dec.device).index_add_(0, entries["keys"].long(), enc_rows)
        grad_enc = grad_enc_rows.view(n_seeds, d_sae, width).transpose(1, 2).contiguous()
        weights = W_dec.float() if with_W_dec else None
        statistics = torch.stack([
            grad_dec.square().sum(-1),
            (grad_dec * weights).sum(-1) if with_W_dec else torch.zeros(n_seeds, d_sae, device=W_dec.device),
            weights.square().sum(-1) if with_W_dec else torch.ones(n_seeds, d_sae, device=W_dec.device),
            grad_enc_rows.view(n_seeds, d_sae, width).square().sum(-1),
        ], dim=-1)
        return grad_dec, grad_enc, statistics
    columns = min(GRAD_COLUMNS * (2 if width >= GRAD_WIDE_D else 1), max(16, triton.next_power_of_2(width)))
    column_blocks = triton.cdiv(width, columns)
    items = _gradient_work_items(entries["segments"], n_seeds, d_sae, entries["keys"].numel())
    grad_dec = torch.empty(n_seeds, d_sae, width, dtype=torch.float32, device=W_dec.device)
    grad_enc = torch.empty(n_seeds, width, d_sae, dtype=torch.float32, device=W_dec.device)
    statistics = torch.empty(column_blocks, n_seeds * d_sae, 4, dtype=torch.float32, device=W_dec.device)
    partial_dec = torch.empty(items["slots"], GRAD_LATENTS, width, dtype=torch.float32, device=W_dec.device)
    partial_enc = torch.empty_like(partial_dec)
    grid = (items["capacity"], column_blocks)
    work = (items["item_block"], items["item_chunk"], items["block_items"], items["block_slot"])
    warps = 8 if columns >= 128 else 4
    _launch("latent_gradients", grid, *work, entries["segments"], entries["keys"], entries["rows"], decoder_weights.float().contiguous(),
            encoder_weights.float().contiguous(), decoder_dense, encoder_dense, W_dec.contiguous(), grad_dec, grad_enc, statistics,
            partial_dec, partial_enc, d_sae, width, decoder_dense.shape[1], n_seeds * d_sae, items["total_blocks"],
            LATENTS=GRAD_LATENTS, ENTRIES=GRAD_ENTRIES, COLUMNS=columns, CHUNK=items["chunk"], LOW_PRECISION=low_precision,
            WITH_W_DEC=with_W_dec, EMULATE_BF16=triton_interpreting(), num_warps=warps)
    _launch("combine_gradients", grid, *work, W_dec.contiguous(), grad_dec, grad_enc, statistics, partial_dec, partial_enc,
            d_sae, width, n_seeds * d_sae, items["total_blocks"], LATENTS=GRAD_LATENTS, COLUMNS=columns, WITH_W_DEC=with_W_dec, num_warps=warps)
    return grad_dec, grad_enc, statistics.sum(dim=0).view(n_seeds, d_sae, 4)


def _adam_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> dict:
    """``parameter``'s Adam state as torch.optim.Adam keeps it (created as it would create it), the step on the parameter's device."""
    state = optimizer.state[parameter]
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
        state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
    elif state["step"].device != parameter.device:
        state["step"] = state["step"].to(parameter.device, torch.float32)
    return state


def _adam_launch(name: str, optimizer: torch.optim.Optimizer, parameter: torch.Tensor, gradient: torch.Tensor, low_copy: torch.Tensor | None,
                 clip_scale: torch.Tensor | None, lr: torch.Tensor, grid: tuple[int, ...], *shape_args, **meta) -> None:
    group = optimizer.param_groups[0]
    beta1, beta2 = (float(beta) for beta in group["betas"])
    state = _adam_state(optimizer, parameter)
    _launch(name, grid, parameter, gradient.contiguous(), state["exp_avg"], state["exp_avg_sq"],
            low_copy if low_copy is not None else parameter, clip_scale if clip_scale is not None else lr, lr, state["step"],
            *shape_args, beta1, beta2, float(group["eps"]), math.log2(beta1), math.log2(beta2),
            CLIP=clip_scale is not None, LOW_COPY=low_copy is not None, **meta)


@torch.no_grad()
def sparse_adam_step(optimizer: torch.optim.Optimizer, deferred: DeferredWeightGradients, W_enc: torch.Tensor, W_dec: torch.Tensor,
                     b_enc: torch.Tensor, b_dec: torch.Tensor, low_copies: tuple[torch.Tensor, torch.Tensor] | None,
                     clip_norm: float | None, unit_norm_decoder: bool) -> None:
    """One optimizer step of a top-k SAE whose weight gradients were deferred (``deferred``), as
    ``remove_parallel_decoder_gradient`` (``unit_norm_decoder``), per-seed ``clip_gradients_per_seed``
    (``clip_norm``), ``torch.optim.Adam`` (``optimizer``'s hyper-parameters and state, kept in its own
    layout so its state_dict is unchanged) and ``normalize_decoder`` would do it, in three passes:

    1. :func:`latent_gradients` forms both weight gradients from the entries (sorted by latent) with
       per-latent statistics, from which the per-seed clipping scale follows without another pass;
    2. Adam over W_dec's rows (projection, scale, update, renormalisation, bf16 copy in one program);
    3. elementwise Adam over W_enc (bf16 copy too), b_enc and b_dec.

    ``low_copies``: bf16 ``(W_enc, W_dec)`` copies the step refreshes (what the next forward reads). The
    learning rate is read from device memory (a tensor ``lr`` of the optimizer's group, or one made here),
    so the step can be captured in a CUDA graph. Needs Triton (CUDA or its interpreter); b_enc and b_dec
    must hold their gradients."""
    group = optimizer.param_groups[0]
    if group.get("weight_decay", 0) or group.get("amsgrad", False) or group.get("maximize", False):
        raise ValueError("sparse_adam_step implements plain Adam (no weight decay, amsgrad or maximize)")
    records = deferred.records
    n_seeds, d_sae, width = W_dec.shape
    entries = sort_entries_by_latent([record["indices"] for record in records], d_sae)

    batch = records[0]["indices"].shape[1]

    def stacked(key: str, per_record: Callable[[dict], torch.Tensor], missing: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        parts = [per_record(record) if key in record else missing(record) for record in records]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # Per-entry weights in the sorted order; dense operands stacked along the rows (record p's rows p*B..).
    per_entry = [stacked(key, lambda record, key=key: record[key].reshape(n_seeds, -1).float(),
                         lambda record: torch.zeros(n_seeds, record["indices"][0].numel(), device=W_dec.device)).reshape(-1)[entries["order"]]
                 for key in ("decoder_weights", "encoder_weights")]
    decoder_dense, encoder_dense = (stacked(key, lambda record, key=key: record[key], lambda record: torch.zeros(n_seeds, batch, width, device=W_dec.device))
                                    for key in ("decoder_dense", "encoder_dense"))
    grad_dec, grad_enc, statistics = latent_gradients(entries, *per_entry, decoder_dense, encoder_dense, W_dec,
                                                      deferred.low_precision, with_W_dec=unit_norm_decoder)
    grad_b_enc = b_enc.grad if b_enc.grad is not None else torch.zeros_like(b_enc)
    grad_b_dec = b_dec.grad if b_dec.grad is not None else torch.zeros_like(b_dec)
    clip_scale = None
    if clip_norm is not None:
        squared, dots, weight_squared, encoder_squared = statistics.unbind(-1)
        if unit_norm_decoder:  # |g - <g,u>u|^2 with u = w / |w| (as remove_parallel_decoder_gradient projects)
            norms = weight_squared.sqrt().clamp_min(1e-12)
            along = dots / norms
            squared = (squared - 2 * along.square() + along.square() * (weight_squared / norms.square())).clamp_min(0)
        total = squared.sum(-1) + encoder_squared.sum(-1) + grad_b_enc.float().square().sum(-1) + grad_b_dec.float().square().sum(-1)
        clip_scale = (float(clip_norm) / (total.sqrt() + 1e-6)).clamp(max=1.0)
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=torch.float32, device=W_dec.device)
    states = [_adam_state(optimizer, parameter) for parameter in (W_enc, W_dec, b_enc, b_dec)]
    steps = [state["step"] for state in states]
    if steps[0].device.type == "cuda":
        torch._foreach_add_(steps, 1.0)
    else:
        for step in steps:
            step.add_(1.0)
    low_enc, low_dec = low_copies if low_copies is not None else (None, None)
    block = triton.next_power_of_2(width)
    rows = max(1, ADAM_ROW_ELEMENTS // block)
    _adam_launch("adam_rows", optimizer, W_dec, grad_dec, low_dec, clip_scale, lr, (triton.cdiv(n_seeds * d_sae, rows),),
                 n_seeds * d_sae, d_sae, width, ROWS=rows, BLOCK=block, PROJECT=unit_norm_decoder, NORMALIZE=unit_norm_decoder,
                 num_warps=8 if block >= 2048 else 4)
    for parameter, gradient, low in ((W_enc, grad_enc, low_enc), (b_enc, grad_b_enc, None), (b_dec, grad_b_dec, None)):
        numel = parameter.numel()
        _adam_launch("adam_flat", optimizer, parameter, gradient.float(), low, clip_scale, lr, (triton.cdiv(numel, ADAM_BLOCK),),
                     numel, numel // n_seeds, BLOCK=ADAM_BLOCK)
    records.clear()
