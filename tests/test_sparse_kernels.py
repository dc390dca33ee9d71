"""Sparse top-k SAE kernels: values and gradients against dense autograd and hand computation.

Each check runs on the PyTorch path and, where Triton's CPU interpreter works (triton >= 3.9 with
numpy 2, installed by .ci/run; TRITON_INTERPRET=1 is set in conftest), on the Triton programs that
run on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sae_pipeline.sae import kernels as sparse_kernels
from sae_pipeline.sae.kernels import programs as kernel_programs
from sae_pipeline.sae.kernels import entries as kernel_entries
from sae_pipeline.sae.kernels import updates as kernel_updates
from sae_pipeline.sae.trainer import SeedBatchedTrainer
from sae_pipeline.sae.training_model import SeedBatchedSAE, topk_indices
from sae_pipeline.settings import TrainSettings
from tests.conftest import interpreter_works

torch.set_num_threads(1)


def dense_topk_sae(x, W_enc, b_enc, W_dec, b_dec, k):
    """Reference: the top-k SAE through dense autograd. Returns (reconstruction, indices)."""
    pre = torch.baddbmm(b_enc.unsqueeze(1), x.unsqueeze(0) - b_dec.unsqueeze(1), W_enc)
    indices = pre.topk(k, dim=-1).indices
    codes = torch.zeros_like(pre).scatter(-1, indices, pre.gather(-1, indices).relu())
    return torch.bmm(codes, W_dec) + b_dec.unsqueeze(1), indices


def sparse_topk_sae(x, W_enc, b_enc, W_dec, b_dec, indices):
    with torch.no_grad():
        centered = x.unsqueeze(0) - b_dec.unsqueeze(1)
        pre = torch.bmm(centered, W_enc)
    values = sparse_kernels.selected_preactivations(pre, centered, W_enc, b_enc, b_dec, indices, bias_separate=True)
    return sparse_kernels.sparse_decode(values.relu(), W_dec, indices) + b_dec.unsqueeze(1)


@pytest.mark.parametrize("decode_wide", [None, 16, 256])  # the wide decode and selected dots: 16 columns (d_in 20 in two blocks, the second masked), one block
@pytest.mark.parametrize("k,column_block", [(5, 128), (70, 128), (5, 8)])  # 70: more selected rows than one block of the Triton programs
def test_sparse_forward_and_gradients_equal_dense_autograd(backend, k, column_block, decode_wide, monkeypatch):
    # column_block 8: d_in 20 in three column blocks, decoded by two programs per token (the second's last block empty)
    monkeypatch.setattr(kernel_programs, "COLUMN_BLOCK", column_block)
    monkeypatch.setattr(kernel_programs, "DECODE_COLUMN_BLOCKS", 2)
    monkeypatch.setattr(kernel_programs, "DECODE_WIDE_COLUMNS", decode_wide)
    monkeypatch.setattr(kernel_programs, "SELECTED_DOT_WIDE_COLUMNS", decode_wide)  # the selected dots likewise: 16 columns, 256, the old program
    generator = torch.Generator().manual_seed(0)
    n_seeds, batch, d_sae, d_in = 2, 24, 160, 20
    x = torch.randn(batch, d_in, generator=generator)
    parameters = [torch.randn(shape, generator=generator).requires_grad_() for shape in
                  ((n_seeds, d_in, d_sae), (n_seeds, d_sae), (n_seeds, d_sae, d_in), (n_seeds, d_in))]
    target = torch.randn(n_seeds, batch, d_in, generator=generator)
    results = []
    for path in ("dense", "sparse"):
        for parameter in parameters:
            parameter.grad = None
        if path == "dense":
            out, indices = dense_topk_sae(x, *parameters, k)
        else:
            out = sparse_topk_sae(x, *parameters, indices)
        (out - target).square().sum().backward()
        results.append([out.detach()] + [parameter.grad.clone() for parameter in parameters])
    for name, dense, sparse in zip(("out", "W_enc", "b_enc", "W_dec", "b_dec"), *results):
        assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-4 * dense.abs().max().item()), name


@pytest.mark.parametrize("decode_wide", [None, 256])
def test_decode_dots_and_scatter_match_hand_computation(backend, decode_wide, monkeypatch):
    monkeypatch.setattr(kernel_programs, "DECODE_WIDE_COLUMNS", decode_wide)
    monkeypatch.setattr(kernel_programs, "SELECTED_DOT_WIDE_COLUMNS", decode_wide)
    table = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]])  # [S=1, n=3, d=2]
    indices = torch.tensor([[[0, 2], [1, 2]]])  # token 0 picks rows 0 and 2, token 1 rows 1 and 2
    values = torch.tensor([[[2.0, 1.0], [0.5, -1.0]]])
    decoded = sparse_kernels.decode_rows(values, indices, table)
    assert decoded.tolist() == [[[2 * 1 + 3, 0 + 1], [-3.0, 1.0 - 1.0]]]
    dense = torch.tensor([[[1.0, 1.0], [2.0, -1.0]]])
    dots = sparse_kernels.selected_dots(dense, indices, table)
    assert dots.tolist() == [[[1.0, 4.0], [-2.0, 5.0]]]
    scattered = sparse_kernels.scatter_rows(values, indices, 3, dense)  # latent 2 gets 1*[1,1] + (-1)*[2,-1]
    assert scattered.tolist() == [[[2.0, 2.0], [1.0, -0.5], [-1.0, 2.0]]]
    assert torch.equal(sparse_kernels.scatter_rows(values, indices, 3, dense, transposed=True), scattered.transpose(1, 2))


@pytest.mark.parametrize("width,k,ties", [(2048, 8, False), (1000, 7, True), (640, 20, False)])
def test_topk_columns_selects_the_k_largest_with_ties_and_bias(width, k, ties):
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    generator = torch.Generator().manual_seed(width)
    pre = torch.randn(2, 3, width, generator=generator)
    if ties:
        pre = (2 * pre).round()  # many equal values around the k-th largest
    pre[0, 0] = -pre[0, 0].abs() - 1  # a row of negatives only
    bias = torch.randn(2, width, generator=generator).round() if ties else torch.randn(2, width, generator=generator)
    columns = sparse_kernels.topk_columns(pre, k, bias)
    biased = pre + bias.unsqueeze(1)
    assert columns.shape == (2, 3, k)
    assert (columns.sort(dim=-1).values.diff(dim=-1) > 0).all()  # k distinct columns
    assert torch.equal(biased.gather(-1, columns).sort(dim=-1).values, biased.topk(k, dim=-1).values.sort(dim=-1).values)


@pytest.mark.parametrize("ties", [False, True])
def test_topk_early_exit_bisection_picks_the_same_columns_in_the_same_slots(ties, monkeypatch):
    """The bisection that stops at the first probe with exactly k keys above it returns the full bisection's
    threshold: the same columns in the same output slots, ties (rounded values, a constant row) included."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    generator = torch.Generator().manual_seed(17)
    pre = torch.randn(2, 4, 1024, generator=generator)
    if ties:
        pre = (3 * pre).round()
        pre[1, 2] = 0.5  # every key tied
    bias = torch.randn(2, 1024, generator=generator).round() if ties else torch.randn(2, 1024, generator=generator)
    columns = {}
    for early_exit in (True, False):
        monkeypatch.setattr(kernel_programs, "TOPK_EARLY_EXIT", early_exit)
        columns[early_exit] = sparse_kernels.topk_columns(pre, 10, bias)
    assert torch.equal(columns[True], columns[False])
    biased = pre + bias.unsqueeze(1)
    assert torch.equal(biased.gather(-1, columns[True]).sort(dim=-1).values, biased.topk(10, dim=-1).values.sort(dim=-1).values)


@pytest.mark.parametrize("rows_per_program,tile", [(1, None), (2, 8), (4, 32), (4, None)])
def test_topk_columns_rows_per_program_share_the_bias(rows_per_program, tile, monkeypatch):
    """Several rows (tokens of one seed) per program, the bias tiles loaded once for them, and a cap on each
    thread's tile (more, narrower chunk blocks): the same k largest as torch.topk; rows of another count run
    one per program."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "TOPK_ROWS", rows_per_program)
    monkeypatch.setattr(kernel_programs, "TOPK_TILE_PER_THREAD", tile)
    launched = []
    launch = kernel_programs.launch
    monkeypatch.setattr(kernel_programs, "launch", lambda name, grid, *args, **meta: (launched.append((grid, meta)), launch(name, grid, *args, **meta)))
    generator = torch.Generator().manual_seed(rows_per_program)
    for tokens in (8, 6):
        pre = torch.randn(2, tokens, 1280, generator=generator)
        pre[1, 3] = -pre[1, 3].abs() - 1  # a row of negatives only
        bias = torch.randn(2, 1280, generator=generator)
        columns = sparse_kernels.topk_columns(pre, 6, bias)
        biased = pre + bias.unsqueeze(1)
        assert (columns.sort(dim=-1).values.diff(dim=-1) > 0).all()
        assert torch.equal(biased.gather(-1, columns).sort(dim=-1).values, biased.topk(6, dim=-1).values.sort(dim=-1).values)
    grid, meta = launched[0]
    assert meta["ROWS"] == rows_per_program and grid == (16 // rows_per_program,)
    if tile is not None:
        assert meta["CHUNK_BLOCK"] * meta["CHUNK"] <= tile * 32 * meta["num_warps"]
    assert launched[1][1]["ROWS"] == (rows_per_program if 6 % rows_per_program == 0 else 1)


def test_topk_indices_adds_the_bias_on_the_torch_path():
    generator = torch.Generator().manual_seed(3)
    pre, bias = torch.randn(2, 5, 64, generator=generator), torch.randn(2, 64, generator=generator)
    chosen = topk_indices(pre, 4, bias=bias)
    assert torch.equal(chosen.sort(dim=-1).values, (pre + bias.unsqueeze(1)).topk(4, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("aux,crossover", [(False, 12), (True, 12), (True, 2)])
def test_training_with_kernels_equals_dense_autograd_training(backend, aux, crossover, monkeypatch):
    """Six Adam steps (AuxK on from the third when ``aux``): the kernels path lands on the dense path's weights.
    ``crossover`` 2: the AuxK steps' weight gradients come from dense products (many entries per latent)."""
    monkeypatch.setattr(kernel_updates, "GRAD_CHUNK", 16)  # latent blocks shared by several gradient work items
    monkeypatch.setattr(kernel_updates, "GRAD_DENSE_ENTRIES_PER_LATENT", crossover)
    generator = torch.Generator().manual_seed(1)
    pool = [torch.randn(32, 16, generator=generator) + 0.5 for _ in range(3)]
    weights = {}
    for mode in (False, "kernels"):
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=3, d_sae=64, batch_size=32, total_tokens=32 * 100,
                                                   warmup_steps=0, sparse_decoder=mode, dead_window_tokens=64 if aux else 10**9, aux_k=8))
        model = SeedBatchedSAE(settings, 16, seeds=[0, 1], b_dec=torch.zeros(16))
        trainer = SeedBatchedTrainer(model, "cpu")
        for step in range(6):
            if step % 3 == 2:
                model.refresh_dead_flag()
            trainer.step(pool[step % 3])
        assert model.decoder_mode == ("dense" if mode is False else "kernels")
        # The kernels path on Triton defers the weight gradients to the fused sparse optimizer step.
        assert model.sparse_update is (mode == "kernels" and backend == "triton-interpreter")
        assert model.auxk_active is aux
        weights[mode] = [parameter.detach().clone() for parameter in model.parameters()]
    for dense, sparse in zip(weights[False], weights["kernels"]):
        assert torch.allclose(sparse, dense, atol=1e-6, rtol=1e-5)


def test_autocast_dtype_follows_autocast():
    """The sparse path reads autocast's dtype (torch.get_autocast_dtype; the getautocast_dtype spelling is gone from torch 2.11)."""
    assert sparse_kernels.autocast_dtype("cpu") is None
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert sparse_kernels.autocast_dtype("cpu") == torch.bfloat16


def test_decoder_mode_resolution():
    def mode(**overrides):
        values = dict(architecture="topk", k=2, d_sae=16, **overrides)
        return SeedBatchedSAE(TrainSettings.from_mapping(values), 4, seeds=[0]).decoder_mode

    assert mode() == "embedding_bag"  # auto on the CPU
    assert mode(sparse_decoder="kernels") == "kernels"
    assert mode(sparse_decoder=False) == "dense"
    assert mode(sparse_decoder="kernels", regularizer={"kind": "off_support_l1", "coefficient": 0.1}) == "embedding_bag"


def _distinct_indices(generator, n_seeds, batch, k, d_sae, heavy=3):
    """Top-k-like indices: k distinct latents per token, latent ``heavy`` chosen by every token (more
    entries than one block of the gradient program holds)."""
    rest = [i for i in range(d_sae) if i != heavy]
    rows = [[torch.tensor([heavy] + [rest[j] for j in torch.randperm(len(rest), generator=generator)[:k - 1].tolist()])
             for _ in range(batch)] for _ in range(n_seeds)]
    return torch.stack([torch.stack(row) for row in rows])


@pytest.mark.parametrize("low_precision,chunk,dense,columns,per_program,one_pass", [
    (False, 256, False, 64, 4, None), (True, 256, False, 64, 4, None), (False, 24, False, 64, 4, None), (True, 7, False, 64, 4, None),
    (False, 256, True, 64, 4, None), (True, 256, True, 64, 4, None), (False, 24, False, 16, 2, None), (True, 256, False, 16, 1, None),
    (False, 7, False, 16, 8, None),
    (False, 256, False, 64, 4, 64), (True, 256, False, 64, 4, 16), (False, 24, False, 16, 4, 16), (True, 7, False, 16, 4, 64),
    (True, 256, False, 64, 4, "64/16"), (False, 7, False, 16, 4, "16/16")])
def test_latent_gradients_equal_dense_products(backend, low_precision, chunk, dense, columns, per_program, one_pass, monkeypatch):
    """Both weight gradients and the per-latent statistics from entries sorted by latent, for two sets of
    entries (top-k and AuxK-like) stacked, against dense scattered products (bf16-rounded operands when low;
    on the Triton paths the gradients are then bf16, as the dense path's bf16 products give them).
    Small ``chunk``s split most latent blocks over several work items (partial tiles added in order);
    ``dense``: past the entries-per-latent crossover the Triton path forms them by products instead;
    ``columns`` 16: d = 70 in 5 column blocks, looped over by programs of ``per_program`` (groups of 2, 2, 1; 5 alone; 1 each);
    ``one_pass``: round 1's one-pass program instead (chosen: every block average exceeds threshold 0), with that many
    entries per product (16: several products per item; 64: one, mostly masked); "entries/latents": with blocks of 16
    latents (GRAD_ONE_PASS_LATENTS; partial tiles of 16 rows)."""
    monkeypatch.setattr(kernel_updates, "GRAD_CHUNK", chunk)
    monkeypatch.setattr(kernel_updates, "GRAD_DENSE_ENTRIES_PER_LATENT", 0 if dense else 12)
    monkeypatch.setattr(kernel_updates, "GRAD_MAX_SLOTS", 4096)
    monkeypatch.setattr(kernel_updates, "GRAD_COLUMNS", columns)
    monkeypatch.setattr(kernel_updates, "GRAD_ONE_PASS_COLUMNS", columns)
    monkeypatch.setattr(kernel_updates, "GRAD_PROGRAM_COLUMN_BLOCKS", per_program)
    monkeypatch.setattr(kernel_updates, "GRAD_ONE_PASS_ENTRIES_PER_BLOCK", None if one_pass is None else 0)
    if one_pass is not None:
        one_pass, _, one_pass_latents = str(one_pass).partition("/")
        monkeypatch.setattr(kernel_updates, "GRAD_ONE_PASS_ENTRIES", int(one_pass))
        monkeypatch.setattr(kernel_updates, "GRAD_ONE_PASS_LATENTS", int(one_pass_latents) if one_pass_latents else 32)
    launched = []
    launch = kernel_programs.launch
    monkeypatch.setattr(kernel_programs, "launch", lambda name, *args, **meta: (launched.append(name), launch(name, *args, **meta))[1])
    generator = torch.Generator().manual_seed(4)
    n_seeds, batch, d_sae, width = 2, 40, 100, 70  # partial latent and column blocks
    sets = [_distinct_indices(generator, n_seeds, batch, 6, d_sae), _distinct_indices(generator, n_seeds, batch, 9, d_sae, heavy=50)]
    entries = sparse_kernels.sort_entries_by_latent(sets, d_sae)
    assert (entries["keys"].diff() >= 0).all() and entries["segments"][-1] == n_seeds * batch * 15
    a = [torch.randn(n_seeds, batch, s.shape[2], generator=generator) for s in sets]
    c = [torch.randn(n_seeds, batch, s.shape[2], generator=generator) for s in sets]
    dec_dense = [torch.randn(n_seeds, batch, width, generator=generator) for _ in sets]
    enc_dense = [torch.randn(n_seeds, batch, width, generator=generator) for _ in sets]
    W_dec = torch.randn(n_seeds, d_sae, width, generator=generator)
    order = entries["order"]
    grad_dec, grad_enc, statistics = sparse_kernels.latent_gradients(
        entries, torch.cat([t.reshape(n_seeds, -1) for t in a], 1).reshape(-1)[order], torch.cat([t.reshape(n_seeds, -1) for t in c], 1).reshape(-1)[order],
        torch.cat(dec_dense, 1), torch.cat(enc_dense, 1), W_dec, low_precision)
    if backend == "triton-interpreter" and not dense:
        launched = [name for name in launched if not name.startswith("sort_")]  # the entry sort's programs
        gradient_programs = [name for name in launched if name != "work_items"]  # the work items' own program first
        assert launched[0] == "work_items" and gradient_programs[0] == ("latent_gradients" if one_pass is None else "latent_gradients_one_pass"), launched
    rounded = (lambda t: t.bfloat16().float()) if low_precision else (lambda t: t)
    ref_dec = sum(torch.bmm(rounded(torch.zeros(n_seeds, batch, d_sae).scatter_(-1, s, w)).transpose(1, 2), rounded(d)) for s, w, d in zip(sets, a, dec_dense))
    ref_enc = sum(torch.bmm(rounded(e).transpose(1, 2), rounded(torch.zeros(n_seeds, batch, d_sae).scatter_(-1, s, w))) for s, w, e in zip(sets, c, enc_dense))
    # the interpreter rounds to bf16 by truncation; bf16 products round their outputs to bf16
    tolerance = 1e-2 if low_precision and (backend == "triton-interpreter" or dense) else 1e-5
    for name, got, want in (("W_dec", grad_dec, ref_dec), ("W_enc", grad_enc, ref_enc)):
        assert got.dtype == (torch.bfloat16 if low_precision and backend == "triton-interpreter" else torch.float32), name
        got = got.float()
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        assert torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item()), name
    want = torch.stack([ref_dec.square().sum(-1), (ref_dec * W_dec).sum(-1), W_dec.square().sum(-1), ref_enc.square().sum(1)], dim=-1)
    assert torch.allclose(statistics, want, rtol=2 * tolerance, atol=2 * tolerance * want.abs().max().item())
    stored_dec, stored_enc = grad_dec.float(), grad_enc.float()  # the statistics are those of the values returned
    own = torch.stack([stored_dec.square().sum(-1), (stored_dec * W_dec).sum(-1), W_dec.square().sum(-1), stored_enc.square().sum(1)], dim=-1)
    assert torch.allclose(statistics, own, rtol=1e-5, atol=1e-5 * own.abs().max().item())


def test_gradient_program_shape_follows_entries_per_block(monkeypatch):
    """Round 1's one-pass program past GRAD_ONE_PASS_ENTRIES_PER_BLOCK entries per latent block on average (from
    the shapes alone: top-k k 40, batch 4096 gives ~320 a block of 32 latents at 16,384 latents, 20 at 262,144);
    never when None."""
    monkeypatch.setattr(kernel_updates, "GRAD_ONE_PASS_ENTRIES_PER_BLOCK", 64)
    blocks_16k, blocks_262k = 16384 // kernel_updates.GRAD_LATENTS, 262144 // kernel_updates.GRAD_LATENTS
    assert kernel_updates.gradient_program_shape(4096 * 40, blocks_16k) == "one_pass"
    assert kernel_updates.gradient_program_shape(4096 * 40, blocks_262k) == "looping"
    assert kernel_updates.gradient_program_shape(64 * blocks_16k, blocks_16k) == "looping"  # exactly at the threshold
    monkeypatch.setattr(kernel_updates, "GRAD_ONE_PASS_ENTRIES_PER_BLOCK", None)
    assert kernel_updates.gradient_program_shape(4096 * 40, blocks_16k) == "looping"


@pytest.mark.parametrize("width", [40, 64])
def test_adam_programs_read_bf16_gradients_as_their_float32_values(width):
    """The Adam programs given a bf16 gradient (the gradient program's output under autocast) update exactly as
    with its float32 values (rows of 40 columns: a masked tile of 64)."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    kernel_programs.INTERPRET_ON_CPU = True
    try:
        generator = torch.Generator().manual_seed(8)
        rows = 12
        start = torch.randn(rows, width, generator=generator)
        start = start / start.norm(dim=-1, keepdim=True)
        gradient = torch.randn(rows, width, generator=generator).bfloat16()
        results = []
        for given in (gradient, gradient.float()):
            weights = {"rows": start.clone(), "flat": start.clone()}
            optimizer = torch.optim.Adam(list(weights.values()), lr=1e-2)
            lr = torch.tensor(1e-2)
            for _ in range(2):
                for weight in weights.values():
                    kernel_updates._adam_state(optimizer, weight)["step"] += 1
                kernel_updates._adam_launch("adam_rows", optimizer, weights["rows"], given, None, None, lr, (rows // 2,), rows, rows // 2, width,
                                            ROWS=2, BLOCK=64, PROJECT=True, NORMALIZE=True)
                kernel_updates._adam_launch("adam_flat", optimizer, weights["flat"], given, None, None, lr, (-(-rows * width // 128),),
                                            rows * width, rows * width, BLOCK=128)
            results.append(weights)
        for name in ("rows", "flat"):
            assert torch.equal(results[0][name], results[1][name]), name
        assert torch.allclose(results[0]["rows"].norm(dim=-1), torch.ones(rows))
        assert not torch.equal(results[0]["flat"], start)
        # The projection's coefficients given per row (<g, w> / |w|^2, as sparse_adam_step forms them from the
        # gradient program's statistics) land where the program's own two row reductions land.
        weights = {"rows": start.clone()}
        optimizer = torch.optim.Adam(list(weights.values()), lr=1e-2)
        for _ in range(2):
            kernel_updates._adam_state(optimizer, weights["rows"])["step"] += 1
            along = (gradient.float() * weights["rows"]).sum(-1) / weights["rows"].square().sum(-1)
            kernel_updates._adam_launch("adam_rows", optimizer, weights["rows"], gradient, None, None, lr, (rows // 2,), rows, rows // 2, width,
                                        along=along, ROWS=2, BLOCK=64, PROJECT=True, NORMALIZE=True)
        assert torch.allclose(weights["rows"], results[0]["rows"], rtol=1e-5, atol=1e-6)
        assert not torch.equal(weights["rows"], start)
    finally:
        kernel_programs.INTERPRET_ON_CPU = False


@pytest.mark.parametrize("block", [4, 1024])  # 4: the running sums carried over many steps of the loops
@pytest.mark.parametrize("n_seeds,d_sae,chunk,latents", [(2, 200, 4, 32), (1, 64, 16, 32), (3, 100, 2, 32), (2, 200, 4, 16)])
def test_work_items_program_equals_the_torch_formulas(n_seeds, d_sae, chunk, latents, block, monkeypatch):
    """The one-program work items (blocks of ``latents`` latents cut into items of ``chunk`` entries, shared blocks, padding
    past the real count) equal the torch formulas' on latents of very uneven counts (empty blocks, hot latents)."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    generator = torch.Generator().manual_seed(d_sae)
    counts = torch.randint(0, 3, (n_seeds * d_sae,), generator=generator) * (torch.rand(n_seeds * d_sae, generator=generator) < 0.5)
    counts[:n_seeds * d_sae:37] += 20  # hot latents: blocks of many items
    counts[32:64] = 0  # an empty block
    segments = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    n_entries = int(counts.sum())
    monkeypatch.setattr(kernel_updates, "GRAD_CHUNK", chunk)
    monkeypatch.setattr(kernel_updates, "WORK_ITEMS_PROGRAM", False)
    want = kernel_updates._gradient_work_items(segments, n_seeds, d_sae, n_entries, latents)
    monkeypatch.setattr(kernel_updates, "WORK_ITEMS_PROGRAM", True)
    monkeypatch.setattr(kernel_updates, "WORK_ITEMS_BLOCK", block)
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    got = kernel_updates._gradient_work_items(segments, n_seeds, d_sae, n_entries, latents)
    assert (want["block_items"] > 1).any() and want["item_block"].eq(want["total_blocks"]).any()  # shared blocks and padding occur
    assert want.keys() == got.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == torch.int32 and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("block,scale_block", [(32, 2), (1024, 1024)])  # 32: three latent blocks (the last masked); 2: the partials looped over
@pytest.mark.parametrize("unit_norm,clip,along_given", [(True, 1.0, True), (True, 0.05, False), (False, 0.05, False), (True, None, True)])
def test_clip_statistics_programs_equal_the_torch_formulas(unit_norm, clip, along_given, block, scale_block, monkeypatch):
    """The two clipping programs give the torch formulas' per-seed scale and per-row projection coefficients
    from per-column-block statistics (three column blocks summed), b_enc's and b_dec's gradients included."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    generator = torch.Generator().manual_seed(11)
    n_seeds, d_sae, d_in, column_blocks = 2, 70, 9, 3
    statistics = torch.rand(column_blocks, n_seeds * d_sae, 4, generator=generator)
    statistics[..., 1] -= 0.5  # <g, w> of either sign
    grad_b_enc, grad_b_dec = torch.randn(n_seeds, d_sae, generator=generator), torch.randn(n_seeds, d_in, generator=generator)
    monkeypatch.setattr(kernel_updates, "CLIP_PROGRAMS", False)
    want = kernel_updates.clip_statistics(statistics, grad_b_enc, grad_b_dec, clip, unit_norm, along_given)
    monkeypatch.setattr(kernel_updates, "CLIP_PROGRAMS", True)
    monkeypatch.setattr(kernel_updates, "CLIP_BLOCK", block)
    monkeypatch.setattr(kernel_updates, "CLIP_SCALE_BLOCK", scale_block)
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    got = kernel_updates.clip_statistics(statistics, grad_b_enc, grad_b_dec, clip, unit_norm, along_given)
    for expected, result in zip(want, got):
        assert (expected is None) == (result is None)
        if expected is not None:
            assert torch.allclose(result, expected, rtol=1e-5, atol=1e-7)
    if clip is not None:
        assert (want[0] < 1).all()  # the scale is binding, so every term of the norm counts


@pytest.mark.parametrize("clip_programs", [True, False])
@pytest.mark.parametrize("projection_given", [True, False])
@pytest.mark.parametrize("unit_norm,clip", [(True, 1.0), (True, 0.01), (False, None)])
def test_sparse_adam_step_equals_projection_clipping_adam_and_renormalisation(unit_norm, clip, projection_given, clip_programs, monkeypatch):
    """Three fused steps on given entries land where the unfused sequence (dense gradients, projection,
    per-seed clipping, torch.optim.Adam, renormalisation) lands; the bf16 copies follow the weights. With
    ``projection_given`` the Adam row program takes the projection from the gradient statistics."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_updates, "ADAM_ROWS_PROJECTION_GIVEN", projection_given)
    monkeypatch.setattr(kernel_updates, "CLIP_PROGRAMS", clip_programs)
    kernel_programs.INTERPRET_ON_CPU = True
    try:
        generator = torch.Generator().manual_seed(5)
        n_seeds, batch, d_sae, width, k = 2, 24, 80, 40, 5
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=k, d_sae=d_sae, unit_norm_decoder=unit_norm, grad_clip_norm=clip))
        models = [SeedBatchedSAE(settings, width, seeds=[0, 1]) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        optimizers = [torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999)) for model in models]
        for step in range(3):
            indices = _distinct_indices(generator, n_seeds, batch, k, d_sae)
            codes, grad_values = torch.randn(n_seeds, batch, k, generator=generator), torch.randn(n_seeds, batch, k, generator=generator)
            grad_out, centered = torch.randn(n_seeds, batch, width, generator=generator), torch.randn(n_seeds, batch, width, generator=generator)
            grad_b_enc, grad_b_dec = torch.randn(n_seeds, d_sae, generator=generator), torch.randn(n_seeds, width, generator=generator)
            reference, fused = models
            reference.W_dec.grad = torch.bmm(torch.zeros(n_seeds, batch, d_sae).scatter_(-1, indices, codes).transpose(1, 2), grad_out)
            reference.W_enc.grad = torch.bmm(centered.transpose(1, 2), torch.zeros(n_seeds, batch, d_sae).scatter_(-1, indices, grad_values))
            reference.b_enc.grad, reference.b_dec.grad = grad_b_enc.clone(), grad_b_dec.clone()
            if unit_norm:
                reference.remove_parallel_decoder_gradient()
            if clip is not None:
                reference.clip_gradients_per_seed(clip)
            optimizers[0].step()
            if unit_norm:
                reference.normalize_decoder()
            deferred = sparse_kernels.DeferredWeightGradients(low_precision=False)
            record = deferred.record(indices)
            record.update(decoder_weights=codes, decoder_dense=grad_out, encoder_weights=grad_values, encoder_dense=centered)
            fused.b_enc.grad, fused.b_dec.grad = grad_b_enc.clone(), grad_b_dec.clone()
            low = fused.low_precision_weights()
            sparse_kernels.sparse_adam_step(optimizers[1], deferred, fused.W_enc, fused.W_dec, fused.b_enc, fused.b_dec, low, clip, unit_norm)
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                want, got = getattr(reference, name).detach(), getattr(fused, name).detach()
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (step, name)
                state_want, state_got = optimizers[0].state[getattr(reference, name)], optimizers[1].state[getattr(fused, name)]
                assert float(state_got["step"]) == step + 1
                assert torch.allclose(state_got["exp_avg_sq"], state_want["exp_avg_sq"], rtol=1e-4, atol=1e-12), (step, name)
            for copy, weight in zip(low, (fused.W_enc, fused.W_dec)):
                assert copy.dtype == torch.bfloat16 and torch.allclose(copy.float(), weight.detach(), rtol=2 ** -7, atol=0)
            assert fused.low_precision_weights()[0] is low[0]  # the step kept the copies current: nothing is cast again
    finally:
        kernel_programs.INTERPRET_ON_CPU = False


def test_sparse_update_leaves_no_gradient_record_alive(monkeypatch):
    """A step's gradient records (and so its autograd graph) are freed with the step: a record kept alive
    by a reference cycle with the graph kept its AccumulateGrad nodes into the next step, which broke CUDA-graph capture."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    import weakref

    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)

    class Record(dict):  # weak-referenceable
        pass

    references = []

    def record(self, indices):
        entry = Record(indices=indices)
        self.records.append(entry)
        references.append(weakref.ref(entry))
        return entry

    monkeypatch.setattr(sparse_kernels.DeferredWeightGradients, "record", record)
    settings = TrainSettings.from_mapping(dict(architecture="topk", k=3, d_sae=64, batch_size=32, total_tokens=3200, warmup_steps=0, sparse_decoder="kernels"))
    trainer = SeedBatchedTrainer(SeedBatchedSAE(settings, 16, seeds=[0]), "cpu")
    for _ in range(3):
        trainer.step(torch.randn(32, 16), statistics=False)
    assert len(references) == 3 and all(reference() is None for reference in references)


def test_topk_columns_on_wide_rows_uses_wider_chunks_and_more_warps(monkeypatch):
    """Past TOPK_MAX_CHUNKS chunks the chunks widen (and warps are added): the same k largest are selected."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "TOPK_MAX_CHUNKS", 16)
    monkeypatch.setattr(kernel_programs, "TOPK_KEYS_PER_THREAD", 4)
    generator = torch.Generator().manual_seed(6)
    pre, bias = torch.randn(2, 3, 2000, generator=generator), torch.randn(2, 2000, generator=generator)
    columns = sparse_kernels.topk_columns(pre, 9, bias)
    biased = pre + bias.unsqueeze(1)
    assert torch.equal(biased.gather(-1, columns).sort(dim=-1).values, biased.topk(9, dim=-1).values.sort(dim=-1).values)


def test_sparse_update_state_round_trip_continues_identically(monkeypatch):
    """A trainer restored from another's state_dict (optimizer state kept in torch.optim.Adam's layout) continues
    the sparse update exactly as the original does."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randn(32, 16, generator=generator) for _ in range(5)]
    settings = TrainSettings.from_mapping(dict(architecture="topk", k=3, d_sae=64, batch_size=32, total_tokens=3200, warmup_steps=2, sparse_decoder="kernels"))
    original = SeedBatchedTrainer(SeedBatchedSAE(settings, 16, seeds=[0, 1]), "cpu")
    for x in batches[:2]:
        original.step(x)
    restored = SeedBatchedTrainer(SeedBatchedSAE(settings, 16, seeds=[5, 6]), "cpu")
    restored.load_state_dict(copy.deepcopy(original.state_dict()))  # as a checkpoint gives it (torch's load shares tensors)
    assert restored.model.sparse_update
    for x in batches[2:]:
        original.step(x)
        restored.step(x)
    for mine, theirs in zip(original.model.parameters(), restored.model.parameters()):
        assert torch.equal(mine, theirs)


def _sort_case(generator, n_seeds, batch, ks, d_sae, layout):
    """Indices ``[S,B,k]`` per record (distinct latents per token): ``random``; ``heavy`` (latent 1 in every token of
    every record, latent d_sae - 1 in half of them); ``same`` (every token of a record picks the same latents, as AuxK
    does where a seed has fewer dead latents than aux_k)."""
    records = []
    for k in ks:
        if layout == "same":
            chosen = torch.randperm(d_sae, generator=generator)[:k].expand(n_seeds, batch, k).clone()
        else:
            chosen = torch.stack([torch.stack([torch.randperm(d_sae, generator=generator)[:k] for _ in range(batch)]) for _ in range(n_seeds)])
            if layout == "heavy":
                for latent, tokens in ((1, batch), (d_sae - 1, batch // 2)):
                    rows = chosen[:, :tokens]
                    has = (rows == latent).any(-1, keepdim=True)
                    slot = torch.where(has, (rows == latent).int().argmax(-1, keepdim=True), torch.full_like(has, k - 1, dtype=torch.long))
                    rows.scatter_(-1, slot, latent)
        records.append(chosen)
    return records


@pytest.mark.parametrize("digit_bits,chunk", [(8, 128), (3, 16), (9, 64), (7, 256)])  # 3 bits, 16 entries: several passes over many chunks
@pytest.mark.parametrize("n_seeds,batch,ks,d_sae,layout,values", [
    (1, 8, (3,), 30, "random", "both"),  # one pass
    (2, 24, (5, 9), 100, "heavy", "both"),
    (3, 17, (4,), 700, "heavy", "missing"),  # 700 latents, most empty; a record without its encoder weights
    (2, 20, (6, 11), 333, "same", "both"),
    (1, 40, (40,), 4099, "random", "none"),
    (3, 9, (7, 2), 70_001, "random", "both")])  # 18 key bits: three passes of 6 at 8 bits a pass
def test_counting_sort_equals_torch_sort(n_seeds, batch, ks, d_sae, layout, values, digit_bits, chunk, monkeypatch):
    """The counting-sort programs give torch.sort's stable order bit for bit: keys, order, rows, segments and the
    per-entry weights gathered in that order (float32 and bf16 sources; None gives zeros), for one to three seeds,
    one or two records of different k, heavy latents, identical rows, empty latents, d_sae past any block size."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    generator = torch.Generator().manual_seed(d_sae + len(ks))
    indices = _sort_case(generator, n_seeds, batch, ks, d_sae, layout)
    weights = ()
    if values != "none":
        weights = tuple([None if values == "missing" and name == "encoder" else torch.randn(n_seeds, batch, k, generator=generator).to(dtype)
                         for k, dtype in zip(ks, (torch.float32, torch.bfloat16))] for name in ("decoder", "encoder"))
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(kernel_entries, "COUNTING_SORT", False)
    want = sparse_kernels.sort_entries_by_latent(indices, d_sae, weights)
    monkeypatch.setattr(kernel_entries, "COUNTING_SORT", True)
    monkeypatch.setattr(kernel_entries, "COUNTING_SORT_DIGIT_BITS", digit_bits)
    monkeypatch.setattr(kernel_entries, "COUNTING_SORT_CHUNK", chunk)
    launched = []
    launch = kernel_programs.launch
    monkeypatch.setattr(kernel_programs, "launch", lambda name, *args, **meta: (launched.append(name), launch(name, *args, **meta))[1])
    got = sparse_kernels.sort_entries_by_latent(indices, d_sae, weights)
    passes = -(-(n_seeds * d_sae - 1).bit_length() // digit_bits)
    assert launched == ["sort_histogram", "sort_place"] * passes
    assert want.keys() == got.keys() == {"keys", "order", "rows", "segments"} | ({"weights"} if weights else set())
    for key in ("keys", "order", "rows", "segments"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    for wanted, result in zip(want.get("weights", []), got.get("weights", [])):
        assert result.dtype == torch.float32 and torch.equal(result, wanted)
    if values == "missing":
        assert not got["weights"][1].any()
    if batch * sum(ks) < d_sae or layout == "same":
        assert (got["segments"].diff() == 0).any()  # empty latents occur


@pytest.mark.parametrize("switch,program", [("COUNTING_SORT", "sort_place"), ("ADAM_BIASES_ONE_LAUNCH", "adam_pair")])  # kernels.entries / updates
@pytest.mark.parametrize("aux", [False, True])
def test_training_with_round_6_switches_on_equals_training_with_them_off(aux, switch, program, monkeypatch):
    """Training with the sparse update lands on bit-identical weights and Adam state with ``switch`` (the counting
    sort; b_enc's and b_dec's Adam in one launch) on and off (AuxK's second record from the third step when ``aux``)."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    generator = torch.Generator().manual_seed(2)
    pool = [torch.randn(32, 16, generator=generator) + 0.5 for _ in range(3)]
    results = {}
    launched = []
    launch = kernel_programs.launch
    monkeypatch.setattr(kernel_programs, "launch", lambda name, *args, **meta: (launched.append(name), launch(name, *args, **meta))[1])
    for counting in (False, True):
        monkeypatch.setattr(kernel_entries if switch == "COUNTING_SORT" else kernel_updates, switch, counting)
        launched.clear()
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=3, d_sae=64, batch_size=32, total_tokens=32 * 100, warmup_steps=0,
                                                   sparse_decoder="kernels", dead_window_tokens=64 if aux else 10**9, aux_k=8, grad_clip_norm=1.0))
        trainer = SeedBatchedTrainer(SeedBatchedSAE(settings, 16, seeds=[0, 1], b_dec=torch.zeros(16)), "cpu")
        for step in range(4):
            if step % 3 == 2:
                trainer.model.refresh_dead_flag()
            trainer.step(pool[step % 3])
        assert trainer.model.sparse_update and trainer.model.auxk_active is aux
        assert (program in launched) is counting
        results[counting] = copy.deepcopy(trainer.state_dict())
    flat = [[leaf for leaf in torch.utils._pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)] for result in (results[False], results[True])]
    assert len(flat[0]) == len(flat[1]) > 8
    for want, got in zip(*flat):
        assert torch.equal(got, want)
