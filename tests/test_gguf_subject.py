"""A real GGUF (tiny random Gemma-3, written in the test) through the subject-model preparation, and
KV-cached steered generation on the Gemma architecture equal to generation without a cache."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from sae_pipeline.subject.gguf import gguf_to_hf_folder
from sae_pipeline.subject.model import load_subject_model, pass_cache_to_attention
from sae_pipeline.subject.steering import SamplingSettings, generate_continuations
from tests.tiny_gguf import TINY, write_tiny_gguf

pytest.importorskip("gguf")
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
HOOK = "blocks.3.hook_resid_post"
# lengths 5..11 around the sliding window (8); 20 new tokens run past it
PROMPTS = [[2, 294, 282, 279, 271], [2, 274, 301, 280, 290, 262, 270, 281, 299, 300, 277], [2, 300, 299, 298, 297, 296, 295, 294]]
GREEDY = SamplingSettings(greedy=True)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gemma")
    weights = write_tiny_gguf(root / "tiny.gguf", seed=1)
    description = gguf_to_hf_folder(root / "tiny.gguf", root / "hf")
    return weights, root / "hf", description


def test_gguf_becomes_a_plain_hf_folder(tiny_gemma):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights, folder, description = tiny_gemma
    assert description["n_layers"] == TINY["layers"] and description["d_model"] == TINY["hidden"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    for name, value in weights.items():  # the Q8_0 matrices come back as their dequantized values
        np.testing.assert_allclose(state[name].numpy(), value, atol=1e-6, err_msg=name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the cat sat.")["input_ids"]
    assert ids[0] == 2 and tokenizer.decode(ids, skip_special_tokens=True) == "the cat sat."
    bridge = load_subject_model(str(folder), "cpu")
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens, return_type="logits"), model(tokens).logits, atol=1e-4, rtol=1e-4)


def _uncached_generation(bridge, prompts, new_tokens, vectors):
    """Greedy reference without a cache: the full sequence every step, the vector on every position
    from the prompt's last token on (what newest-position steering with a cache amounts to)."""
    rows = []
    for index, prompt in enumerate(prompts):
        tokens = list(prompt)

        def steer(activation, hook, start=len(prompt) - 1, vector=None if vectors is None else vectors[index]):
            if vector is None:
                return activation
            steered = activation.clone()
            steered[:, start:, :] += vector.to(activation.dtype)
            return steered

        generated = []
        with torch.no_grad(), bridge.hooks(fwd_hooks=[(HOOK, steer)]):
            for _ in range(new_tokens):
                logits = bridge(torch.tensor([tokens]), return_type="logits")
                token = int(logits[0, -1].argmax())
                generated.append(token)
                tokens.append(token)
        rows.append(generated)
    return torch.tensor(rows)


@pytest.mark.parametrize("steered", [False, True])
def test_cached_generation_equals_uncached_on_gemma(tiny_gemma, steered):
    bridge = load_subject_model(str(tiny_gemma[1]), "cpu")
    assert pass_cache_to_attention(bridge) == 0  # load_subject_model already wrapped every block
    vectors = torch.randn(len(PROMPTS), TINY["hidden"], generator=torch.Generator().manual_seed(0)) if steered else None
    generation = generate_continuations(bridge, HOOK, PROMPTS, 20, GREEDY, vectors, pad_token_id=0, return_logits=True)
    cached = generation.tokens
    assert torch.equal(cached, _uncached_generation(bridge, PROMPTS, 20, vectors))
    assert sum(len(set(row.tolist())) for row in cached) > len(PROMPTS)  # not one repeated token per row
    if steered:  # the hook acted
        unsteered = generate_continuations(bridge, HOOK, PROMPTS, 20, GREEDY, None, pad_token_id=0, return_logits=True)
        assert (generation.logits - unsteered.logits).abs().amax() > 1.0


def test_without_the_adapter_the_cache_stays_empty_and_generation_says_so(tiny_gemma):
    """The TransformerLens 4.3 / transformers 5.24 mismatch the adapter mends, caught rather than silent."""
    import inspect

    from transformer_lens.model_bridge import TransformerBridge
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    if "cache" not in inspect.signature(Gemma3DecoderLayer.forward).parameters:
        pytest.skip("this transformers passes past_key_values=, which TransformerLens reads")
    bridge = TransformerBridge.boot_transformers(str(tiny_gemma[1]), device="cpu", dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="does not update it"):
        generate_continuations(bridge, HOOK, PROMPTS, 4, GREEDY, pad_token_id=0)
