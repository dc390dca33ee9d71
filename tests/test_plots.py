"""Plots that say what they show: shared_fraction.png's x labels do not overlap; all-zero data are named."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from sae_pipeline.report import plots
from sae_pipeline.report.figures import pyplot

VARIANTS = ["topk-k32-l2w0-noreg", "topk-k32-l2w1e-03-noreg", "topk-k32-l2w0-off_support_l11e-03", "topk-k32-l2w0-l1_l2_ratio1e-02"]


def shared_table(fraction: float) -> pd.DataFrame:
    """The regress stage's shared-fraction table for the default experiment's four variants."""
    rows = []
    for variant in VARIANTS:
        condition = variant.split("-", 2)[2].replace("-", "+", 1)
        row = {"variant": variant, "condition": condition}
        for category in ("always", "sometimes", "never"):
            row.update({f"{category}_fraction": fraction, f"{category}_ci_low": fraction, f"{category}_ci_high": fraction})
        rows.append(row)
    return pd.DataFrame(rows)


def test_shared_fraction_x_labels_do_not_overlap():
    figure = plots.shared_fraction_figure(shared_table(0.3))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in figure.axes[0].get_xticklabels()]
    assert len(boxes) == len(VARIANTS)
    overlapping = [(first, second) for first, second in itertools.combinations(range(len(boxes)), 2) if boxes[first].overlaps(boxes[second])]
    pyplot().close(figure)
    assert overlapping == []


@pytest.mark.parametrize("fraction, says_zero", [(0.0, True), (0.25, False)])
def test_an_all_zero_shared_fraction_plot_says_so(fraction, says_zero):
    figure = plots.shared_fraction_figure(shared_table(fraction))
    texts = [text.get_text() for text in figure.axes[0].texts]
    pyplot().close(figure)
    assert ("all shared fractions are 0" in texts) == says_zero


def test_an_all_zero_steering_success_plot_says_so(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: saved.append([text.get_text() for text in figure.axes[0].texts]))
    table = pd.DataFrame({"condition": ["l2w0+noreg", "l2w1e-03+noreg"], "success_rate": [0.0, 0.0], "ci_low": [0.0, 0.0], "ci_high": [0.0, 0.0]})
    plots.plot_steering_success(tmp_path / "steering.png", {"embedding": table, "lm": table})
    assert saved == [["all success rates are 0"]]
