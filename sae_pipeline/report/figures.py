"""Writing figures: matplotlib without a display, laid out, saved atomically as PNG, closed."""

from __future__ import annotations

import os
from typing import Any

from sae_pipeline.data.atomic import atomic_path

DPI = 120


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Lay out ``figure``, write it to ``path`` as PNG (temporary name, then renamed) and close it."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    pyplot().close(figure)


def no_data_figure(path: str | os.PathLike, title: str, message: str) -> None:
    """A figure that says plainly that there is nothing to plot (so a report item always exists)."""
    figure, axis = pyplot().subplots(figsize=(6, 2.5))
    axis.axis("off")
    axis.set_title(title)
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    save_figure(figure, path)
