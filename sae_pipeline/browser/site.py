"""The feature browser's static site, written from the per-condition records (:mod:`sae_pipeline.browser.records`).

Files under the browser folder (names from :data:`sae_pipeline.layout.BROWSER_OUTPUTS`)::

    index.html                    the conditions' stability figures and the searchable, sortable feature list
    feature.html?v=<variant>&f=<id>   one feature page (the same file for every feature)
    data/<variant>/list.js        the condition's feature list, loaded when the condition is picked
    data/<variant>/chunk-<i>.js   ``chunk_size`` feature pages each; a page loads only its own chunk

Every file opens from disk (file:// URLs) with no network: scripts and styles are inlined from
``static/``, and data files are JavaScript assignments loaded by ``<script>`` tags (Chromium blocks
``fetch()`` of local files).
"""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from sae_pipeline.data.atomic import write_text
from sae_pipeline.settings import BrowserSettings

STATIC = Path(__file__).with_name("static")
# Feature-list rows rendered at once (the count above the table says how many matched).
ROWS_SHOWN = 500


def script_literal(value: Any) -> str:
    """``value`` as a JavaScript literal that is safe inside a ``<script>`` element (no ``</`` sequence)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def _page(title: str, site: Mapping[str, Any], body: str, scripts: Sequence[str]) -> str:
    """A complete HTML document with the stylesheet and ``scripts`` (names in ``static/``) inlined."""
    code = "\n".join((STATIC / name).read_text() for name in ("common.js", *scripts))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{(STATIC / 'browser.css').read_text()}</style>"
        f"<script>window.BROWSER_SITE = {script_literal(site)};</script><script>{code}</script></head>\n"
        f"<body>{body}</body></html>\n"
    )


def chunk_pages(pages: Mapping[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Pages split in order into chunks of at most ``chunk_size`` (``{feature id: page}`` each)."""
    items = list(pages.items())
    return [dict(items[start : start + chunk_size]) for start in range(0, len(items), chunk_size)]


def build_site(
    records: Sequence[Mapping[str, Any]], index_path: str | os.PathLike, settings: BrowserSettings | Mapping[str, Any] | None
) -> dict[str, Any]:
    """Write the site beside ``index_path`` from each condition's records (in the order given).

    The ``data/`` folder is rebuilt from scratch (under a temporary name, then renamed), so pages of a
    condition that left the config do not linger. Returns ``{"files", "bytes"}`` of the site (records not counted).
    """
    settings = BrowserSettings.from_mapping(settings)
    root = Path(index_path).parent
    root.mkdir(parents=True, exist_ok=True)
    staging = root / "data.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    conditions = []
    for record in records:
        variant = record["variant"]
        folder = staging / variant
        folder.mkdir(parents=True)
        chunks = chunk_pages(record["pages"], int(settings.chunk_size))
        chunk_of = {feature: number for number, chunk in enumerate(chunks) for feature in chunk}
        page_column = record["list"]["columns"].index("page")
        rows = [[*row[:page_column], chunk_of.get(str(row[0]), -1), *row[page_column + 1 :]] for row in record["list"]["rows"]]
        (folder / "list.js").write_text(
            f"window.BROWSER_LISTS[{script_literal(variant)}] = {script_literal({'columns': record['list']['columns'], 'rows': rows})};\n"
        )
        for number, chunk in enumerate(chunks):
            (folder / f"chunk-{number}.js").write_text(
                f"window.BROWSER_CHUNKS[{script_literal(f'{variant}/{number}')}] = {script_literal(chunk)};\n"
            )
        histogram = record.get("histogram")
        conditions.append(
            {
                "variant": variant,
                "condition": record["condition"],
                "seeds": record["seeds"],
                "reference_seed": record["reference_seed"],
                "success_judge": record.get("success_judge"),
                "summary": record["summary"],
                "histogram": os.path.relpath(histogram, root).replace(os.sep, "/")
                if histogram and Path(histogram).exists()
                else None,
                "n_features": len(rows),
                "chunk_of": chunk_of,
            }
        )
    data = root / "data"
    shutil.rmtree(data, ignore_errors=True)
    staging.rename(data)
    site = {"conditions": conditions, "rows_shown": ROWS_SHOWN}
    index_body = (
        "<h1>Feature browser: SAE features across seeds</h1>"
        '<p>Condition <select id="variant"></select> &nbsp; Search <input id="search" type="search" '
        'placeholder="id, category or words of the explanation"></p><div id="condition"></div><div id="list"></div>'
    )
    write_text(index_path, _page("Feature browser", site, index_body, ["index.js"]))
    write_text(root / "feature.html", _page("Feature", site, '<div id="page">loading...</div>', ["feature.js"]))
    files = [Path(index_path), root / "feature.html", *(path for path in data.rglob("*") if path.is_file())]
    return {"files": len(files), "bytes": sum(path.stat().st_size for path in files)}
