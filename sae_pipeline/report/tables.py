"""Markdown tables and interval formatting for the results summary, and lookups in result tables."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd


def format_interval(value: Any, low: Any = None, high: Any = None, digits: int = 3) -> str:
    """``0.123 [0.100, 0.150]``; ``n/a`` for a missing value; the bracket is left out when the interval is missing."""

    def finite(number: Any) -> bool:
        return number is not None and not (isinstance(number, float) and math.isnan(number)) and not pd.isna(number)

    if not finite(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    if finite(low) and finite(high):
        text += f" [{float(low):.{digits}f}, {float(high):.{digits}f}]"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def digits_cell_row(table: pd.DataFrame, penalty: str, tied: bool, unit: bool) -> pd.Series | None:
    """The row of the digits stability table for one (penalty, tied init, unit norm) cell, or None."""
    found = table[(table["weight_penalty"] == penalty) & (table["tied_init"] == tied) & (table["unit_norm_decoder"] == unit)]
    return found.iloc[0] if len(found) else None
