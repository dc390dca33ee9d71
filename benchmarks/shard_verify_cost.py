"""Cost of checking a shard's checksum on read: one default-size shard (65,536 rows x d_model 640, float16,
84 MB, the Gemma default's cache) read with and without the XXH3-128 check, best of several reads.

    nice -n 15 python3 benchmarks/shard_verify_cost.py [--rows 65536] [--d-model 640] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from sae_pipeline.data.shards import (
    ActivationStore,
    ShardData,
    file_checksum,
    read_activation_parts,
    write_manifest,
    write_numbered_shard,
)


def best_seconds(function, repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``function`` (seconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    rows, d_model = arguments.rows, arguments.d_model
    with tempfile.TemporaryDirectory() as folder:
        activations = np.random.default_rng(0).standard_normal((rows, d_model)).astype(np.float16)
        positions = np.tile(np.arange(64, dtype=np.int32), rows // 64 + 1)[:rows]
        data = ShardData(activations, np.arange(rows) // 64, positions, np.zeros(rows, np.int32), positions == 0)
        record = write_numbered_shard(folder, 0, data, "float16")
        write_manifest(folder, model=None, hook_name="bench", dtype="float16", d_model=d_model, context_size=64, rows_per_shard=rows, shards=[record])
        path = Path(folder) / record["path"]
        size_mb = path.stat().st_size / 1e6
        unchecked = best_seconds(lambda: read_activation_parts(path), arguments.repeats)
        checksum = best_seconds(lambda: file_checksum(path), arguments.repeats)
        checked = best_seconds(lambda: ActivationStore(folder).read_activation_parts(0), arguments.repeats)
    print(f"shard {rows} x {d_model} float16: {size_mb:.1f} MB")
    print(f"read without check: {unchecked * 1e3:.1f} ms; XXH3-128 of the file: {checksum * 1e3:.1f} ms ({size_mb / 1e3 / checksum:.2f} GB/s)")
    print(f"first read with check (fresh store): {checked * 1e3:.1f} ms ({checked / unchecked:.2f}x the unchecked read)")


if __name__ == "__main__":
    main()
