"""The Triton programs of the sparse SAE kernels, their helpers, and how they are compiled and launched.

The programs and the helpers they call live in this one module: :func:`launch` compiles them once
(``triton.jit``, or plain Python in Triton's CPU interpreter) and a program finds its helpers among
this module's globals. :func:`triton_usable` says whether the programs run on a tensor; tests switch
the CPU interpreter on with ``INTERPRET_ON_CPU`` (and ``TRITON_INTERPRET=1`` set before Triton is imported).

Longer than 500 lines because a Triton program finds the helpers it calls among its own module's
globals: splitting the programs over modules would mean importing every helper into each of them.
"""

import functools
import os

import torch

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
# Wide decode (round 4): one program per (token, block of this many columns), DECODE_ROWS selected rows at a
# time accumulated in a [DECODE_ROWS, columns] tile and summed once at the end; a warp per 256 columns, so each
# thread holds every row of its 8 columns and the sum stays inside the thread (the [64, 128] tiles of the
# program above are split over rows across warps: a shared-memory reduction per column block, 2x the
# selected-dot program's time at d_in 512 on the H200). None: the program above.
# Round 8 (H200, benchmarks/issue17_logs/round8_forward_variants.log): 4 rows instead of 8, the decode 0.053 -> 0.030 ms
# at 16,384 x 512, k 64 (0.024 either way at k 40); with SELECTED_DOT_WIDE_COLUMNS 128 the step 0.97-0.99x at k 64,
# unchanged at k 40, over the 16 sizes of the table (round8_decode_rows_variants.log).
DECODE_WIDE_COLUMNS = 256
DECODE_ROWS = 4
# Wide selected dots (round 4), the decode's layout for the decode's backward: one program per (token, group of
# SELECTED_DOT_ROWS selected rows), columns in blocks of this many added into a [rows, columns] tile, summed over
# the columns once at the end. None: the per-token program (a [64, 128] tile per column block, K padded to 64).
# (Round 8: 128 columns instead of 256, the program 0.048 -> 0.043 ms at 16,384 x 512, k 64, 0.032 -> 0.029 at k 40.)
SELECTED_DOT_WIDE_COLUMNS = 128
SELECTED_DOT_ROWS = 8
# Round 7: the wide decode reads no row whose code is 0, and the wide selected dots (given the codes) none either,
# writing 0 there (BatchTopK's dropped candidates and Matryoshka's other groups are zero codes). False: every row read.
SKIP_ZERO_CODES = True
# Key below that of -inf (see _sortable_keys): marks candidate slots past the row's end.
BELOW_ALL_KEYS = tl.constexpr(-2139095042)
# Top-k: columns per chunk, chunks whose maxima one load covers, warps per row.
TOPK_CHUNK = 16
TOPK_CHUNK_BLOCK = 128
TOPK_WARPS = 1
# Wide rows: at most this many chunks (wider chunks beyond), and keys per thread (more warps beyond).
TOPK_MAX_CHUNKS = 4096
TOPK_KEYS_PER_THREAD = 32
# Rows (tokens of one seed) per top-k program: the encoder-bias tile (float32, twice the bytes of the bf16
# pre-activations it is added to) is loaded once for them all instead of once per row; 1 = a program per row.
# On the H200 (round 4, benchmarks/issue17_logs/round4_variants.log) 4 rows did not pay: top-k 0.118 -> 0.146 ms at
# 16,384 latents, 0.549 -> 0.578 at 65,536, 1.378 -> 1.337 at 262,144 (32-element tiles): the bias reads are not the cost.
TOPK_ROWS = 1
# Elements of the row one thread loads per chunk-maxima tile at most (None: TOPK_CHUNK_BLOCK chunks per warp
# whatever the chunk's width, the shape before round 4: 256 a thread at 262,144 latents, 128 at 131,072). 64 is
# that shape below 131,072 latents; at 262,144 x 2304 top-k took 1.40 ms uncapped, 1.13-1.14 with 64 and 1.38 with 32
# (one row a program; round 4, benchmarks/issue17_logs/round4*_variants.log and round4_final_table.log).
TOPK_TILE_PER_THREAD = 64
# Round 6: the top-k program's selected values and firing counts from the chosen columns read back after their store
# (a K_PAD vector) instead of over the [K_PAD * CHUNK] candidates in registers (False; on the H200 that made top-k
# 0.088 -> 0.109 ms at 512 x 16k, k 40: benchmarks/issue17_logs/round6_forward_variants.log).
TOPK_VALUES_READ_BACK = True
# Both top-k bisections stop at the first probe with exactly k keys at or above it (False: all 33 halvings, the
# selection before round 6; the same columns in the same slots either way).
TOPK_EARLY_EXIT = True


# Run the Triton programs on CPU tensors too (tests only; needs TRITON_INTERPRET=1 set before Triton is imported).
INTERPRET_ON_CPU = False


def triton_interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(tensor: torch.Tensor) -> bool:
    """Whether the Triton programs run on ``tensor``: on CUDA, or on the CPU when ``INTERPRET_ON_CPU``
    and Triton's interpreter is on."""
    return triton is not None and (tensor.is_cuda or (INTERPRET_ON_CPU and triton_interpreting()))


def _weighted_rows_tile(values, indices, table_seed, token, K, D, row_start, columns, column_mask, ROWS: tl.constexpr,
                        SKIP_ZERO: tl.constexpr = False, END=None):
    """``values[t, j] * table_seed[indices[t, j], columns]`` for the ``ROWS`` selected slots from ``row_start``
    (slots past ``K``, or past ``END`` when given, and masked columns give 0): the float32 ``[ROWS, COLUMNS]`` tile
    both decode programs sum. ``SKIP_ZERO``: rows whose value is 0 are not read (they add 0 either way)."""
    slots = row_start + tl.arange(0, ROWS)
    slot_mask = slots < K if END is None else slots < END
    rows = tl.load(indices + token * K + slots, mask=slot_mask, other=0).to(tl.int64)
    weights = tl.load(values + token * K + slots, mask=slot_mask, other=0.0).to(tl.float32)
    row_mask = slot_mask & (weights != 0) if SKIP_ZERO else slot_mask
    tile = tl.load(table_seed + rows[:, None] * D + columns[None, :], mask=row_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
    return tile * weights[:, None]


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
            total += tl.sum(_weighted_rows_tile(values, indices, table_seed, token, K, D, row_start, columns, column_mask, ROWS), axis=0)
        tl.store(out + token * D + columns, total, mask=column_mask)


def _decode_wide_program(values, indices, table, out, bias, starts, ends, n_tokens, K, table_rows, D, ROWS: tl.constexpr,
                         COLUMNS: tl.constexpr, HAS_BIAS: tl.constexpr, SKIP_ZERO: tl.constexpr, HAS_RANGES: tl.constexpr):
    """One program per (seed, token) and block of ``COLUMNS`` columns (grid axis 1): ``out[t] = sum_j values[t, j] *
    table[seed, indices[t, j]]``, ``ROWS`` selected rows at a time added into a ``[ROWS, COLUMNS]`` tile, summed
    over its rows once at the end; with ``HAS_BIAS`` (round 6) plus ``bias[seed]`` (float32 ``[S, D]``), one float32 add;
    with ``SKIP_ZERO`` (round 7) rows of zero values unread; with ``HAS_RANGES`` (round 7) only slots
    ``starts[t] .. ends[t]`` (int32) summed, the others being zero."""
    token = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    column_mask = columns < D
    seed = token // n_tokens
    table_seed = table + seed * table_rows * D
    total = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
    if HAS_RANGES:
        first, end = tl.load(starts + token), tl.load(ends + token)
    else:
        first, end = 0, K
    for row_start in range(first, end, ROWS):
        total += _weighted_rows_tile(values, indices, table_seed, token, K, D, row_start, columns, column_mask, ROWS, SKIP_ZERO, end)
    decoded = tl.sum(total, axis=0)
    if HAS_BIAS:
        decoded += tl.load(bias + seed * D + columns, mask=column_mask, other=0.0)
    tl.store(out + token * D + columns, decoded, mask=column_mask)


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


def _selected_dot_wide_program(dense, indices, table, out, codes, starts, ends, n_tokens, K, table_rows, D, ROWS: tl.constexpr,
                               COLUMNS: tl.constexpr, SKIP_ZERO: tl.constexpr, HAS_RANGES: tl.constexpr):
    """One program per (seed, token) and group of ``ROWS`` selected rows (grid axis 1): ``out[t, j] = <dense[t],
    table[seed, indices[t, j]]>``, the products of ``COLUMNS`` columns at a time added into a ``[ROWS, COLUMNS]``
    tile, summed over its columns once at the end; with ``SKIP_ZERO`` (round 7) 0 where ``codes[t, j]`` is 0, its row
    unread; with ``HAS_RANGES`` (round 7) 0 outside slots ``starts[t] .. ends[t]``, a group without such slots
    reading nothing."""
    token = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    slot_mask = slots < K
    seed = token // n_tokens
    table_seed = table + seed * table_rows * D
    rows = tl.load(indices + token * K + slots, mask=slot_mask, other=0).to(tl.int64)
    if SKIP_ZERO:
        slot_mask = slot_mask & (tl.load(codes + token * K + slots, mask=slot_mask, other=0.0) != 0)
    width = D
    if HAS_RANGES:
        first, end = tl.load(starts + token), tl.load(ends + token)
        slot_mask = slot_mask & (slots >= first) & (slots < end)
        width = tl.where((tl.program_id(1) * ROWS < end) & (tl.program_id(1) * ROWS + ROWS > first), D, 0)
    total = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
    for column_start in range(0, width, COLUMNS):
        columns = column_start + tl.arange(0, COLUMNS)
        column_mask = columns < D
        row = tl.load(dense + token * D + columns, mask=column_mask, other=0.0).to(tl.float32)
        tile = tl.load(table_seed + rows[:, None] * D + columns[None, :],
                       mask=slot_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
        total += tile * row[None, :]
    tl.store(out + token * K + slots, tl.sum(total, axis=1), mask=slots < K)


def _sortable_keys(values):
    """int32 keys that order like the float32 ``values`` (negative floats get their magnitude bits flipped);
    -inf maps to -2139095041, above every key :data:`BELOW_ALL_KEYS` marks."""
    bits = values.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_largest_key(keys, K, EARLY_EXIT: tl.constexpr):
    """The K-th largest of ``keys`` (ties counted), by bisection: 33 halvings cover any range of width <= 2**33.

    With ``EARLY_EXIT`` the bisection stops at the first probe ``t`` with exactly K keys ``>= t`` (typically after
    10-15 of the 33 block-wide counts) and returns the smallest of those K keys: the same key as the full bisection."""
    low = tl.min(keys, axis=0).to(tl.int64)
    high = tl.max(keys, axis=0).to(tl.int64)
    if EARLY_EXIT:
        # Invariant: at least K keys >= low, fewer than K keys >= high + 1; a probe hitting K exactly ends the loop.
        while low < high:
            middle = low + (high - low + 1) // 2
            count = tl.sum((keys >= middle.to(tl.int32)).to(tl.int32), axis=0)
            low = tl.where(count >= K, middle, low)
            high = tl.where(count > K, high, tl.where(count == K, middle, middle - 1))
        return tl.min(tl.where(keys >= low.to(tl.int32), keys, 2147483647), axis=0)
    for _ in range(33):
        middle = low + (high - low + 1) // 2
        enough = tl.sum((keys >= middle.to(tl.int32)).to(tl.int32), axis=0) >= K
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle - 1)
    return low.to(tl.int32)


def _top_k_slots(keys, K, EARLY_EXIT: tl.constexpr):
    """For the K largest of ``keys`` (ties broken by position): each entry's output slot ``rank``
    (0..K-1 where ``chosen``) and the mask ``chosen``; slots are filled by prefix sums, not sorting."""
    threshold = _kth_largest_key(keys, K, EARLY_EXIT)
    above = keys > threshold
    tied = keys == threshold
    n_above = tl.sum(above.to(tl.int32), axis=0)
    rank = tl.where(above, tl.cumsum(above.to(tl.int32), axis=0) - 1, n_above + tl.cumsum(tied.to(tl.int32), axis=0) - 1)
    return rank, (above | tied) & (rank < K)


def _topk_program(pre, bias, chunk_maxima, chosen_chunks, out, values_out, firing, n, K, rows_per_bias, rows_per_seed,
                  N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr, CHUNK_BLOCK: tl.constexpr, K_PAD: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, EARLY_EXIT: tl.constexpr, WRITE_VALUES: tl.constexpr,
                  COUNT_FIRING: tl.constexpr, READ_BACK: tl.constexpr):
    """One program per ``ROWS`` consecutive rows of ``pre [rows, n]`` (``ROWS`` divides ``rows`` and
    ``rows_per_bias``): each row's K largest entries' columns into ``out [rows, K]``. With ``HAS_BIAS`` the row
    is ``pre[row] + bias[row // rows_per_bias]`` (the bias added on the fly; the program's rows share one bias
    row, whose tiles are loaded once for them all).

    Round 6: with ``WRITE_VALUES`` the chosen entries' float32 values (``pre + bias``, the sum as it was ranked)
    also go to ``values_out [rows, K]``, in ``out``'s order; with ``COUNT_FIRING`` each chosen entry whose value is
    above 0 (whose ReLU code fires) adds 1 to ``firing [rows // rows_per_seed, n]`` (float32 atomics of 1.0: exact
    and order-free below 2**24 per latent; ``firing`` zero-filled by the caller).

    Chunk c is columns ``[c*CHUNK, (c+1)*CHUNK)``. With T the K-th largest chunk maximum, the K
    chunks made of every chunk whose maximum exceeds T plus the first chunks whose maximum equals
    T hold a top-k set (see :func:`sae_pipeline.sae.selection.topk_indices`); the K largest of their
    ``K*CHUNK`` entries are chosen with ties broken by position. Both selections find the K-th
    largest value by bisection over order-preserving integer keys and place the winners by a
    prefix sum, so nothing is sorted.
    """
    first_row = tl.program_id(0).to(tl.int64) * ROWS
    bias_start = bias + (first_row // rows_per_bias) * n
    members = tl.arange(0, CHUNK)
    for block_start in range(0, N_CHUNKS, CHUNK_BLOCK):
        chunk_ids = block_start + tl.arange(0, CHUNK_BLOCK)
        columns = chunk_ids[:, None] * CHUNK + members[None, :]
        if HAS_BIAS:
            bias_tile = tl.load(bias_start + columns, mask=columns < n, other=0.0).to(tl.float32)
        for part in tl.static_range(ROWS):
            row = first_row + part
            tile = tl.load(pre + row * n + columns, mask=columns < n, other=float("-inf")).to(tl.float32)
            if HAS_BIAS:
                tile += bias_tile
            tl.store(chunk_maxima + row * N_CHUNKS + chunk_ids, tl.max(tile, axis=1))
    tl.debug_barrier()
    for part in range(ROWS):
        row = first_row + part
        row_start = pre + row * n
        chunk_ids = tl.arange(0, N_CHUNKS)
        keys = _sortable_keys(tl.load(chunk_maxima + row * N_CHUNKS + chunk_ids))
        rank, chosen = _top_k_slots(keys, K, EARLY_EXIT)
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
        rank, chosen = _top_k_slots(keys, K, EARLY_EXIT)
        tl.store(out + row * K + rank, columns, mask=chosen)
        if READ_BACK:
            if WRITE_VALUES or COUNT_FIRING:
                # The K chosen columns read back as a K_PAD vector (a few a thread, where the [K_PAD * CHUNK] candidates are
                # 32 a thread at one warp: masked stores and atomics over them cost per candidate), their sums pre + bias
                # formed again as they were ranked (the same bits).
                tl.debug_barrier()
                kept = slots < K
                chosen_columns = tl.load(out + row * K + slots, mask=kept, other=0)
                chosen_values = tl.load(row_start + chosen_columns, mask=kept, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    chosen_values += tl.load(bias_start + chosen_columns, mask=kept, other=0.0).to(tl.float32)
                if WRITE_VALUES:
                    tl.store(values_out + row * K + slots, chosen_values, mask=kept)
                if COUNT_FIRING:
                    tl.atomic_add(firing + (row // rows_per_seed) * n + chosen_columns, tl.full([K_PAD], 1.0, tl.float32),
                                  mask=kept & (chosen_values > 0), sem="relaxed")
        else:
            # The chosen values from their keys (the order-preserving map is its own inverse: the float32 sums bit for bit).
            key_values = tl.where(keys < 0, keys ^ 0x7FFFFFFF, keys).to(tl.float32, bitcast=True)
            if WRITE_VALUES:
                tl.store(values_out + row * K + rank, key_values, mask=chosen)
            if COUNT_FIRING:
                fires = chosen & (key_values > 0)
                tl.atomic_add(firing + (row // rows_per_seed) * n + columns, tl.full([K_PAD * CHUNK], 1.0, tl.float32), mask=fires, sem="relaxed")


def _tokens_since_fired_program(tokens_since_fired, firing_counts, numel, batch, BLOCK: tl.constexpr):
    """Round 6: ``tokens_since_fired`` (int64) advanced by ``batch`` tokens and reset to 0 where ``firing_counts``
    (float32, same shape, ``numel`` elements) is above 0: ``add_(batch).masked_fill_(firing_counts > 0, 0)`` in one pass."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    counts = tl.load(firing_counts + offsets, mask=mask, other=0.0)
    since = tl.load(tokens_since_fired + offsets, mask=mask, other=0)
    tl.store(tokens_since_fired + offsets, tl.where(counts > 0, tl.zeros_like(since), since + batch), mask=mask)


def _entry_operands(keys, rows, decoder_weights, encoder_weights, entry_start, hi, global_latents,
                    ENTRIES: tl.constexpr, LOW_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The sorted entries ``entry_start ..`` (up to ``ENTRIES``, none from ``hi`` on) as operands of the gradient
    products: their mask, dense rows, and one-hot latent matrices weighted by their decoder weights (``[LATENTS,
    ENTRIES]``, transposed for the decoder product) and encoder weights (``[ENTRIES, LATENTS]``); bf16 with
    ``LOW_PRECISION`` (float32 holding bf16 values with ``EMULATE_BF16``: Triton's interpreter mis-computes bf16 dots)."""
    entries = entry_start + tl.arange(0, ENTRIES)
    entry_mask = entries < hi
    key = tl.load(keys + entries, mask=entry_mask, other=-1).to(tl.int64)
    row = tl.load(rows + entries, mask=entry_mask, other=0).to(tl.int64)
    a = tl.load(decoder_weights + entries, mask=entry_mask, other=0.0).to(tl.float32)
    c = tl.load(encoder_weights + entries, mask=entry_mask, other=0.0).to(tl.float32)
    hit = key[:, None] == global_latents[None, :]
    a_hot = tl.where(hit, a[:, None], 0.0)
    c_hot = tl.where(hit, c[:, None], 0.0)
    if LOW_PRECISION and not EMULATE_BF16:
        a_operand = tl.trans(a_hot.to(tl.bfloat16))
        c_operand = c_hot.to(tl.bfloat16)
    elif LOW_PRECISION:
        a_operand = tl.trans(a_hot.to(tl.bfloat16).to(tl.float32))
        c_operand = c_hot.to(tl.bfloat16).to(tl.float32)
    else:
        a_operand = tl.trans(a_hot)
        c_operand = c_hot
    return entry_mask, row, a_operand, c_operand


def _accumulate_entries(acc_dec, acc_enc, entry_mask, row, a_operand, c_operand, decoder_dense, encoder_dense, columns, column_mask,
                        dense_offset, D, LOW_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Add to the ``[LATENTS, COLUMNS]`` decoder tile and the ``[COLUMNS, LATENTS]`` encoder tile (its layout in
    memory, latents contiguous) the products of the entries' one-hot operands (:func:`_entry_operands`) with their
    gathered dense rows at ``columns`` (tensor cores; bf16 operands as autocast gives the dense product, float32 ``ieee`` else)."""
    gather_mask = entry_mask[:, None] & column_mask[None, :]
    offsets = dense_offset + row[:, None] * D + columns[None, :]
    dec_rows = tl.load(decoder_dense + offsets, mask=gather_mask, other=0.0)
    enc_rows = tl.load(encoder_dense + offsets, mask=gather_mask, other=0.0)
    if LOW_PRECISION and not EMULATE_BF16:
        acc_dec = tl.dot(a_operand, dec_rows.to(tl.bfloat16), acc_dec)
        acc_enc = tl.dot(tl.trans(enc_rows.to(tl.bfloat16)), c_operand, acc_enc)
    else:  # float32, or bf16 values held in float32 (bf16 x bf16 is exact in float32)
        acc_dec = tl.dot(a_operand, dec_rows.to(tl.float32), acc_dec, input_precision="ieee")
        acc_enc = tl.dot(tl.trans(enc_rows.to(tl.float32)), c_operand, acc_enc, input_precision="ieee")
    return acc_dec, acc_enc


def _store_gradient_tiles(acc_dec, acc_enc, seed, latents, latent_mask, global_latents, columns, column_mask, column_block,
                          W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents,
                          LATENTS: tl.constexpr, WITH_W_DEC: tl.constexpr, W_DEC_FIRST: tl.constexpr):
    """Store finished tiles (``grad_dec [S, d_sae, D]``, ``grad_enc [S, D, d_sae]``, float32 or bf16: then rounded
    as a bf16 product's output is) and their per-latent statistics, of the stored values,
    ``row_statistics[column_block, s * d_sae + i] = (|g_dec|^2, <g_dec, W_dec>, |W_dec|^2, |g_enc|^2)``
    over these columns (the W_dec terms 0 and 1 without ``WITH_W_DEC``). ``W_DEC_FIRST``: the W_dec tile is loaded
    before the stores (round 2), else after them (round 1's order, :func:`_latent_gradients_one_pass_program`)."""
    acc_dec = acc_dec.to(grad_dec.dtype.element_ty).to(tl.float32)
    acc_enc = acc_enc.to(grad_enc.dtype.element_ty).to(tl.float32)
    out_mask = latent_mask[:, None] & column_mask[None, :]
    statistics = row_statistics + (column_block * total_latents + global_latents) * 4
    if WITH_W_DEC:
        if W_DEC_FIRST:  # issued first: its latency overlaps the stores
            w = tl.load(W_dec + (seed * d_sae + latents[:, None]) * D + columns[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(grad_dec + (seed * d_sae + latents[:, None]) * D + columns[None, :], acc_dec.to(grad_dec.dtype.element_ty), mask=out_mask)
    tl.store(grad_enc + seed * D * d_sae + columns[:, None] * d_sae + latents[None, :], acc_enc.to(grad_enc.dtype.element_ty),
             mask=column_mask[:, None] & latent_mask[None, :])
    tl.store(statistics, tl.sum(acc_dec * acc_dec, axis=1), mask=latent_mask)
    if WITH_W_DEC:
        if not W_DEC_FIRST:
            w = tl.load(W_dec + (seed * d_sae + latents[:, None]) * D + columns[None, :], mask=out_mask, other=0.0).to(tl.float32)
        tl.store(statistics + 1, tl.sum(acc_dec * w, axis=1), mask=latent_mask)
        tl.store(statistics + 2, tl.sum(w * w, axis=1), mask=latent_mask)
    else:
        tl.store(statistics + 1, tl.zeros([LATENTS], dtype=tl.float32), mask=latent_mask)
        tl.store(statistics + 2, tl.full([LATENTS], 1.0, dtype=tl.float32), mask=latent_mask)
    tl.store(statistics + 3, tl.sum(acc_enc * acc_enc, axis=0), mask=latent_mask)


def _latent_gradients_program(item_block, item_chunk, block_items, block_slot, segments, keys, rows, decoder_weights, encoder_weights,
                              decoder_dense, encoder_dense, W_dec, grad_dec, grad_enc, row_statistics, partial_dec, partial_enc,
                              d_sae, D, n_rows, total_latents, total_blocks, n_column_blocks,
                              LATENTS: tl.constexpr, ENTRIES: tl.constexpr, COLUMNS: tl.constexpr, CHUNK: tl.constexpr,
                              COLUMN_BLOCKS: tl.constexpr, LOW_PRECISION: tl.constexpr, WITH_W_DEC: tl.constexpr,
                              EMULATE_BF16: tl.constexpr):
    """One program per (work item, group of ``COLUMN_BLOCKS`` blocks of ``COLUMNS`` columns of d): both weight
    gradients of a block of ``LATENTS`` latents from up to ``CHUNK`` of its entries (sorted by latent; ``segments``
    marks each latent's range), so a block whose latents fired on thousands of tokens is shared by several items:

    - ``grad_dec[s, i] = sum_e decoder_weights[e] * decoder_dense[s, rows[e]]`` (layout ``[S, d_sae, D]``),
    - ``grad_enc[s, :, i] = sum_e encoder_weights[e] * encoder_dense[s, rows[e]]`` (layout ``[S, D, d_sae]``).

    The program loads its first ``ENTRIES`` entries and builds their one-hot operands once, then loops over its
    column blocks (further entries, if any, are loaded in each). A block of one item stores its tiles (every
    element, so nothing is zero-filled first) and statistics; the items of a shared block store partial tiles in
    ``partial_*[block_slot[block] + chunk]`` (``[LATENTS, D]`` for the decoder, ``[D, LATENTS]`` for the encoder),
    which :func:`_combine_gradients_program` adds in order (deterministic: no atomics)."""
    item = tl.program_id(0)
    group = tl.program_id(1)
    block = tl.load(item_block + item).to(tl.int64)
    if block < total_blocks:
        chunk = tl.load(item_chunk + item)
        n_blocks = tl.cdiv(d_sae, LATENTS)
        seed = block // n_blocks
        first = (block % n_blocks) * LATENTS
        latents = first + tl.arange(0, LATENTS)
        latent_mask = latents < d_sae
        global_latents = seed * d_sae + latents
        start = tl.load(segments + seed * d_sae + first)
        end = tl.load(segments + seed * d_sae + tl.minimum(first + LATENTS, d_sae))
        lo = start + chunk * CHUNK
        hi = tl.minimum(end, lo + CHUNK)
        dense_offset = seed * n_rows * D
        entry_mask, row, a_operand, c_operand = _entry_operands(keys, rows, decoder_weights, encoder_weights, lo, hi, global_latents,
                                                                ENTRIES, LOW_PRECISION, EMULATE_BF16)
        alone = tl.load(block_items + block) == 1
        slot = (tl.load(block_slot + block) + chunk).to(tl.int64)
        first_column_block = group.to(tl.int64) * COLUMN_BLOCKS  # int64 bounds: an int64 loop index, so columns * d_sae cannot overflow
        for column_block in range(first_column_block, tl.minimum(first_column_block + COLUMN_BLOCKS, n_column_blocks)):
            columns = column_block * COLUMNS + tl.arange(0, COLUMNS)
            column_mask = columns < D
            acc_dec = tl.zeros([LATENTS, COLUMNS], dtype=tl.float32)
            acc_enc = tl.zeros([COLUMNS, LATENTS], dtype=tl.float32)
            acc_dec, acc_enc = _accumulate_entries(acc_dec, acc_enc, entry_mask, row, a_operand, c_operand, decoder_dense, encoder_dense,
                                                   columns, column_mask, dense_offset, D, LOW_PRECISION, EMULATE_BF16)
            for entry_start in range(lo + ENTRIES, hi, ENTRIES):
                more_mask, more_rows, more_a, more_c = _entry_operands(keys, rows, decoder_weights, encoder_weights, entry_start, hi,
                                                                       global_latents, ENTRIES, LOW_PRECISION, EMULATE_BF16)
                acc_dec, acc_enc = _accumulate_entries(acc_dec, acc_enc, more_mask, more_rows, more_a, more_c, decoder_dense, encoder_dense,
                                                       columns, column_mask, dense_offset, D, LOW_PRECISION, EMULATE_BF16)
            if alone:
                _store_gradient_tiles(acc_dec, acc_enc, seed, latents, latent_mask, global_latents, columns, column_mask, column_block,
                                      W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents, LATENTS, WITH_W_DEC, True)
            else:
                tile = slot * LATENTS * D + tl.arange(0, LATENTS)[:, None] * D + columns[None, :]
                tl.store(partial_dec + tile, acc_dec, mask=column_mask[None, :])
                tile_t = slot * LATENTS * D + columns[:, None] * LATENTS + tl.arange(0, LATENTS)[None, :]
                tl.store(partial_enc + tile_t, acc_enc, mask=column_mask[:, None])


def _gradient_tiles(keys, rows, decoder_weights, encoder_weights, decoder_dense, encoder_dense, lo, hi, global_latents,
                    columns, column_mask, dense_offset, D, LATENTS: tl.constexpr, ENTRIES: tl.constexpr, COLUMNS: tl.constexpr,
                    LOW_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Round 1's loop (run 3, commit b68f02b): tiles of both weight gradients from the sorted entries ``lo .. hi``, the
    decoder's ``[LATENTS, COLUMNS]`` and the encoder's ``[COLUMNS, LATENTS]`` (its layout in memory), ``ENTRIES`` at
    a time, each step loading its entries, their dense rows and building its one-hot operands (nothing kept across steps)."""
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


def _latent_gradients_one_pass_program(item_block, item_chunk, block_items, block_slot, segments, keys, rows, decoder_weights,
                                       encoder_weights, decoder_dense, encoder_dense, W_dec, grad_dec, grad_enc, row_statistics,
                                       partial_dec, partial_enc, d_sae, D, n_rows, total_latents, total_blocks,
                                       LATENTS: tl.constexpr, ENTRIES: tl.constexpr, COLUMNS: tl.constexpr, CHUNK: tl.constexpr,
                                       LOW_PRECISION: tl.constexpr, WITH_W_DEC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Round 1's shape of :func:`_latent_gradients_program` (run 3, commit b68f02b; stores as round 2's: bf16 under
    autocast): one program per (work item, single block of ``COLUMNS`` columns), one pass over the item's entries
    (:func:`_gradient_tiles`), the W_dec tile for the statistics loaded after the stores. Same inputs and outputs
    (partial tiles of shared blocks for :func:`_combine_gradients_program`); chosen per call for latent blocks of many
    entries (``updates.GRAD_ONE_PASS_ENTRIES_PER_BLOCK``), where the looping program did worse on the H200 (round 2)."""
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
                                  W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents, LATENTS, WITH_W_DEC, False)
        else:
            slot = (tl.load(block_slot + block) + chunk).to(tl.int64)
            tile = slot * LATENTS * D + tl.arange(0, LATENTS)[:, None] * D + columns[None, :]
            tl.store(partial_dec + tile, acc_dec, mask=column_mask[None, :])
            tile_t = slot * LATENTS * D + columns[:, None] * LATENTS + tl.arange(0, LATENTS)[None, :]
            tl.store(partial_enc + tile_t, acc_enc, mask=column_mask[:, None])


def _combine_gradients_program(shared_blocks, block_items, block_slot, W_dec, grad_dec, grad_enc, row_statistics,
                               partial_dec, partial_enc, d_sae, D, total_latents, total_blocks,
                               LATENTS: tl.constexpr, COLUMNS: tl.constexpr, WITH_W_DEC: tl.constexpr):
    """One program per (block shared by several work items, listed in ``shared_blocks``; entries from
    ``total_blocks`` on mark unused programs) and column block: the sum of the items' partial tiles, in item
    order, stored with its statistics as :func:`_latent_gradients_program` stores a whole block."""
    block = tl.load(shared_blocks + tl.program_id(0)).to(tl.int64)
    column_block = tl.program_id(1).to(tl.int64)
    if block < total_blocks:
        n_items = tl.load(block_items + block)
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
                              column_block, W_dec, grad_dec, grad_enc, row_statistics, d_sae, D, total_latents, LATENTS, WITH_W_DEC, True)


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
                       along, ROWS: tl.constexpr, BLOCK: tl.constexpr, PROJECT: tl.constexpr, NORMALIZE: tl.constexpr,
                       CLIP: tl.constexpr, LOW_COPY: tl.constexpr, PROJECT_GIVEN: tl.constexpr):
    """Adam on whole rows of ``W [S*rows_per_seed, D]`` (the decoder), ``ROWS`` rows per program: with ``PROJECT``
    the gradient's component along its (unit-norm) row is removed first, with ``CLIP`` it is scaled by
    ``clip_scale[seed]``, and with ``NORMALIZE`` the updated row is rescaled to unit norm; ``LOW_COPY`` also
    writes the row in bf16 to ``W_low`` (what the next step reads). ``G`` may be bf16 (read as float32).

    ``PROJECT_GIVEN``: the projection's coefficients ``<g, w> / max(|w|, 1e-12)**2`` per row are read from
    ``along [S*rows_per_seed]`` (from the gradient program's per-latent statistics) instead of two row
    reductions here; then the only reduction left is the renormalisation's, and all four loads are issued first."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    columns = tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (columns < D)[None, :]
    offsets = rows[:, None] * D + columns[None, :]
    w = tl.load(W + offsets, mask=mask, other=0.0)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    if PROJECT_GIVEN:
        m = tl.load(M + offsets, mask=mask, other=0.0)
        v = tl.load(V + offsets, mask=mask, other=0.0)
    if PROJECT:
        if PROJECT_GIVEN:
            g = g - tl.load(along + rows, mask=row_mask, other=0.0)[:, None] * w
        else:
            direction = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-12)[:, None]
            g = g - tl.sum(g * direction, axis=1)[:, None] * direction
    if CLIP:
        g = g * tl.load(clip_scale + rows // rows_per_seed, mask=row_mask, other=1.0)[:, None]
    step_size, bias_correction2_sqrt = _adam_scalars(lr, step, log2_beta1, log2_beta2)
    if not PROJECT_GIVEN:
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


def _adam_flat_block(W, G, M, V, W_low, clip_scale, lr, step, block, numel, per_seed, beta1, beta2, eps, log2_beta1, log2_beta2,
                     BLOCK: tl.constexpr, CLIP: tl.constexpr, LOW_COPY: tl.constexpr):
    """Elementwise Adam over block ``block`` of ``BLOCK`` elements of ``W`` (``per_seed`` elements a seed), the
    gradient (float32 or bf16) scaled by ``clip_scale[seed]`` with ``CLIP``; ``LOW_COPY`` also writes the result
    in bf16 to ``W_low``."""
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    w = tl.load(W + offsets, mask=mask, other=0.0)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
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


def _adam_flat_program(W, G, M, V, W_low, clip_scale, lr, step, numel, per_seed, beta1, beta2, eps, log2_beta1, log2_beta2,
                       BLOCK: tl.constexpr, CLIP: tl.constexpr, LOW_COPY: tl.constexpr):
    """Elementwise Adam over ``W`` (``per_seed`` elements a seed; :func:`_adam_flat_block`), a block a program."""
    _adam_flat_block(W, G, M, V, W_low, clip_scale, lr, step, tl.program_id(0), numel, per_seed, beta1, beta2, eps, log2_beta1, log2_beta2,
                     BLOCK, CLIP, LOW_COPY)


def _adam_pair_program(W, G, M, V, step, numel, per_seed, blocks, W_second, G_second, M_second, V_second, step_second, numel_second,
                       per_seed_second, clip_scale, lr, beta1, beta2, eps, log2_beta1, log2_beta2, BLOCK: tl.constexpr, CLIP: tl.constexpr):
    """:func:`_adam_flat_program` over two parameters in one launch (b_enc and b_dec, without bf16 copies): the
    first ``blocks`` programs update ``W``, the rest ``W_second``, each with its own Adam state and step."""
    block = tl.program_id(0)
    if block < blocks:
        _adam_flat_block(W, G, M, V, W, clip_scale, lr, step, block, numel, per_seed, beta1, beta2, eps, log2_beta1, log2_beta2,
                         BLOCK, CLIP, False)
    else:
        _adam_flat_block(W_second, G_second, M_second, V_second, W_second, clip_scale, lr, step_second, block - blocks, numel_second,
                         per_seed_second, beta1, beta2, eps, log2_beta1, log2_beta2, BLOCK, CLIP, False)


def _clip_statistics_program(statistics, column_blocks, stride, grad_b_enc, along, partial, d_sae, blocks_per_seed,
                             PROJECT: tl.constexpr, ALONG: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (seed, block of ``BLOCK`` latents): sums the gradient program's per-latent statistics
    ``[column_blocks, S * d_sae, 4]`` (``stride = S * d_sae * 4``) over the column blocks; with ``ALONG`` stores the decoder-gradient
    projection's coefficient ``<g, w> / max(|w|, 1e-12)^2`` per row; with ``CLIP`` the block's share of the
    seed's squared gradient norm (decoder rows projected with ``PROJECT``, encoder columns, b_enc) in ``partial``."""
    seed = tl.program_id(0)
    block = tl.program_id(1)
    latents = block * BLOCK + tl.arange(0, BLOCK)
    mask = latents < d_sae
    rows = seed.to(tl.int64) * d_sae + latents
    squared = tl.zeros([BLOCK], dtype=tl.float32)
    dots = tl.zeros([BLOCK], dtype=tl.float32)
    weight_squared = tl.zeros([BLOCK], dtype=tl.float32)
    encoder_squared = tl.zeros([BLOCK], dtype=tl.float32)
    for column_block in range(column_blocks):
        base = statistics + column_block * stride + rows * 4
        squared += tl.load(base, mask=mask, other=0.0)
        dots += tl.load(base + 1, mask=mask, other=0.0)
        weight_squared += tl.load(base + 2, mask=mask, other=1.0)
        encoder_squared += tl.load(base + 3, mask=mask, other=0.0)
    norms = tl.maximum(tl.sqrt(weight_squared), 1e-12)
    if ALONG:
        tl.store(along + rows, dots / (norms * norms), mask=mask)
    if CLIP:
        if PROJECT:  # |g - <g,u>u|^2 with u = w / |w|
            coefficient = dots / norms
            squared = tl.maximum(squared - 2 * coefficient * coefficient + coefficient * coefficient * (weight_squared / (norms * norms)), 0.0)
        bias = tl.load(grad_b_enc + rows, mask=mask, other=0.0).to(tl.float32)
        share = tl.where(mask, squared + encoder_squared + bias * bias, 0.0)
        tl.store(partial + seed * blocks_per_seed + block, tl.sum(share, axis=0))


def _clip_scale_program(partial, blocks_per_seed, grad_b_dec, d_in, clip_scale, clip_norm, BLOCK: tl.constexpr):
    """One program per seed: the seed's squared gradient norm (the partial sums and b_dec's gradient) and its
    clipping scale ``min(clip_norm / (norm + 1e-6), 1)``."""
    seed = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, blocks_per_seed, BLOCK):
        total += tl.load(partial + seed * blocks_per_seed + start + offsets, mask=start + offsets < blocks_per_seed, other=0.0)
    for start in range(0, d_in, BLOCK):
        g = tl.load(grad_b_dec + seed * d_in + start + offsets, mask=start + offsets < d_in, other=0.0).to(tl.float32)
        total += g * g
    norm = tl.sqrt(tl.sum(total, axis=0))
    tl.store(clip_scale + seed, tl.minimum(clip_norm / (norm + 1e-6), 1.0))


def _work_items_program(segments, inclusive, item_block, item_chunk, block_items, block_slot, shared_blocks, d_sae, blocks_per_seed,
                        total_blocks, capacity, max_shared, chunk, LATENTS: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the gradient program's work items from the latent segments (``updates._gradient_work_items``'s
    torch formulas, ~25 small kernels there). Each block of ``LATENTS`` latents gets ``max(1, ceil(count / chunk))``
    items (``block_items``, their running total in ``inclusive``); a block with more than one is shared (``block_slot``:
    the exclusive running sum of the shared blocks' items; ``shared_blocks``: the j-th shared block, ``total_blocks``
    past the last); each block then writes its items' block and chunk, and the ``capacity`` items past the real
    count are marked by block ``total_blocks``."""
    offsets = tl.arange(0, BLOCK)
    carry_items = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    carry_slot = carry_items
    carry_rank = carry_items
    for start in range(0, total_blocks, BLOCK):
        blocks = start + offsets
        mask = blocks < total_blocks
        seed = blocks // blocks_per_seed
        first = (blocks % blocks_per_seed) * LATENTS
        after = tl.minimum(first + LATENTS, d_sae)
        lo = tl.load(segments + seed * d_sae + first, mask=mask, other=0)
        hi = tl.load(segments + seed * d_sae + after, mask=mask, other=0)
        n = tl.where(mask, tl.maximum((hi - lo + chunk - 1) // chunk, 1), 0)
        ends = carry_items + tl.cumsum(n, axis=0)
        tl.store(inclusive + blocks, ends, mask=mask)
        tl.store(block_items + blocks, n, mask=mask)
        shared = tl.where(n > 1, n, 0)
        tl.store(block_slot + blocks, carry_slot + tl.cumsum(shared, axis=0) - shared, mask=mask)
        is_shared = (n > 1).to(tl.int32)
        rank = carry_rank + tl.cumsum(is_shared, axis=0)
        tl.store(shared_blocks + rank - 1, blocks, mask=mask & (n > 1) & (rank <= max_shared))
        for j in range(0, tl.max(n, axis=0)):
            item_mask = mask & (j < n)
            tl.store(item_block + ends - n + j, blocks, mask=item_mask)
            tl.store(item_chunk + ends - n + j, tl.zeros([BLOCK], dtype=tl.int32) + j, mask=item_mask)
        carry_items += tl.sum(n, axis=0)
        carry_slot += tl.sum(shared, axis=0)
        carry_rank += tl.sum(is_shared, axis=0)
    last_start = carry_items - tl.load(block_items + total_blocks - 1)
    for start in range(0, max_shared, BLOCK):
        rows = start + offsets
        tl.store(shared_blocks + rows, tl.zeros([BLOCK], dtype=tl.int32) + total_blocks, mask=(rows < max_shared) & (rows >= carry_rank))
    for start in range(0, capacity, BLOCK):
        items = start + offsets
        padding = (items < capacity) & (items >= carry_items)
        tl.store(item_block + items, tl.zeros([BLOCK], dtype=tl.int32) + total_blocks, mask=padding)
        tl.store(item_chunk + items, items - last_start, mask=padding)



def _entry_source(entries, per_seed, first_per_seed, TWO_RECORDS: tl.constexpr):
    """For entries at positions ``entries`` (int32) of the seed-major concatenation of one or two records'
    flattened ``indices [S, B*K_p]`` (``per_seed`` entries a seed, the first record's ``first_per_seed``
    first): their seed, whether they are the second record's, and their position in their own record's
    flattened ``[S * B * K_p]`` (int32)."""
    seed = entries // per_seed
    position = entries - seed * per_seed
    second = position >= first_per_seed
    local = seed * first_per_seed + position
    if TWO_RECORDS:
        local = tl.where(second, seed * (per_seed - first_per_seed) + position - first_per_seed, local)
    return seed, second, local


def _sort_pass_keys(keys_in, order_in, indices_first, indices_second, entries, mask, per_seed, first_per_seed, d_sae,
                    FIRST: tl.constexpr, TWO_RECORDS: tl.constexpr):
    """The keys (int32 ``seed * d_sae + latent``) and original positions (int32) of one counting-sort pass's
    input entries ``entries``: from the records' indices in the first pass, else from the previous pass's output."""
    if FIRST:
        seed, second, local = _entry_source(entries, per_seed, first_per_seed, TWO_RECORDS)
        latents = tl.load(indices_first + local, mask=mask & (second == 0), other=0).to(tl.int32)
        if TWO_RECORDS:
            latents = tl.where(second, tl.load(indices_second + local, mask=mask & second, other=0).to(tl.int32), latents)
        keys = seed * d_sae + latents
        order = entries
    else:
        keys = tl.load(keys_in + entries, mask=mask, other=0)
        order = tl.load(order_in + entries, mask=mask, other=0)
    return keys, order


def _sort_histogram_program(keys_in, order_in, indices_first, indices_second, counts, total, n_chunks, per_seed, first_per_seed, d_sae,
                            shift, FIRST: tl.constexpr, TWO_RECORDS: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
                            BIN_BLOCK: tl.constexpr):
    """One program per chunk of ``CHUNK`` consecutive entries of a counting-sort pass's input: how many of them
    have each digit ``(key >> shift) % BINS``, stored digit-major (``counts[digit * n_chunks + chunk]``, int32) so
    that one running sum over ``counts`` gives each (digit, chunk) its first output position."""
    chunk = tl.program_id(0)
    entries = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = entries < total
    keys, order = _sort_pass_keys(keys_in, order_in, indices_first, indices_second, entries, mask, per_seed, first_per_seed, d_sae,
                                  FIRST, TWO_RECORDS)
    digits = tl.where(mask, (keys >> shift) & (BINS - 1), BINS)
    for start in tl.static_range(0, BINS, BIN_BLOCK):
        bins = start + tl.arange(0, BIN_BLOCK)
        tl.store(counts + bins * n_chunks + chunk, tl.sum((digits[:, None] == bins[None, :]).to(tl.int32), axis=0))


def _record_values(first, second_values, local, second, in_first, in_second,
                   HAS_FIRST: tl.constexpr, HAS_SECOND: tl.constexpr, CHUNK: tl.constexpr):
    """One per-entry weight ``[CHUNK]`` (float32) for the entries at ``local`` of the first or the ``second``
    record: loaded from the record's vector where it has one, 0 where it has none."""
    values = tl.zeros([CHUNK], dtype=tl.float32)
    if HAS_FIRST:
        values = tl.load(first + local, mask=in_first, other=0.0).to(tl.float32)
    if HAS_SECOND:
        values = tl.where(second, tl.load(second_values + local, mask=in_second, other=0.0).to(tl.float32), values)
    return values


def _sort_place_program(keys_in, order_in, indices_first, indices_second, counts, ends, keys_out, order_out, rows_out, order_final,
                        values_a_first, values_a_second, values_b_first, values_b_second, values_a_out, values_b_out,
                        total, n_chunks, per_seed, first_per_seed, first_k, second_k, batch, d_sae, shift,
                        FIRST: tl.constexpr, LAST: tl.constexpr, TWO_RECORDS: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
                        HAS_A_FIRST: tl.constexpr, HAS_A_SECOND: tl.constexpr, HAS_B_FIRST: tl.constexpr, HAS_B_SECOND: tl.constexpr,
                        VALUES: tl.constexpr):
    """One program per chunk of ``CHUNK`` consecutive entries of a counting-sort pass's input (stable by digit
    ``(key >> shift) % BINS``): an entry goes to its (digit, chunk)'s first position (``ends - counts``, the
    inclusive running sum over the digit-major counts less the count) plus the number of the chunk's earlier
    entries with its digit. Not ``LAST``: the keys and original positions (int32) to ``keys_out`` / ``order_out``.
    ``LAST``: the keys (int32) to ``keys_out``, the original positions (int64) to ``order_final``, the entries'
    dense rows (int32 ``p * batch + token``) to ``rows_out`` and, for the first ``VALUES`` (0-2) of the per-entry
    value vectors a and b (one tensor per record, float32 out; a record without one gives 0), their values."""
    chunk = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    entries = chunk * CHUNK + lanes
    mask = entries < total
    keys, order = _sort_pass_keys(keys_in, order_in, indices_first, indices_second, entries, mask, per_seed, first_per_seed, d_sae,
                                  FIRST, TWO_RECORDS)
    digits = tl.where(mask, (keys >> shift) & (BINS - 1), BINS)
    earlier = (lanes[None, :] < lanes[:, None]) & (digits[None, :] == digits[:, None])
    slots = digits * n_chunks + chunk
    first = tl.load(ends + slots, mask=mask, other=0) - tl.load(counts + slots, mask=mask, other=0)
    targets = first + tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(keys_out + targets, keys, mask=mask)
    if LAST:
        tl.store(order_final + targets, order.to(tl.int64), mask=mask)
        seed, second, local = _entry_source(order, per_seed, first_per_seed, TWO_RECORDS)
        rows = local // first_k - seed * batch
        if TWO_RECORDS:
            rows = tl.where(second, batch + local // second_k - seed * batch, rows)
        tl.store(rows_out + targets, rows, mask=mask)
        in_first = mask & (second == 0)
        in_second = mask & second
        if VALUES >= 1:
            tl.store(values_a_out + targets, _record_values(values_a_first, values_a_second, local, second, in_first, in_second,
                                                            HAS_A_FIRST, HAS_A_SECOND, CHUNK), mask=mask)
        if VALUES >= 2:
            tl.store(values_b_out + targets, _record_values(values_b_first, values_b_second, local, second, in_first, in_second,
                                                            HAS_B_FIRST, HAS_B_SECOND, CHUNK), mask=mask)
    else:
        tl.store(order_out + targets, order, mask=mask)

def _source(function):
    """The plain Python function behind a function or a ``triton.jit`` wrapper of it."""
    return getattr(function, "fn", function)


@functools.lru_cache(maxsize=None)
def _programs(interpreting: bool) -> tuple[dict, dict]:
    """The helpers and programs compiled by ``triton.jit`` (separately for the CPU interpreter)."""
    # The interpreter runs helpers as plain Python (with triton.language patched); compiled programs need them jitted.
    helpers = {name: _source(globals()[name]) if interpreting else triton.jit(_source(globals()[name]))
               for name in ("_weighted_rows_tile", "_sortable_keys", "_kth_largest_key", "_top_k_slots", "_adam_moments", "_adam_scalars",
                            "_entry_operands", "_accumulate_entries", "_store_gradient_tiles", "_gradient_tiles",
                            "_entry_source", "_sort_pass_keys", "_record_values", "_adam_flat_block")}
    programs = {name: triton.jit(_source(function)) for name, function in
                (("decode", _decode_program), ("decode_wide", _decode_wide_program), ("selected_dot", _selected_dot_program),
                 ("selected_dot_wide", _selected_dot_wide_program), ("topk", _topk_program),
                 ("tokens_since_fired", _tokens_since_fired_program),
                 ("latent_gradients", _latent_gradients_program), ("latent_gradients_one_pass", _latent_gradients_one_pass_program),
                 ("combine_gradients", _combine_gradients_program),
                 ("adam_rows", _adam_rows_program), ("adam_flat", _adam_flat_program), ("adam_pair", _adam_pair_program),
                 ("clip_statistics", _clip_statistics_program), ("clip_scale", _clip_scale_program),
                 ("work_items", _work_items_program),
                 ("sort_histogram", _sort_histogram_program), ("sort_place", _sort_place_program))}
    return helpers, programs


def launch(name: str, grid: tuple[int, ...], *args, **meta) -> None:
    helpers, programs = _programs(triton_interpreting())
    globals().update(helpers)  # a program finds its helpers among the module's globals when compiled or interpreted
    programs[name][grid](*args, **meta)


def per_token_program(name: str, operand: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, out_width: int,
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
    launch(name, (n_seeds * batch, groups), operand.contiguous(), indices.contiguous(), table.contiguous(), out, batch, k, n_rows, width,
            ROWS=min(MAX_ROW_BLOCK, triton.next_power_of_2(k)), COLUMNS=columns, COLUMN_BLOCKS=triton.cdiv(blocks, groups))
    return out


def decode_wide(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None = None,
                slot_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`_decode_wide_program` over ``values, indices [S,B,K]`` into ``table [S,n,d]``: float32 ``[S,B,d]``
    (blocks of ``DECODE_WIDE_COLUMNS`` columns, narrower for narrow rows; a warp per 256 columns), plus float32
    ``bias [S,d]`` when given; ``slot_ranges``: int32 ``(starts, ends) [S,B]``, the only slots of each row that may
    hold nonzero values."""
    n_seeds, batch, k = indices.shape
    n_rows, width = table.shape[1:]
    columns = min(DECODE_WIDE_COLUMNS, max(16, triton.next_power_of_2(width)))
    out = torch.empty(n_seeds, batch, width, dtype=torch.float32, device=table.device)
    starts, ends = _ranges(slot_ranges, indices)
    launch("decode_wide", (n_seeds * batch, triton.cdiv(width, columns)), values.contiguous(), indices.contiguous(), table.contiguous(), out,
           bias.float().contiguous() if bias is not None else out, starts, ends, batch, k, n_rows, width,
           ROWS=min(DECODE_ROWS, triton.next_power_of_2(k)), COLUMNS=columns, HAS_BIAS=bias is not None, SKIP_ZERO=SKIP_ZERO_CODES,
           HAS_RANGES=slot_ranges is not None, num_warps=max(1, min(8, columns // 256)))
    return out


def selected_dot_wide(dense: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, codes: torch.Tensor | None = None,
                      slot_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`_selected_dot_wide_program` over ``dense [S,B,d]``, ``indices [S,B,K]`` into ``table [S,n,d]``: float32
    ``[S,B,K]`` (``SELECTED_DOT_ROWS`` rows a program, blocks of ``SELECTED_DOT_WIDE_COLUMNS`` columns; a warp per 256);
    0 where ``codes [S,B,K]`` (when given) is 0 and, with ``slot_ranges`` (as for :func:`decode_wide`), outside the ranges."""
    n_seeds, batch, k = indices.shape
    n_rows, width = table.shape[1:]
    columns = min(SELECTED_DOT_WIDE_COLUMNS, max(16, triton.next_power_of_2(width)))
    rows = min(SELECTED_DOT_ROWS, triton.next_power_of_2(k))
    out = torch.empty(n_seeds, batch, k, dtype=torch.float32, device=table.device)
    skip = codes is not None
    starts, ends = _ranges(slot_ranges, indices)
    launch("selected_dot_wide", (n_seeds * batch, triton.cdiv(k, rows)), dense.contiguous(), indices.contiguous(), table.contiguous(), out,
           codes.contiguous() if skip else out, starts, ends, batch, k, n_rows, width, ROWS=rows, COLUMNS=columns, SKIP_ZERO=skip,
           HAS_RANGES=slot_ranges is not None, num_warps=max(1, min(8, columns // 256)))
    return out


def _ranges(slot_ranges: tuple[torch.Tensor, torch.Tensor] | None, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 ``(starts, ends)`` a wide program reads (``indices`` stands in for both when there are none)."""
    if slot_ranges is None:
        return indices, indices
    starts, ends = slot_ranges
    if starts.dtype != torch.int32 or ends.dtype != torch.int32 or starts.shape != indices.shape[:2] or ends.shape != indices.shape[:2]:
        raise ValueError(f"slot_ranges: int32 (starts, ends) of shape {tuple(indices.shape[:2])} expected")
    return starts.contiguous(), ends.contiguous()
