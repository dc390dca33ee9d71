"""The digits experiment: the image cache round-trips the pixels; the stability table and claim-1 verdict."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from sae_pipeline.data.digits import load_digit_images, read_labels
from sae_pipeline.data.holdout import read_holdout, training_spans
from sae_pipeline.data.shards import ActivationStore
from sae_pipeline.layout import digits_cell, expand_variants
from sae_pipeline.stages.digits_cache import cache_digits
from sae_pipeline.stages.digits_table import digits_stability_table

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "source": "sklearn_digits",
    "hf_dataset": {"path": "ylecun/mnist", "name": None, "split": "train", "image_field": "image", "label_field": "label"},
    "max_images": None,
    "shuffle_seed": 3,
    "rows_per_shard": 500,
    "dtype": "float32",
}


def test_cache_round_trips_the_pixel_vectors_and_labels(tmp_path):
    manifest = cache_digits(DATA, tmp_path / "cache" / "manifest.json")
    bunch = load_digits()
    order = np.random.default_rng(3).permutation(len(bunch.data))
    store = ActivationStore(tmp_path / "cache")
    assert (manifest["model"], manifest["hook_name"], manifest["d_model"], manifest["n_rows"]) == (None, "pixels", 64, 1797)
    assert "sklearn digits 8x8" in manifest["dataset"] and "MNIST" in manifest["dataset"]
    assert [shard["rows"] for shard in manifest["shards"]] == [500, 500, 500, 297]
    shards = list(store.iter_shards(drop_excluded=True))
    pixels = np.concatenate([shard.activations for shard in shards])
    np.testing.assert_array_equal(pixels, bunch.data[order].astype(np.float32) / 16.0)
    np.testing.assert_array_equal(np.concatenate([shard.doc_id for shard in shards]), np.arange(1797))
    np.testing.assert_array_equal(read_labels(tmp_path / "cache"), bunch.target[order])
    store.verify()
    # the trainer's hold-out is the last rows in stored order: a shuffled sample of the images
    assert sum(span.kept_rows for span in training_spans(store, 360)) == 1797 - 360
    np.testing.assert_array_equal(read_holdout(store, 360).activations, pixels[-360:])


def test_rerun_replaces_previous_shards(tmp_path):
    cache_digits(dict(DATA, rows_per_shard=200), tmp_path / "manifest.json")
    manifest = cache_digits(dict(DATA, max_images=300), tmp_path / "manifest.json")
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == ["shard-00000.parquet", "shard-00000.parquet.xxh3"]  # stale shards and their checksum files gone
    assert ActivationStore(tmp_path).n_rows == manifest["n_rows"] == 300


class FakeHubDataset(dict):
    """What ``datasets.load_dataset`` returns for MNIST: columns of PIL images and integer labels."""


def test_hub_mnist_path_flattens_and_scales_28x28_images(monkeypatch):
    import datasets

    images = [Image.fromarray(np.full((28, 28), value, dtype=np.uint8)) for value in (0, 51, 255)]
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return FakeHubDataset(image=images, label=[7, 2, 1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pixels, labels, name = load_digit_images(dict(DATA, source="hf_mnist"))
    assert calls == [("ylecun/mnist", None, "train")]
    assert pixels.shape == (3, 784)
    np.testing.assert_allclose(pixels[:, 0], [0.0, 0.2, 1.0])
    assert list(labels) == [7, 2, 1] and name.startswith("MNIST")


def test_hub_mnist_unreachable_says_how_to_run_offline(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="sklearn_digits"):
        load_digit_images(dict(DATA, source="hf_mnist"))


def write_summary(path: Path, shared: float, mmcs: float) -> str:
    path.mkdir(parents=True)
    summary = {
        "n_pairs": 3,
        "mean_over_pairs": {"fraction_shared": shared, "mmcs_decoder": mmcs, "mmcs_encoder": mmcs / 2, "fraction_paired_decoder": shared},
        "reference_fractions": {"always": shared / 2, "sometimes": shared / 2, "never": 1 - shared},
        "reference_dead_latents": {"count": 1},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path / "summary.json")


def digits_grid() -> dict:
    return yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["digits"]["train"]


@pytest.mark.parametrize("target_wins", [True, False])
def test_stability_table_and_claim1_verdict(tmp_path, target_wins):
    variants = expand_variants(digits_grid())
    assert len(variants) == 12
    cells = {name: digits_cell(settings) for name, settings in variants.items()}
    summaries = {}
    for index, (name, cell) in enumerate(cells.items()):
        is_target = cell["weight_penalty"] == "l2" and cell["tied_init"] and cell["unit_norm_decoder"]
        shared = (0.9 if target_wins else 0.05) if is_target else 0.1 + 0.02 * index
        summaries[name] = write_summary(tmp_path / "match" / name, shared, 0.5 + shared / 2)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"dataset": "sklearn digits 8x8 (stand-in)"}))
    outputs = [tmp_path / "table.csv", tmp_path / "stability.png", tmp_path / "verdict.json"]
    digits_stability_table(summaries, cells, {}, manifest, *outputs)
    table = pd.read_csv(outputs[0])
    assert len(table) == 12 and (table["dataset"] == "sklearn digits 8x8 (stand-in)").all()
    assert list(table["weight_penalty"][::4]) == ["none", "l1", "l2"]
    assert list(zip(table["tied_init"][:4], table["unit_norm_decoder"][:4])) == [(False, False), (False, True), (True, False), (True, True)]
    for name, path in summaries.items():
        row = table.set_index("variant").loc[name]
        assert row["fraction_shared"] == pytest.approx(json.loads(Path(path).read_text())["mean_over_pairs"]["fraction_shared"])
    verdict = json.loads(outputs[2].read_text())
    assert verdict["holds"] is target_wins
    assert set(verdict["comparisons"]) == {"plain (none, untied, free norms)", "no penalty, tied, unit", "l2, untied, free norms"}
    assert verdict["rank_by_fraction_shared"] == (1 if target_wins else 12)
    assert outputs[1].read_bytes()[:4] == b"\x89PNG"


def test_digits_section_validates_and_names_a_bad_key():
    schema = str(REPO_ROOT / "workflow" / "schemas" / "digits.schema.yaml")
    section = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["digits"]
    validate(copy.deepcopy(section), schema)
    broken = copy.deepcopy(section)
    broken["data"]["sorce"] = "mnist"
    with pytest.raises(WorkflowError, match="sorce"):
        validate(broken, schema)
    broken = copy.deepcopy(section)
    broken["train"]["options"]["l1_coeficient"] = 0.5
    with pytest.raises(WorkflowError, match="l1_coeficient"):
        validate(broken, schema)
