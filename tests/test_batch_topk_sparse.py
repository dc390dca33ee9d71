"""BatchTopK on the sparse kernels: the k*B kept from per-token candidates, against the dense selection
over the whole batch and hand computation, and training through the kernels (PyTorch path and, where the
interpreter works, the Triton programs with the fused optimizer step) against dense autograd training."""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.sae import kernels as sparse_kernels
from sae_pipeline.sae import selection, training_model
from sae_pipeline.sae.kernels import programs as kernel_programs
from sae_pipeline.sae.kernels import updates as kernel_updates
from sae_pipeline.sae.trainer import SeedBatchedTrainer
from sae_pipeline.sae.training_model import SeedBatchedSAE
from sae_pipeline.settings import TrainSettings
from tests.conftest import interpreter_works

torch.set_num_threads(1)


def test_keep_candidates_by_hand_and_the_capped_token_count():
    """B 2, k 1: the batch keeps 2 of the 8 entries, 5 and 4, both token 0's. With 1 candidate a token the cap binds
    (1 is kept instead of 4): token 0 is counted (its candidate 5 beats the smallest kept, 1), token 1 not (its
    candidate is that smallest kept value, so its next one could not beat it). With 2 or 3 the selection is exact
    and nothing is counted (token 0's smallest candidate, 4, is the smallest kept)."""
    pre = torch.tensor([[[5.0, 4.0, 0.0, -1.0], [1.0, 0.0, 0.0, -2.0]]])
    for cap, kept_values, capped in ((1, [5.0, 1.0], 1), (2, [5.0, 4.0], 0), (3, [5.0, 4.0], 0)):
        candidates = pre.topk(cap, dim=-1)
        threshold, counted = torch.zeros(1), torch.zeros(1, dtype=torch.int64)
        keep, positions = selection.keep_candidates(candidates.values, 1, threshold, 0.5, counted)
        assert sorted((candidates.values * keep).flatten()[positions[0]].tolist(), reverse=True) == kept_values
        assert positions[0].tolist() == sorted(positions[0].tolist()) and keep.sum() == 2
        assert counted.item() == capped
        assert threshold.item() == pytest.approx(0.5 * min(kept_values))


@pytest.mark.parametrize("cap", [6, 12])
def test_keep_candidates_equals_the_dense_batch_selection_when_no_token_is_capped(cap):
    generator = torch.Generator().manual_seed(4)
    pre = torch.randn(2, 16, 50, generator=generator)
    pre[:, 3] += 2.0  # one busy token
    dense_threshold, sparse_threshold, counted = torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.int64)
    dense = selection.dense_batch_codes(pre, 3, dense_threshold, 0.1)
    candidates = pre.topk(cap, dim=-1)
    keep, _ = selection.keep_candidates(candidates.values, 3, sparse_threshold, 0.1, counted)
    sparse = torch.zeros_like(pre).scatter(-1, candidates.indices, candidates.values.relu() * keep)
    busiest = (dense > 0).sum(dim=-1).max().item()
    assert (counted.sum().item() == 0) == (busiest < cap)
    if busiest < cap:
        assert torch.equal(sparse, dense) and torch.equal(sparse_threshold, dense_threshold)
    else:  # the cap bound: the busy token lost entries to smaller ones elsewhere
        assert not torch.equal(sparse, dense) and (sparse > 0).sum() == (dense > 0).sum()


def test_sort_with_positions_keeps_only_the_kept_entries_in_stable_order():
    generator = torch.Generator().manual_seed(2)
    n_seeds, batch, d_sae = 2, 6, 20
    records = [torch.randint(0, d_sae, (n_seeds, batch, k), generator=generator) for k in (4, 3)]
    weights = [torch.randn(n_seeds, batch, k, generator=generator) for k in (4, 3)]
    kept = torch.stack([torch.randperm(batch * 4, generator=generator)[:9].sort().values for _ in range(n_seeds)])
    entries = sparse_kernels.sort_entries_by_latent(records, d_sae, weights=(weights,), positions=[kept, None])
    expected = []  # (key, row, weight) in the stable order: the kept entries of record 0, then all of record 1
    for seed in range(n_seeds):
        listed = [(seed * d_sae + int(records[0][seed].flatten()[p]), int(p) // 4, float(weights[0][seed].flatten()[p])) for p in kept[seed]]
        listed += [(seed * d_sae + int(latent), batch + position // 3, float(weight))
                   for position, (latent, weight) in enumerate(zip(records[1][seed].flatten(), weights[1][seed].flatten()))]
        expected += listed
    expected.sort(key=lambda entry: entry[0])  # Python's sort is stable
    assert entries["keys"].tolist() == [key for key, _, _ in expected]
    assert entries["rows"].tolist() == [row for _, row, _ in expected]
    assert entries["weights"][0].tolist() == pytest.approx([weight for _, _, weight in expected])
    assert entries["segments"][-1] == n_seeds * (9 + batch * 3)


@pytest.mark.parametrize("architecture,aux,kept_first,crossover", [
    ("batchtopk", False, False, 16), ("batchtopk", True, False, 16), ("batchtopk", True, True, 16),
    ("matryoshka_batchtopk", False, True, 16), ("matryoshka_batchtopk", True, True, 16), ("matryoshka_batchtopk", True, True, 0)])
def test_batchtopk_training_with_kernels_equals_dense_autograd_training(backend, architecture, aux, kept_first, crossover, monkeypatch):
    """Six Adam steps of BatchTopK or Matryoshka BatchTopK (prefixes 32 and 128 of 256 latents; AuxK from the third step
    when ``aux``): the kernels path, from 16 candidates a token (k 2, cap multiple 8; the top-k program selects them in
    the interpreter), lands on the dense path's weights and threshold, and no token was capped; ``kept_first``: the
    kept candidates sorted to the front of each token's slots, the programs visiting only those; ``crossover`` 0: the
    deferred weight gradients from dense products over the kept entries (``GRAD_DENSE_ENTRIES_PER_LATENT``).

    Untied initialisation: with W_enc = W_dec^T a token that keeps one latent has a residual orthogonal to its
    decoder row, so that latent's gradient is rounding noise (~1e-9), which Adam (below its eps) turns into
    updates of a sizeable share of the learning rate on either path. On the PyTorch path the first step's
    gradients, before Adam, are compared too."""
    monkeypatch.setattr(kernel_updates, "GRAD_CHUNK", 16)
    monkeypatch.setattr(kernel_updates, "GRAD_DENSE_ENTRIES_PER_LATENT", crossover)
    monkeypatch.setattr(training_model, "KEPT_FIRST_MIN_D_IN", 0 if kept_first else 10**6)  # Matryoshka always puts kept first
    generator = torch.Generator().manual_seed(1)
    pool = [torch.randn(32, 16, generator=generator) + 0.5 for _ in range(3)]
    trained, first_gradients = {}, {}
    for mode in (False, "kernels"):
        settings = TrainSettings.from_mapping(dict(architecture=architecture, k=2, d_sae=256, batch_size=32, total_tokens=32 * 100,
                                                   warmup_steps=0, sparse_decoder=mode, batch_topk_cap_multiple=8, matryoshka_prefixes=[32, 128], tied_init=False,
                                                   dead_window_tokens=64 if aux else 10**9, aux_k=8, threshold_lr=0.3))
        model = SeedBatchedSAE(settings, 16, seeds=[0, 1], b_dec=torch.zeros(16))
        if backend == "torch":
            model(pool[0])["loss"].sum().backward()
            first_gradients[mode] = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            model.threshold.zero_()
        trainer = SeedBatchedTrainer(model, "cpu")
        for step in range(6):
            if step % 3 == 2:
                model.refresh_dead_flag()
            trainer.step(pool[step % 3])
        assert model.sparse_codes is (mode == "kernels")
        assert model.sparse_update is (mode == "kernels" and backend == "triton-interpreter")
        assert model.auxk_active is aux
        trained[mode] = model
    dense, sparse = trained[False], trained["kernels"]
    assert sparse.capped_tokens.tolist() == [0, 0] and dense.capped_tokens.tolist() == [0, 0]
    for name, parameter in dense.named_parameters():
        assert torch.allclose(getattr(sparse, name), parameter, atol=1e-6, rtol=1e-5), name
        if first_gradients:
            assert torch.allclose(first_gradients["kernels"][name], first_gradients[False][name], atol=1e-6, rtol=1e-5), name
    assert torch.allclose(sparse.threshold, dense.threshold, rtol=1e-6) and (dense.threshold > 0).all()
    assert torch.equal(sparse.tokens_since_fired, dense.tokens_since_fired)


def test_batchtopk_candidates_use_the_top_k_program_where_it_fits(monkeypatch):
    """16 candidates of 256 latents: the top-k program selects them (it needs 16 chunks of 16 columns), though
    the torch chunked selection's rule (width >= 4 * 32 * k) would refuse."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    calls = []
    original = sparse_kernels.topk_columns

    def counted(pre, k, *args, **kwargs):
        calls.append(k)
        return original(pre, k, *args, **kwargs)

    monkeypatch.setattr(sparse_kernels, "topk_columns", counted)
    settings = TrainSettings.from_mapping(dict(architecture="batchtopk", k=2, d_sae=256, batch_size=32, total_tokens=3200,
                                               warmup_steps=0, sparse_decoder="kernels", batch_topk_cap_multiple=8))
    model = SeedBatchedSAE(settings, 16, seeds=[0])
    out = model(torch.randn(32, 16))
    assert calls == [16] and model.candidates_per_token == 16
    assert out["firing_counts"].sum().item() == 2 * 32
    assert not selection.topk_program_runs(torch.zeros(1, 1, 256), 16) and selection.topk_program_runs(torch.zeros(1, 1, 256), 16, any_width=True)


def test_cap_multiple_zero_keeps_the_dense_selection():
    settings = TrainSettings.from_mapping(dict(architecture="batchtopk", k=2, d_sae=64, sparse_decoder="kernels", batch_topk_cap_multiple=0))
    assert not SeedBatchedSAE(settings, 8, seeds=[0]).sparse_codes
    with pytest.raises(ValueError, match="batch_topk_cap_multiple"):
        TrainSettings.from_mapping(dict(architecture="batchtopk", batch_topk_cap_multiple=-1))


@pytest.mark.parametrize("skip", [True, False])
def test_wide_decode_and_dots_leave_rows_of_zero_codes_unread(skip, monkeypatch):
    """Rows of zero codes hold NaN: with SKIP_ZERO_CODES the wide decode never reads them (the sum stays the
    decode of the nonzero codes) and the dots given the codes are 0 there, the others unchanged; without, the
    NaN rows reach the decode, so the check can fail."""
    if not interpreter_works():
        pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
    monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(kernel_programs, "SKIP_ZERO_CODES", skip)
    generator = torch.Generator().manual_seed(5)
    n_seeds, batch, k, d_sae, width = 2, 5, 12, 40, 20
    indices = torch.stack([torch.stack([torch.randperm(d_sae, generator=generator)[:k] for _ in range(batch)]) for _ in range(n_seeds)])
    codes = torch.randn(n_seeds, batch, k, generator=generator).relu()  # about half zero
    table = torch.randn(n_seeds, d_sae, width, generator=generator)
    dense = torch.randn(n_seeds, batch, width, generator=generator)
    poisoned = table.clone()
    for seed in range(n_seeds):  # latents selected only with zero codes get NaN rows
        live = set(indices[seed][codes[seed] > 0].tolist())
        for latent in set(indices[seed].flatten().tolist()) - live:
            poisoned[seed, latent] = float("nan")
    assert torch.isnan(poisoned).any()
    clean = torch.where(torch.isnan(poisoned), torch.zeros_like(poisoned), poisoned)
    decoded = sparse_kernels.decode_rows(codes, indices, poisoned)
    dots = sparse_kernels.selected_dots(dense, indices, poisoned, zero_where=codes)
    expected_decode = torch.einsum("sbk,sbkd->sbd", codes, clean.gather(1, indices.flatten(1).unsqueeze(-1).expand(-1, -1, width)).view(n_seeds, batch, k, width))
    expected_dots = torch.einsum("sbd,sbkd->sbk", dense, clean.gather(1, indices.flatten(1).unsqueeze(-1).expand(-1, -1, width)).view(n_seeds, batch, k, width))
    if skip:
        assert torch.allclose(decoded, expected_decode, atol=1e-5)
        assert torch.allclose(dots, expected_dots * (codes > 0), atol=1e-5) and (dots[codes == 0] == 0).all()
    else:
        assert torch.isnan(decoded).any()


def test_kept_first_orders_slots_and_gives_each_group_its_range():
    """By hand: token 0 keeps slots 0 and 2 (group 0), token 1 keeps slot 3 (group 0); two groups."""
    keep = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    groups = torch.tensor([[[0, 1, 0, 1], [1, 0, 1, 0]]])
    order, positions, starts, ends = selection.kept_first(keep, torch.tensor([[0, 2, 7]]), groups, 2)
    assert order.tolist() == [[[0, 2, 1, 3], [3, 0, 1, 2]]]
    assert positions.tolist() == [[0, 1, 4]]
    assert starts.tolist() == [[[0, 2], [0, 1]]] and ends.tolist() == [[[2, 2], [1, 1]]]
    assert keep.gather(-1, order).view(1, -1)[0, positions[0]].tolist() == [1.0, 1.0, 1.0]
