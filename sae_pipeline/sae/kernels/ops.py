"""Sparse forward and backward operations of a top-k SAE: top-k selection, gathered decode, selected
pre-activations, and the records they leave for the deferred weight gradients (Triton where
:func:`programs.triton_usable`, PyTorch operations elsewhere)."""

import torch
import torch.nn.functional as F

from sae_pipeline.sae.kernels import programs
from sae_pipeline.sae.kernels.programs import triton

# Latents per program of advance_tokens_since_fired's program.
FIRING_BLOCK = 1024


def decode_rows(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None = None,
                slot_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``out[s,b] = sum_j values[s,b,j] * table[s, indices[s,b,j]]``: ``[S,B,K]`` x ``[S,n,d]`` -> float32 ``[S,B,d]``;
    plus float32 ``bias [S,d]`` when given (inside the wide decode program; one float32 add either way).
    ``slot_ranges``: int32 ``(starts, ends) [S,B]``; values outside each row's slots ``starts .. ends`` must be 0
    (the wide program reads only the ranges; elsewhere they are summed as they are)."""
    if programs.triton_usable(table):
        if programs.DECODE_WIDE_COLUMNS is not None:
            return programs.decode_wide(values, indices, table, bias, slot_ranges)
        decoded = programs.per_token_program("decode", values, indices, table, table.shape[2], max_column_blocks=programs.DECODE_COLUMN_BLOCKS)
    else:
        decoded = embedding_bag_rows(values.float(), indices, table.float())
    return decoded if bias is None else decoded + bias.float().unsqueeze(1)


def embedding_bag_rows(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The same sum with PyTorch's ``embedding_bag`` (differentiable; output in ``table``'s dtype):
    ``values [S,B,K]`` (in ``table``'s dtype), ``indices [S,B,K]``, ``table [S,n,d]`` -> ``[S,B,d]``."""
    n_seeds, batch, k = values.shape
    n_rows, width = table.shape[1:]
    offsets = (torch.arange(n_seeds, device=table.device) * n_rows).view(n_seeds, 1, 1)
    flat = F.embedding_bag((indices + offsets).reshape(n_seeds * batch, k), table.reshape(n_seeds * n_rows, width),
                           per_sample_weights=values.reshape(n_seeds * batch, k), mode="sum")
    return flat.view(n_seeds, batch, width)


def selected_dots(dense: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, zero_where: torch.Tensor | None = None,
                  slot_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``out[s,b,j] = <dense[s,b], table[s, indices[s,b,j]]>``: ``[S,B,d]`` x ``[S,n,d]`` -> float32 ``[S,B,K]``; with
    ``zero_where [S,B,K]`` (the codes) 0 wherever it is 0, those rows unread by the wide program (``programs.SKIP_ZERO_CODES``),
    which with ``slot_ranges`` (as for :func:`decode_rows`, ``zero_where`` 0 outside them) reads only the ranges."""
    n_seeds, batch, k = indices.shape
    width = table.shape[2]
    if programs.triton_usable(table) and programs.SELECTED_DOT_WIDE_COLUMNS is not None:
        skip = zero_where is not None and programs.SKIP_ZERO_CODES
        return programs.selected_dot_wide(dense, indices, table, zero_where if skip else None, slot_ranges if skip else None)
    if programs.triton_usable(table):
        dots = programs.per_token_program("selected_dot", dense, indices, table, k)
    else:
        rows = table.float().gather(1, indices.reshape(n_seeds, batch * k, 1).expand(-1, -1, width)).view(n_seeds, batch, k, width)
        dots = torch.einsum("sbkd,sbd->sbk", rows, dense.float())
    return dots if zero_where is None or not programs.SKIP_ZERO_CODES else dots * (zero_where != 0)


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


def topk_columns(pre: torch.Tensor, k: int, bias: torch.Tensor | None = None, values_out: torch.Tensor | None = None,
                 firing_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Columns ``[..., k]`` (int64, unordered) of the k largest entries in each row of ``pre [S, ..., n]``
    (plus ``bias [S, n]`` when given, added without materialising the sum) by the Triton top-k program
    (CUDA or interpreter). Needs ``ceil(n / programs.TOPK_CHUNK) >= k``.

    ``values_out`` (float32 ``[S, ..., k]``, contiguous): also filled with the selected entries' values
    ``float32(pre) + bias``, in the columns' order (what ``pre.gather(-1, columns).float()`` plus the gathered bias
    gives, bit for bit). ``firing_counts`` (float32 ``[S, n]``, contiguous, zero-filled by the caller): 1 added for
    every selected entry whose value is above 0 (``scatter_add_`` of ``relu(values) > 0``, exactly)."""
    width = pre.shape[-1]
    rows = pre.reshape(-1, width).contiguous()
    # Wide rows: wider chunks past programs.TOPK_MAX_CHUNKS chunks, and more warps so no thread holds more than
    # programs.TOPK_KEYS_PER_THREAD keys of either selection (one warp over 8,192 chunk maxima spilled: 3.3 ms at 131k
    # latents; 16 warps over 16,384 took 1.86 ms at 262k, the bisection's block-wide sums).
    k_pad = triton.next_power_of_2(k)
    chunk = programs.TOPK_CHUNK
    while triton.cdiv(width, chunk) > programs.TOPK_MAX_CHUNKS and k_pad * chunk * 2 <= triton.cdiv(width, chunk):
        chunk *= 2  # both selections over at most max(programs.TOPK_MAX_CHUNKS, ~sqrt(width * k)) keys
    n_chunks = triton.next_power_of_2(triton.cdiv(width, chunk))
    if triton.cdiv(width, chunk) < k:
        raise ValueError(f"topk_columns needs at least k={k} chunks of {chunk} columns, got width {width}")
    keys = max(n_chunks, k_pad * chunk)
    warps = programs.TOPK_WARPS if keys <= 32 * programs.TOPK_KEYS_PER_THREAD * programs.TOPK_WARPS else min(16, triton.next_power_of_2(triton.cdiv(keys, 32 * programs.TOPK_KEYS_PER_THREAD)))
    chunk_maxima = torch.empty(rows.shape[0], n_chunks, dtype=torch.float32, device=pre.device)
    chosen_chunks = torch.empty(rows.shape[0], k_pad, dtype=torch.int32, device=pre.device)
    out = torch.empty(rows.shape[0], k, dtype=torch.int64, device=pre.device)
    rows_per_bias = rows.shape[0] // bias.shape[0] if bias is not None else rows.shape[0]
    bias_rows = bias.contiguous() if bias is not None else rows
    # Rows per program: they share the bias tiles (so all must lie in one seed's rows).
    per_program = programs.TOPK_ROWS if bias is not None and rows_per_bias % programs.TOPK_ROWS == 0 else 1
    chunk_block = programs.TOPK_CHUNK_BLOCK * warps
    if programs.TOPK_TILE_PER_THREAD is not None:  # no more than this many loaded elements a thread, however wide the chunks
        chunk_block = max(1, min(chunk_block, programs.TOPK_TILE_PER_THREAD * 32 * warps // chunk))
    for given, shape in ((values_out, (rows.shape[0] * k,)), (firing_counts, (pre.shape[0] * width,))):
        if given is not None and (given.dtype != torch.float32 or not given.is_contiguous() or given.numel() != shape[0]):
            raise ValueError(f"topk_columns: values_out / firing_counts must be contiguous float32 of {shape[0]} elements")
    programs.launch("topk", (rows.shape[0] // per_program,), rows, bias_rows, chunk_maxima, chosen_chunks, out,
            values_out if values_out is not None else chunk_maxima, firing_counts if firing_counts is not None else chunk_maxima,
            width, k, rows_per_bias, rows.shape[0] // pre.shape[0],
            N_CHUNKS=n_chunks, CHUNK=chunk, CHUNK_BLOCK=min(chunk_block, n_chunks), K_PAD=k_pad,
            HAS_BIAS=bias is not None, ROWS=per_program, EARLY_EXIT=programs.TOPK_EARLY_EXIT, WRITE_VALUES=values_out is not None,
            COUNT_FIRING=firing_counts is not None, READ_BACK=programs.TOPK_VALUES_READ_BACK, num_warps=warps)
    return out.view(*pre.shape[:-1], k)


def advance_tokens_since_fired(tokens_since_fired: torch.Tensor, firing_counts: torch.Tensor, batch: int) -> None:
    """In place: ``tokens_since_fired`` (int64 ``[S, d_sae]``) advanced by ``batch`` tokens and reset to 0 where
    ``firing_counts`` (float32 ``[S, d_sae]``) is above 0; one program where Triton runs (round 6), else
    ``add_(batch).masked_fill_(firing_counts > 0, 0)``."""
    if programs.triton_usable(tokens_since_fired) and tokens_since_fired.is_contiguous():
        numel = tokens_since_fired.numel()
        programs.launch("tokens_since_fired", (triton.cdiv(numel, FIRING_BLOCK),), tokens_since_fired, firing_counts.contiguous(), numel,
                        int(batch), BLOCK=FIRING_BLOCK, num_warps=4)
    else:
        tokens_since_fired.add_(batch).masked_fill_(firing_counts > 0, 0)


def autocast_dtype(device_type: str) -> torch.dtype | None:
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
    def forward(ctx, codes, W_dec, indices, table, record, bias, slot_ranges):
        if table is None:
            # Under autocast the rows are read in its dtype, as a dense product would read them (half the bytes).
            low_dtype = autocast_dtype(W_dec.device.type)
            table = W_dec.to(low_dtype) if low_dtype is not None else W_dec
        ctx.low_precision = table.dtype != W_dec.dtype
        ctx.weight_dtype = W_dec.dtype
        ctx.d_sae = W_dec.shape[1]
        ctx.record = record
        ctx.slot_ranges = slot_ranges
        ctx.save_for_backward(codes, table, indices)
        return decode_rows(codes, indices, table, bias.detach() if bias is not None else None, slot_ranges)

    @staticmethod
    def backward(ctx, grad_out):
        codes, table, indices = ctx.saved_tensors
        # A zero code's gradient is reported as 0 (its row unread): every caller's zero codes are ReLU-clamped or masked
        # (top-k, BatchTopK's dropped candidates, Matryoshka's other groups, AuxK's live latents), so nothing flows there.
        grad_codes = selected_dots(grad_out, indices, table, zero_where=codes, slot_ranges=ctx.slot_ranges) if ctx.needs_input_grad[0] else None
        grad_W_dec = None
        if ctx.record is not None:
            # Detached, and the ctx lets go of the record: a record referring back to the graph would keep the
            # step's autograd graph (its AccumulateGrad nodes) alive into the next step and break CUDA-graph capture.
            record, ctx.record = ctx.record, None
            record["decoder_weights"], record["decoder_dense"] = codes.detach(), grad_out.detach()
        elif ctx.needs_input_grad[1]:
            grad_W_dec = scatter_rows(codes, indices, ctx.d_sae, grad_out, low_precision=ctx.low_precision).to(ctx.weight_dtype)
        grad_bias = grad_out.sum(dim=1) if ctx.needs_input_grad[5] else None  # the sum autograd forms for a broadcast add
        ctx.slot_ranges = None
        return grad_codes, grad_W_dec, None, None, None, grad_bias, None


class _SelectedPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, centered, W_enc, b_enc, b_dec, indices, bias_separate, encoder_table, record, selected):
        ctx.low_precision = autocast_dtype(W_enc.device.type) is not None
        ctx.record = record
        ctx.save_for_backward(centered, W_enc if encoder_table is None else encoder_table, indices)
        if selected is not None:  # the values the top-k program wrote (round 6): returned as they are (a view)
            return selected
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
        return None, None, grad_W_enc, per_latent if ctx.needs_input_grad[3] else None, grad_b_dec, None, None, None, None, None


def sparse_decode(codes: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor, table: torch.Tensor | None = None,
                  record: dict | None = None, bias: torch.Tensor | None = None,
                  slot_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Differentiable ``sum_j codes[s,b,j] * W_dec[s, indices[s,b,j]]``: codes ``[S,B,K]``, W_dec
    ``[S, d_sae, d]``, indices ``[S,B,K]`` int64 -> float32 ``[S,B,d]`` (plus float32 ``bias [S,d]``, differentiable,
    when given: the decoder bias added inside the decode, round 6).

    ``table``: the rows to read instead of ``W_dec`` (a bf16 copy kept by the optimizer); ``record`` (from
    :class:`DeferredWeightGradients`): leave W_dec's gradient to :func:`sparse_adam_step` instead of returning it.
    The gradient of a zero code is returned as 0 (round 7): callers pass codes whose zeros get no gradient further
    down (a ReLU or a mask), and rows of zero codes are then read neither forward nor backward. ``slot_ranges``
    (int32 ``(starts, ends) [S,B]``, codes 0 outside each row's slots ``starts .. ends``): the wide programs visit
    only those slots (BatchTopK's kept candidates, sorted to the front of each token's slots)."""
    return _SparseDecode.apply(codes, W_dec, indices, table, record, bias, slot_ranges)


def selected_preactivations(pre: torch.Tensor, centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                            b_dec: torch.Tensor, indices: torch.Tensor, bias_separate: bool = False,
                            encoder_table: torch.Tensor | None = None, record: dict | None = None,
                            selected: torch.Tensor | None = None) -> torch.Tensor:
    """The pre-activations ``a = centered W_enc + b_enc`` (``centered = x - b_dec``, ``[S,B,d]``) at
    ``indices [S,B,K]``, float32 ``[S,B,K]``, read from ``pre [S,B,d_sae]`` computed without autograd (``a``
    itself, or with ``bias_separate`` the product alone, b_enc then added here), with the gradients they
    would have had through the dense product flowing to W_enc, b_enc and b_dec.

    ``encoder_table``: a bf16 copy of W_enc for b_dec's gradient; ``record``: leave W_enc's gradient to
    :func:`sparse_adam_step` (see :class:`DeferredWeightGradients`); ``selected``: those values already read
    (float32 ``[S,B,K]``, by :func:`topk_columns`'s ``values_out``), returned instead of gathered again."""
    return _SelectedPreactivations.apply(pre, centered, W_enc, b_enc, b_dec, indices, bias_separate, encoder_table, record, selected)
