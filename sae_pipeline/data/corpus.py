"""Text corpora, read through the Hugging Face ``datasets`` library.

Offline default: the King James Bible (1611; public domain) as printed by Debian's ``bible-kjv``
program (package ``bible-kjv``, text in ``bible-kjv-text``), one document per chapter (1,189
documents, about 4.3 MB, 0.8 M words). :func:`sae_pipeline.stages.export_corpus.export_documents` writes such local documents to a
JSON-lines file that :func:`load_documents` then streams through ``datasets``; ``hf_dataset`` streams a
Hub dataset such as ``monology/pile-uncopyrighted`` (the paper's text) through the same function.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from sae_pipeline.settings import CorpusSettings

KJV_RANGE = "Genesis 1:1-Revelation 22:21"
_CHAPTER_HEADER = re.compile(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$")
_VERSE_START = re.compile(r"^(?:\s+\d+|[1-3]?[A-Z][a-z]*\d+:\d+)\s+")


def kjv_chapters(command: str = "bible") -> list[str]:
    """The King James Bible as a list of chapters (verse numbers removed, lines joined).

    Raises:
        FileNotFoundError: when the Debian ``bible-kjv`` program is not installed.
    """
    if shutil.which(command) is None:
        raise FileNotFoundError(
            f"corpus.kjv_command {command!r} not found: install Debian's bible-kjv (`apt-get install bible-kjv`) "
            "or set corpus.source to text_files / hf_dataset"
        )
    text = subprocess.run([command, KJV_RANGE], check=True, capture_output=True, text=True).stdout
    chapters: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if len(lines) == 1 and _CHAPTER_HEADER.match(lines[0].strip()):
            chapters.append("")
            continue
        verses = " ".join(_VERSE_START.sub("", line).strip() for line in lines)
        if not chapters:
            chapters.append("")
        chapters[-1] = (chapters[-1] + " " + verses).strip()
    return [chapter for chapter in chapters if chapter]


def text_file_documents(paths: Iterable[str]) -> list[str]:
    """Documents from plain-text files: each blank-line separated block is one document."""
    documents: list[str] = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"corpus.text_files: {path} does not exist")
        for block in re.split(r"\n\s*\n", Path(path).read_text(encoding="utf-8", errors="replace")):
            block = " ".join(block.split())
            if block:
                documents.append(block)
    return documents


def load_documents(settings: CorpusSettings | Mapping[str, Any], local_path: str | os.PathLike | None = None) -> Iterator[str]:
    """Stream document texts through ``datasets``: the exported local file, or the configured Hub dataset."""
    import datasets

    settings = CorpusSettings.from_mapping(settings)
    if settings.source == "hf_dataset":
        hub = settings.hf_dataset
        dataset = datasets.load_dataset(hub.path, hub.name, split=hub.split, streaming=hub.streaming)
        field = hub.text_field
    else:
        if local_path is None:
            raise ValueError("load_documents: a local corpus needs the exported documents file")
        dataset = datasets.load_dataset("json", data_files=str(local_path), split="train", streaming=True)
        field = "text"
    limit = settings.max_documents
    for index, record in enumerate(dataset):
        if limit and index >= int(limit):
            return
        yield record[field]


def is_heldout(document_index: int, heldout_fraction: float) -> bool:
    """Deterministic held-out split: document ``i`` is held out when a hash of ``i`` falls below the fraction."""
    return ((document_index * 2654435761) % 2**32) / 2**32 < heldout_fraction


def pack_sequences(token_lists: Iterable[list[int]], context_size: int, bos_token_id: int, max_sequences: int | None = None) -> "Any":
    """Pack tokenized documents into fixed-length sequences that start with BOS.

    Documents are concatenated with ``bos_token_id`` between them (Pythia's ``<|endoftext|>`` serves as
    both BOS and document separator) and cut into chunks of ``context_size - 1`` tokens, each prefixed
    with BOS. Returns int32 ``[n_sequences, context_size]``; a trailing partial chunk is dropped.
    """
    import numpy as np

    body = context_size - 1
    sequences: list[np.ndarray] = []
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(tokens)
        buffer.append(bos_token_id)
        while len(buffer) >= body:
            sequences.append(np.asarray([bos_token_id] + buffer[:body], dtype=np.int32))
            del buffer[:body]
            if max_sequences is not None and len(sequences) >= max_sequences:
                return np.stack(sequences)
    if not sequences:
        return np.zeros((0, context_size), dtype=np.int32)
    return np.stack(sequences)
