"""The deferred weight gradients and the fused optimizer step of a top-k SAE trained with the sparse kernels.

The selected entries a step recorded (:class:`~sae_pipeline.sae.kernels.ops.DeferredWeightGradients`)
are sorted by latent; :func:`latent_gradients` forms the W_dec and W_enc gradients from them, and
:func:`sparse_adam_step` does projection, per-seed clipping, Adam, renormalisation and the bf16 copies.
"""

import functools
import math

import torch

from sae_pipeline.sae.kernels import programs
from sae_pipeline.sae.kernels.entries import deferred_operands
from sae_pipeline.sae.kernels.ops import DeferredWeightGradients
from sae_pipeline.sae.kernels.programs import triton


# Latent-sorted weight gradients: latents per block, entries per product, columns of d per block (wider from
# GRAD_WIDE_D on), column blocks one program loops over at most (its first entries' one-hot operands built once),
# entries per work item (at least; more when there are many entries, so that the partial tiles of shared blocks
# need at most GRAD_MAX_SLOTS slots), warps per program (None: GRAD_LOOPING_WARPS for the looping program,
# GRAD_ONE_PASS_WARPS for the one-pass one; the GRAD_ONE_PASS_* constants shape the latter).
# 4 column blocks and 32 entries per product: on the H200 (benchmarks/ISSUE17_NOTES.md, round 2) the program took
# 5.04 ms in the 262,144 x 2304 step (5.37 with one column block and 64 entries, float32 stores), but 0.28 and
# 1.12 ms at 16,384 latents (d_in 512 / 2304; 0.19 and 0.83 before): blocks there hold ~320 entries.
# (With 4 warps, GRAD_LOOPING_WARPS, round 4: 3.56 ms at 262,144 x 2304; 16,384 latents run the one-pass program.)
GRAD_LATENTS = 32
GRAD_ENTRIES = 32
GRAD_COLUMNS = 64
GRAD_WIDE_D = 512
GRAD_PROGRAM_COLUMN_BLOCKS = 4
GRAD_CHUNK = 256
GRAD_MAX_SLOTS = 1024
GRAD_WARPS = None
# Warps of the looping program (and its combining program) where GRAD_WARPS is None. On the H200 (round 4,
# benchmarks/issue17_logs/round4b_variants.log, in the step) 4 instead of 8: the program 0.662 -> 0.513 ms at
# 131,072 x 512 and 2.944 -> 2.176 at 131,072 x 2304 (step 0.95x / 0.93x). (The one-pass program in round 4's shape
# kept 8: with 4, 0.176 -> 0.189 ms at 16,384 x 512; in round 8's shape 4 won, GRAD_ONE_PASS_WARPS.)
GRAD_LOOPING_WARPS = 4
# Program shape per call: where the latent blocks (of GRAD_LATENTS) average more than this many entries (entries /
# blocks, known from the shapes, so CUDA graphs hold), round 1's one-pass program (one column block per program,
# GRAD_ONE_PASS_ENTRIES entries per product; programs._latent_gradients_one_pass_program) instead of the looping one;
# None: never. Top-k k 40, batch 4096: ~320 entries per block at 16,384 latents, 80 at 65,536, 20 at 262,144.
# Round 3 (the one-pass program then in blocks of 32 latents) put the crossover at 64; with round 8's one-pass shape
# below, one-pass at 16 made the step 0.94-0.97x at 131,072 and 262,144 latents (k 40 and 64, d_in 512 and 2304;
# benchmarks/issue17_logs/round8_one_pass_threshold_wide.log), so every width of the table runs it.
GRAD_ONE_PASS_ENTRIES_PER_BLOCK = 16
# The one-pass program's shape: entries per product, Triton's num_stages (None: Triton's default), latents per block
# (and per work item; None: GRAD_LATENTS), columns per block (doubled from GRAD_WIDE_D on, as GRAD_COLUMNS is) and
# warps. Round 8 on the H200, timed in-step against round 7's shape (64 entries, default stages, 32 latents, 64
# columns, 8 warps): the program 0.177 -> ~0.10 ms at 16,384 x 512 (k 40) and 1.106 -> ~0.57 at 16,384 x 2304 (k 64);
# the step 0.91x, 0.85x, 0.83x, 0.79x at 16,384 latents (d_in 512 / 2304, k 40 / 64) and 0.86-0.92x at 65,536
# (benchmarks/issue17_logs/round8_one_pass_latents_variants.log, round8_one_pass_shape_variants.log). One stage (no
# cp.async pipelining of the gathered rows) was itself 0.93x; Triton's default (3) and 4-5 slower.
GRAD_ONE_PASS_ENTRIES = 32
GRAD_ONE_PASS_STAGES = 1
GRAD_ONE_PASS_LATENTS = 16
GRAD_ONE_PASS_COLUMNS = 128
GRAD_ONE_PASS_WARPS = 4
# Under bf16 autocast the weight gradients are stored in bf16, rounded as the dense path's bf16 products round
# them (half the bytes written by the gradient program and read by Adam); float32 else, or when this is off.
GRAD_STORE_LOW_PRECISION = True
# Past this many entries per latent (per seed) the weight gradients are two dense products instead: on the
# H200 the sparse program costs ~2e-12 s per entry and column of d, the bf16 products ~5.7e-15 s per
# B * d_sae * d (cuBLAS at ~700 TFLOP/s), equal at ~12 entries per latent for B = 4096 (top-k k=40 at 16k
# latents: 0.19 ms sparse vs 0.25 dense; an AuxK step's 512 extra entries per token favour the products below ~190k latents).
# Round 4 (faster one-pass program): at 16 entries per latent (top-k k 64, 16,384 latents) the sparse program won, the
# step 0.93x at d_in 512 and 2304 (benchmarks/issue17_logs/round4d_variants.log: 1.125 vs 1.214 ms, 3.154 vs 3.395); so 16
# (k 64 at 16k sparse; AuxK steps, 17+ entries per latent below ~131k latents, unmeasured, stay on the products).
GRAD_DENSE_ENTRIES_PER_LATENT = 16
# Adam over decoder rows: at most this many elements (rows x next_power_of_2(d)) per program. (A row of 2304 held
# as a head of 2048 and a tail of 256 instead of one tile of 4096 was slower on the H200: 5.58 ms vs 4.79 at
# 262,144 x 2304, 4.93 with 4 warps; benchmarks/ISSUE17_NOTES.md, round 2.)
ADAM_ROW_ELEMENTS = 4096
ADAM_BLOCK = 2048
# The decoder-gradient projection in the Adam row program from the gradient program's per-latent statistics
# (<g, w> and |w|^2 of the stored values) instead of two row reductions in the program (round 4; False: as before).
ADAM_ROWS_PROJECTION_GIVEN = True
# The clipping scale and the projection coefficients from the statistics in two small programs (round 5,
# :func:`clip_statistics`) instead of ~30 torch kernels; latents per program of the first, partial sums per step of the second.
CLIP_PROGRAMS = True
# The gradient program's work items from the segments in one program (round 5, programs._work_items_program) instead
# of ~25 torch kernels; blocks of latents (and items) per step of its loops.
WORK_ITEMS_PROGRAM = True
WORK_ITEMS_BLOCK = 1024
CLIP_BLOCK = 1024
CLIP_SCALE_BLOCK = 1024
# Adam over b_enc and b_dec in one launch (programs._adam_pair_program, round 6) instead of one adam_flat launch each.
ADAM_BIASES_ONE_LAUNCH = True


def _dense_latent_gradients(entries: dict[str, torch.Tensor], decoder_weights: torch.Tensor, encoder_weights: torch.Tensor,
                            decoder_dense: torch.Tensor, encoder_dense: torch.Tensor, W_dec: torch.Tensor, operand_dtype: torch.dtype,
                            gradient_dtype: torch.dtype, with_W_dec: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`latent_gradients` as two batched products on the entries scattered into a dense ``[S, R, d_sae]``
    code matrix (in ``operand_dtype``, as autocast gives the dense path), for steps with many entries per latent."""
    n_seeds, d_sae, width = W_dec.shape
    keys = entries["keys"].long()
    seeds, rows = keys // d_sae, entries["rows"].long()
    latents = keys - seeds * d_sae
    codes = torch.zeros(n_seeds, decoder_dense.shape[1], d_sae, dtype=operand_dtype, device=W_dec.device)
    codes[seeds, rows, latents] = decoder_weights.to(operand_dtype)
    grad_dec = torch.bmm(codes.transpose(1, 2), decoder_dense).to(gradient_dtype)
    codes[seeds, rows, latents] = encoder_weights.to(operand_dtype)  # the same positions: every entry is overwritten
    grad_enc = torch.bmm(encoder_dense.transpose(1, 2), codes).to(gradient_dtype)
    weights, dec, enc = W_dec.float(), grad_dec.float(), grad_enc.float()
    statistics = torch.stack([
        dec.square().sum(-1),
        (dec * weights).sum(-1) if with_W_dec else torch.zeros(n_seeds, d_sae, device=W_dec.device),
        weights.square().sum(-1) if with_W_dec else torch.ones(n_seeds, d_sae, device=W_dec.device),
        enc.square().sum(1),
    ], dim=-1)
    return grad_dec, grad_enc, statistics


@functools.lru_cache(maxsize=16)
def _block_bounds(n_seeds: int, d_sae: int, latents: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the segments of each block of ``latents`` latents' first latent and of the latent after its last."""
    blocks = torch.arange(n_seeds * triton.cdiv(d_sae, latents), device=device)
    per_seed = triton.cdiv(d_sae, latents)
    seed, first = blocks // per_seed, (blocks % per_seed) * latents
    return seed * d_sae + first, seed * d_sae + (first + latents).clamp(max=d_sae)


def _gradient_work_items(segments: torch.Tensor, n_seeds: int, d_sae: int, n_entries: int, latents: int) -> dict:
    """Work items of :func:`_latent_gradients_program`: each block of ``latents`` latents is cut into items of at most
    ``chunk`` entries (one item for an empty block). Static sizes (for CUDA graphs): ``capacity`` items,
    those past the real count marked by block ``total_blocks``; ``slots`` partial tiles for shared blocks."""
    chunk = max(GRAD_CHUNK, triton.next_power_of_2(triton.cdiv(n_entries, GRAD_MAX_SLOTS // 2)))
    if WORK_ITEMS_PROGRAM and programs.triton_usable(segments):
        per_seed = triton.cdiv(d_sae, latents)
        total_blocks = n_seeds * per_seed
        capacity = total_blocks + triton.cdiv(n_entries, chunk)
        max_shared = max(1, min(total_blocks, n_entries // chunk))
        # One int32 buffer: inclusive sums, block items, block slots, item blocks, item chunks, shared blocks.
        buffer = torch.empty(3 * total_blocks + 2 * capacity + max_shared, dtype=torch.int32, device=segments.device)
        inclusive, block_items, block_slot = buffer[:total_blocks], buffer[total_blocks:2 * total_blocks], buffer[2 * total_blocks:3 * total_blocks]
        item_block, item_chunk = buffer[3 * total_blocks:3 * total_blocks + capacity], buffer[3 * total_blocks + capacity:3 * total_blocks + 2 * capacity]
        shared_blocks = buffer[3 * total_blocks + 2 * capacity:]
        programs.launch("work_items", (1,), segments, inclusive, item_block, item_chunk, block_items, block_slot, shared_blocks, d_sae, per_seed,
                        total_blocks, capacity, max_shared, chunk, LATENTS=latents, BLOCK=WORK_ITEMS_BLOCK, num_warps=4)
        return {"item_block": item_block, "item_chunk": item_chunk, "block_items": block_items, "block_slot": block_slot,
                "shared_blocks": shared_blocks, "capacity": capacity, "total_blocks": total_blocks, "chunk": chunk,
                "slots": max(1, 2 * triton.cdiv(n_entries, chunk))}
    first, after = _block_bounds(n_seeds, d_sae, latents, segments.device)
    total_blocks = first.numel()
    counts = (segments[after] - segments[first]).long()
    n_items = ((counts + chunk - 1) // chunk).clamp_min(1)
    inclusive = n_items.cumsum(0)
    capacity = total_blocks + triton.cdiv(n_entries, chunk)  # sum of max(1, ceil(count / chunk)) over blocks
    items = torch.arange(capacity, device=segments.device)
    item_block = torch.searchsorted(inclusive, items, right=True)
    item_chunk = items - (inclusive - n_items)[item_block.clamp(max=total_blocks - 1)]
    shared = torch.where(n_items > 1, n_items, 0)
    # A shared block has > chunk entries, so at most n_entries // chunk blocks are shared: the combining
    # program runs over a list of that length (the j-th shared block, or total_blocks past the last).
    max_shared = max(1, min(total_blocks, n_entries // chunk))
    shared_rank = (n_items > 1).cumsum(0)
    shared_blocks = torch.searchsorted(shared_rank, _counting(max_shared, segments.device))
    return {"item_block": item_block.to(torch.int32), "item_chunk": item_chunk.to(torch.int32), "block_items": n_items.to(torch.int32),
            "block_slot": (shared.cumsum(0) - shared).to(torch.int32), "shared_blocks": shared_blocks.to(torch.int32),
            "capacity": capacity, "total_blocks": total_blocks, "chunk": chunk, "slots": max(1, 2 * triton.cdiv(n_entries, chunk))}


@functools.lru_cache(maxsize=16)
def _counting(n: int, device: torch.device) -> torch.Tensor:
    """``1 .. n`` (int64)."""
    return torch.arange(1, n + 1, device=device)


def gradient_program_shape(n_entries: int, n_blocks: int) -> str:
    """Which gradient program :func:`latent_gradients` launches for ``n_entries`` sorted entries over ``n_blocks``
    latent blocks: ``"one_pass"`` (round 1's shape) past ``GRAD_ONE_PASS_ENTRIES_PER_BLOCK`` entries per block on
    average, else ``"looping"`` (``GRAD_PROGRAM_COLUMN_BLOCKS`` column blocks per program)."""
    if GRAD_ONE_PASS_ENTRIES_PER_BLOCK is not None and n_entries > GRAD_ONE_PASS_ENTRIES_PER_BLOCK * max(1, n_blocks):
        return "one_pass"
    return "looping"


def latent_gradients(entries: dict[str, torch.Tensor], decoder_weights: torch.Tensor, encoder_weights: torch.Tensor,
                     decoder_dense: torch.Tensor, encoder_dense: torch.Tensor, W_dec: torch.Tensor, low_precision: bool,
                     with_W_dec: bool = True, per_column_block: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both weight gradients of a top-k SAE from its selected entries, without dense code matrices.

    ``entries`` from :func:`~sae_pipeline.sae.kernels.entries.sort_entries_by_latent`; ``decoder_weights`` / ``encoder_weights`` (float32, in
    the sorted order) weigh the rows ``decoder_dense[s, rows[e]]`` / ``encoder_dense[s, rows[e]]`` (``[S, R, d]``).
    Returns ``grad_dec [S, d_sae, d]``, ``grad_enc [S, d, d_sae]`` (bf16 with ``low_precision`` on the Triton
    paths while ``GRAD_STORE_LOW_PRECISION``, rounded as the dense path's bf16 products round them; float32 else)
    and float32 per-latent statistics of those values ``[S, d_sae, 4]``: ``|grad_dec row|^2``,
    ``<grad_dec row, W_dec row>``, ``|W_dec row|^2`` (the last two 0 and 1 without ``with_W_dec``) and
    ``|grad_enc column|^2``; with ``per_column_block`` those unsummed, ``[C, S * d_sae, 4]`` (the Triton
    programs' partial sums per column block, C = 1 on the other paths), for :func:`clip_statistics`.

    On CUDA (or Triton's interpreter) one program per work item (a block of latents, or part of one) and group of
    ``GRAD_PROGRAM_COLUMN_BLOCKS`` column blocks (or, past ``GRAD_ONE_PASS_ENTRIES_PER_BLOCK`` entries per block,
    round 1's program, one per work item and column block: :func:`gradient_program_shape`), or, past
    ``GRAD_DENSE_ENTRIES_PER_LATENT`` entries per latent (an AuxK step at moderate widths), two dense products on
    the scattered entries; elsewhere ``index_add_``."""
    n_seeds, d_sae, width = W_dec.shape
    operand_dtype = torch.bfloat16 if low_precision else torch.float32
    decoder_dense = decoder_dense.to(operand_dtype).contiguous()
    encoder_dense = encoder_dense.to(operand_dtype).contiguous()
    gradient_dtype = torch.bfloat16 if low_precision and GRAD_STORE_LOW_PRECISION else torch.float32
    if programs.triton_usable(W_dec) and entries["keys"].numel() > GRAD_DENSE_ENTRIES_PER_LATENT * n_seeds * d_sae:
        grad_dec, grad_enc, statistics = _dense_latent_gradients(entries, decoder_weights, encoder_weights, decoder_dense, encoder_dense,
                                                                 W_dec, operand_dtype, gradient_dtype, with_W_dec)
        return grad_dec, grad_enc, statistics.view(1, n_seeds * d_sae, 4) if per_column_block else statistics
    if not programs.triton_usable(W_dec):
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
        return grad_dec, grad_enc, statistics.view(1, n_seeds * d_sae, 4) if per_column_block else statistics
    n_entries = entries["keys"].numel()
    one_pass = gradient_program_shape(n_entries, n_seeds * triton.cdiv(d_sae, GRAD_LATENTS)) == "one_pass"
    latents = (GRAD_ONE_PASS_LATENTS or GRAD_LATENTS) if one_pass else GRAD_LATENTS
    columns = min((GRAD_ONE_PASS_COLUMNS if one_pass else GRAD_COLUMNS) * (2 if width >= GRAD_WIDE_D else 1),
                  max(16, triton.next_power_of_2(width)))
    column_blocks = triton.cdiv(width, columns)
    groups = triton.cdiv(column_blocks, max(1, GRAD_PROGRAM_COLUMN_BLOCKS))
    per_program = triton.cdiv(column_blocks, groups)  # the groups as even as they come
    items = _gradient_work_items(entries["segments"], n_seeds, d_sae, n_entries, latents)
    grad_dec = torch.empty(n_seeds, d_sae, width, dtype=gradient_dtype, device=W_dec.device)
    grad_enc = torch.empty(n_seeds, width, d_sae, dtype=gradient_dtype, device=W_dec.device)
    statistics = torch.empty(column_blocks, n_seeds * d_sae, 4, dtype=torch.float32, device=W_dec.device)
    partial_dec = torch.empty(items["slots"], latents, width, dtype=torch.float32, device=W_dec.device)
    partial_enc = torch.empty_like(partial_dec)
    warps = GRAD_WARPS or (GRAD_ONE_PASS_WARPS if one_pass else GRAD_LOOPING_WARPS)
    operands = (items["item_block"], items["item_chunk"], items["block_items"], items["block_slot"], entries["segments"], entries["keys"],
                entries["rows"], decoder_weights.float().contiguous(), encoder_weights.float().contiguous(), decoder_dense, encoder_dense,
                W_dec.contiguous(), grad_dec, grad_enc, statistics, partial_dec, partial_enc, d_sae, width, decoder_dense.shape[1],
                n_seeds * d_sae, items["total_blocks"])
    if one_pass:
        programs.launch("latent_gradients_one_pass", (items["capacity"], column_blocks), *operands,
                LATENTS=latents, ENTRIES=GRAD_ONE_PASS_ENTRIES, COLUMNS=columns, CHUNK=items["chunk"],
                LOW_PRECISION=low_precision, WITH_W_DEC=with_W_dec, EMULATE_BF16=programs.triton_interpreting(), num_warps=warps,
                **({"num_stages": GRAD_ONE_PASS_STAGES} if GRAD_ONE_PASS_STAGES else {}))
    else:
        programs.launch("latent_gradients", (items["capacity"], groups), *operands, column_blocks,
                LATENTS=GRAD_LATENTS, ENTRIES=GRAD_ENTRIES, COLUMNS=columns, CHUNK=items["chunk"], COLUMN_BLOCKS=per_program,
                LOW_PRECISION=low_precision, WITH_W_DEC=with_W_dec, EMULATE_BF16=programs.triton_interpreting(), num_warps=warps)
    programs.launch("combine_gradients", (items["shared_blocks"].numel(), column_blocks), items["shared_blocks"], items["block_items"],
            items["block_slot"], W_dec.contiguous(), grad_dec, grad_enc, statistics, partial_dec, partial_enc, d_sae, width, n_seeds * d_sae,
            items["total_blocks"], LATENTS=latents, COLUMNS=columns, WITH_W_DEC=with_W_dec, num_warps=warps)
    return grad_dec, grad_enc, statistics if per_column_block else statistics.sum(dim=0).view(n_seeds, d_sae, 4)


def clip_statistics(statistics: torch.Tensor, grad_b_enc: torch.Tensor, grad_b_dec: torch.Tensor, clip_norm: float | None,
                    unit_norm_decoder: bool, along_given: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From :func:`latent_gradients`'s per-column-block statistics ``[C, S * d_sae, 4]``: the per-seed clipping
    scale ``[S]`` (None without ``clip_norm``) and the decoder-gradient projection's coefficient per row
    ``[S * d_sae]`` (None unless ``unit_norm_decoder`` and ``along_given``), as :func:`sparse_adam_step`'s torch
    formulas give them. With ``CLIP_PROGRAMS`` on (and Triton usable) two programs instead of ~30 small torch
    kernels: one per seed and ``CLIP_BLOCK`` latents (the sums over the column blocks, the coefficients, partial
    squared norms), one per seed (the norm with b_dec's gradient, the scale)."""
    along_wanted = unit_norm_decoder and along_given
    n_seeds, d_in = grad_b_dec.shape
    d_sae = grad_b_enc.shape[1]
    if CLIP_PROGRAMS and programs.triton_usable(statistics):
        along = torch.empty(n_seeds * d_sae, dtype=torch.float32, device=statistics.device) if along_wanted else None
        clip_scale = None
        if along is None and clip_norm is None:
            return None, None
        blocks = triton.cdiv(d_sae, CLIP_BLOCK)
        partial = torch.empty(n_seeds * blocks, dtype=torch.float32, device=statistics.device) if clip_norm is not None else None
        statistics = statistics.contiguous()
        programs.launch("clip_statistics", (n_seeds, blocks), statistics, statistics.shape[0], n_seeds * d_sae * 4, grad_b_enc.contiguous(),
                        along if along is not None else statistics, partial if partial is not None else statistics, d_sae, blocks,
                        PROJECT=unit_norm_decoder, ALONG=along is not None, CLIP=partial is not None, BLOCK=CLIP_BLOCK, num_warps=4)
        if partial is not None:
            clip_scale = torch.empty(n_seeds, dtype=torch.float32, device=statistics.device)
            programs.launch("clip_scale", (n_seeds,), partial, blocks, grad_b_dec.contiguous(), d_in, clip_scale, float(clip_norm),
                            BLOCK=CLIP_SCALE_BLOCK, num_warps=4)
        return clip_scale, along
    squared, dots, weight_squared, encoder_squared = statistics.sum(dim=0).view(n_seeds, d_sae, 4).unbind(-1)
    clip_scale = None
    # The projection's coefficient per decoder row, <g, w> / max(|w|, 1e-12)^2, for the Adam row program.
    norms = weight_squared.sqrt().clamp_min(1e-12)
    along_rows = (dots / norms.square()).reshape(-1) if along_wanted else None
    if clip_norm is not None:
        if unit_norm_decoder:  # |g - <g,u>u|^2 with u = w / |w| (as remove_parallel_decoder_gradient projects)
            along = dots / norms
            squared = (squared - 2 * along.square() + along.square() * (weight_squared / norms.square())).clamp_min(0)
        total = squared.sum(-1) + encoder_squared.sum(-1) + grad_b_enc.float().square().sum(-1) + grad_b_dec.float().square().sum(-1)
        clip_scale = (float(clip_norm) / (total.sqrt() + 1e-6)).clamp(max=1.0)
    return clip_scale, along_rows


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
                 clip_scale: torch.Tensor | None, lr: torch.Tensor, grid: tuple[int, ...], *shape_args, along: torch.Tensor | None = None,
                 **meta) -> None:
    """Launch ``adam_rows`` or ``adam_flat``; ``along`` (``adam_rows``): the projection's per-row coefficients, or None
    for the program to form them itself."""
    state = _adam_state(optimizer, parameter)
    extra = ()
    if name == "adam_rows":
        extra = (along.contiguous() if along is not None else lr,)
        meta["PROJECT_GIVEN"] = along is not None
    programs.launch(name, grid, parameter, gradient.contiguous(), state["exp_avg"], state["exp_avg_sq"],
            low_copy if low_copy is not None else parameter, clip_scale if clip_scale is not None else lr, lr, state["step"],
            *shape_args, *_adam_hyperparameters(optimizer), *extra,
            CLIP=clip_scale is not None, LOW_COPY=low_copy is not None, **meta)


def _adam_hyperparameters(optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
    """The Adam programs' scalar arguments: ``beta1, beta2, eps, log2(beta1), log2(beta2)``."""
    group = optimizer.param_groups[0]
    beta1, beta2 = (float(beta) for beta in group["betas"])
    return beta1, beta2, float(group["eps"]), math.log2(beta1), math.log2(beta2)


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
    3. elementwise Adam over W_enc (bf16 copy too), b_enc and b_dec (the two in one launch with ``ADAM_BIASES_ONE_LAUNCH``).

    ``low_copies``: bf16 ``(W_enc, W_dec)`` copies the step refreshes (what the next forward reads). The
    learning rate is read from device memory (a tensor ``lr`` of the optimizer's group, or one made here),
    so the step can be captured in a CUDA graph. Needs Triton (CUDA or its interpreter); b_enc and b_dec
    must hold their gradients."""
    group = optimizer.param_groups[0]
    if group.get("weight_decay", 0) or group.get("amsgrad", False) or group.get("maximize", False):
        raise ValueError("sparse_adam_step implements plain Adam (no weight decay, amsgrad or maximize)")
    records = deferred.records
    n_seeds, d_sae, width = W_dec.shape
    grad_dec, grad_enc, statistics = latent_gradients(*deferred_operands(deferred, W_dec), W_dec, deferred.low_precision,
                                                      with_W_dec=unit_norm_decoder, per_column_block=True)
    grad_b_enc = b_enc.grad if b_enc.grad is not None else torch.zeros_like(b_enc)
    grad_b_dec = b_dec.grad if b_dec.grad is not None else torch.zeros_like(b_dec)
    clip_scale, along_rows = clip_statistics(statistics, grad_b_enc, grad_b_dec, clip_norm, unit_norm_decoder, ADAM_ROWS_PROJECTION_GIVEN)
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
                 n_seeds * d_sae, d_sae, width, along=along_rows, ROWS=rows, BLOCK=block, PROJECT=unit_norm_decoder,
                 NORMALIZE=unit_norm_decoder, num_warps=8 if block >= 2048 else 4)
    flat = ((W_enc, grad_enc, low_enc),) + (((b_enc, grad_b_enc, None), (b_dec, grad_b_dec, None)) if not ADAM_BIASES_ONE_LAUNCH else ())
    for parameter, gradient, low in flat:
        numel = parameter.numel()
        _adam_launch("adam_flat", optimizer, parameter, gradient, low, clip_scale, lr, (triton.cdiv(numel, ADAM_BLOCK),),
                     numel, numel // n_seeds, BLOCK=ADAM_BLOCK)
    if ADAM_BIASES_ONE_LAUNCH:
        operands = [(parameter, gradient.contiguous(), state["exp_avg"], state["exp_avg_sq"], state["step"], parameter.numel(), parameter.numel() // n_seeds)
                    for parameter, gradient, state in ((b_enc, grad_b_enc, states[2]), (b_dec, grad_b_dec, states[3]))]
        blocks = triton.cdiv(b_enc.numel(), ADAM_BLOCK)
        programs.launch("adam_pair", (blocks + triton.cdiv(b_dec.numel(), ADAM_BLOCK),), *operands[0], blocks, *operands[1],
                        clip_scale if clip_scale is not None else lr, lr, *_adam_hyperparameters(optimizer),
                        BLOCK=ADAM_BLOCK, CLIP=clip_scale is not None)
    records.clear()
