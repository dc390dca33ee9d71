"""The cache stage: shapes, dtypes, values against a direct forward pass, crash-safety and resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import sae_pipeline.stages.cache as cache_module
from sae_pipeline.data.shards import ActivationStore, CorruptCacheError, read_shard
from sae_pipeline.stages.cache import cache_activations
from tests.conftest import TINY_CACHE_SETTINGS, TINY_HOOK


def count_forwarded_sequences(monkeypatch) -> list[int]:
    """Make the cache stage's forward passes record their batch sizes (sequences) in the returned list."""
    forwarded_batches: list[int] = []
    real_call = cache_module.HookActivations.__call__

    def counting_call(self, tokens):
        forwarded_batches.append(tokens.shape[0])
        return real_call(self, tokens)

    monkeypatch.setattr(cache_module.HookActivations, "__call__", counting_call)
    return forwarded_batches


def test_manifest_and_shard_shapes(tiny_cache):
    store = ActivationStore(tiny_cache)
    manifest = store.manifest
    assert manifest["d_model"] == 32
    assert manifest["hook_name"] == TINY_HOOK
    assert manifest["dtype"] == "float16"
    assert manifest["context_size"] == 16
    assert manifest["n_rows"] == 2048 and manifest["n_sequences"] == 128
    assert [shard["rows"] for shard in manifest["shards"]] == [512, 512, 512, 512]
    store.verify()
    shard = store.read_shard(1)
    assert shard.activations.shape == (512, 32) and shard.activations.dtype == np.float16
    assert shard.doc_id.dtype == np.int64 and shard.position.dtype == np.int32 and shard.token_id.dtype == np.int32
    assert np.array_equal(shard.is_bos, shard.position == 0)
    assert shard.doc_id[0] == 32 and shard.doc_id[-1] == 63


def test_token_ids_match_tokens_table_and_bos(tiny_cache):
    store = ActivationStore(tiny_cache)
    sequences = store.sequences()
    assert sequences.shape == (128, 16)
    assert np.all(sequences[:, 0] == store.manifest["bos_token_id"])
    for shard in store.iter_shards(columns=["doc_id", "position", "token_id", "is_bos"]):
        assert np.array_equal(shard.token_id, sequences[shard.doc_id, shard.position])
    without_bos = next(store.iter_shards(drop_excluded=True))
    assert len(without_bos) == 512 - 32 and not without_bos.is_bos.any()


def test_activations_equal_direct_forward_pass(tiny_cache, tiny_subject_model):
    from transformers import GPTNeoXForCausalLM

    store = ActivationStore(tiny_cache)
    model = GPTNeoXForCausalLM.from_pretrained(tiny_subject_model).eval()
    sequences = torch.from_numpy(store.sequences()[:4].astype(np.int64))
    captured = {}
    handle = model.gpt_neox.layers[1].register_forward_hook(lambda module, args, output: captured.setdefault("out", output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        model(sequences)
    handle.remove()
    hidden = captured["out"]  # residual stream after block 1 (HF's last hidden_states entry is after the final LayerNorm)
    stored = torch.from_numpy(store.read_shard(0).activations[: 4 * 16].astype(np.float32)).reshape(4, 16, 32)
    torch.testing.assert_close(stored, hidden, atol=2e-2, rtol=1e-2)


def test_float32_dtype(tmp_path, tiny_subject_model, tiny_corpus):
    corpus_settings, documents = tiny_corpus
    settings = dict(TINY_CACHE_SETTINGS, dtype="float32", max_tokens=512)
    manifest = cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(tmp_path / "manifest.json"), settings)
    shard = read_shard(tmp_path / manifest["shards"][0]["path"])
    assert shard.activations.dtype == np.float32 and shard.activations.shape == (512, 32)


def test_crash_leaves_no_partial_shard_and_rerun_resumes(tmp_path, tiny_subject_model, tiny_corpus, monkeypatch):
    corpus_settings, documents = tiny_corpus
    manifest_path = tmp_path / "manifest.json"
    real_write_numbered_shard = cache_module.write_numbered_shard
    written = []

    def crash_on_third_shard(cache_dir, index, data, dtype):
        if len(written) == 2:
            # die half-way through writing: a temporary file exists, then the process "is killed"
            (tmp_path / "shards" / f".shard-{index:05d}.parquet.deadbeef.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill")
        written.append(index)
        return real_write_numbered_shard(cache_dir, index, data, dtype)

    monkeypatch.setattr(cache_module, "write_numbered_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(manifest_path), TINY_CACHE_SETTINGS)
    assert not manifest_path.exists()
    complete = sorted(path.name for path in (tmp_path / "shards").glob("shard-*.parquet"))
    assert complete == ["shard-00000.parquet", "shard-00001.parquet"]
    for name in complete:
        assert len(read_shard(tmp_path / "shards" / name)) == 512

    monkeypatch.setattr(cache_module, "write_numbered_shard", real_write_numbered_shard)
    forwarded_batches = count_forwarded_sequences(monkeypatch)
    manifest = cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(manifest_path), TINY_CACHE_SETTINGS)
    assert sum(forwarded_batches) == 64  # only shards 2 and 3 (32 sequences each) were recomputed
    store = ActivationStore(tmp_path)
    store.verify()
    assert manifest["n_rows"] == 2048


def test_changed_settings_discard_old_shards(tmp_path, tiny_subject_model, tiny_corpus):
    corpus_settings, documents = tiny_corpus
    manifest_path = tmp_path / "manifest.json"
    cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(manifest_path), dict(TINY_CACHE_SETTINGS, max_tokens=1024))
    first = read_shard(tmp_path / "shards" / "shard-00000.parquet").activations.dtype
    manifest = cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(manifest_path), dict(TINY_CACHE_SETTINGS, max_tokens=1024, dtype="float32"))
    assert first == np.float16
    assert read_shard(tmp_path / manifest["shards"][0]["path"]).activations.dtype == np.float32
    assert json.loads(manifest_path.read_text())["dtype"] == "float32"


def test_streamed_packing_equals_reference_packing(tiny_subject_model):
    from transformers import AutoTokenizer

    from sae_pipeline.data.corpus import pack_sequences
    from sae_pipeline.stages.cache import iter_sequence_blocks
    from tests.conftest import tiny_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_subject_model)
    documents = tiny_documents(30)
    reference = pack_sequences(tokenizer(documents, add_special_tokens=False)["input_ids"], 16, 0, max_sequences=50)
    blocks = list(iter_sequence_blocks(iter(documents), tokenizer, 16, 50, 0, block_sequences=7, chunk_documents=4))
    assert [len(block) for block in blocks] == [7] * 7 + [1]
    assert np.array_equal(np.concatenate(blocks), reference)


def overwrite_4kb(path) -> None:
    """Overwrite 4 KB in the middle of a file (the activation column), keeping its size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes((byte + 1) % 256 for byte in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("reader", ["read_shard", "read_activation_parts", "read_exclusions", "iter_shards"])
def test_every_read_of_a_corrupt_shard_names_the_file_and_the_recovery(tmp_path, tiny_cache, reader):
    shutil.copytree(tiny_cache, tmp_path / "cache")
    store = ActivationStore(tmp_path / "cache")
    store.read_shard(1)  # verified once; rewriting the file changes its modification time, so it is checked again
    corrupted = tmp_path / "cache" / "shards" / "shard-00001.parquet"
    overwrite_4kb(corrupted)
    read = {
        "read_shard": lambda: store.read_shard(1),
        "read_activation_parts": lambda: store.read_activation_parts(1),
        "read_exclusions": lambda: store.read_exclusions(1),
        "iter_shards": lambda: list(store.iter_shards(drop_excluded=True)),
    }[reader]
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.parquet: checksum xxh3_128:\w+ does not match") as error:
        read()
    assert f"delete {corrupted} and {tmp_path / 'cache' / 'manifest.json'}" in str(error.value)
    with pytest.raises(CorruptCacheError):
        ActivationStore(tmp_path / "cache").read_shard(1)
    with pytest.raises(CorruptCacheError):
        ActivationStore(tmp_path / "cache").verify()
    ActivationStore(tmp_path / "cache").read_shard(0)


def test_a_resumed_cache_recomputes_a_shard_it_cannot_verify(tmp_path, tiny_subject_model, tiny_corpus, monkeypatch):
    """The issue's sequence: corrupt a shard, delete the manifest, rerun the cache: the shard is recomputed
    (not re-blessed with a fresh checksum); a shard with neither its checksum file nor a manifest is recomputed too."""
    corpus_settings, documents = tiny_corpus
    manifest_path = tmp_path / "manifest.json"
    cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(manifest_path), TINY_CACHE_SETTINGS)
    shards = tmp_path / "shards"
    original = {index: read_shard(shards / f"shard-0000{index}.parquet").activations.copy() for index in range(4)}
    assert (shards / "shard-00002.parquet.xxh3").read_text().strip() == json.loads(manifest_path.read_text())["shards"][2]["checksum"]
    overwrite_4kb(shards / "shard-00001.parquet")
    (shards / "shard-00003.parquet.xxh3").unlink()
    manifest_path.unlink()

    forwarded_batches = count_forwarded_sequences(monkeypatch)
    cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(manifest_path), TINY_CACHE_SETTINGS)
    assert sum(forwarded_batches) == 64  # shards 1 and 3 (32 sequences each) recomputed, 0 and 2 kept
    store = ActivationStore(tmp_path)
    store.verify()
    for index in range(4):
        np.testing.assert_array_equal(store.read_shard(index).activations, original[index])
