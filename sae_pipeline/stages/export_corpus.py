"""Export-corpus stage: a local corpus written as JSON lines, one document per line."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from sae_pipeline.data.atomic import atomic_path
from sae_pipeline.data.corpus import fortune_documents, interleaved, kjv_chapters, text_file_documents, wordnet_documents
from sae_pipeline.settings import CorpusSettings


def export_documents(settings: CorpusSettings | Mapping[str, Any], output_path: str | os.PathLike) -> int:
    """Write a local corpus (``wordnet_fortunes``, ``kjv`` or ``text_files``) as JSON lines ``{"text": ...}``; returns the count."""
    settings = CorpusSettings.from_mapping(settings)
    source = settings.source
    if source == "wordnet_fortunes":
        english = settings.wordnet_fortunes
        documents = interleaved(
            wordnet_documents(english.wordnet_dir, english.synsets_per_document)
            + fortune_documents(english.fortunes_dir, english.fortune_document_chars, english.include_third_party_quotes),
            english.shuffle_seed,
        )
    elif source == "kjv":
        documents = kjv_chapters(settings.kjv_command)
    elif source == "text_files":
        documents = text_file_documents(settings.text_files)
    else:
        raise ValueError(f"export_documents: corpus.source {source!r} is not a local corpus")
    limit = settings.max_documents
    documents = documents[: int(limit)] if limit else documents
    if not documents:
        raise ValueError(f"corpus.source {source!r} produced no documents")
    with atomic_path(output_path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            for document in documents:
                stream.write(json.dumps({"text": document}) + "\n")
    return len(documents)
