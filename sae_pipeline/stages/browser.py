"""Browser stage: the static feature browser (:mod:`sae_pipeline.browser`).

Two rules: ``browser_condition`` gathers one variant's feature records (mining the contexts of the
features with a page and of their partners from the activation cache) into ``records/<variant>.json``;
``browser`` writes the site (``index.html``, ``feature.html``, ``data/``) from every variant's records.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from sae_pipeline.browser.records import gather_records, mine_page_contexts
from sae_pipeline.browser.site import build_site
from sae_pipeline.data.atomic import write_text
from sae_pipeline.settings import BrowserSettings

logger = logging.getLogger(__name__)


def run_browser_condition(
    inputs: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    records_path: str | os.PathLike,
    settings: BrowserSettings | Mapping[str, Any] | None,
    mining: Mapping[str, Any] | None,
    judges: Sequence[str],
) -> dict[str, Any]:
    """The ``browser_condition`` rule: write one variant's records (``inputs``: ``Experiment.browser_inputs`` plus ``variant``).

    ``mining`` is the ``autointerp.mining`` section (context windows, batch size, device); ``judges`` is ``steer.judges``.
    """
    settings = BrowserSettings.from_mapping(settings)
    started = time.perf_counter()
    records = gather_records(inputs, settings, judges, mine_page_contexts(str(cache_dir), mining, settings))
    write_text(records_path, json.dumps(records, ensure_ascii=False, separators=(",", ":")))
    logger.info(
        "browser: %d features, %d pages of %s in %.1f s",
        len(records["list"]["rows"]),
        len(records["pages"]),
        inputs["variant"],
        time.perf_counter() - started,
    )
    return records


def run_browser(
    records_paths: Sequence[str | os.PathLike],
    index_path: str | os.PathLike,
    settings: BrowserSettings | Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``browser`` rule: the site from every variant's records, in the order given. Returns its files and bytes."""
    started = time.perf_counter()
    written = build_site([json.loads(Path(path).read_text()) for path in records_paths], index_path, settings)
    logger.info(
        "browser: %d files, %.1f MB in %.1f s; open %s",
        written["files"],
        written["bytes"] / 1e6,
        time.perf_counter() - started,
        index_path,
    )
    return written
