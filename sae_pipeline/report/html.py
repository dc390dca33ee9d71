"""Markdown to a standalone HTML page (Python-Markdown with tables), so the Snakemake report shows the
summary inline. Raw HTML in the text is escaped, not passed through."""

from __future__ import annotations

import html

import markdown

STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:0.5em 0 1em}th,td{border:1px solid #bbb;padding:3px 7px;font-size:0.9em}"
    "th{background:#eee}code{background:#f4f4f4}"
)


def markdown_to_html(text: str, title: str) -> str:
    """A complete HTML page of ``text`` (headings, pipe tables, lists, paragraphs, emphasis, code)."""
    converter = markdown.Markdown(extensions=["tables"], output_format="html")
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(text)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n'
        f"{body}\n</body></html>\n"
    )
