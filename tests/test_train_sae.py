"""The trainable seed-batched SAE: codes, losses and constraints against hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sae_pipeline.sae.trainer import SeedBatchedTrainer, learning_rate
from sae_pipeline.sae.losses import sparsity_regularizer, weight_penalty
from sae_pipeline.sae.initialization import geometric_median, initial_weights
from sae_pipeline.sae.training_model import SeedBatchedSAE, topk_indices
from sae_pipeline.settings import TrainSettings

torch.set_num_threads(1)

D_IN = 6
D_SAE = 10


def settings(**overrides) -> TrainSettings:
    values = dict(architecture="topk", k=3, d_sae=D_SAE, batch_size=8, total_tokens=8 * 40, lr=1e-2, lr_scale_with_width=False,
                  warmup_steps=0, decay_fraction=0.0, aux_k=4, dead_window_tokens=16, device="cpu")
    values.update(overrides)
    return TrainSettings.from_mapping(values)


def batches(n: int, rows: int = 8, seed: int = 123) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, D_IN, generator=generator) + 0.3 for _ in range(n)]


def hand_pre_activations(model: SeedBatchedSAE, x: torch.Tensor, seed_index: int) -> torch.Tensor:
    return (x - model.b_dec[seed_index]) @ model.W_enc[seed_index] + model.b_enc[seed_index]


@pytest.mark.parametrize("sparse_decoder", [True, False])
def test_topk_keeps_exactly_k_per_row_and_reconstructs_like_dense_topk(sparse_decoder):
    model = SeedBatchedSAE(settings(sparse_decoder=sparse_decoder), D_IN, seeds=[0, 1])
    with torch.no_grad():
        model.b_enc.fill_(5.0)  # every pre-activation positive: the ReLU keeps all k
        model.b_dec.copy_(torch.randn(2, D_IN))
    x = batches(1)[0]
    out = model(x)
    assert out["l0"].tolist() == [3.0, 3.0]
    assert out["firing_counts"].sum(dim=1).tolist() == [8 * 3, 8 * 3]
    for index in range(2):
        pre = hand_pre_activations(model, x, index)
        kept = pre.topk(3, dim=-1).indices
        codes = torch.zeros_like(pre).scatter(-1, kept, pre.gather(-1, kept).relu())
        assert ((codes > 0).sum(dim=-1) == 3).all()
        x_hat = codes @ model.W_dec[index] + model.b_dec[index]
        expected = (x_hat - x).square().sum(dim=-1).mean()
        assert out["recon"][index].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("width,k", [(4096, 5), (1024, 8), (100, 7)])
def test_topk_indices_select_the_same_values_as_torch_topk(width, k):
    generator = torch.Generator().manual_seed(width + k)
    pre = torch.randn(3, 64, width, generator=generator)
    pre[0, 0, :64] = 10.0 + torch.arange(64.0)  # all top entries crowded into two adjacent chunks
    pre[1, 1] = 2.0  # a row of ties: any k indices of the tied value are right
    indices = topk_indices(pre, k)
    assert indices.shape == (3, 64, k)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all()  # k distinct latents per row
    chosen = pre.gather(-1, indices).sort(dim=-1).values
    assert torch.equal(chosen, pre.topk(k, dim=-1).values.sort(dim=-1).values)


def test_sparse_decoder_auto_means_sparse_off_cuda():
    assert SeedBatchedSAE(settings(), D_IN, seeds=[0]).uses_sparse_decoder  # default "auto", on the CPU
    assert not SeedBatchedSAE(settings(sparse_decoder=False), D_IN, seeds=[0]).uses_sparse_decoder
    with pytest.raises(ValueError, match="sparse_decoder"):
        settings(sparse_decoder="yes")


def test_topk_relu_zeroes_negative_kept_values():
    model = SeedBatchedSAE(settings(), D_IN, seeds=[0])
    with torch.no_grad():
        model.b_enc.fill_(-100.0)  # every pre-activation negative: top-k keeps k slots, all zero after ReLU
    out = model(batches(1)[0])
    assert out["l0"].item() == 0.0


def test_tied_initialisation_and_unit_norm_decoder_rows():
    tied = SeedBatchedSAE(settings(tied_init=True), D_IN, seeds=[0, 7])
    for index in range(2):
        assert torch.equal(tied.W_enc[index], tied.W_dec[index].t())
        assert torch.allclose(tied.W_dec[index].norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    untied = SeedBatchedSAE(settings(tied_init=False), D_IN, seeds=[0])
    assert not torch.allclose(untied.W_enc[0], untied.W_dec[0].t())
    assert torch.allclose(untied.W_enc[0].norm(dim=0), torch.ones(D_SAE), atol=1e-6)
    assert not torch.equal(tied.W_dec[0], tied.W_dec[1])


def test_initial_weights_depend_only_on_seed():
    torch.manual_seed(999)
    first = initial_weights(4, D_IN, D_SAE, tied_init=False)
    torch.manual_seed(1)
    second = initial_weights(4, D_IN, D_SAE, tied_init=False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("unit_norm_decoder", [True, False])
def test_decoder_rows_stay_unit_norm_only_when_constrained(unit_norm_decoder):
    config = settings(unit_norm_decoder=unit_norm_decoder, lr=5e-2, weight_penalty={"kind": "l2", "coefficient": 1e-2})
    trainer = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=[0, 1]), "cpu")
    for x in batches(20):
        trainer.step(x)
    norms = trainer.model.W_dec.detach().norm(dim=-1)
    if unit_norm_decoder:
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    else:
        assert (norms - 1).abs().max() > 1e-3


def test_parallel_gradient_component_is_removed():
    model = SeedBatchedSAE(settings(), D_IN, seeds=[0, 1])
    model(batches(1)[0])["loss"].sum().backward()
    assert (model.W_dec.grad * model.W_dec).sum(dim=-1).abs().max() > 1e-4
    model.remove_parallel_decoder_gradient()
    assert (model.W_dec.grad * model.W_dec).sum(dim=-1).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("on", ["both", "encoder", "decoder"])
def test_weight_penalty_matches_hand_computation(kind, on):
    W_enc = torch.tensor([[[1.0, -2.0], [0.5, 0.0]], [[3.0, 0.0], [0.0, -1.0]]])  # [S=2, d_in=2, d_sae=2]
    W_dec = torch.tensor([[[0.0, 1.0], [-1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])
    power = 1 if kind == "l1" else 2
    expected = []
    for seed in range(2):
        total = 0.0
        if on in ("both", "encoder"):
            total += sum(abs(v) ** power for v in W_enc[seed].flatten().tolist())
        if on in ("both", "decoder"):
            total += sum(abs(v) ** power for v in W_dec[seed].flatten().tolist())
        expected.append(0.1 * total)
    result = weight_penalty(W_enc, W_dec, kind, 0.1, on)
    assert result.tolist() == pytest.approx(expected)
    assert weight_penalty(W_enc, W_dec, "none", 0.1, on).tolist() == [0.0, 0.0]


def test_weight_penalty_enters_the_loss():
    plain = SeedBatchedSAE(settings(), D_IN, seeds=[0])
    penalised = SeedBatchedSAE(settings(weight_penalty={"kind": "l2", "coefficient": 0.5}), D_IN, seeds=[0])
    x = batches(1)[0]
    difference = penalised(x)["loss"] - plain(x)["loss"]
    expected = 0.5 * (plain.W_enc.square().sum() + plain.W_dec.square().sum())
    assert difference.item() == pytest.approx(expected.item(), rel=1e-5)


PRE = torch.tensor([[[2.0, -1.0, 0.5, 0.0, 3.0], [1.0, 4.0, -2.0, 0.1, 0.0], [0.3, 0.2, 0.1, -5.0, 1.0]]])  # [1, 3, 5]
SUPPORT = torch.tensor([[[True, False, False, False, True], [False, True, False, False, False], [True, False, False, False, False]]])


def regularizer_of(pre, support, kind, coefficient):
    """The regularizer from a support mask, through the function's (active units, support L1) interface."""
    return sparsity_regularizer(pre, support.any(dim=1), (pre.abs() * support).sum(dim=-1), kind, coefficient)


def test_off_support_l1_matches_hand_computation():
    active = [any(SUPPORT[0, t, i] for t in range(3)) for i in range(5)]  # units 0, 1, 4
    per_token = []
    for t in range(3):
        per_token.append(sum(abs(PRE[0, t, i].item()) for i in range(5) if active[i] and not SUPPORT[0, t, i]))
    expected = 0.2 * sum(per_token) / 3  # token sums: 1.0 ; 1.0 + 0.0 ; 0.2 + 1.0
    assert regularizer_of(PRE, SUPPORT, "off_support_l1", 0.2).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.2 * (1.0 + 1.0 + 1.2) / 3)


def test_l1_l2_ratio_matches_hand_computation():
    active = [0, 1, 4]
    ratios = []
    for t in range(3):
        values = [abs(PRE[0, t, i].item()) for i in active]
        ratios.append(sum(values) / math.sqrt(sum(v * v for v in values)))
    expected = 0.5 * sum(ratios) / 3
    assert regularizer_of(PRE, SUPPORT, "l1_l2_ratio", 0.5).item() == pytest.approx(expected, rel=1e-6)
    # scale invariance: multiplying the pre-activations leaves the ratio unchanged
    assert regularizer_of(7.0 * PRE, SUPPORT, "l1_l2_ratio", 0.5).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["off_support_l1", "l1_l2_ratio"])
def test_topk_regularizer_in_the_loss_uses_the_topk_support(kind):
    model = SeedBatchedSAE(settings(regularizer={"kind": kind, "coefficient": 0.3}), D_IN, seeds=[0])
    x = batches(1)[0]
    out = model(x)
    pre = hand_pre_activations(model, x, 0).detach()
    support = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(3, dim=-1).indices, True)
    active = support.any(dim=0)
    per_token = []
    for t in range(8):
        magnitudes = pre[t].abs()
        if kind == "off_support_l1":
            per_token.append(magnitudes[active & ~support[t]].sum())
        else:
            per_token.append(magnitudes[active].sum() / magnitudes[active].square().sum().sqrt())
    expected = 0.3 * torch.stack(per_token).mean()
    assert out["regularizer"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["regularizer"].item() > 0


@pytest.mark.parametrize("architecture", ["batchtopk", "relu"])
def test_dense_architectures_regularize_over_their_fired_support(architecture):
    model = SeedBatchedSAE(settings(architecture=architecture, regularizer={"kind": "off_support_l1", "coefficient": 0.3}), D_IN, seeds=[0])
    x = batches(1)[0]
    out = model(x)
    pre = hand_pre_activations(model, x, 0).detach()
    if architecture == "relu":
        support = pre > 0
    else:
        flat = pre.relu().flatten()
        support = torch.zeros_like(flat, dtype=torch.bool).scatter(0, flat.topk(8 * 3).indices, True).view_as(pre) & (pre > 0)
    active = support.any(dim=0)
    expected = 0.3 * torch.stack([pre[t].abs()[active & ~support[t]].sum() for t in range(8)]).mean()
    assert out["regularizer"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_relu_l1_sparsity_loss_matches_hand_computation():
    model = SeedBatchedSAE(settings(architecture="relu", l1_coefficient=0.7, unit_norm_decoder=False), D_IN, seeds=[0])
    with torch.no_grad():
        model.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[None, :, None])  # rows of different norms
    x = batches(1)[0]
    out = model(x)
    codes = hand_pre_activations(model, x, 0).relu()
    expected = 0.7 * (codes * model.W_dec[0].norm(dim=-1)).sum(dim=-1).mean()
    assert out["sparsity_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    x_hat = codes @ model.W_dec[0] + model.b_dec[0]
    assert out["recon"].item() == pytest.approx((x_hat - x).square().sum(dim=-1).mean().item(), rel=1e-5)


def test_batchtopk_keeps_k_times_batch_over_the_batch_and_learns_a_threshold():
    model = SeedBatchedSAE(settings(architecture="batchtopk", threshold_lr=0.5), D_IN, seeds=[0])
    with torch.no_grad():
        model.b_enc.fill_(5.0)
    x = batches(1)[0]
    out = model(x)
    assert out["firing_counts"].sum().item() == 8 * 3  # k * B codes over the whole batch
    pre = hand_pre_activations(model, x, 0).detach()
    smallest_kept = pre.flatten().topk(8 * 3).values.min()
    assert model.threshold.item() == pytest.approx(0.5 * smallest_kept.item(), rel=1e-5)
    tensors = model.inference_tensors(0)
    assert tensors["threshold"].shape == (D_SAE,) and torch.allclose(tensors["threshold"], model.threshold[0].expand(D_SAE))


def test_matryoshka_loss_is_the_sum_of_prefix_losses():
    model = SeedBatchedSAE(settings(architecture="matryoshka_batchtopk", matryoshka_prefixes=[2, 5]), D_IN, seeds=[0])
    with torch.no_grad():
        model.b_enc.fill_(5.0)
    x = batches(1)[0]
    out = model(x)
    pre = hand_pre_activations(model, x, 0).detach()
    flat = pre.relu().flatten()
    kept = flat.topk(8 * 3)
    codes = torch.zeros_like(flat).scatter(0, kept.indices, kept.values).view_as(pre)
    expected = 0.0
    for size in (2, 5, D_SAE):
        x_hat = codes[:, :size] @ model.W_dec[0, :size] + model.b_dec[0]
        expected += (x_hat - x).square().sum(dim=-1).mean().item()
    assert out["recon"].item() == pytest.approx(expected, rel=1e-5)


def test_auxk_loss_matches_hand_computation():
    model = SeedBatchedSAE(settings(aux_k=2), D_IN, seeds=[0])
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    with torch.no_grad():
        model.tokens_since_fired[0, dead] = 10_000
        model.b_enc.fill_(0.5)
    model.auxk_active = True
    x = batches(1)[0]
    pre = hand_pre_activations(model, x, 0).detach()
    residual = torch.randn(8, D_IN)
    aux = model._auxk_loss(pre[None], residual[None])
    masked = torch.where(dead, pre, torch.tensor(float("-inf")))
    top = masked.topk(2, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    reconstruction = codes @ model.W_dec[0].detach()
    expected = (residual - reconstruction).square().sum(dim=-1).mean() / (residual - residual.mean(dim=0)).square().sum(dim=-1).mean()
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():
        model.tokens_since_fired.zero_()
    assert model._auxk_loss(pre[None], residual[None]).item() == 0.0  # no dead latent, no aux loss


def test_dead_counter_counts_tokens_since_last_firing():
    model = SeedBatchedSAE(settings(dead_window_tokens=16), D_IN, seeds=[0])
    with torch.no_grad():
        model.b_enc.fill_(-100.0)
        model.b_enc[0, 2] = 100.0  # latent 2 always fires, the rest never do
    x = batches(1)[0]
    model(x)
    model(x)
    assert model.tokens_since_fired[0, 2].item() == 0
    assert model.tokens_since_fired[0, 0].item() == 16
    assert model.dead_mask()[0].sum().item() == D_SAE - 1


def test_learning_rate_warmup_and_linear_decay():
    assert learning_rate(0, 100, 1.0, 10, 0.2) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, 0.2) == pytest.approx(1.0)
    assert learning_rate(50, 100, 1.0, 10, 0.2) == pytest.approx(1.0)
    assert learning_rate(80, 100, 1.0, 10, 0.2) == pytest.approx(1.0)
    assert learning_rate(90, 100, 1.0, 10, 0.2) == pytest.approx(0.5)
    assert learning_rate(99, 100, 1.0, 10, 0.2) == pytest.approx(0.05)
    assert settings(lr=2e-4, lr_scale_with_width=True, d_sae=4 * 2**14).effective_lr == pytest.approx(1e-4)


def test_gradient_clipping_is_per_seed_like_torch_clip_grad_norm():
    model = SeedBatchedSAE(settings(), D_IN, seeds=[0, 1])
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.grad[1] *= 1e-3  # seed 1's gradient is tiny and must not be scaled
    expected = []
    for index in range(2):
        grads = [parameter.grad[index].clone().requires_grad_(False) for parameter in model.parameters()]
        holders = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
        for holder, grad in zip(holders, grads):
            holder.grad = grad
        torch.nn.utils.clip_grad_norm_(holders, 1.0)
        expected.append([holder.grad for holder in holders])
    model.clip_gradients_per_seed(1.0)
    for index in range(2):
        for parameter, reference in zip(model.parameters(), expected[index]):
            assert torch.allclose(parameter.grad[index], reference, rtol=1e-5, atol=1e-8)


def test_geometric_median_resists_an_outlier_and_minimises_distance_sum():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    median = geometric_median(points)

    def total_distance(centre):
        return (points - centre).norm(dim=1).sum().item()

    assert median.norm() < 2.0  # the mean (20.4, 20.4) is dragged far away by the outlier
    for offset in ([0.01, 0], [0, 0.01], [-0.01, 0], [0, -0.01]):
        assert total_distance(median) <= total_distance(median + torch.tensor(offset)) + 1e-6


def run(seeds, config, steps=25, silenced_latents=()):
    """Train ``seeds`` together for ``steps`` steps; ``silenced_latents`` start with a very negative
    encoder bias so that they die and the AuxK loss has work to do. Returns (model, AuxK ever on)."""
    trainer = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=seeds, b_dec=torch.full((D_IN,), 0.3)), "cpu")
    with torch.no_grad():
        trainer.model.b_enc[:, list(silenced_latents)] = -20.0
    auxk_ran = False
    for x in batches(steps):
        auxk_ran |= trainer.model.auxk_active
        trainer.step(x)
        trainer.model.refresh_dead_flag()
    return trainer.model, auxk_ran


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_batched_seeds_equal_each_seed_trained_alone(architecture):
    config = settings(architecture=architecture, weight_penalty={"kind": "l1", "coefficient": 1e-3},
                      regularizer={"kind": "off_support_l1", "coefficient": 1e-2}, dead_window_tokens=24, aux_k=3)
    together, auxk_ran = run([3, 5], config, silenced_latents=(8, 9))
    assert auxk_ran  # the AuxK path ran during this comparison
    for index, seed in enumerate([3, 5]):
        alone, _ = run([seed], config, silenced_latents=(8, 9))
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.allclose(getattr(together, name)[index], getattr(alone, name)[0], rtol=1e-4, atol=1e-5), name


def test_same_seed_gives_identical_weights_and_other_seed_differs():
    config = settings(regularizer={"kind": "l1_l2_ratio", "coefficient": 1e-2})
    (first, _), (second, _), (other, _) = run([11], config), run([11], config), run([12], config)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert not torch.equal(first.W_dec, other.W_dec)


def test_trainer_state_round_trip_continues_identically():
    config = settings()
    data = batches(20)
    reference = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=[0, 1]), "cpu")
    for x in data:
        reference.step(x)
    first = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=[0, 1]), "cpu")
    for x in data[:8]:
        first.step(x)
    resumed = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=[0, 1]), "cpu")
    resumed.load_state_dict(first.state_dict())
    for x in data[8:]:
        resumed.step(x)
    assert torch.equal(resumed.model.W_enc, reference.model.W_enc)
    assert torch.equal(resumed.model.W_dec, reference.model.W_dec)


def test_loss_falls_during_training():
    config = settings(lr=2e-2)
    trainer = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=[0], b_dec=torch.full((D_IN,), 0.3)), "cpu")
    data = batches(60)
    losses = [trainer.step(x)[0, 0].item() for x in data]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_settings_reject_unknown_keys_and_bad_values_by_name():
    with pytest.raises(ValueError, match="lrr"):
        TrainSettings.from_mapping({"lrr": 1.0})
    with pytest.raises(ValueError, match="architecture"):
        TrainSettings.from_mapping({"architecture": "gated"})
    with pytest.raises(ValueError, match="regularizer.kind"):
        TrainSettings.from_mapping({"regularizer": {"kind": "l0"}})
    with pytest.raises(ValueError, match="k=20 exceeds d_sae=10"):
        TrainSettings.from_mapping({"k": 20, "d_sae": 10})
    assert TrainSettings.from_mapping({"weight_penalty": {"kind": "none"}}).weight_penalty["coefficient"] == 0.0


def test_bf16_autocast_step_runs_and_tracks_the_fp32_loss():
    data = batches(3)
    losses = {}
    for mode in ("off", "bf16"):
        config = settings(autocast=mode, regularizer={"kind": "l1_l2_ratio", "coefficient": 1e-2})
        trainer = SeedBatchedTrainer(SeedBatchedSAE(config, D_IN, seeds=[0, 1]), "cpu")
        assert trainer.autocast_enabled == (mode == "bf16")
        losses[mode] = [trainer.step(x)[:, 0] for x in data]
        assert trainer.model.W_enc.dtype == torch.float32
    for fp32, bf16 in zip(losses["off"], losses["bf16"]):
        assert torch.allclose(fp32, bf16, rtol=0.05)
