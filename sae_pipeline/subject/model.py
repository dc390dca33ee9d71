"""The subject model: loading it through TransformerLens's ``TransformerBridge``, its hooks, and the
cross-entropy loss with an activation replaced (CE-loss recovered).

``load_subject_model`` accepts a Hugging Face Hub id (``EleutherAI/pythia-70m-deduped``, needs the
Hub) or a local Hugging Face folder (what the subject-model stage writes); both go through
``TransformerBridge.boot_transformers``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch


def hook_layer(hook_name: str) -> int:
    """Block index of a ``blocks.<i>.hook_*`` name, e.g. ``blocks.3.hook_resid_post`` -> 3."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_[a-z_]+", hook_name)
    if match is None:
        raise ValueError(f"hook name {hook_name!r} is not of the form blocks.<i>.hook_<name>")
    return int(match.group(1))


def load_subject_model(model_ref: str, device: str = "cpu", dtype: torch.dtype | str = torch.float32) -> Any:
    """Boot a ``TransformerBridge`` from a Hub id or a local Hugging Face folder, in eval mode on ``device``.

    ``dtype`` is a torch dtype or its name (``float32``, ``bfloat16``, ``float16``). The bridge's
    attention is made to read the key/value cache transformers passes (:func:`pass_cache_to_attention`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        bridge = TransformerBridge.boot_transformers(model_ref, device=device, dtype=dtype)
    except OSError as error:
        raise OSError(
            f"could not load subject model {model_ref!r}: {error}. A Hub id needs network access to the "
            "Hugging Face Hub (or a warm HF cache); offline, use subject_model.source: gguf or train_local."
        ) from error
    bridge.eval()
    pass_cache_to_attention(bridge)
    return bridge


def pass_cache_to_attention(bridge: Any) -> int:
    """Make every block's attention read the key/value cache under the name transformers passes it.

    transformers 5.24 decoder layers (Gemma, Llama, Qwen...; not GPT-NeoX) call their attention with
    ``cache=``; TransformerLens 4.3's ``AttentionBridge._update_kv_cache`` reads only
    ``past_key_values`` / ``layer_past``, so the cache stays empty and every generation step attends
    to itself alone (Gemma's output degenerates). This wraps each attention bridge's ``forward``
    (per instance, no library edit) to hand ``cache`` over as ``past_key_values`` as well. Harmless
    where the name is already right; idempotent. Returns how many modules it wrapped.
    """
    wrapped = 0
    for block in bridge.blocks:
        attention = block.attn
        if getattr(attention, "_reads_cache_argument", False):
            continue
        original_forward = attention.forward

        def forward(*args: Any, _original: Any = original_forward, **kwargs: Any) -> Any:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _original(*args, **kwargs)

        # nn.Module.__setattr__ would refuse a plain function: set it on the instance directly
        object.__setattr__(attention, "forward", forward)
        object.__setattr__(attention, "_reads_cache_argument", True)
        wrapped += 1
    return wrapped


def bos_token_id(bridge: Any) -> int:
    """The token id the pipeline puts at position 0 of every sequence."""
    tokenizer = bridge.tokenizer
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the subject model's tokenizer has neither a BOS nor an EOS token")
    return int(token_id)


def ce_loss_with_replacement(
    bridge: Any,
    tokens: torch.Tensor,
    hook_name: str,
    replace_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    batch_size: int = 32,
    keep_first_position: bool = True,
) -> float:
    """Mean next-token cross-entropy (nats/token) of the subject model with the activation at ``hook_name`` replaced.

    Args:
        bridge: a ``TransformerBridge`` (see :func:`load_subject_model`).
        tokens: ``[n_sequences, seq_len]`` token ids (position 0 is the BOS token, as in the cache).
        hook_name: e.g. ``blocks.2.hook_resid_post``.
        replace_fn: maps the hook activation ``[batch, seq_len, d_model]`` to its replacement (same shape),
            e.g. an SAE reconstruction or ``torch.zeros_like`` (zero ablation); None gives the clean loss.
        batch_size: sequences per forward pass.
        keep_first_position: leave the position-0 (BOS) activation unchanged, as SAEs are trained without
            BOS rows; every other position gets the replacement.

    Returns:
        The cross-entropy averaged over all ``n_sequences * (seq_len - 1)`` predicted tokens.
    """

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        replacement = replace_fn(activation).to(activation.dtype)
        if keep_first_position:
            replacement = torch.cat([activation[:, :1], replacement[:, 1:]], dim=1)
        return replacement

    device = next(bridge.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
            hooks = [(hook_name, hook)] if replace_fn is not None else []
            per_token = bridge.run_with_hooks(batch, fwd_hooks=hooks, return_type="loss", loss_per_token=True)
            total_loss += float(per_token.double().sum())
            total_tokens += per_token.numel()
    if total_tokens == 0:
        raise ValueError("ce_loss_with_replacement: no tokens to predict (need sequences of length >= 2)")
    return total_loss / total_tokens


def ce_loss_recovered(clean_loss: float, replaced_loss: float, zero_ablation_loss: float) -> float:
    """Share of the zero-ablation loss increase that the replacement recovers: (zero - replaced) / (zero - clean).

    1 means the replacement is as good as the clean activation, 0 as bad as zeroing it. Returns NaN when
    zero ablation does not change the loss (the ratio is undefined).
    """
    gap = zero_ablation_loss - clean_loss
    if abs(gap) < 1e-12:
        return float("nan")
    return (zero_ablation_loss - replaced_loss) / gap
