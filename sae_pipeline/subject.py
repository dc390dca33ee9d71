"""The subject model: loading it through TransformerLens's ``TransformerBridge``, and training the
small offline GPT-NeoX that the default experiment uses in place of Pythia.

``load_subject_model`` accepts a Hugging Face Hub id (``EleutherAI/pythia-70m-deduped``, needs the
Hub) or a local Hugging Face folder (what :func:`train_subject_model` writes); both go through
``TransformerBridge.boot_transformers``.
"""

from __future__ import annotations

import re
from typing import Any

import torch


def hook_layer(hook_name: str) -> int:
    """Block index of a ``blocks.<i>.hook_*`` name, e.g. ``blocks.3.hook_resid_post`` -> 3."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_[a-z_]+", hook_name)
    if match is None:
        raise ValueError(f"hook name {hook_name!r} is not of the form blocks.<i>.hook_<name>")
    return int(match.group(1))


def load_subject_model(model_ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Boot a ``TransformerBridge`` from a Hub id or a local Hugging Face folder, in eval mode on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(model_ref, device=device, dtype=dtype)
    except OSError as error:
        raise OSError(
            f"could not load subject model {model_ref!r}: {error}. A Hub id needs network access to the "
            "Hugging Face Hub (or a warm HF cache); offline, use subject_model.source: train_local."
        ) from error
    bridge.eval()
    return bridge


def bos_token_id(bridge: Any) -> int:
    """The token id the pipeline puts at position 0 of every sequence."""
    tokenizer = bridge.tokenizer
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the subject model's tokenizer has neither a BOS nor an EOS token")
    return int(token_id)
