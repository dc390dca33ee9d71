"""A tiny random-weight Gemma-3 GGUF file, written with the ``gguf`` package, for CPU tests.

It has the real file's layout: architecture ``gemma3``, llama.cpp tensor names (``token_embd``,
``blk.N.attn_q`` ...), norm weights stored as ``1 + w`` (llama.cpp's Gemma convention, which
transformers' loader undoes), tied embeddings (no ``output.weight``), a sentencepiece-style
``llama`` vocabulary (specials, 256 byte tokens, a few pieces) and one quantized type (Q8_0) beside
F32, so the loader's dequantization path runs. Writing and loading it back takes about a second.

    from tests.tiny_gguf import write_tiny_gguf
    weights = write_tiny_gguf("t/tiny.gguf")   # HF-named float32 reference weights
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(hidden=64, layers=6, heads=2, kv_heads=1, head_dim=32, ffn=128, context=256, sliding_window=8)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma
PIECES = ["▁", "▁t", "▁th", "▁the", "▁a", "▁an", "▁and", "▁o", "▁of", "▁c", "▁ca", "▁cat", "▁s", "▁sa", "▁sat"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [".", ",", "!", "?"]


def tiny_vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their GGUF token types (3 control, 2 unknown, 6 byte, 1 normal)."""
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES + LETTERS
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(PIECES) + len(LETTERS))
    return tokens, types


def hf_reference_weights(vocab: int, seed: int = 0, branch_gain: float = 4.0, **sizes) -> dict[str, np.ndarray]:
    """Random Gemma3ForCausalLM weights in HF names and layout ([out, in]), float32.

    ``branch_gain`` scales the post-attention / post-MLP norms so the blocks, not the (sqrt(d)-scaled)
    token embedding, dominate the residual stream; otherwise a random tied model just predicts its
    input token and greedy generation repeats one token, which tests nothing.
    """
    s = {**TINY, **sizes}
    rng = np.random.default_rng(seed)
    d, hd, q, kv, f = s["hidden"], s["head_dim"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["ffn"]

    def mat(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(n):  # HF Gemma norms scale by (1 + w)
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((vocab, d))).astype(np.float32), "model.norm.weight": norm(d)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d) + branch_gain - 1,
            p + "pre_feedforward_layernorm.weight": norm(d), p + "post_feedforward_layernorm.weight": norm(d) + branch_gain - 1,
            p + "self_attn.q_proj.weight": mat(q, d), p + "self_attn.k_proj.weight": mat(kv, d),
            p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.o_proj.weight": mat(d, q),
            p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d), p + "mlp.down_proj.weight": mat(d, f),
        })
    return w


def write_tiny_gguf(path: str | Path, seed: int = 0, quantize_q8: bool = True, **sizes) -> dict[str, np.ndarray]:
    """Write the tiny GGUF to ``path``; return the HF-named weights transformers should load back.

    Matrices are stored as Q8_0 when ``quantize_q8`` (the returned weights are then the dequantized
    values, so a loader round trip must reproduce them exactly), norms and the embedding as F32.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    s = {**TINY, **sizes}
    tokens, types = tiny_vocabulary()
    weights = hf_reference_weights(len(tokens), seed, **sizes)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, s["layers"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3-test")
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_key_length(s["head_dim"])
    writer.add_value_length(s["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(s["sliding_window"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize_q8 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 260)])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)

    for hf_name, value in weights.items():
        module, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(module)}.{suffix}"
        if hf_name.endswith("norm.weight"):
            writer.add_tensor(gguf_name, value + 1.0)  # llama.cpp stores Gemma norms as 1 + w
        elif quantize_q8 and value.ndim == 2 and "embed_tokens" not in hf_name:
            packed = quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weights[hf_name] = dequantize(packed, gguf.GGMLQuantizationType.Q8_0).reshape(value.shape)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
