"""The streaming activation loader: BOS rows and the hold-out are never trained on, every epoch is a
permutation of the training rows, shards are mixed, and the stream can be resumed at any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_pipeline.data.holdout import read_holdout, training_spans
from sae_pipeline.data.loader import ActivationLoader, write_synthetic_cache
from sae_pipeline.data.shards import ActivationStore


@pytest.fixture()
def indexed_cache(tmp_path) -> ActivationStore:
    """640 rows in 10 shards of 64; column 0 of each activation holds its global row index."""
    activations = np.zeros((640, 4), dtype=np.float32)
    activations[:, 0] = np.arange(640)
    activations[:, 1] = 1.0
    return ActivationStore(write_synthetic_cache(tmp_path / "cache", activations))


def row_ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].round().long().tolist()


def expected_training_rows(holdout: int) -> set[int]:
    return {row for row in range(640 - holdout) if row % 8 != 0}


@pytest.mark.parametrize("gather_on_device", [False, True])
def test_one_epoch_visits_every_training_row_once_and_skips_bos_and_holdout(indexed_cache, gather_on_device):
    loader = ActivationLoader(indexed_cache, batch_size=20, n_batches=24, seed=1, shuffle_buffer_rows=128, holdout_rows=100,
                              gather_on_device=gather_on_device)
    assert loader.rows_per_epoch == 540 - 540 // 8 - 1  # 540 rows before the hold-out, BOS every 8 rows
    seen = [row for batch in loader for row in row_ids(batch)]
    assert len(seen) == 480
    first_epoch = seen[: loader.rows_per_epoch]
    assert len(set(first_epoch)) == len(first_epoch)
    assert set(first_epoch) == expected_training_rows(100)


def test_several_epochs_each_a_fresh_permutation(indexed_cache):
    loader = ActivationLoader(indexed_cache, batch_size=14, n_batches=120, seed=0, shuffle_buffer_rows=128, holdout_rows=100)
    seen = [row for batch in loader for row in row_ids(batch)]
    per_epoch = loader.rows_per_epoch
    assert loader.epochs == pytest.approx(120 * 14 / per_epoch)
    epochs = [seen[start : start + per_epoch] for start in range(0, 3 * per_epoch, per_epoch)]
    for epoch in epochs:
        assert set(epoch) == expected_training_rows(100)
    assert epochs[0] != epochs[1]


def test_batches_mix_rows_from_several_shards(indexed_cache):
    loader = ActivationLoader(indexed_cache, batch_size=32, n_batches=1, seed=0, shuffle_buffer_rows=192, holdout_rows=0)
    shards = {row // 64 for row in row_ids(next(iter(loader)))}
    assert len(shards) >= 2


@pytest.mark.parametrize("gather_on_device", [False, True])
def test_resuming_at_a_batch_gives_the_same_stream(indexed_cache, gather_on_device):
    arguments = dict(batch_size=24, n_batches=50, seed=3, shuffle_buffer_rows=100, holdout_rows=64)
    full = [batch.clone() for batch in ActivationLoader(indexed_cache, **arguments)]
    device_gathered = [batch.clone() for batch in ActivationLoader(indexed_cache, gather_on_device=True, **arguments)]
    assert len(device_gathered) == 50 and all(torch.equal(a, b) for a, b in zip(full, device_gathered))
    resumed = list(ActivationLoader(indexed_cache, start_batch=31, gather_on_device=gather_on_device, **arguments))
    assert len(resumed) == 19
    assert all(torch.equal(a, b) for a, b in zip(full[31:], resumed))
    again = [batch for batch in ActivationLoader(indexed_cache, **arguments)]
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    other_seed = next(iter(ActivationLoader(indexed_cache, **{**arguments, "seed": 4})))
    assert not torch.equal(other_seed, full[0])


def test_batches_are_float32_in_the_cache_values(tmp_path):
    activations = np.random.default_rng(0).standard_normal((128, 3)).astype(np.float16)
    store = ActivationStore(write_synthetic_cache(tmp_path / "half", activations, dtype="float16"))
    batch = next(iter(ActivationLoader(store, batch_size=16, n_batches=1, shuffle_buffer_rows=1)))
    assert batch.dtype == torch.float32 and batch.shape == (16, 3)
    training = activations[np.arange(128) % 8 != 0][:64].astype(np.float32)  # the first shard's non-BOS rows
    for row in batch.numpy():
        assert (np.abs(training - row).sum(axis=1) == 0).any()


def test_holdout_is_the_tail_in_stored_order(indexed_cache):
    holdout = read_holdout(indexed_cache, 100)
    assert holdout.activations[:, 0].tolist() == list(range(540, 640))
    assert holdout.is_bos.tolist() == [row % 8 == 0 for row in range(540, 640)]
    spans = training_spans(indexed_cache, 100)
    assert [span.kept_rows for span in spans] == [64] * 8 + [28]


def test_bad_sizes_are_rejected_with_the_setting_named(indexed_cache):
    with pytest.raises(ValueError, match="holdout_tokens"):
        ActivationLoader(indexed_cache, batch_size=8, n_batches=1, holdout_rows=400)
    with pytest.raises(ValueError, match="batch_size"):
        ActivationLoader(indexed_cache, batch_size=10_000, n_batches=1)


def test_stopping_early_ends_the_background_thread(indexed_cache):
    loader = ActivationLoader(indexed_cache, batch_size=8, n_batches=60, prefetch_batches=2, gather_on_device=True)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert loader._thread is None


def test_batches_larger_than_a_window_are_assembled_across_windows(indexed_cache):
    arguments = dict(batch_size=150, n_batches=9, seed=5, shuffle_buffer_rows=1, holdout_rows=0)
    host = [batch.clone() for batch in ActivationLoader(indexed_cache, **arguments)]
    device = [batch.clone() for batch in ActivationLoader(indexed_cache, gather_on_device=True, **arguments)]
    resumed = list(ActivationLoader(indexed_cache, start_batch=4, gather_on_device=True, **arguments))
    assert len(host) == len(device) == 9 and all(torch.equal(a, b) for a, b in zip(host, device))
    assert all(torch.equal(a, b) for a, b in zip(host[4:], resumed))
    first_epoch = [row for batch in host[:3] for row in row_ids(batch)]
    assert len(set(first_epoch)) == 450 and set(first_epoch) <= expected_training_rows(0)
