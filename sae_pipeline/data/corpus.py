"""Text corpora, read through the Hugging Face ``datasets`` library.

Local sources, written to a JSON-lines file by :func:`sae_pipeline.stages.export_corpus.export_documents`
and streamed by :func:`load_documents`:

- ``wordnet_fortunes`` (the default experiment's modern English): the glosses and example sentences
  of WordNet 3.0 (Debian ``wordnet-base``; Princeton's licence allows use, copying and distribution
  for any purpose with its notice) and the fortune-cookie files of Debian ``fortunes`` (BSD-licensed
  compilation; the quote files of copyrighted works are left out by default), interleaved.
- ``kjv``: the King James Bible (1611; public domain) as printed by Debian's ``bible-kjv`` program,
  one document per chapter (1,189 documents, about 4.3 MB, 0.8 M words); the tiny test experiment's text.
- ``text_files``: any plain-text files, one document per blank-line separated block.

``hf_dataset`` streams a Hub dataset such as ``monology/pile-uncopyrighted`` (the paper's text)
through the same function.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from sae_pipeline.data.wordnet import WORDNET_LEXICOGRAPHER_FILES
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


# Fortune files that are pictures rather than prose.
FORTUNE_PICTURES = ("art", "ascii-art", "translate-me")
# Fortune files made mostly of quotations from copyrighted works: left out unless asked for.
FORTUNE_THIRD_PARTY_QUOTES = ("pratchett", "songs-poems", "startrek", "literature", "humorists", "zippy")


def wordnet_documents(wordnet_dir: str | os.PathLike, synsets_per_document: int) -> list[str]:
    """WordNet glosses as documents: one line ``lemma, lemma: definition; "example"`` per synset, synsets
    grouped by lexicographer file (animals, food, motion verbs...), ``synsets_per_document`` to a document.

    Raises:
        FileNotFoundError: when Debian's ``wordnet-base`` data files are missing.
    """
    root = Path(wordnet_dir)
    groups: dict[str, list[str]] = {}
    for part_of_speech in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{part_of_speech}"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: install Debian's wordnet-base (`apt-get install -y wordnet-base`) or set corpus.source")
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header's lines start with two spaces
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lemmas = [re.sub(r"\(.*\)$", "", parts[4 + 2 * index]).replace("_", " ") for index in range(int(parts[3], 16))]
            groups.setdefault(WORDNET_LEXICOGRAPHER_FILES[int(parts[1])], []).append(f"{', '.join(dict.fromkeys(lemmas))}: {gloss.strip()}")
    return ["\n".join(entries[start : start + synsets_per_document]) for entries in groups.values() for start in range(0, len(entries), synsets_per_document)]


def fortune_documents(fortunes_dir: str | os.PathLike, document_chars: int, include_third_party_quotes: bool) -> list[str]:
    """Fortune cookies as documents: each cookie file cut into runs of whole cookies of about ``document_chars`` characters.

    Raises:
        FileNotFoundError: when Debian's ``fortunes`` files are missing.
    """
    root = Path(fortunes_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: install Debian's fortunes (`apt-get install -y fortunes`) or set corpus.source")
    left_out = set(FORTUNE_PICTURES) | (set() if include_third_party_quotes else set(FORTUNE_THIRD_PARTY_QUOTES))
    documents = []
    for path in sorted(root.iterdir()):
        if path.suffix or not path.is_file() or path.name in left_out:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        cookies = [re.sub(r"\n\s*\n", "\n", cookie.strip("\n")).strip() for cookie in re.split(r"^%$", text, flags=re.M)]
        current: list[str] = []
        for cookie in filter(None, cookies):
            current.append(cookie)
            if sum(len(piece) for piece in current) >= document_chars:
                documents.append("\n".join(current))
                current = []
        if current:
            documents.append("\n".join(current))
    return documents


def interleaved(documents: list[str], seed: int) -> list[str]:
    """``documents`` in a fixed pseudo-random order (so any prefix of the corpus mixes every source)."""
    order = np.random.default_rng(seed).permutation(len(documents))
    return [documents[index] for index in order]


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
