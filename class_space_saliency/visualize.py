"""Overlays, figure grids and plots.

Normalisation of maps for display (``normalization=``):

- ``"minmax"``: ``(s - min) / (max - min)`` per map; the coldest colour is the map's minimum,
  which is *not* zero when the map has negative values.
- ``"symmetric"``: ``0.5 + s / (2 max|s|)``; zero sits at the middle of the colormap, so
  signed maps keep their sign (use a diverging colormap).
- ``"positive"``: ``max(s, 0) / max(s)``; negative evidence is shown as zero.
- ``"auto"`` (default): ``"minmax"`` for maps without negative values, ``"symmetric"`` for
  maps with any, so a negative map is never silently rescaled as if it were non-negative.

A constant map shows as the colormap's lowest colour (or its middle, for ``"symmetric"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch

from ._validation import check_choice

NORMALIZATIONS = ("auto", "minmax", "symmetric", "positive")
ArrayLike = np.ndarray | torch.Tensor


def _numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def image_to_uint8(image: ArrayLike) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3).

    Args:
        image: uint8 array, or float array/tensor in [0, 1]; (H, W), (H, W, 1|3), or a
            channels-first tensor/array (1|3, H, W).

    Raises:
        ValueError: For float values outside [0, 1] (denormalise model inputs first) or an
            unsupported shape.
    """
    array = _numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1|3) or (1|3, H, W), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.min() < -1e-6 or array.max() > 1 + 1e-6:
        raise ValueError(
            f"float images must lie in [0, 1], got range [{array.min():.3g}, {array.max():.3g}]; "
            "pass uint8, or Preprocessing.denormalize(inputs) for model inputs"
        )
    return (array.clip(0, 1) * 255).round().astype(np.uint8)


def normalize_map(saliency: ArrayLike, normalization: str = "auto") -> np.ndarray:
    """Scale a 2-D map to [0, 1] for display (see the module docstring for the rules)."""
    check_choice("normalization", normalization, NORMALIZATIONS)
    values = _numpy(saliency).astype(np.float64)
    values = values.reshape(values.shape[-2:]) if values.ndim > 2 else values
    if values.ndim != 2:
        raise ValueError(f"saliency must be a 2-D map (or (1, h, w)), got shape {values.shape}")
    if normalization == "auto":
        normalization = "symmetric" if values.min() < 0 else "minmax"
    if normalization == "symmetric":
        scale = np.abs(values).max()
        return 0.5 + values / (2 * scale) if scale > 0 else np.full_like(values, 0.5)
    if normalization == "positive":
        values = values.clip(min=0)
        scale = values.max()
        return values / scale if scale > 0 else np.zeros_like(values)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def colormap_names() -> list[str]:
    """The OpenCV colormaps by name (``"jet"``, ``"turbo"``, ``"viridis"``, ...), sorted."""
    return sorted(name[9:].lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


def colorize(values01: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Apply an OpenCV colormap (``"jet"``, ``"turbo"``, ``"viridis"``, ...) -> uint8 RGB."""
    code = getattr(cv2, f"COLORMAP_{colormap.upper()}", None)
    if code is None:
        raise ValueError(
            f"colormap must be an OpenCV colormap name {colormap_names()}, got {colormap!r}"
        )
    bgr = cv2.applyColorMap((values01 * 255).round().astype(np.uint8), code)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def display_range(saliency: ArrayLike, normalization: str = "auto") -> tuple[float, float, str]:
    """Map values shown at the two ends of the colormap, and the scaling used.

    Returns:
        ``(low, high, scaling)`` with ``scaling`` one of ``"minmax"``, ``"symmetric"``,
        ``"positive"`` (``"auto"`` resolved as in :func:`normalize_map`).
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    values = _numpy(saliency).astype(np.float64)
    if normalization == "auto":
        normalization = "symmetric" if values.min() < 0 else "minmax"
    if normalization == "symmetric":
        scale = float(np.abs(values).max())
        return (-scale, scale, normalization)
    if normalization == "positive":
        return (0.0, float(values.clip(min=0).max()), normalization)
    return (float(values.min()), float(values.max()), normalization)


def overlay(
    image: ArrayLike,
    saliency: ArrayLike,
    colormap: str = "jet",
    alpha: float = 0.5,
    normalization: str = "auto",
    box: Sequence[float] | None = None,
) -> np.ndarray:
    """Blend a saliency map of any grid size onto an image.

    Args:
        image: uint8 or [0, 1] float image (see :func:`image_to_uint8`).
        saliency: Map (h, w), (1, h, w) or (1, 1, h, w); bilinearly upsampled to the image
            (or to ``box``).
        colormap: OpenCV colormap name.
        alpha: Weight of the heatmap (0 = image only, 1 = heatmap only).
        normalization: How the map is scaled to the colormap (module docstring).
        box: ``(left, top, right, bottom)`` in image pixels: the region the model saw
            (:meth:`Preprocessing.crop_box`). The map covers that region; the rest of the
            image is shown dimmed. Default: the whole image.

    Returns:
        uint8 RGB array (H, W, 3).

    Example:
        >>> photo = np.zeros((30, 40, 3), np.uint8)  # 40x30 pixels
        >>> maps = torch.rand(1, 1, 4, 4)
        >>> rgb = overlay(photo, maps[0], box=(5, 0, 35, 30))  # box: Preprocessing.crop_box
        >>> rgb.shape, rgb.dtype
        ((30, 40, 3), dtype('uint8'))
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image_to_uint8(image).astype(np.float32)
    height, width = rgb.shape[:2]
    left, top, right, bottom = (0, 0, width, height) if box is None else (round(v) for v in box)
    if not (right > left and bottom > top):
        raise ValueError(f"box must be (left, top, right, bottom) with positive size, got {box}")
    values = normalize_map(saliency, normalization).astype(np.float32)
    values = cv2.resize(values, (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
    heat = colorize(values.clip(0, 1), colormap).astype(np.float32)
    inside = (slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width)))
    heat_inside = heat[inside[0].start - top : inside[0].stop - top,
                       inside[1].start - left : inside[1].stop - left]  # fmt: skip
    blended = rgb * (0.5 if box is not None else 1.0)
    blended[inside] = (1 - alpha) * rgb[inside] + alpha * heat_inside
    return blended.round().clip(0, 255).astype(np.uint8)


def with_colorbar(
    rgb: np.ndarray,
    saliency: ArrayLike,
    colormap: str = "jet",
    normalization: str = "auto",
) -> np.ndarray:
    """Append a colour bar to the right of an overlay, labelled with the map's values.

    The bar is labelled with the values at its ends and the scaling (``minmax``,
    ``symmetric`` or ``positive``, see the module docstring).

    Returns:
        uint8 RGB array (H, W + bar width, 3).
    """
    height = rgb.shape[0]
    low, high, scaling = display_range(saliency, normalization)
    font = max(0.3, min(height / 500, 1.0))
    scale, line = font * 0.5 + 0.05, max(1, round(font * 2))
    labels = ((f"{high:.3g}", int(14 * font) + 2), (f"{low:.3g}", height - 4),
              (scaling, height // 2))  # fmt: skip
    text_w = max(
        cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, line)[0][0] for text, _ in labels
    )  # the widest label fits whole
    bar_w = max(8, height // 40)
    strip = np.full((height, bar_w + text_w + 10, 3), 255, np.uint8)
    ramp = np.linspace(1, 0, height, dtype=np.float32)[:, None].repeat(bar_w, 1)
    strip[:, 3 : 3 + bar_w] = colorize(ramp, colormap)
    for text, y in labels:
        cv2.putText(strip, text, (bar_w + 6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), line,
                    cv2.LINE_AA)  # fmt: skip
    return np.concatenate([rgb, strip], 1)


def _matplotlib_colormap(colormap: str):
    """The OpenCV colormap as a matplotlib colormap (same 256 colours)."""
    from matplotlib.colors import ListedColormap

    ramp = colorize(np.linspace(0, 1, 256, dtype=np.float32)[None], colormap)[0]
    return ListedColormap(ramp / 255.0, name=colormap)


SCALING_NOTES = {
    "minmax": "colours: min to max of the map",
    "symmetric": "colours: symmetric, centre = 0",
    "positive": "colours: 0 to max, negatives shown as 0",
}


def overlay_figure(
    image: ArrayLike,
    saliency: ArrayLike,
    colormap: str = "jet",
    alpha: float = 0.5,
    normalization: str = "auto",
    box: Sequence[float] | None = None,
    title: str | None = None,
):
    """One overlay as a matplotlib figure, with a colour bar in map units and a scaling note.

    Args:
        image: As for :func:`overlay`.
        saliency: As for :func:`overlay`.
        colormap: As for :func:`overlay`.
        alpha: As for :func:`overlay`.
        normalization: As for :func:`overlay`.
        box: As for :func:`overlay`.
        title: Optional title.

    Returns:
        A matplotlib ``Figure`` (shown inline in Jupyter).

    Example:
        >>> photo, maps = np.zeros((30, 40, 3), np.uint8), torch.rand(1, 1, 4, 4)
        >>> figure = overlay_figure(photo, maps[0], box=(5, 0, 35, 30))
        >>> len(figure.axes)  # the overlay and its colour bar
        2
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rgb = overlay(image, saliency, colormap, alpha, normalization, box)
    low, high, scaling = display_range(saliency, normalization)
    figure = plt.figure(figsize=(5.6, 5 * rgb.shape[0] / rgb.shape[1] + 0.5))
    ax, bar_ax = _panels_and_bar(figure, 1, 1, bar_width=0.06)
    ax = ax[0, 0]
    ax.imshow(rgb)
    ax.set_xticks([])
    ax.set_yticks([])
    figure.supxlabel(SCALING_NOTES[scaling], fontsize=7, x=0.01, ha="left")
    if title:
        ax.set_title(title, fontsize=9)
    mappable = ScalarMappable(Normalize(low, high), _matplotlib_colormap(colormap))
    figure.colorbar(mappable, cax=bar_ax, label="map value")
    figure.tight_layout()
    return figure


def _panels_and_bar(figure, rows: int, cols: int, bar_width: float):
    """A ``rows`` x ``cols`` grid of axes and a colour-bar axes beside them (``bar_width``
    of a panel's width), all in one grid spec, so that the layout (``tight_layout``) makes
    room for the bar's tick labels instead of pushing them off the figure."""
    spec = figure.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [bar_width])
    axes = np.array([[figure.add_subplot(spec[r, c]) for c in range(cols)] for r in range(rows)])
    return axes, figure.add_subplot(spec[:, -1])


def saliency_grid(
    images: Sequence[ArrayLike],
    columns: Mapping[str, ArrayLike],
    row_titles: Sequence[str] | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    normalization: str = "auto",
    cell_size: float = 1.6,
    boxes: Sequence[Sequence[float] | None] | None = None,
    caption: str | None = None,
):
    """A figure with one row per image: the original, then one overlay per column.

    Every panel is scaled on its own (see the module docstring); the figure's colour bar
    runs from each panel's low to its high end, panels with symmetric scaling (maps with
    negative values, centre = 0) are marked "±", and a note below says so.

    Args:
        images: Images (see :func:`image_to_uint8`), one per row.
        columns: ``{title: maps}`` where maps is (B, 1, h, w) or (B, h, w) with B rows.
        row_titles: Optional label of each row, e.g. ``"label Coat, pred Shirt ✗"``; say
            in ``caption`` whether the maps explain the label or the prediction.
        colormap: As for :func:`overlay`.
        alpha: As for :func:`overlay`.
        normalization: As for :func:`overlay`.
        cell_size: Inches per panel.
        boxes: Per row, the region of the image that the model saw (see :func:`overlay`),
            or ``None`` for the whole image.
        caption: A line below the grid (before the scaling note), e.g. which class the maps
            explain.

    Returns:
        A matplotlib ``Figure`` (shown inline in Jupyter).

    Example:
        >>> figure = saliency_grid(torch.rand(3, 3, 32, 32), {"random": maps},
        ...                        ["label 0, pred 0"] * 3, caption="maps explain the label")
        >>> len(figure.axes)  # 3 rows x (image + 1 map), and the colour bar
        7
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows, cols = len(images), 1 + len(columns)
    figure = plt.figure(figsize=(cell_size * cols + 0.9, cell_size * rows + 0.5))
    axes, bar_ax = _panels_and_bar(figure, rows, cols, bar_width=0.15)
    for r, image in enumerate(images):
        box = None if boxes is None else boxes[r]
        axes[r, 0].imshow(image_to_uint8(image))
        axes[r, 0].set_ylabel(row_titles[r] if row_titles else "", fontsize=7)
        for c, (title, maps) in enumerate(columns.items(), start=1):
            axes[r, c].imshow(overlay(image, maps[r], colormap, alpha, normalization, box))
            if display_range(maps[r], normalization)[2] == "symmetric":
                axes[r, c].text(0.03, 0.97, "±", transform=axes[r, c].transAxes, fontsize=8,
                                va="top", color="white")  # fmt: skip
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    bar = figure.colorbar(
        ScalarMappable(Normalize(0, 1), _matplotlib_colormap(colormap)), cax=bar_ax,
        ticks=[0, 0.5, 1],
    )  # fmt: skip
    bar.ax.set_yticklabels(["low", "mid", "high"], fontsize=7)
    note = (
        f"each panel scaled on its own ({normalization}): min to max, or symmetric around 0 "
        "where marked ±"
    )
    figure.supxlabel(f"{caption}\n{note}" if caption else note, fontsize=6, x=0.01, ha="left")
    figure.tight_layout()
    return figure


def plot_identifiability(result, ax=None):
    """Plot identifiability rate (%) and mean normalised rank by block.

    Args:
        result: An :class:`~class_space_saliency.analysis.Identifiability`.
        ax: Optional matplotlib Axes (a new figure otherwise).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    blocks = list(result.layers)  # numbered from 0, as the API's layer=
    ax.plot(blocks, result.token_rate, "o-", label="image tokens: top-1 = label (%)")
    if result.cls_rate is not None:
        ax.plot(blocks, result.cls_rate, "s-", label="[CLS]: top-1 = label (%)")
    ax.set_xlabel("layer (block index, from 0)")
    ax.set_ylabel("identifiability rate (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(blocks)
    twin = ax.twinx()
    twin.plot(blocks, result.token_rank, "o--", color="tab:gray", label="image tokens: rank")
    twin.set_ylabel("mean normalised rank of label")
    twin.set_ylim(0, 1.02)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower right")
    ax.set_title(f"class identifiability ({result.component}, {result.num_images} images)")
    ax.figure.tight_layout()
    return ax.figure


def save_figure(figure, path) -> None:
    """Save a figure as PNG (150 dpi) and close it."""
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=150)
    plt.close(figure)
