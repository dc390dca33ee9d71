"""Round 6 of issue 17: the top-k program writes the selected values and adds the firing counts, and the
dead-latent counters advance in one program. Each switch (``training_model.TOPK_WRITES_VALUES``,
``TOPK_COUNTS_FIRING``, ``FIRING_PROGRAM``) gives results identical to the torch operations it replaces,
checked in Triton's CPU interpreter (TRITON_INTERPRET=1 is set in conftest)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sae_pipeline.sae import kernels as sparse_kernels
from sae_pipeline.sae import training_model
from sae_pipeline.sae.kernels import ops as kernel_ops
from sae_pipeline.sae.kernels import programs as kernel_programs
from sae_pipeline.sae.trainer import SeedBatchedTrainer
from sae_pipeline.sae.training_model import SeedBatchedSAE
from sae_pipeline.settings import TrainSettings

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if sparse_kernels.triton is None or not sparse_kernels.triton_interpreting():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, triton>=3.9)")
    major, minor = (int(part) for part in sparse_kernels.triton.__version__.split(".")[:2])
    if (major, minor) < (3, 9):
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)


def _switches(monkeypatch, on: bool) -> None:
    for name in ("TOPK_WRITES_VALUES", "TOPK_COUNTS_FIRING", "FIRING_PROGRAM"):
        monkeypatch.setattr(training_model, name, on)


@pytest.mark.parametrize("read_back", [True, False])
@pytest.mark.parametrize("n_seeds,dtype,rows_per_program", [(1, torch.float32, 1), (3, torch.bfloat16, 1), (2, torch.bfloat16, 2)])
def test_topk_program_values_and_firing_counts_equal_the_gather_and_scatter(n_seeds, dtype, rows_per_program, read_back, monkeypatch):
    """The values the program writes are bit for bit the gather path's (``pre.gather().float()`` plus the gathered
    bias); its firing counts are ``scatter_add_`` of ``relu(values) > 0``: selected entries of value exactly 0
    (and negative ones) do not count. ``read_back``: from the chosen columns read back, or from the keys."""
    monkeypatch.setattr(kernel_programs, "TOPK_ROWS", rows_per_program)
    monkeypatch.setattr(kernel_programs, "TOPK_VALUES_READ_BACK", read_back)
    generator = torch.Generator().manual_seed(n_seeds)
    batch, width, k = 6, 640, 5
    pre = torch.randn(n_seeds, batch, width, generator=generator).to(dtype)
    bias = torch.randn(n_seeds, width, generator=generator)
    # Token 1 of seed 0: every entry negative but columns 3..9, exactly 0 after the bias (7 > k zeros, so all k are 0).
    pre[0, 1] = -pre[0, 1].abs() - 4
    pre[0, 1, 3:10] = (-bias[0, 3:10]).to(dtype)
    bias[0, 3:10] = pre[0, 1, 3:10].float().neg()
    # Token 2 of the last seed: two exact zeros among the k largest, the rest negative.
    pre[-1, 2] = -pre[-1, 2].abs() - 4
    pre[-1, 2, :3] = 1
    bias[-1, 100:102] = 0
    pre[-1, 2, 100:102] = 0
    values = torch.empty(n_seeds, batch, k)
    counts = torch.zeros(n_seeds, width)
    columns = sparse_kernels.topk_columns(pre, k, bias, values_out=values, firing_counts=counts)
    assert torch.equal(columns, sparse_kernels.topk_columns(pre, k, bias))  # the same selection either way
    gathered = sparse_kernels.selected_preactivations(pre, torch.zeros(n_seeds, batch, 4), torch.zeros(n_seeds, 4, width), bias,
                                                      torch.zeros(n_seeds, 4), columns, bias_separate=True)
    assert torch.equal(values, gathered)
    assert (values[0, 1] == 0).all() and (values[-1, 2] == 0).sum() == 2
    expected = torch.zeros(n_seeds, width).scatter_add_(1, columns.reshape(n_seeds, -1), (gathered.relu() > 0).float().reshape(n_seeds, -1))
    assert torch.equal(counts, expected)
    assert counts[0, 3:10].sum() == 0 and counts[-1, 100:102].sum() == 0


@pytest.mark.parametrize("block", [16, 1024])
def test_tokens_since_fired_program_equals_add_and_masked_fill(block, monkeypatch):
    monkeypatch.setattr(kernel_ops, "FIRING_BLOCK", block)
    generator = torch.Generator().manual_seed(block)
    counters = torch.randint(0, 10**12, (3, 77), generator=generator)
    counts = torch.randint(0, 3, (3, 77), generator=generator).float()
    expected = counters.clone().add_(40).masked_fill_(counts > 0, 0)
    sparse_kernels.advance_tokens_since_fired(counters, counts, 40)
    assert counters.dtype == torch.int64 and torch.equal(counters, expected)


def _model(aux: bool) -> SeedBatchedSAE:
    """Three seeds, 512 latents (wide enough for the top-k program at k 3): latents 0 and 1 of ordinary values, 2..4
    exactly 0 (zero encoder columns and bias), every other far below, so each token selects an exact zero."""
    settings = TrainSettings.from_mapping(dict(architecture="topk", k=3, d_sae=512, batch_size=32, total_tokens=3200, warmup_steps=0,
                                               sparse_decoder="kernels", dead_window_tokens=64, aux_k=8))
    model = SeedBatchedSAE(settings, 16, seeds=[0, 1, 2], b_dec=torch.zeros(16))
    with torch.no_grad():
        model.b_enc.fill_(-50)
        model.b_enc[:, :5] = 0
        model.W_enc[:, :, 2:5] = 0
        model.tokens_since_fired[:, ::7] = 100 if aux else 0
    model.auxk_active = aux
    return model


SWITCHES = ("TOPK_WRITES_VALUES", "TOPK_COUNTS_FIRING", "FIRING_PROGRAM", "DECODE_ADDS_BIAS", "SHARED_ZERO_FILL")


@pytest.mark.parametrize("aux", [False, True])
def test_forward_fusions_switched_off_give_identical_steps(aux, monkeypatch):
    """Forward and backward with the round-6 switches on, each off alone, and all off: identical outputs, dead-latent
    counters, bias gradients and deferred gradient records (two records with AuxK)."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    launched = []
    launch = kernel_programs.launch
    monkeypatch.setattr(kernel_programs, "launch", lambda name, grid, *args, **meta: (launched.append((name, meta)), launch(name, grid, *args, **meta))[1])
    results = {}
    settings = [dict.fromkeys(SWITCHES, True)] + [{**dict.fromkeys(SWITCHES, True), name: False} for name in SWITCHES] + [dict.fromkeys(SWITCHES, False)]
    for switches in settings:
        for name, on in switches.items():
            monkeypatch.setattr(training_model, name, on)
        launched.clear()
        model = _model(aux)
        out = model(x)
        deferred = out.pop("deferred_gradients")
        out["loss"].sum().backward()
        topk = [meta for name, meta in launched if name == "topk"]
        assert len(topk) == 1 and (topk[0]["WRITE_VALUES"], topk[0]["COUNT_FIRING"]) == (switches["TOPK_WRITES_VALUES"], switches["TOPK_COUNTS_FIRING"])
        assert ("tokens_since_fired" in [name for name, _ in launched]) is switches["FIRING_PROGRAM"]
        assert [meta["HAS_BIAS"] for name, meta in launched if name == "decode_wide"][0] is switches["DECODE_ADDS_BIAS"]
        assert len(deferred.records) == (2 if aux else 1)
        records = [{key: value for key, value in record.items()} for record in deferred.records]
        results[tuple(switches.values())] = (out, model.tokens_since_fired.clone(), model.b_enc.grad, model.b_dec.grad, records)
    reference_out, reference_counters, *reference_rest = results[(True,) * len(SWITCHES)]
    assert reference_out["firing_counts"][:, 2:5].sum() == 0  # selected every token, code exactly 0
    assert (reference_out["firing_counts"][:, 5:] == 0).all() and reference_out["firing_counts"].sum() > 0
    assert (reference_counters[:, 2:5] == 32).all()  # never fired: advanced by the batch
    for switches, (out, counters, *rest) in results.items():
        assert out.keys() == reference_out.keys()
        for key in out:
            assert torch.equal(out[key], reference_out[key]), (switches, key)
        assert torch.equal(counters, reference_counters), switches
        for mine, theirs in zip(rest[:2], reference_rest[:2]):
            assert torch.equal(mine, theirs), switches
        for mine, theirs in zip(rest[2], reference_rest[2]):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine), switches


@pytest.mark.parametrize("wide", [256, None])
def test_decode_with_bias_equals_decode_plus_bias(wide, monkeypatch):
    """The decoder bias added inside the decode (the wide program, or after the per-token one): the same float32 sums."""
    monkeypatch.setattr(kernel_programs, "DECODE_WIDE_COLUMNS", wide)
    generator = torch.Generator().manual_seed(4)
    values, table = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 40, 20, generator=generator).bfloat16()
    indices, bias = torch.randint(0, 40, (2, 5, 3), generator=generator), torch.randn(2, 20, generator=generator)
    plain = sparse_kernels.decode_rows(values, indices, table)
    assert torch.equal(sparse_kernels.decode_rows(values, indices, table, bias), plain + bias.unsqueeze(1))


@pytest.mark.parametrize("aux", [False, True])
def test_training_with_fused_top_k_equals_dense_autograd_training(aux, monkeypatch):
    """Four Adam steps (AuxK from the second when ``aux``) at 512 latents, where the top-k program runs and writes the
    values and firing counts: the kernels path lands on the dense path's weights and dead-latent counters
    (the existing tolerance of test_sparse_kernels' training test)."""
    generator = torch.Generator().manual_seed(2)
    pool = [torch.randn(32, 16, generator=generator) + 0.5 for _ in range(2)]
    launched = []
    launch = kernel_programs.launch
    monkeypatch.setattr(kernel_programs, "launch", lambda name, grid, *args, **meta: (launched.append((name, meta)), launch(name, grid, *args, **meta))[1])
    _switches(monkeypatch, True)
    final = {}
    for mode in (False, "kernels"):
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=3, d_sae=512, batch_size=32, total_tokens=32 * 100, warmup_steps=0,
                                                   sparse_decoder=mode, dead_window_tokens=32 if aux else 10**9, aux_k=8))
        model = SeedBatchedSAE(settings, 16, seeds=[0, 1], b_dec=torch.zeros(16))
        trainer = SeedBatchedTrainer(model, "cpu")
        for step in range(4):
            if step == 1:
                model.refresh_dead_flag()
            trainer.step(pool[step % 2])
        assert model.auxk_active is aux and model.sparse_update is (mode == "kernels")
        final[mode] = [parameter.detach().clone() for parameter in model.parameters()] + [model.tokens_since_fired.clone()]
    assert any(name == "topk" and meta["WRITE_VALUES"] and meta["COUNT_FIRING"] for name, meta in launched)
    for dense, sparse in itertools.zip_longest(final[False], final["kernels"]):
        if dense.dtype == torch.int64:
            assert torch.equal(sparse, dense)
        else:
            assert torch.allclose(sparse, dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aux", [False, True])
def test_bf16_centered_record_gives_the_same_sparse_update(aux, monkeypatch):
    """Under bf16 autocast the gradient records keep ``x - b_dec`` in bf16 (``RECORD_LOW_CENTERED``): the fused
    optimizer step lands on the same weights, bit for bit, as with the float32 records it casts itself."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(8))
    final = {}
    for low in (True, False):
        monkeypatch.setattr(training_model, "RECORD_LOW_CENTERED", low)
        model = _model(aux)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = model(x)
        deferred = out.pop("deferred_gradients")
        assert deferred.low_precision and len(deferred.records) == (2 if aux else 1)
        out["loss"].sum().backward()
        assert all(record["encoder_dense"].dtype == (torch.bfloat16 if low else torch.float32) for record in deferred.records)
        model.sparse_optimizer_step(optimizer, deferred)
        final[low] = [parameter.detach().clone() for parameter in model.parameters()] + [copy.clone() for copy in model.low_precision_weights()]
    for mine, theirs in zip(final[True], final[False]):
        assert torch.equal(mine, theirs)
