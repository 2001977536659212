"""Figures a reader can read: colour-bar labels inside the picture, and titles that say whether
a map explains the label or the prediction (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from class_space_saliency import visualize
from class_space_saliency.visualize import overlay, overlay_figure, saliency_grid, with_colorbar


def overshoot(figure) -> float:
    """How far (inches) what the figure draws reaches beyond its canvas; 0 when it fits.

    ``Figure.get_tightbbox`` bounds every drawn artist (tick labels, titles, the colour bar's
    labels), as ``savefig(bbox_inches="tight")`` would crop to.
    """
    figure.canvas.draw()
    drawn = figure.get_tightbbox(figure.canvas.get_renderer())
    canvas = figure.bbox_inches
    return max(0.0, -drawn.x0, -drawn.y0, drawn.x1 - canvas.x1, drawn.y1 - canvas.y1)


@pytest.mark.parametrize("columns", [1, 6, 9])
def test_saliency_grid_keeps_every_label_inside(columns):
    images = torch.rand(4, 3, 32, 32)
    maps = {f"layer {k}": torch.randn(4, 1, 4, 4) for k in range(columns)}
    titles = ["label Trouser\npred Dress ✗"] * 4
    figure = saliency_grid(images, maps, titles, caption="maps explain the label")
    assert overshoot(figure) < 0.01
    bar = figure.axes[-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["low", "mid", "high"]
    assert figure.texts[0].get_text().startswith("maps explain the label\neach panel scaled")


def test_overlay_figure_keeps_the_colour_bar_and_its_label_inside():
    for scale in (1e-5, 1.0, 1e4):  # offset text, short and long tick labels
        saliency = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * scale
        figure = overlay_figure(np.zeros((30, 40, 3), np.uint8), saliency, title="t")
        assert overshoot(figure) < 0.01, scale
    assert figure.axes[1].get_ylabel() == "map value"


@pytest.mark.parametrize("height", [40, 160, 230, 489, 1000])
def test_the_overlay_colour_strip_is_wide_enough_for_its_labels(height):
    rgb = np.full((height, 50, 3), 128, np.uint8)
    saliency = torch.tensor([[-1.234e-5, 2.0e-6], [3.0e-6, 0.0]])  # labels -1.23e-05, symmetric
    strip = with_colorbar(overlay(rgb, saliency), saliency)[:, 50:]
    ink = (strip.min(-1) < 200).any(0)  # columns with something drawn
    start = np.flatnonzero(ink)[0]  # the colour ramp, then a gap, then the labels
    ramp_end = start + np.flatnonzero(~ink[start:])[0]
    assert ink[ramp_end:].any()  # the labels are drawn
    assert not ink[-3:].any()  # and end before the right edge


def test_demo_rows_say_label_and_prediction(tmp_path, monkeypatch):
    from class_space_saliency.cli import main

    calls = []
    original = visualize.saliency_grid

    def recording(images, columns, row_titles=None, *args, **kwargs):
        calls.append((list(row_titles), kwargs.get("caption")))
        return original(images, columns, row_titles, *args, **kwargs)

    monkeypatch.setattr(visualize, "saliency_grid", recording)
    assert main(["demo", "--out", str(tmp_path), "--methods", "sobel"]) == 0
    examples = json.loads((tmp_path / "summary.json").read_text())["examples"]
    assert len(calls) == 2  # class_space_layers.png and methods.png
    for titles, caption in calls:
        assert caption == "maps explain the label (target = label); ✗ = misclassified"
        for title, example in zip(titles, examples, strict=True):
            wrong = example["label"] != example["predicted"]
            assert title == (
                f"label {example['label']}\npred {example['predicted']}" + (" ✗" if wrong else "")
            )
    assert any("✗" in title for title in calls[0][0])  # the embedded model errs on some rows
