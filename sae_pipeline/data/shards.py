"""Parquet activation shards: the on-disk format every stage after ``cache`` reads.

Layout of a cache folder::

    <cache>/manifest.json         what is here (model, hook, dtype, d_model, shards with row counts and checksums)
    <cache>/tokens.parquet        one row per sequence: doc_id (int64), token_ids (fixed_size_list<int32>[T])
    <cache>/shards/shard-00000.parquet
    <cache>/shards/shard-00000.parquet.xxh3   its checksum, written right after it (what a resumed cache trusts)

A shard has one row per token position:

    activation  fixed_size_binary(d_model * itemsize)   raw little-endian float16/float32 vector
    doc_id      int64     index of the sequence in tokens.parquet
    position    int32     position in the sequence (0 is the BOS position)
    token_id    int32     the token at that position
    is_bos      bool      True for BOS positions (training drops them)
    is_outlier  bool      True for other positions whose norm is an outlier (training drops them too;
                          absent in caches written before it existed, read as False)

Activations are stored as ``fixed_size_binary`` rather than a list of floats because that is the
fastest Parquet layout by far (../shared/MEASUREMENTS.md: 0.69 M rows/s write and 3.4 M rows/s read
on 2 cores, against 0.09/0.33 for FixedSizeList<halffloat>); the dtype lives in the schema metadata
and in the manifest, and reading is a zero-copy ``np.frombuffer``.

Every read through :class:`ActivationStore` is checked: the first time a process reads a shard (and
again whenever its size or modification time changes) its XXH3-128 checksum is compared with the
manifest's, and a mismatch raises :class:`CorruptCacheError` naming the file and how to recover. The
cost is one extra pass over the file at memory speed (benchmarks/shard_verify_cost.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from sae_pipeline.data.atomic import atomic_path, write_json, write_text
from sae_pipeline.settings import ACTIVATION_DTYPES

FORMAT_VERSION = "sae-stability-activations/1"
MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.parquet"
SHARD_FOLDER = "shards"
SUPPORTED_DTYPES = {name: np.dtype(name).type for name in ACTIVATION_DTYPES}
# Rows per Parquet row group in a shard: several groups let a reader decode one shard on several threads.
ROW_GROUP_ROWS = 16384


class CorruptCacheError(ValueError):
    """A cached file's bytes differ from the checksum recorded when it was written."""


def corrupt_shard_error(path: Path, actual: str, expected: str, manifest_path: Path) -> CorruptCacheError:
    """The error for a shard whose checksum ``actual`` is not the ``expected`` one of ``manifest_path``."""
    return CorruptCacheError(
        f"{path}: checksum {actual} does not match {expected} recorded in {manifest_path}: the shard changed after the "
        f"cache stage wrote it. To recover, delete {path} and {manifest_path} and run snakemake again: the cache job "
        f"recomputes the missing shard and keeps the ones it can verify (or delete {manifest_path.parent} to rebuild it all)."
    )


def checksum_path(path: str | os.PathLike) -> Path:
    """The file beside a shard holding the checksum it was written with: ``<shard>.xxh3``."""
    path = Path(path)
    return path.with_name(path.name + ".xxh3")


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside ``<cache>/shards``."""
    return f"shard-{index:05d}.parquet"


def file_checksum(path: str | os.PathLike) -> str:
    """``"xxh3_128:<hex>"`` of a file's bytes.

    XXH3-128 rather than sha256: it detects corruption and truncation as well and runs at memory
    speed (about 10x sha256), which matters when the cache writes gigabytes per second.
    """
    digest = xxhash.xxh3_128()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return f"xxh3_128:{digest.hexdigest()}"


@dataclass
class ShardData:
    """The rows of one shard (or a slice of one).

    Attributes:
        activations: [rows, d_model] float16 or float32.
        doc_id: [rows] int64, position: [rows] int32, token_id: [rows] int32, is_bos: [rows] bool,
        is_outlier: [rows] bool (all False when not given).
    """

    activations: np.ndarray
    doc_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    is_bos: np.ndarray
    is_outlier: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.is_outlier is None:
            self.is_outlier = np.zeros(len(self.is_bos), dtype=bool)

    def __len__(self) -> int:
        return int(self.activations.shape[0])

    @property
    def excluded(self) -> np.ndarray:
        """[rows] bool: rows SAEs neither train nor are evaluated on (BOS and outlier-norm positions)."""
        return self.is_bos | self.is_outlier

    def select(self, keep: np.ndarray) -> "ShardData":
        """The rows where ``keep`` is True (or the rows a slice or index array names)."""
        return ShardData(self.activations[keep], self.doc_id[keep], self.position[keep], self.token_id[keep], self.is_bos[keep], self.is_outlier[keep])

    def training_rows(self) -> "ShardData":
        """The same rows with BOS and outlier positions removed."""
        return self.select(~self.excluded)


def shard_schema(d_model: int, dtype: str) -> pa.Schema:
    """Arrow schema of an activation shard for vectors of ``d_model`` values of ``dtype``."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cache.dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {dtype!r}")
    width = d_model * np.dtype(SUPPORTED_DTYPES[dtype]).itemsize
    return pa.schema(
        [
            pa.field("activation", pa.binary(width)),
            pa.field("doc_id", pa.int64()),
            pa.field("position", pa.int32()),
            pa.field("token_id", pa.int32()),
            pa.field("is_bos", pa.bool_()),
            pa.field("is_outlier", pa.bool_()),
        ],
        metadata={"dtype": dtype, "d_model": str(d_model), "format": FORMAT_VERSION},
    )


def write_shard(path: str | os.PathLike, data: ShardData, dtype: str) -> dict:
    """Write ``data`` to ``path`` atomically; returns ``{"rows", "checksum"}`` for the manifest.

    ``data.activations`` is cast to ``dtype`` (little-endian) before writing.
    """
    activations = np.ascontiguousarray(data.activations, dtype=np.dtype(SUPPORTED_DTYPES[dtype]).newbyteorder("<"))
    rows, d_model = activations.shape
    schema = shard_schema(d_model, dtype)
    vector_column = pa.FixedSizeBinaryArray.from_buffers(
        schema.field("activation").type, rows, [None, pa.py_buffer(activations.reshape(-1).view(np.uint8))]
    )
    table = pa.Table.from_arrays(
        [
            vector_column,
            pa.array(np.asarray(data.doc_id, dtype=np.int64)),
            pa.array(np.asarray(data.position, dtype=np.int32)),
            pa.array(np.asarray(data.token_id, dtype=np.int32)),
            pa.array(np.asarray(data.is_bos, dtype=bool)),
            pa.array(np.asarray(data.is_outlier, dtype=bool)),
        ],
        schema=schema,
    )
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="none", use_dictionary=False, write_statistics=False, row_group_size=ROW_GROUP_ROWS)
        checksum = file_checksum(temporary)
    write_text(checksum_path(path), checksum + "\n")
    return {"rows": rows, "checksum": checksum}


def write_numbered_shard(cache_dir: str | os.PathLike, index: int, data: ShardData, dtype: str) -> dict:
    """Write shard ``index`` of a cache folder (``<cache>/shards/shard-<index>.parquet``) atomically.

    Returns its manifest record ``{"path", "rows", "checksum"}`` (path relative to the cache folder).
    """
    relative = f"{SHARD_FOLDER}/{shard_name(index)}"
    info = write_shard(Path(cache_dir) / relative, data, dtype)
    return {"path": relative, "rows": info["rows"], "checksum": info["checksum"]}


def verified_shard_record(cache_dir: str | os.PathLike, index: int, recorded: Mapping[str, str]) -> dict | None:
    """Manifest record of a shard already on disk when its bytes can be verified, else ``None``.

    A shard is verified when its checksum equals the one written beside it (``<shard>.xxh3``) or, for a
    shard written before those files existed, the one ``recorded`` for its relative path (the previous
    manifest's). A shard that cannot be verified is never re-blessed with a fresh checksum: the caller
    recomputes it.
    """
    relative = f"{SHARD_FOLDER}/{shard_name(index)}"
    path = Path(cache_dir) / relative
    sidecar = checksum_path(path)
    expected = sidecar.read_text().strip() if sidecar.exists() else recorded.get(relative)
    checksum = file_checksum(path)
    if expected != checksum:
        return None
    return {"path": relative, "rows": pq.ParquetFile(path).metadata.num_rows, "checksum": checksum}


def recorded_checksums(cache_dir: str | os.PathLike) -> dict[str, str]:
    """``{relative shard path: checksum}`` of the manifest in ``cache_dir`` (empty when there is none or it is unreadable)."""
    manifest_path = Path(cache_dir) / MANIFEST_NAME
    try:
        shards = json.loads(manifest_path.read_text())["shards"]
        return {str(shard["path"]): str(shard["checksum"]) for shard in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_manifest(
    cache_dir: str | os.PathLike,
    *,
    model: str | None,
    hook_name: str,
    dtype: str,
    d_model: int,
    context_size: int,
    rows_per_shard: int,
    shards: Sequence[dict],
    **extra: object,
) -> dict:
    """Write ``<cache>/manifest.json`` atomically (last, once every shard exists) and return it.

    The keys given here are the ones :class:`ActivationStore` and the stages rely on; ``n_rows`` is
    summed from the shard records; ``extra`` adds stage-specific keys (tokens table, labels, timings...).
    """
    manifest = {
        "format": FORMAT_VERSION,
        "model": model,
        "hook_name": hook_name,
        "dtype": dtype,
        "d_model": int(d_model),
        "context_size": int(context_size),
        "rows_per_shard": int(rows_per_shard),
        "n_rows": int(sum(int(shard["rows"]) for shard in shards)),
        "shards": list(shards),
        **extra,
    }
    write_json(Path(cache_dir) / MANIFEST_NAME, manifest)
    return manifest


def decode_activation_column(column: pa.ChunkedArray | pa.Array, d_model: int, dtype: str) -> np.ndarray:
    """Turn a ``fixed_size_binary`` column into a ``[rows, d_model]`` array without copying when possible."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.byte_width
    buffer = column.buffers()[1]
    raw = np.frombuffer(buffer, dtype=np.uint8, count=(column.offset + len(column)) * width)[column.offset * width :]
    return raw.view(np.dtype(SUPPORTED_DTYPES[dtype]).newbyteorder("<")).reshape(len(column), d_model)


def _activation_format(table: pa.Table) -> tuple[str, int]:
    """``(dtype, d_model)`` of a shard from the schema metadata its table was read with (no second file read)."""
    metadata = table.schema.metadata
    return metadata[b"dtype"].decode(), int(metadata[b"d_model"])


def read_shard(path: str | os.PathLike, columns: Sequence[str] | None = None) -> ShardData:
    """Read one shard. ``columns`` may omit ``activation`` (then ``activations`` is an empty [rows, 0] array);
    a requested column the shard lacks (``is_outlier`` in older caches) reads as zeros."""
    if columns is not None:
        present = set(pq.read_schema(path).names)
        columns = [name for name in columns if name in present]
    table = pq.read_table(path, columns=list(columns) if columns is not None else None, use_threads=True)
    dtype, d_model = _activation_format(table)
    rows = table.num_rows
    names = set(table.column_names)
    activations = (
        decode_activation_column(table.column("activation"), d_model, dtype)
        if "activation" in names
        else np.empty((rows, 0), dtype=SUPPORTED_DTYPES[dtype])
    )

    def column(name: str, dtype_: type) -> np.ndarray:
        return table.column(name).to_numpy() if name in names else np.zeros(rows, dtype=dtype_)

    return ShardData(
        activations, column("doc_id", np.int64), column("position", np.int32), column("token_id", np.int32), column("is_bos", bool), column("is_outlier", bool)
    )


def _excluded_rows(table: pa.Table) -> np.ndarray:
    """``is_bos | is_outlier`` of a table read with those columns (``is_outlier`` may be absent)."""
    excluded = table.column("is_bos").to_numpy()
    if "is_outlier" in table.column_names:
        excluded = excluded | table.column("is_outlier").to_numpy()
    return excluded


def read_exclusions(path: str | os.PathLike) -> np.ndarray:
    """A shard's ``[rows]`` bool mask of rows left out of training (BOS and outlier positions)."""
    schema_names = set(pq.read_schema(path).names)
    return _excluded_rows(pq.read_table(path, columns=[name for name in ("is_bos", "is_outlier") if name in schema_names]))


def read_activation_parts(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """A shard's activations as zero-copy arrays ``[rows_g, d_model]``, one per Parquet row group (in
    order), and its ``[rows]`` mask of excluded rows (BOS and outliers): what a reader that copies the
    rows anyway needs, without first joining the row groups into one array."""
    schema_names = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[name for name in ("activation", "is_bos", "is_outlier") if name in schema_names], use_threads=True)
    dtype, d_model = _activation_format(table)
    parts = [decode_activation_column(chunk, d_model, dtype) for chunk in table.column("activation").chunks]
    return parts, _excluded_rows(table)


class ActivationStore:
    """Read access to a finished cache folder (the one ``manifest.json`` sits in).

    Example::

        store = ActivationStore("results/lm/cache")
        for shard in store.iter_shards(drop_excluded=True):
            x = shard.activations            # [rows, d_model]
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.exists():
            raise FileNotFoundError(f"no activation cache at {self.root}: {manifest_path} is missing (run the cache stage)")
        self.manifest: dict = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
        # shard index -> (size, mtime_ns) of the file when its checksum last matched
        self._verified: dict[int, tuple[int, int]] = {}

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def n_rows(self) -> int:
        return int(sum(shard["rows"] for shard in self.manifest["shards"]))

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / shard["path"] for shard in self.manifest["shards"]]

    def verified_path(self, index: int) -> Path:
        """Path of shard ``index`` after checking its checksum against the manifest (once per process, and
        again when the file's size or modification time changes).

        Raises:
            CorruptCacheError: naming the file and how to recover.
        """
        path = self.shard_paths[index]
        status = path.stat()
        stamp = (status.st_size, status.st_mtime_ns)
        if self._verified.get(index) != stamp:
            expected = str(self.manifest["shards"][index]["checksum"])
            actual = file_checksum(path)
            if actual != expected:
                raise corrupt_shard_error(path, actual, expected, self.root / MANIFEST_NAME)
            self._verified[index] = stamp
        return path

    def read_shard(self, index: int, columns: Sequence[str] | None = None) -> ShardData:
        return read_shard(self.verified_path(index), columns)

    def read_activation_parts(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        return read_activation_parts(self.verified_path(index))

    def read_exclusions(self, index: int) -> np.ndarray:
        return read_exclusions(self.verified_path(index))

    def iter_shards(self, columns: Sequence[str] | None = None, drop_excluded: bool = False, order: Sequence[int] | None = None) -> Iterator[ShardData]:
        """Yield shards in ``order`` (default: stored order), optionally without BOS and outlier rows."""
        if drop_excluded and columns is not None:
            columns = list(dict.fromkeys([*columns, "is_bos", "is_outlier"]))
        for index in order if order is not None else range(len(self.shard_paths)):
            shard = self.read_shard(index, columns)
            yield shard.training_rows() if drop_excluded else shard

    def sequences(self) -> np.ndarray:
        """Token ids of every cached sequence, ``[n_sequences, context_size]`` int32 (row i is doc_id i)."""
        table = pq.read_table(self.root / TOKENS_NAME)
        doc_ids = table.column("doc_id").to_numpy()
        flat = table.column("token_ids").combine_chunks().flatten().to_numpy()
        tokens = flat.reshape(len(doc_ids), -1).astype(np.int32)
        if not np.array_equal(doc_ids, np.arange(len(doc_ids))):
            raise ValueError(f"{self.root / TOKENS_NAME}: doc_id column is not 0..n-1")
        return tokens

    def verify(self) -> None:
        """Check every shard's checksum against the manifest; raises :class:`CorruptCacheError` naming the first bad file."""
        for index in range(len(self.shard_paths)):
            self.verified_path(index)


def write_sequences(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write the ``tokens`` table: ``tokens`` is ``[n_sequences, context_size]`` int, row i gets doc_id i."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    n_sequences, context_size = tokens.shape
    token_column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), context_size)
    table = pa.table({"doc_id": pa.array(np.arange(n_sequences, dtype=np.int64)), "token_ids": token_column})
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)
