"""Sparse top-k SAE kernels: values and gradients against dense autograd and hand computation.

Each check runs on the PyTorch path and, where Triton's CPU interpreter works (triton >= 3.9 with
numpy 2, installed by .ci/run; TRITON_INTERPRET=1 is set in conftest), on the Triton programs that
run on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.sae import kernels as sparse_kernels
from sae_pipeline.sae.trainer import SeedBatchedTrainer
from sae_pipeline.sae.training_model import SeedBatchedSAE, topk_indices
from sae_pipeline.settings import TrainSettings

torch.set_num_threads(1)


def _interpreter_works() -> bool:
    if sparse_kernels.triton is None:
        return False
    major, minor = (int(part) for part in sparse_kernels.triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9) and sparse_kernels.triton_interpreting()


@pytest.fixture(params=["torch", "triton-interpreter"])
def backend(request, monkeypatch):
    """Run a test on the PyTorch path, then on the Triton programs in the CPU interpreter."""
    if request.param == "triton-interpreter":
        if not _interpreter_works():
            pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
        monkeypatch.setattr(sparse_kernels, "INTERPRET_ON_CPU", True)
    else:
        monkeypatch.setattr(sparse_kernels, "triton_usable", lambda tensor: False)
    return request.param


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


@pytest.mark.parametrize("k", [5, 70])  # 70: more selected rows than one block of the Triton programs
def test_sparse_forward_and_gradients_equal_dense_autograd(backend, k):
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


def test_decode_dots_and_scatter_match_hand_computation(backend):
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
    if not _interpreter_works():
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


def test_topk_indices_adds_the_bias_on_the_torch_path():
    generator = torch.Generator().manual_seed(3)
    pre, bias = torch.randn(2, 5, 64, generator=generator), torch.randn(2, 64, generator=generator)
    chosen = topk_indices(pre, 4, bias=bias)
    assert torch.equal(chosen.sort(dim=-1).values, (pre + bias.unsqueeze(1)).topk(4, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("aux", [False, True])
def test_training_with_kernels_equals_dense_autograd_training(backend, aux):
    """Six Adam steps (AuxK on from the third when ``aux``): the kernels path lands on the dense path's weights."""
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
        assert model.auxk_active is aux
        weights[mode] = [parameter.detach().clone() for parameter in model.parameters()]
    for dense, sparse in zip(weights[False], weights["kernels"]):
        assert torch.allclose(sparse, dense, atol=1e-6, rtol=1e-5)


def test_decoder_mode_resolution():
    def mode(**overrides):
        values = dict(architecture="topk", k=2, d_sae=16, **overrides)
        return SeedBatchedSAE(TrainSettings.from_mapping(values), 4, seeds=[0]).decoder_mode

    assert mode() == "embedding_bag"  # auto on the CPU
    assert mode(sparse_decoder="kernels") == "kernels"
    assert mode(sparse_decoder=False) == "dense"
    assert mode(sparse_decoder="kernels", regularizer={"kind": "off_support_l1", "coefficient": 0.1}) == "embedding_bag"
