"""Shared fixtures: a tiny random GPT-NeoX subject model with its own BPE tokenizer, a tiny corpus,
and a tiny activation cache made by the real cache stage. Everything is small enough for CPU in seconds."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton fixes its interpreter mode at import: set before anything imports it, so the tests can run the
# GPU programs on CPU tensors (sparse_kernels uses the interpreter only where a test switches it on).
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG_FILE = REPO_ROOT / "workflow" / "configs" / "tiny.yaml"


def merge_configs(base: dict, override: dict) -> dict:
    """Snakemake's --configfile semantics: nested dictionaries are merged, other values replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def tiny_experiment_config() -> dict:
    """config.yaml with workflow/configs/tiny.yaml on top: the experiment the tests shrink further."""
    base = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    return merge_configs(base, yaml.safe_load(TINY_CONFIG_FILE.read_text()))

TINY_TEXT_SENTENCES = [
    "In the beginning the river ran past the old mill and the children played beside it.",
    "The king of the north sent seven riders to the city with gold and silver.",
    "She said that the light was good, and the evening and the morning were the first day.",
    "Many people believe that the most important thing is a quiet mind and an honest heart.",
    "According to experts, the weather in the mountains changes quickly in the spring.",
    "He counted the sheep: one, two, three, four, five, and then he slept.",
    "The ship sailed across the sea for forty days and forty nights before it found land.",
    "Bread, wine, oil and salt were carried to the market on the back of a grey donkey.",
]


def tiny_documents(n_documents: int = 40) -> list[str]:
    """Deterministic little English documents built from the sentences above."""
    documents = []
    for index in range(n_documents):
        sentences = [TINY_TEXT_SENTENCES[(index * 3 + offset) % len(TINY_TEXT_SENTENCES)] for offset in range(4)]
        documents.append(" ".join(sentences))
    return documents


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[dict, Path]:
    """(corpus settings, JSON-lines documents file) for a local text corpus."""
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in tiny_documents()))
    return {"source": "text_files", "text_files": [], "heldout_fraction": 0.1}, path


@pytest.fixture(scope="session")
def tiny_subject_model(tmp_path_factory) -> Path:
    """A random tiny GPT-NeoX (d_model 32, 2 layers) with a 300-token BPE tokenizer, as a local HF folder."""
    from sae_pipeline.subject.tiny import build_gpt_neox, build_tokenizer

    folder = tmp_path_factory.mktemp("subject_model")
    tokenizer = build_tokenizer(tiny_documents(), vocab_size=300)
    model = build_gpt_neox(len(tokenizer), d_model=32, n_layers=2, n_heads=2, d_mlp=64, context_size=32, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_CACHE_SETTINGS = {"context_size": 16, "max_tokens": 2048, "batch_size": 8, "dtype": "float16", "rows_per_shard": 512, "device": "cpu"}
TINY_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_subject_model, tiny_corpus) -> Path:
    """A finished activation cache (4 shards of 512 rows, d_model 32) from the real cache stage; returns the folder."""
    from sae_pipeline.stages.cache import cache_activations

    corpus_settings, documents = tiny_corpus
    folder = tmp_path_factory.mktemp("cache")
    cache_activations(str(tiny_subject_model), TINY_HOOK, corpus_settings, str(documents), str(folder / "manifest.json"), TINY_CACHE_SETTINGS)
    return folder


@pytest.fixture(scope="session")
def tiny_topk_sae(tmp_path_factory, tiny_cache):
    """A Top-k SAE (k 4, 64 latents) with tied random unit-norm decoder rows and b_dec at the data mean."""
    import numpy as np
    import torch

    from sae_pipeline.data.checkpoint import save_sae
    from sae_pipeline.data.shards import ActivationStore

    store = ActivationStore(tiny_cache)
    mean = torch.from_numpy(np.concatenate([s.activations for s in store.iter_shards(drop_excluded=True)]).astype(np.float32).mean(axis=0))
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(64, store.d_model, generator=generator)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    tensors = {"W_enc": decoder.T.clone(), "W_dec": decoder, "b_enc": torch.zeros(64), "b_dec": mean}
    folder = tmp_path_factory.mktemp("sae") / "seed0"
    save_sae(folder, tensors, {"architecture": "topk", "k": 4, "metadata": {"hook_name": store.manifest["hook_name"]}})
    return folder


def interpreter_works() -> bool:
    """Whether Triton's CPU interpreter can run the sparse-kernel programs here (triton >= 3.9 with numpy 2, installed by .ci/run)."""
    from sae_pipeline.sae import kernels as sparse_kernels

    if sparse_kernels.triton is None:
        return False
    major, minor = (int(part) for part in sparse_kernels.triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9) and sparse_kernels.triton_interpreting()


@pytest.fixture(params=["torch", "triton-interpreter"])
def backend(request, monkeypatch):
    """Run a sparse-kernel test on the PyTorch path, then on the Triton programs in the CPU interpreter."""
    from sae_pipeline.sae.kernels import programs as kernel_programs

    if request.param == "triton-interpreter":
        if not interpreter_works():
            pytest.skip("Triton's CPU interpreter needs triton>=3.9 (installed by .ci/run)")
        monkeypatch.setattr(kernel_programs, "INTERPRET_ON_CPU", True)
    else:
        monkeypatch.setattr(kernel_programs, "triton_usable", lambda tensor: False)
    return request.param
