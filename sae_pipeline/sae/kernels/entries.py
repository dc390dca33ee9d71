"""The entries a training step recorded for its deferred weight gradients, sorted by latent
(:func:`sort_entries_by_latent`), and the operands :func:`~sae_pipeline.sae.kernels.updates.latent_gradients`
reads from the records (:func:`deferred_operands`)."""

import functools

import torch

from sae_pipeline.sae.kernels import programs
from sae_pipeline.sae.kernels.ops import DeferredWeightGradients
from sae_pipeline.sae.kernels.programs import triton

# The entry sort as a stable counting sort in Triton programs (round 6, :func:`_counting_sort_entries`; passes of at most
# COUNTING_SORT_DIGIT_BITS key bits over chunks of COUNTING_SORT_CHUNK entries), output identical to torch.sort's and the
# gathers it replaces. Off: on the H200 the torch.sort path was 0.98-1.007x the step with it at all 16 sizes, faster at
# 14 (its placing program alone 0.042 ms at 512 x 16k, k 40; benchmarks/issue17_logs/round6_final_table.log).
COUNTING_SORT = False
COUNTING_SORT_CHUNK = 128
COUNTING_SORT_DIGIT_BITS = 8


def sort_entries_by_latent(indices: list[torch.Tensor], d_sae: int,
                           weights: tuple[list[torch.Tensor | None], ...] = (),
                           positions: list[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """The entries of several ``indices [S,B,K_p]`` tensors sorted by (seed, latent), stably.

    Returns ``keys`` (int32 ``s * d_sae + latent`` per sorted entry), ``order`` (int64: each sorted entry's
    position in the concatenation of the flattened tensors, per seed), ``rows`` (int32 ``p * B + token``,
    the entry's row in the stacked dense operands), ``segments`` (int32 ``[S * d_sae + 1]``: latent
    ``s * d_sae + i`` owns sorted entries ``segments[i] .. segments[i+1]``) and, with ``weights`` (per-entry
    values: one ``[S,B,K_p]`` tensor per record, or None for zeros), ``weights``: each as float32 in the sorted
    order. ``positions`` (one per record, or None): int64 ``[S, N_p]``, the flat positions ``row * K_p + j`` of the
    entries of that record that count (BatchTopK's kept candidates), the others left out (``order`` then counts
    positions in the concatenation of what is kept, and the records' rows follow one another, whatever their number). With ``COUNTING_SORT`` (Triton usable, at most two
    records and two weights, no ``positions``) the counting-sort programs (:func:`_counting_sort_entries`), else
    torch.sort; the two give the same values."""
    n_seeds, batch = indices[0].shape[:2]
    device = indices[0].device
    if n_seeds * d_sae >= 2**31:
        raise ValueError("sort_entries_by_latent: seeds x d_sae must stay below 2**31")
    n_entries = n_seeds * batch * sum(chosen.shape[2] for chosen in indices)
    # int32 positions: the entries, and the (digit, chunk) counts (at most 2**COUNTING_SORT_DIGIT_BITS per chunk).
    fits = triton is not None and 0 < n_entries < 2**31 and (1 << COUNTING_SORT_DIGIT_BITS) * triton.cdiv(n_entries, COUNTING_SORT_CHUNK) < 2**31
    positions = list(positions) if positions is not None and any(kept is not None for kept in positions) else None
    if COUNTING_SORT and fits and positions is None and programs.triton_usable(indices[0]) and len(indices) <= 2 and len(weights) <= 2:
        return _counting_sort_entries(indices, d_sae, weights)
    offsets, rows, queries = _entry_constants(n_seeds, batch, tuple(chosen.shape[2] for chosen in indices), d_sae, device)
    if positions is None:
        flat = indices[0].reshape(n_seeds, -1) if len(indices) == 1 else torch.cat([chosen.reshape(n_seeds, -1) for chosen in indices], dim=1)
    else:
        flat, rows = _kept_entries(indices, positions)
    keys = (flat.to(torch.int32) + offsets).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    sorted_rows = rows.reshape(-1)[order]
    segments = torch.searchsorted(sorted_keys, queries, out_int32=True)
    entries = {"keys": sorted_keys, "order": order, "rows": sorted_rows, "segments": segments}
    if weights:
        def flattened(values: list[torch.Tensor | None]) -> torch.Tensor:
            parts = [value.reshape(n_seeds, -1).float() if value is not None else torch.zeros(n_seeds, chosen[0].numel(), device=device)
                     for value, chosen in zip(values, indices)]
            if positions is not None:
                parts = [part if kept is None else part.gather(1, kept) for part, kept in zip(parts, positions)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        entries["weights"] = [flattened(values).reshape(-1)[order] for values in weights]
    return entries


def _counting_sort_entries(indices: list[torch.Tensor], d_sae: int, weights: tuple[list[torch.Tensor | None], ...]) -> dict[str, torch.Tensor]:
    """:func:`sort_entries_by_latent` (one or two records, at most two weights) by a stable least-significant-digit
    counting sort over the keys' ``ceil(log2(S * d_sae))`` bits, in passes of at most ``COUNTING_SORT_DIGIT_BITS``
    bits. Per pass: ``sort_histogram`` counts each chunk's digits (``[bins, chunks]`` int32), ``torch.cumsum`` gives
    their inclusive running sums, ``sort_place`` puts each entry at its (digit, chunk)'s first position plus the
    number of the chunk's earlier entries with its digit (no atomics: deterministic and stable). The first pass reads
    the keys from the records' indices, the last writes the sorted keys, ``order``, ``rows`` and the weights; the
    segments are ``torch.searchsorted`` over the sorted keys, as on the torch path."""
    n_seeds, batch = indices[0].shape[:2]
    device = indices[0].device
    ks = [chosen.shape[2] for chosen in indices]
    per_seed = batch * sum(ks)
    total = n_seeds * per_seed
    bits = max(1, (n_seeds * d_sae - 1).bit_length())
    passes = triton.cdiv(bits, COUNTING_SORT_DIGIT_BITS)
    digit_bits = triton.cdiv(bits, passes)
    bins, chunk = 1 << digit_bits, COUNTING_SORT_CHUNK
    n_chunks = triton.cdiv(total, chunk)
    first, second = indices[0].contiguous(), indices[-1].contiguous()
    counts = torch.empty(2, bins * n_chunks, dtype=torch.int32, device=device)  # the counts and their inclusive running sums
    keys = torch.empty(2 if passes > 1 else 1, total, dtype=torch.int32, device=device)
    order_between = torch.empty(2 if passes > 2 else 1, total, dtype=torch.int32, device=device) if passes > 1 else keys
    order, rows = torch.empty(total, dtype=torch.int64, device=device), torch.empty(total, dtype=torch.int32, device=device)
    values = [[value.contiguous() if value is not None else None for value in per_record] for per_record in weights]
    out = [torch.empty(total, dtype=torch.float32, device=device) for _ in weights]
    value_pointers = [(per_record[0] if per_record[0] is not None else first, per_record[-1] if per_record[-1] is not None else first)
                      for per_record in values] + [(first, first)] * (2 - len(values))
    flags = {f"HAS_{name}_{part}": index < len(values) and (slot == 0 or len(indices) == 2) and values[index][slot] is not None
             for index, name in enumerate("AB") for slot, part in enumerate(("FIRST", "SECOND"))}
    outputs = out + [rows] * (2 - len(out))
    for step in range(passes):
        source_keys = keys[(step - 1) % keys.shape[0]] if step > 0 else first
        source_order = order_between[(step - 1) % order_between.shape[0]] if step > 0 else first
        target_keys = keys[step % keys.shape[0]]
        target_order = order_between[step % order_between.shape[0]]
        shape = dict(FIRST=step == 0, TWO_RECORDS=len(indices) == 2, CHUNK=chunk, BINS=bins)
        common = (total, n_chunks, per_seed, batch * ks[0], d_sae)
        programs.launch("sort_histogram", (n_chunks,), source_keys, source_order, first, second, counts[0], *common, step * digit_bits,
                        BIN_BLOCK=min(bins, 64), num_warps=4, **shape)
        torch.cumsum(counts[0], 0, dtype=torch.int32, out=counts[1])
        programs.launch("sort_place", (n_chunks,), source_keys, source_order, first, second, counts[0], counts[1], target_keys, target_order,
                        rows, order, *value_pointers[0], *value_pointers[1], *outputs, total, n_chunks, per_seed, batch * ks[0], ks[0], ks[-1],
                        batch, d_sae, step * digit_bits, LAST=step == passes - 1, VALUES=len(values), num_warps=4, **flags, **shape)
    sorted_keys = keys[(passes - 1) % keys.shape[0]]
    queries = _entry_constants(n_seeds, batch, tuple(ks), d_sae, device)[2]
    entries = {"keys": sorted_keys, "order": order, "rows": rows, "segments": torch.searchsorted(sorted_keys, queries, out_int32=True)}
    return {**entries, "weights": out} if weights else entries


def _kept_entries(indices: list[torch.Tensor], positions: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """For :func:`sort_entries_by_latent` with ``positions``: the kept entries' latents and dense rows (the token plus
    the rows of the records before), both ``[S, N]`` over the records in order (int64, int32). Records may have
    different numbers of rows (Matryoshka's grouped record has G*B)."""
    latents, rows, first_row = [], [], 0
    for chosen, kept in zip(indices, positions):
        n_seeds, n_rows, k = chosen.shape
        if kept is None:
            kept = torch.arange(n_rows * k, device=chosen.device).expand(n_seeds, -1)
        latents.append(chosen.reshape(n_seeds, -1).gather(1, kept))
        rows.append((kept // k + first_row).to(torch.int32))
        first_row += n_rows
    return torch.cat(latents, dim=1), torch.cat(rows, dim=1)


@functools.lru_cache(maxsize=16)
def _entry_constants(n_seeds: int, batch: int, ks: tuple[int, ...], d_sae: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For :func:`sort_entries_by_latent`: per-seed key offsets ``[S, 1]``, each entry's dense row ``[S, N]``
    (``p * B + token`` for set p) and the segment queries ``0 .. S * d_sae`` (int32; made once per layout)."""
    offsets = (torch.arange(n_seeds, device=device, dtype=torch.int32) * d_sae).view(n_seeds, 1)
    tokens = torch.arange(batch, device=device, dtype=torch.int32).view(batch, 1)
    rows = torch.cat([(tokens + part * batch).expand(batch, k).reshape(-1) for part, k in enumerate(ks)])
    queries = torch.arange(n_seeds * d_sae + 1, device=device, dtype=torch.int32)
    return offsets, rows.expand(n_seeds, -1).contiguous(), queries


def deferred_operands(deferred: DeferredWeightGradients, W_dec: torch.Tensor) -> tuple:
    """The first five arguments of :func:`latent_gradients` from a step's records: the entries of every record
    sorted by latent, the per-entry decoder and encoder weights in that order, and the dense operands stacked
    along the rows (record p's rows p*B ..; zeros for a record whose backward left none)."""
    records = deferred.records
    n_seeds, d_sae, width = W_dec.shape
    for record in records:  # Matryoshka's grouped rows: the encoder's per-token operands repeated once per group
        groups = record.pop("groups", 1)
        for key in ("encoder_weights", "encoder_dense"):
            if groups > 1 and key in record:
                record[key] = record[key].repeat(1, groups, 1)
    entries = sort_entries_by_latent([record["indices"] for record in records], d_sae,
                                     weights=tuple([record.get(key) for record in records] for key in ("decoder_weights", "encoder_weights")),
                                     positions=[record.get("positions") for record in records])
    per_entry = entries.pop("weights")

    def stacked(key: str) -> torch.Tensor:
        dtype = next((record[key].dtype for record in records if key in record), torch.float32)
        parts = [record[key] if key in record else torch.zeros(n_seeds, record["indices"].shape[1], width, dtype=dtype, device=W_dec.device)
                 for record in records]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    decoder_dense, encoder_dense = (stacked(key) for key in ("decoder_dense", "encoder_dense"))
    return entries, *per_entry, decoder_dense, encoder_dense
