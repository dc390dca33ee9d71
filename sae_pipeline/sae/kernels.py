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

The two transposed products (``codes^T g`` and ``(x - b_dec)^T g``) run as one batched matrix
product each on a dense code matrix (:func:`scatter_rows`): on an H100 that took 0.19 ms where sparse
Triton reductions over latent-sorted entries took 0.35-0.63 ms (tile-wise 0/1 matrix products, with
atomics or with one program per block of latents), so the tensor cores win at these sizes.

Off CUDA the same arithmetic runs as PyTorch operations (``embedding_bag``, ``index_add_``). With
``TRITON_INTERPRET=1`` set before Triton is imported and ``INTERPRET_ON_CPU`` on, the Triton programs
run on CPU tensors in Triton's interpreter (how the tests check them).
"""

import functools
import os

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
# Key below that of -inf (see _sortable_keys): marks candidate slots past the row's end.
BELOW_ALL_KEYS = tl.constexpr(-2139095042)
# Top-k: columns per chunk, chunks whose maxima one load covers, warps per row.
TOPK_CHUNK = 16
TOPK_CHUNK_BLOCK = 128
TOPK_WARPS = 1


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
    """One program per (seed, token): ``out[t] = sum_j values[t, j] * table[seed, indices[t, j]]``,
    ``ROWS`` selected rows at a time, every column block of them together (unrolled)."""
    token = tl.program_id(0).to(tl.int64)
    seed = token // n_tokens
    table_seed = table + seed * table_rows * D
    for column_block in tl.static_range(COLUMN_BLOCKS):
        columns = column_block * COLUMNS + tl.arange(0, COLUMNS)
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


def _source(function):
    """The plain Python function behind a function or a ``triton.jit`` wrapper of it."""
    return getattr(function, "fn", function)


@functools.lru_cache(maxsize=None)
def _programs(interpreting: bool) -> tuple[dict, dict]:
    """The helpers and programs compiled by ``triton.jit`` (separately for the CPU interpreter)."""
    # The interpreter runs helpers as plain Python (with triton.language patched); compiled programs need them jitted.
    helpers = {name: _source(globals()[name]) if interpreting else triton.jit(_source(globals()[name]))
               for name in ("_sortable_keys", "_kth_largest_key", "_top_k_slots")}
    programs = {name: triton.jit(_source(function)) for name, function in
                (("decode", _decode_program), ("selected_dot", _selected_dot_program), ("topk", _topk_program))}
    return helpers, programs


def _launch(name: str, grid: tuple[int, ...], *args, **meta) -> None:
    helpers, programs = _programs(triton_interpreting())
    globals().update(helpers)  # a program finds its helpers among the module's globals when compiled or interpreted
    programs[name][grid](*args, **meta)


def _per_token_program(name: str, operand: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, out_width: int) -> torch.Tensor:
    """Launch a one-program-per-(seed, token) program (``decode`` or ``selected_dot``) over
    ``indices [S,B,K]`` into table ``[S,n,d]``; returns its float32 output ``[S,B,out_width]``."""
    n_seeds, batch, k = indices.shape
    n_rows, width = table.shape[1:]
    columns = min(COLUMN_BLOCK, triton.next_power_of_2(width))
    out = torch.empty(n_seeds, batch, out_width, dtype=torch.float32, device=table.device)
    _launch(name, (n_seeds * batch,), operand.contiguous(), indices.contiguous(), table.contiguous(), out, batch, k, n_rows, width,
            ROWS=min(MAX_ROW_BLOCK, triton.next_power_of_2(k)), COLUMNS=columns, COLUMN_BLOCKS=triton.cdiv(width, columns))
    return out


def decode_rows(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[s,b] = sum_j values[s,b,j] * table[s, indices[s,b,j]]``: ``[S,B,K]`` x ``[S,n,d]`` -> float32 ``[S,B,d]``."""
    if triton_usable(table):
        return _per_token_program("decode", values, indices, table, table.shape[2])
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
    n_chunks = triton.next_power_of_2(triton.cdiv(width, TOPK_CHUNK))
    if triton.cdiv(width, TOPK_CHUNK) < k:
        raise ValueError(f"topk_columns needs at least k={k} chunks of {TOPK_CHUNK} columns, got width {width}")
    k_pad = triton.next_power_of_2(k)
    chunk_maxima = torch.empty(rows.shape[0], n_chunks, dtype=torch.float32, device=pre.device)
    chosen_chunks = torch.empty(rows.shape[0], k_pad, dtype=torch.int32, device=pre.device)
    out = torch.empty(rows.shape[0], k, dtype=torch.int64, device=pre.device)
    rows_per_bias = rows.shape[0] // bias.shape[0] if bias is not None else rows.shape[0]
    bias_rows = bias.contiguous() if bias is not None else rows
    _launch("topk", (rows.shape[0],), rows, bias_rows, chunk_maxima, chosen_chunks, out, width, k, rows_per_bias,
            N_CHUNKS=n_chunks, CHUNK=TOPK_CHUNK, CHUNK_BLOCK=min(TOPK_CHUNK_BLOCK, n_chunks), K_PAD=k_pad,
            HAS_BIAS=bias is not None, num_warps=TOPK_WARPS)
    return out.view(*pre.shape[:-1], k)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives matrix products on this device now, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, W_dec, indices):
        # Under autocast the rows are read in its dtype, as a dense product would read them (half the bytes).
        low_dtype = _autocast_dtype(W_dec.device.type)
        table = W_dec.to(low_dtype) if low_dtype is not None else W_dec
        ctx.low_precision = low_dtype is not None
        ctx.weight_dtype = W_dec.dtype
        ctx.d_sae = W_dec.shape[1]
        ctx.save_for_backward(codes, table, indices)
        return decode_rows(codes, indices, table)

    @staticmethod
    def backward(ctx, grad_out):
        codes, table, indices = ctx.saved_tensors
        grad_codes = selected_dots(grad_out, indices, table) if ctx.needs_input_grad[0] else None
        grad_W_dec = None
        if ctx.needs_input_grad[1]:
            grad_W_dec = scatter_rows(codes, indices, ctx.d_sae, grad_out, low_precision=ctx.low_precision).to(ctx.weight_dtype)
        return grad_codes, grad_W_dec, None


class _SelectedPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, centered, W_enc, b_enc, b_dec, indices, bias_separate):
        ctx.low_precision = _autocast_dtype(W_enc.device.type) is not None
        ctx.save_for_backward(centered, W_enc, indices)
        selected = pre.gather(-1, indices).float()
        if bias_separate:
            selected = selected + b_enc.detach().float().gather(1, indices.flatten(1)).view_as(selected)
        return selected

    @staticmethod
    def backward(ctx, grad_values):
        centered, W_enc, indices = ctx.saved_tensors
        n_seeds, d_sae = W_enc.shape[0], W_enc.shape[2]
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = scatter_rows(grad_values, indices, d_sae, centered, transposed=True, low_precision=ctx.low_precision).to(W_enc.dtype)
        per_latent = grad_values.new_zeros(n_seeds, d_sae, dtype=torch.float32).scatter_add_(
            1, indices.reshape(n_seeds, -1), grad_values.reshape(n_seeds, -1).float())
        grad_b_dec = -torch.bmm(W_enc.float(), per_latent.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[4] else None
        return None, None, grad_W_enc, per_latent if ctx.needs_input_grad[3] else None, grad_b_dec, None, None


def sparse_decode(codes: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Differentiable ``sum_j codes[s,b,j] * W_dec[s, indices[s,b,j]]``: codes ``[S,B,K]``, W_dec
    ``[S, d_sae, d]``, indices ``[S,B,K]`` int64 -> float32 ``[S,B,d]`` (no bias)."""
    return _SparseDecode.apply(codes, W_dec, indices)


def selected_preactivations(pre: torch.Tensor, centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                            b_dec: torch.Tensor, indices: torch.Tensor, bias_separate: bool = False) -> torch.Tensor:
    """The pre-activations ``a = centered W_enc + b_enc`` (``centered = x - b_dec``, ``[S,B,d]``) at
    ``indices [S,B,K]``, float32 ``[S,B,K]``, read from ``pre [S,B,d_sae]`` computed without autograd (``a``
    itself, or with ``bias_separate`` the product alone, b_enc then added here), with the gradients they
    would have had through the dense product flowing to W_enc, b_enc and b_dec."""
    return _SelectedPreactivations.apply(pre, centered, W_enc, b_enc, b_dec, indices, bias_separate)
