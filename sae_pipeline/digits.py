"""The digits stability experiment (claim 1): SAEs on handwritten-digit images instead of model activations.

The paper trains SAEs on MNIST (784 pixels) and compares cross-seed consistency across weight
penalty (none / L1 / L2) x tied initialisation x unit-norm decoder. Here:

- :func:`cache_digits` writes the images through the same Parquet shard format as the activation
  cache (``sae_pipeline.shards``), so the generic train and match stages run on them unchanged.
  Offline (the default) the images are scikit-learn's bundled digits -- 1,797 8x8 images with 17
  grey levels, a copy of the test set of the UCI optical-recognition digits data -- a stand-in for
  MNIST that every result names as such. With ``source: hf_mnist`` the real MNIST (28x28) is read
  through ``datasets`` from the Hugging Face Hub (``ylecun/mnist``).
  Pixels are scaled to [0, 1]; images are shuffled once (``shuffle_seed``) so the trainer's held-out
  rows (the last rows in stored order) are a random sample. One row per image: ``doc_id`` is the
  image index in the cache, ``position`` 0, ``token_id`` -1 (there are no tokens) and ``is_bos``
  False; the class labels are in ``labels.parquet`` beside the manifest.
- :func:`digits_stability_table` gathers the match summaries of the grid into
  ``stability_table.csv``, ``stability.png`` and ``stability_summary.json`` (which states whether
  claim 1's direction holds).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sae_pipeline.atomic import atomic_path, write_dataframe, write_json
from sae_pipeline.shards import SHARD_FOLDER, ShardData, write_manifest, write_numbered_shard
from sae_pipeline.training_sae import TrainSettings

logger = logging.getLogger(__name__)

LABELS_NAME = "labels.parquet"
HOOK_NAME = "pixels"
SKLEARN_DIGITS_NAME = "sklearn digits 8x8 (UCI optdigits test set, 1797 images; offline stand-in for MNIST)"
SKLEARN_DIGITS_MAX_VALUE = 16.0
MNIST_MAX_VALUE = 255.0


def load_digit_images(settings: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    """The images of ``digits.data``: ``(pixels [n, d] float32 in [0, 1], labels [n] int64, dataset name)``.

    ``source: sklearn_digits`` gives d = 64 offline; ``source: hf_mnist`` gives d = 784 from the Hub.
    """
    source = settings["source"]
    if source == "sklearn_digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels = bunch.data.astype(np.float32) / SKLEARN_DIGITS_MAX_VALUE
        labels = bunch.target.astype(np.int64)
        name = SKLEARN_DIGITS_NAME
    elif source == "hf_mnist":
        pixels, labels, name = _load_hub_mnist(settings["hf_dataset"])
    else:
        raise ValueError(f"digits.data.source must be sklearn_digits or hf_mnist, got {source!r}")
    max_images = settings.get("max_images")
    if max_images is not None:
        pixels, labels = pixels[: int(max_images)], labels[: int(max_images)]
    return pixels, labels, name


def _load_hub_mnist(hub: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST from the Hugging Face Hub through ``datasets`` (images flattened to 784 pixels)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    except Exception as error:  # the Hub is unreachable offline; say what to change
        raise RuntimeError(
            f"digits.data.source=hf_mnist could not load {hub['path']!r} split {hub['split']!r} from the Hugging Face Hub "
            f"({type(error).__name__}: {error}); use digits.data.source: sklearn_digits offline"
        ) from error
    images = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) for image in dataset[hub["image_field"]]])
    labels = np.asarray(dataset[hub["label_field"]], dtype=np.int64)
    return images / MNIST_MAX_VALUE, labels, f"MNIST ({hub['path']}, split {hub['split']}, {len(labels)} images 28x28)"


def cache_digits(settings: Mapping[str, Any], manifest_path: str | os.PathLike) -> dict[str, Any]:
    """Write the digit images as an activation cache (shards, labels, manifest) beside ``manifest_path``.

    Args:
        settings: the config's ``digits.data`` section (source, hf_dataset, max_images, shuffle_seed,
            rows_per_shard, dtype).
        manifest_path: ``<cache>/manifest.json``, written last.

    Returns the manifest. It has ``model: null`` and ``hook_name: "pixels"``; ``d_model`` is the pixel
    count; ``context_size`` is 1 (each image is its own one-row "sequence") and there is no tokens table.
    """
    started = time.time()
    root = Path(manifest_path).parent
    pixels, labels, dataset_name = load_digit_images(settings)
    order = np.random.default_rng(int(settings["shuffle_seed"])).permutation(len(pixels))
    pixels, labels = pixels[order], labels[order]
    dtype = settings["dtype"]
    rows_per_shard = int(settings["rows_per_shard"])
    shard_folder = root / SHARD_FOLDER
    shard_folder.mkdir(parents=True, exist_ok=True)
    for stale in shard_folder.glob("shard-*.parquet"):
        stale.unlink()
    shards = []
    for index, start in enumerate(range(0, len(pixels), rows_per_shard)):
        rows = slice(start, start + rows_per_shard)
        count = len(pixels[rows])
        data = ShardData(
            activations=pixels[rows],
            doc_id=np.arange(start, start + count, dtype=np.int64),
            position=np.zeros(count, dtype=np.int32),
            token_id=np.full(count, -1, dtype=np.int32),
            is_bos=np.zeros(count, dtype=bool),
        )
        shards.append(write_numbered_shard(root, index, data, dtype))
    labels_table = pa.table({"doc_id": pa.array(np.arange(len(labels), dtype=np.int64)), "label": pa.array(labels)})
    with atomic_path(root / LABELS_NAME) as temporary:
        pq.write_table(labels_table, temporary)
    manifest = write_manifest(
        root,
        model=None,
        hook_name=HOOK_NAME,
        dtype=dtype,
        d_model=int(pixels.shape[1]),
        context_size=1,
        rows_per_shard=rows_per_shard,
        shards=shards,
        n_sequences=int(len(pixels)),
        n_bos_rows=0,
        bos_token_id=None,
        prepend_bos=False,
        dataset=dataset_name,
        source=settings["source"],
        pixel_range=[0.0, 1.0],
        shuffle_seed=int(settings["shuffle_seed"]),
        tokens=None,
        labels=LABELS_NAME,
        label_counts={str(label): int(count) for label, count in zip(*np.unique(labels, return_counts=True))},
        wall_time_s=time.time() - started,
    )
    logger.info("cached %d images of %d pixels (%s) in %d shards", len(pixels), pixels.shape[1], dataset_name, len(shards))
    return manifest


def read_labels(cache_dir: str | os.PathLike) -> np.ndarray:
    """Class label of every cached image, indexed by ``doc_id``."""
    table = pq.read_table(Path(cache_dir) / LABELS_NAME)
    return table.column("label").to_numpy()[np.argsort(table.column("doc_id").to_numpy())]


def cell_of(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The grid cell of a digits variant: penalty kind and coefficient, tied init, unit-norm decoder
    (a setting the variant leaves out takes the trainer's default)."""
    resolved = TrainSettings.from_mapping(settings)
    coefficient = float(resolved.weight_penalty["coefficient"])
    kind = resolved.weight_penalty["kind"] if coefficient != 0 else "none"
    return {
        "weight_penalty": kind,
        "penalty_coefficient": coefficient if kind != "none" else 0.0,
        "tied_init": resolved.tied_init,
        "unit_norm_decoder": resolved.unit_norm_decoder,
    }


def _mean_training_metrics(sae_dirs: Sequence[str]) -> dict[str, float]:
    values: dict[str, list[float]] = {"fvu": [], "l0": [], "dead_fraction": []}
    for folder in sae_dirs:
        path = Path(folder) / "metrics.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        for name in values:
            if metrics.get(name) is not None:
                values[name].append(float(metrics[name]))
    return {f"{name}_mean": float(np.mean(found)) if found else float("nan") for name, found in values.items()}


def digits_stability_table(
    match_summaries: Mapping[str, str],
    cells: Mapping[str, Mapping[str, Any]],
    sae_dirs: Mapping[str, Sequence[str]],
    manifest_path: str | os.PathLike,
    output_table: str | os.PathLike,
    output_plot: str | os.PathLike,
    output_summary: str | os.PathLike,
) -> pd.DataFrame:
    """One row per digits variant (grid cell): stability across seeds and training quality.

    Args:
        match_summaries: ``{variant: path of its match summary.json}``.
        cells: ``{variant: its grid cell}`` (:func:`cell_of` of the variant's training settings).
        sae_dirs: ``{variant: its per-seed SAE folders}`` (their ``metrics.json`` give FVU, L0, dead fraction).
        manifest_path: the digits cache manifest (names the dataset).
        output_table, output_plot, output_summary: ``stability_table.csv``, ``stability.png``,
            ``stability_summary.json``.

    Columns: dataset, variant, weight_penalty, penalty_coefficient, tied_init, unit_norm_decoder,
    fraction_shared (mean over seed pairs), mmcs_decoder, mmcs_encoder, fraction_paired_decoder,
    always/sometimes/never fractions of the reference seed, n_pairs, fvu_mean, l0_mean, dead_fraction_mean.
    """
    dataset = json.loads(Path(manifest_path).read_text()).get("dataset", "unknown")
    rows = []
    for variant, summary_path in match_summaries.items():
        summary = json.loads(Path(summary_path).read_text())
        pair_means = summary["mean_over_pairs"]
        fractions = summary["reference_fractions"]
        rows.append(
            {
                "dataset": dataset,
                "variant": variant,
                **cells[variant],
                "fraction_shared": pair_means["fraction_shared"],
                "mmcs_decoder": pair_means["mmcs_decoder"],
                "mmcs_encoder": pair_means["mmcs_encoder"],
                "fraction_paired_decoder": pair_means["fraction_paired_decoder"],
                "always_fraction": fractions["always"],
                "sometimes_fraction": fractions["sometimes"],
                "never_fraction": fractions["never"],
                "n_pairs": summary["n_pairs"],
                "n_dead_reference": summary.get("reference_dead_latents", {}).get("count"),
                **_mean_training_metrics(sae_dirs.get(variant, [])),
            }
        )
    table = pd.DataFrame(rows)
    penalty_order = {"none": 0, "l1": 1, "l2": 2}
    table = table.sort_values(
        ["weight_penalty", "tied_init", "unit_norm_decoder"], key=lambda column: column.map(penalty_order) if column.name == "weight_penalty" else column
    ).reset_index(drop=True)
    write_dataframe(output_table, table)
    write_json(output_summary, claim1_direction(table, dataset))
    plot_stability(table, output_plot, dataset)
    return table


def _cell(table: pd.DataFrame, penalty: str, tied: bool, unit: bool) -> pd.Series | None:
    found = table[(table["weight_penalty"] == penalty) & (table["tied_init"] == tied) & (table["unit_norm_decoder"] == unit)]
    return found.iloc[0] if len(found) else None


def claim1_direction(table: pd.DataFrame, dataset: str) -> dict[str, Any]:
    """Does L2 + tied init + unit-norm decoder raise cross-seed consistency over the other cells?

    Compares the L2/tied/unit cell with (a) the plain cell (no penalty, untied, free decoder norms),
    (b) the same tricks without the penalty (none/tied/unit), (c) L2 without the tricks, and (d) every
    other cell, on the mean shared fraction over seed pairs and on decoder MMCS. The direction holds
    when the L2/tied/unit cell is above (a), (b) and (c) on both measures. This is a direction, from
    3 seeds per cell on one dataset: no significance is claimed.
    """
    target = _cell(table, "l2", True, True)
    comparisons = {"plain (none, untied, free norms)": ("none", False, False), "no penalty, tied, unit": ("none", True, True), "l2, untied, free norms": ("l2", False, False)}
    result: dict[str, Any] = {"dataset": dataset, "claim": "L2 weight penalty with tied init and unit-norm decoder raises cross-seed consistency"}
    if target is None:
        result.update(holds=None, reason="the grid has no l2 / tied / unit-norm cell")
        return result
    result["l2_tied_unit"] = {"variant": target["variant"], "fraction_shared": float(target["fraction_shared"]), "mmcs_decoder": float(target["mmcs_decoder"])}
    verdicts = []
    result["comparisons"] = {}
    for label, key in comparisons.items():
        other = _cell(table, *key)
        if other is None:
            continue
        higher = bool(target["fraction_shared"] > other["fraction_shared"] and target["mmcs_decoder"] > other["mmcs_decoder"])
        verdicts.append(higher)
        result["comparisons"][label] = {
            "variant": other["variant"], "fraction_shared": float(other["fraction_shared"]), "mmcs_decoder": float(other["mmcs_decoder"]), "l2_tied_unit_higher_on_both": higher,
        }
    others = table[table["variant"] != target["variant"]]
    result["rank_by_fraction_shared"] = int((others["fraction_shared"] >= target["fraction_shared"]).sum()) + 1
    result["rank_by_mmcs_decoder"] = int((others["mmcs_decoder"] >= target["mmcs_decoder"]).sum()) + 1
    result["n_cells"] = int(len(table))
    result["holds"] = bool(verdicts) and all(verdicts)
    return result


def plot_stability(table: pd.DataFrame, path: str | os.PathLike, dataset: str) -> None:
    """Grouped bars per penalty: shared fraction and decoder MMCS for the four tied/unit combinations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    penalties = [penalty for penalty in ("none", "l1", "l2") if penalty in set(table["weight_penalty"])]
    combinations = [(False, False), (True, False), (False, True), (True, True)]
    width = 0.8 / len(combinations)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (column, label) in zip(axes, (("fraction_shared", "shared fraction (mean over seed pairs)"), ("mmcs_decoder", "decoder MMCS (mean over seed pairs)"))):
        for offset, (tied, unit) in enumerate(combinations):
            values = []
            for penalty in penalties:
                cell = _cell(table, penalty, tied, unit)
                values.append(float(cell[column]) if cell is not None else np.nan)
            positions = np.arange(len(penalties)) + (offset - (len(combinations) - 1) / 2) * width
            axis.bar(positions, values, width, label=f"tied init {'on' if tied else 'off'}, unit norm {'on' if unit else 'off'}")
        axis.set_xticks(np.arange(len(penalties)))
        axis.set_xticklabels([f"penalty: {penalty}" for penalty in penalties])
        axis.set_ylabel(label)
        axis.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Cross-seed stability of SAE features on {dataset}", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
