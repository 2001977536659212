"""Linear probes against the class-space projection (Vilas et al. 2023, Sec. 5; official
``src/linear_probing/prober.py`` and ``src/plots/linear_probing.py``).

A ridge probe per block, component and token position is fitted on one data set with ``±1``
one-vs-rest targets (the official ``Ridge(alpha=1, solver='lsqr')`` on ``target = -1;
target[label] = 1``, with an unpenalised intercept) and scored by top-1 accuracy on another,
side by side with the class-space projection's top-1 on the same tokens, which needs no
training. A *pooled* probe per block and component, fitted on the image tokens of every
position, also gives a data-efficiency curve: probes fitted on the first 1, 2, 5, 10, ...
training images of each class.

**Memory.** The fit never stores token states: it accumulates the normal equations
``[X 1]^T [X 1]`` and ``[X 1]^T Y`` per block, component and position (float64), from which the
ridge solution with intercept is exact: ``W = (X_c^T X_c + alpha I)^{-1} X_c^T Y_c`` on
centred ``X_c, Y_c``, ``b = mean(Y) - mean(X) W``. This is the minimiser that sklearn's
``lsqr`` solver approaches iteratively (to its tolerance). Memory is
``blocks x components x (positions + 1 + curve sizes) x (D + 1) x (D + 1 + C)`` floats plus one
batch of token states, whatever the number of images (ViT-B/32, every position: about 9 GB, so
choose ``positions``, ``layers`` or ``components`` there).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validation import check_choice
from ..adapters import UnsupportedModelError
from ..anatomy import COMPONENTS, ViTAnatomy
from ..probing import POOLED, LinearProbes
from ._result import AnalysisResult, json_safe, markdown_table
from ._stream import Data, stream
from .identifiability import _as_anatomy, _check_components

CURVE_SIZES = (1, 2, 5, 10, 20, 50, 100)
"""Training images per class of the data-efficiency curve's probes."""

POSITION_CHOICES = ("all", "tokens", POOLED)
"""``positions`` shorthands: every token position and pooled, every token position, pooled."""


def ridge_from_normal_equations(
    gram: torch.Tensor, cross: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalised intercept from accumulated normal equations.

    Args:
        gram: (..., D + 1, D + 1) sums of ``[x 1]^T [x 1]`` (the last row and column hold the
            sums of ``x`` and the count).
        cross: (..., D + 1, C) sums of ``[x 1]^T y``.
        alpha: The ridge penalty (``> 0``).

    Returns:
        ``(weights (..., C, D), biases (..., C))`` in float64: the minimiser of
        ``|Y - X W^T - b|^2 + alpha |W|^2``.

    Raises:
        ValueError: Where no sample was accumulated.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
        >>> y = 2 * x + 1
        >>> a = torch.cat([x, torch.ones(3, 1, dtype=torch.float64)], 1)
        >>> weights, biases = ridge_from_normal_equations(a.T @ a, a.T @ y, alpha=1e-9)
        >>> round(weights.item(), 6), round(biases.item(), 6)
        (2.0, 1.0)
    """
    count = gram[..., -1, -1]
    if (count <= 0).any():
        raise ValueError("no training samples for some probes (empty normal equations)")
    width = gram.shape[-1] - 1
    x_mean = gram[..., :width, -1] / count[..., None]  # (..., D)
    y_mean = cross[..., -1, :] / count[..., None]  # (..., C)
    outer = count[..., None, None] * x_mean[..., :, None]
    centred_gram = gram[..., :width, :width] - outer * x_mean[..., None, :]
    centred_cross = cross[..., :width, :] - outer * y_mean[..., None, :]
    penalty = alpha * torch.eye(width, dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(centred_gram + penalty, centred_cross)  # (..., D, C)
    biases = y_mean - (x_mean[..., None, :] @ weights).squeeze(-2)
    return weights.transpose(-1, -2), biases


def one_vs_rest_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) targets ``-1`` everywhere and ``+1`` at the label (the official encoding)."""
    targets = torch.full((len(labels), num_classes), -1.0, dtype=torch.float64)
    targets[torch.arange(len(labels)), labels.cpu()] = 1.0
    return targets.to(labels.device)


def _augmented(tokens: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D + 1) float64 with a trailing 1 (the intercept's column)."""
    tokens = tokens.double()
    return torch.cat([tokens, tokens.new_ones(*tokens.shape[:-1], 1)], -1)


@dataclass
class LinearProbesResult(AnalysisResult):
    """Ridge probes fitted per block, component and position, against the projection.

    Attributes:
        probes: The fitted :class:`~class_space_saliency.probing.LinearProbes`.
        layers: Block indices.
        components: Components probed.
        positions: Token positions with a probe of their own, then ``"pooled"`` if fitted.
        num_prefix_tokens: Prefix tokens ([CLS], registers) before the image tokens.
        cls_position: The [CLS] position the head reads, or ``None``.
        num_train: Training images.
        num_test: Test images.
        train_per_class: (C,) training images per class.
        probe_top1: ``{component: (L, P)}`` % of test tokens at each position (pooled: of
            all image tokens) whose top-1 probe class is the label.
        projection_top1: ``{component: (L, N)}`` the same for the class-space projection at
            every token position ``0 .. N-1``.
        curve_sizes: Training images per class of the curve's pooled probes.
        curve_images: Training images each curve probe was fitted on.
        curve_top1: ``{component: (L, S)}`` % of test image tokens the curve's pooled probes
            classify correctly.
        alpha: Ridge penalty.
        fit_seconds: Wall time of the training pass and the solves.
        test_seconds: Wall time of the test pass.
    """

    name = "linear_probes"

    probes: LinearProbes
    layers: list[int]
    components: tuple[str, ...]
    positions: tuple[int | str, ...]
    num_prefix_tokens: int
    cls_position: int | None
    num_train: int
    num_test: int
    train_per_class: torch.Tensor
    probe_top1: dict[str, torch.Tensor]
    projection_top1: dict[str, torch.Tensor]
    curve_sizes: list[int] = field(default_factory=list)
    curve_images: list[int] = field(default_factory=list)
    curve_top1: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float = 1.0
    fit_seconds: float = 0.0
    test_seconds: float = 0.0

    @property
    def token_positions(self) -> list[int]:
        """Positions with a probe of their own."""
        return [p for p in self.positions if p != POOLED]

    def image_probe_top1(self, component: str) -> torch.Tensor | None:
        """(L,) mean over image-token positions of the per-position probes' top-1 (as the
        official plot, ``acc[1:]`` averaged), or ``None`` without such positions."""
        columns = [i for i, p in enumerate(self.positions) if p != POOLED]
        columns = [i for i in columns if self.positions[i] >= self.num_prefix_tokens]
        return self.probe_top1[component][:, columns].mean(1) if columns else None

    def pooled_probe_top1(self, component: str) -> torch.Tensor | None:
        """(L,) top-1 of the pooled probe over all test image tokens, or ``None``."""
        if POOLED not in self.positions:
            return None
        return self.probe_top1[component][:, self.positions.index(POOLED)]

    def image_projection_top1(self, component: str) -> torch.Tensor:
        """(L,) the projection's top-1 over all test image tokens."""
        return self.projection_top1[component][:, self.num_prefix_tokens :].mean(1)

    def cls_top1(self, component: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(probe (L,), projection (L,))`` top-1 at the [CLS] token, or ``None``."""
        if self.cls_position is None or self.cls_position not in self.positions:
            return None
        probe = self.probe_top1[component][:, self.positions.index(self.cls_position)]
        return probe, self.projection_top1[component][:, self.cls_position]

    def to_dict(self) -> dict:
        """Accuracies per component (summaries and every position), the curve, the fit."""
        components = {}
        for c in self.components:
            cls = self.cls_top1(c)
            components[c] = dict(
                probe_cls_top1=None if cls is None else cls[0],
                projection_cls_top1=None if cls is None else cls[1],
                probe_image_tokens_top1=self.image_probe_top1(c),
                probe_pooled_top1=self.pooled_probe_top1(c),
                projection_image_tokens_top1=self.image_projection_top1(c),
                probe_top1_per_position=self.probe_top1[c],
                projection_top1_per_position=self.projection_top1[c],
                curve_top1=self.curve_top1.get(c),
            )
        return json_safe(
            dict(
                layers=self.layers,
                positions=list(self.positions),
                num_prefix_tokens=self.num_prefix_tokens,
                num_train=self.num_train,
                num_test=self.num_test,
                train_per_class=self.train_per_class,
                alpha=self.alpha,
                fit_seconds=self.fit_seconds,
                test_seconds=self.test_seconds,
                curve_sizes=self.curve_sizes,
                curve_images=self.curve_images,
                components=components,
            )
        )

    def table(self) -> str:
        """Per component: probe vs projection top-1 by block; then the data-efficiency curve."""
        tables = []
        for c in self.components:
            header, columns = ["layer"], []
            cls = self.cls_top1(c)
            if cls is not None:
                header += ["[CLS] probe %", "[CLS] projection %"]
                columns += list(cls)
            for label, values in (
                ("image tokens probe % (per position)", self.image_probe_top1(c)),
                ("image tokens probe % (pooled)", self.pooled_probe_top1(c)),
                ("image tokens projection %", self.image_projection_top1(c)),
            ):
                if values is not None:
                    header.append(label)
                    columns.append(values)
            rows = [[b, *(v[i].item() for v in columns)] for i, b in enumerate(self.layers)]
            title = (
                f"**{c}**: top-1 on {self.num_test} test images; ridge probes (alpha "
                f"{self.alpha:g}) fitted on {self.num_train} images "
                f"({self.fit_seconds:.1f} s)"
            )
            tables.append(title + "\n\n" + markdown_table(header, rows))
        if self.curve_sizes:
            header = ["component", "layer", *[f"{n}/class" for n in self.curve_sizes]]
            header.append("projection")
            rows = [
                [c, b, *self.curve_top1[c][i].tolist(), self.image_projection_top1(c)[i].item()]
                for c in self.components
                for i, b in enumerate(self.layers)
            ]
            title = (
                "**data efficiency**: top-1 % of pooled probes on test image tokens, fitted on "
                f"the first n training images per class ({', '.join(map(str, self.curve_images))}"
                " images); the projection needs none"
            )
            tables.append(title + "\n\n" + markdown_table(header, rows))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None) -> Any:
        """Probe and projection top-1 by block (the official figure) and the curve."""
        import matplotlib.pyplot as plt

        panels = 2 if self.curve_sizes else 1
        axes = np.atleast_1d(ax) if ax is not None else plt.subplots(1, panels, figsize=(11, 4))[1]
        axes = np.atleast_1d(axes)
        colours = dict(zip(COMPONENTS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
        for c in self.components:
            probe = self.image_probe_top1(c)
            if probe is None:
                probe = self.pooled_probe_top1(c)
            axes[0].plot(self.layers, probe.numpy(), "-o", color=colours[c], ms=3,
                         label=f"{c} probe")  # fmt: skip
            axes[0].plot(self.layers, self.image_projection_top1(c).numpy(), "--",
                         color=colours[c], label=f"{c} projection")  # fmt: skip
        axes[0].set_xlabel("layer (block index, from 0)")
        axes[0].set_ylabel("top-1 % (image tokens)")
        axes[0].set_title("linear probes vs class-space projection")
        axes[0].legend(fontsize=7)
        if self.curve_sizes:
            last = len(self.layers) - 1
            for c in self.components:
                axes[1].plot(self.curve_sizes, self.curve_top1[c][last].numpy(), "-o",
                             color=colours[c], ms=3, label=f"{c} probe")  # fmt: skip
                axes[1].axhline(self.image_projection_top1(c)[last].item(), ls="--",
                                color=colours[c], label=f"{c} projection")  # fmt: skip
            axes[1].set_xscale("log")
            axes[1].set_xlabel("training images per class")
            axes[1].set_ylabel("top-1 % (image tokens)")
            axes[1].set_title(f"data efficiency, layer {self.layers[last]}")
            axes[1].legend(fontsize=7)
        figure = axes[0].figure
        figure.tight_layout()
        return figure

    def save(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """:meth:`AnalysisResult.save`, and the probes (``stem.pt``, default
        ``linear_probes.pt``, which ``LinearProbes.load(folder)`` reads back)."""
        paths = super().save(folder, stem)
        return [*paths, self.probes.save(Path(folder) / f"{stem or self.name}.pt")]


class _NormalEquations:
    """Sums ``[x 1]^T [x 1]`` and ``[x 1]^T y`` of a batch of ridge problems (float64)."""

    def __init__(self, shape: Sequence[int], width: int, num_classes: int, device: Any) -> None:
        self.gram = torch.zeros(*shape, width + 1, width + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(*shape, width + 1, num_classes, dtype=torch.float64, device=device)

    def add(self, index: tuple, rows: torch.Tensor, targets: torch.Tensor, pooled: bool) -> None:
        """Add augmented states ``rows`` (B, P, D + 1) with (B, C) targets to problem ``index``:
        one problem per position ``P``, or with ``pooled=True`` one for all of them."""
        if pooled:
            self.gram[index] += torch.einsum("bpd,bpe->de", rows, rows)
            self.cross[index] += torch.einsum("bpd,bc->dc", rows, targets)
        else:
            self.gram[index] += torch.einsum("bpd,bpe->pde", rows, rows)
            self.cross[index] += torch.einsum("bpd,bc->pdc", rows, targets)

    def solve(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights (..., C, D), biases (..., C))`` float32 on the CPU.

        Solved one leading index (block, or curve size) at a time: the solve's temporaries
        are a few times the size of the equations they solve.
        """
        solved = [
            ridge_from_normal_equations(gram.cpu(), cross.cpu(), alpha)
            for gram, cross in zip(self.gram, self.cross, strict=True)
        ]
        return torch.stack([w for w, _ in solved]).float(), torch.stack(
            [b for _, b in solved]
        ).float()


def _resolve_positions(positions: str | Sequence[int | str]) -> tuple[str | int, ...]:
    """``positions`` -> a tuple of ints, ``"tokens"`` (every position) and/or ``"pooled"``."""
    if isinstance(positions, str):
        check_choice("positions", positions, POSITION_CHOICES)
        return {"all": ("tokens", POOLED), "tokens": ("tokens",), POOLED: (POOLED,)}[positions]
    resolved = []
    for position in positions:
        if position != POOLED and (isinstance(position, bool) or not isinstance(position, int)):
            raise TypeError(f"positions must hold ints or {POOLED!r}, got {position!r}")
        if position != POOLED and position < 0:
            raise ValueError(f"token positions must be >= 0, got {position}")
        resolved.append(position)
    if not resolved or len(set(resolved)) != len(resolved):
        raise ValueError(f"positions must be distinct and not empty, got {positions!r}")
    return tuple(resolved)


def _check_curve(curve: Sequence[int] | None) -> list[int]:
    sizes = list(curve or [])
    if any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes
    ) or sizes != sorted(set(sizes)):
        raise ValueError(
            f"curve must be increasing positive ints (images per class), got {curve!r}"
        )
    return sizes


def linear_probes(
    model: torch.nn.Module | ViTAnatomy,
    train: Data,
    test: Data,
    *,
    components: str | Sequence[str] = COMPONENTS,
    layers: int | Sequence[int] | str = "all",
    positions: str | Sequence[int | str] = "all",
    alpha: float = 1.0,
    curve: Sequence[int] | None = CURVE_SIZES,
    num_train: int | None = None,
    num_test: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> LinearProbesResult:
    """Fit ridge probes on ``train``, score them and the projection top-1 on ``test``.

    Args:
        model: A supported ViT (or its anatomy) that keeps one token per patch.
        train: Training data in any :func:`~class_space_saliency.analysis.stream` form
            (unlabelled images are labelled with the model's predictions).
        test: Test data, likewise.
        components: ``"residual"``, ``"attention"``, ``"mlp"`` or several.
        layers: Blocks (int, list of ints or ``"all"``).
        positions: ``"all"`` (a probe per token position, as the official code, and a
            pooled probe), ``"tokens"``, ``"pooled"`` or a list of token positions (ints,
            0 = the first prefix token) and/or ``"pooled"``.
        alpha: Ridge penalty (the official ``Ridge(alpha=1.0)``).
        curve: Training images per class of the data-efficiency curve (pooled probes on the
            first n images of each class in stream order); ``None`` or ``()`` for none.
        num_train: Use the first ``num_train`` training images only.
        num_test: Use the first ``num_test`` test images only.
        batch_size: Images per forward pass.
        progress: Show progress bars (``None``: on a terminal).

    Returns:
        A :class:`LinearProbesResult`; ``result.probes`` are the fitted probes (for the
        ``linear_probe`` saliency method), ``result.save(folder)`` writes them beside the
        tables.

    Raises:
        UnsupportedModelError: For models whose blocks do not keep one token per patch.
        ValueError: For bad arguments, positions beyond the token count, or a class curve
            size without training images.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.linear_probes(model, (images, labels), (images, labels),
        ...                                 components="residual", curve=[1])
        >>> result.probes.weights.shape  # (L, K, positions 0..16 + pooled, C, D)
        torch.Size([3, 1, 18, 7, 32])
    """
    anatomy = _as_anatomy(model)
    components = _check_components(components)
    layers = anatomy.resolve_layers(layers)
    wanted = _resolve_positions(positions)
    sizes = _check_curve(curve)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    reader = _TokenReader(anatomy, layers, components)
    options = dict(batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    fitted = _fit(reader, train, wanted, sizes, float(alpha), num_train, **options)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    hits = _score(reader, test, fitted, num_test, **options)
    test_seconds = time.perf_counter() - start
    probes, prefix = fitted.probes, anatomy.num_prefix_tokens
    image_tokens = hits.num_images * (hits.projection.shape[-1] - prefix)
    scale = torch.tensor(
        [100 / (image_tokens if p == POOLED else hits.num_images) for p in probes.positions],
        dtype=torch.float64,
    )
    by_component = range(len(components))
    return LinearProbesResult(
        probes=probes,
        layers=layers,
        components=components,
        positions=probes.positions,
        num_prefix_tokens=prefix,
        cls_position=anatomy.readout.cls_index,
        num_train=probes.num_images,
        num_test=hits.num_images,
        train_per_class=fitted.per_class,
        probe_top1={components[j]: (hits.probes[:, j] * scale).float() for j in by_component},
        projection_top1={
            components[j]: (hits.projection[:, j] * 100 / hits.num_images).float()
            for j in by_component
        },
        curve_sizes=sizes,
        curve_images=[int(fitted.per_class.clamp(max=n).sum()) for n in sizes],
        curve_top1={
            components[j]: (hits.curve[:, :, j].T * 100 / image_tokens).float()
            for j in by_component
            if sizes
        },
        alpha=float(alpha),
        fit_seconds=fit_seconds,
        test_seconds=test_seconds,
    )


class _TokenReader:
    """Token states of the chosen blocks and components, one forward pass per batch."""

    def __init__(self, anatomy: ViTAnatomy, layers: list[int], components: tuple[str, ...]):
        if anatomy.prefix_from_block:
            raise UnsupportedModelError(
                f"{type(anatomy.model).__name__} adds its prefix tokens after block "
                f"{anatomy.prefix_from_block - 1}: token positions change along the blocks, so "
                "probes per position cannot be fitted"
            )
        self.anatomy = anatomy
        self.layers, self.components = layers, components
        self.sites = [(i, j, c, b) for i, b in enumerate(layers) for j, c in enumerate(components)]
        self.shape = (len(layers), len(components))

    def __call__(self, images: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        """``{(component, block): (B, N, D)}`` token states of ``images``."""
        with torch.no_grad(), self.anatomy.capture([(c, b) for *_, c, b in self.sites]) as cap:
            self.anatomy.forward(images)
        grid = self.anatomy.grid_size(images.shape)
        for (_, block), tokens in cap.tokens.items():
            self.anatomy.image_tokens(tokens, block, grid)  # checks the token count
        return cap.tokens


@dataclass
class _Fitted:
    probes: LinearProbes
    curve: tuple[torch.Tensor, torch.Tensor] | None  # (S, L, K, C, D), (S, L, K, C)
    per_class: torch.Tensor  # (C,) training images per class


def _fit(
    reader: _TokenReader,
    train: Data,
    wanted: tuple[int | str, ...],
    sizes: list[int],
    alpha: float,
    num_images: int | None,
    batch_size: int,
    progress: bool | None,
) -> _Fitted:
    """Accumulate the normal equations over ``train`` and solve them."""
    anatomy = reader.anatomy
    prefix, num_classes = anatomy.num_prefix_tokens, anatomy.num_classes
    fit: dict[str, _NormalEquations] = {}
    per_class = torch.zeros(num_classes, dtype=torch.int64)
    for batch in stream(
        anatomy, train, num_images=num_images, batch_size=batch_size, progress=progress,
        desc="probes: fit",
    ):  # fmt: skip
        tokens = reader(batch.images)
        if not fit:  # the first batch tells the token count and width
            count, width = next(iter(tokens.values())).shape[1:]
            token_positions = _token_positions(wanted, count)
            device = batch.images.device
            fit["tokens"] = _NormalEquations(
                (*reader.shape, len(token_positions)), width, num_classes, device
            )
            fit["pooled"] = _NormalEquations(reader.shape, width, num_classes, device)
            fit["curve"] = _NormalEquations((len(sizes), *reader.shape), width, num_classes, device)
        labels = batch.labels.cpu()
        targets = one_vs_rest_targets(batch.labels, num_classes)
        # curve bucket s: the image is among the first sizes[s] of its class, not sizes[s - 1]
        bucket = np.searchsorted(sizes, _rank_within_class(labels, per_class), side="right")
        per_class += torch.bincount(labels, minlength=num_classes)
        for i, j, c, b in reader.sites:
            rows = _augmented(tokens[(c, b)])  # (B, N, D + 1)
            fit["tokens"].add((i, j), rows[:, token_positions], targets, pooled=False)
            if POOLED in wanted:
                fit["pooled"].add((i, j), rows[:, prefix:], targets, pooled=True)
            for s in np.unique(bucket[bucket < len(sizes)]):
                chosen = torch.as_tensor(bucket == s, device=rows.device)
                fit["curve"].add((s, i, j), rows[chosen, prefix:], targets[chosen], pooled=True)
    if not fit:
        raise ValueError("train holds no images")
    parts = [fit["tokens"].solve(alpha)] if token_positions else []
    if POOLED in wanted:
        weights, biases = fit["pooled"].solve(alpha)
        parts.append((weights[:, :, None], biases[:, :, None]))
    probes = LinearProbes(
        torch.cat([weights for weights, _ in parts], 2),
        torch.cat([biases for _, biases in parts], 2),
        reader.layers,
        reader.components,
        [*token_positions, *([POOLED] if POOLED in wanted else [])],
        alpha=alpha,
        num_images=int(per_class.sum()),
        num_prefix_tokens=prefix,
    )
    curve = None
    if sizes:  # cumulative sums: the first n images of each class
        fit["curve"].gram = fit["curve"].gram.cumsum(0)
        fit["curve"].cross = fit["curve"].cross.cumsum(0)
        curve = fit["curve"].solve(alpha)
    return _Fitted(probes, curve, per_class)


@dataclass
class _Hits:
    probes: torch.Tensor  # (L, K, P) correctly classified tokens per probe position
    projection: torch.Tensor  # (L, K, N) the same for the projection, per token position
    curve: torch.Tensor  # (S, L, K) correctly classified image tokens per curve probe
    num_images: int = 0


def _score(
    reader: _TokenReader,
    test: Data,
    fitted: _Fitted,
    num_images: int | None,
    batch_size: int,
    progress: bool | None,
) -> _Hits:
    """Count the test tokens each probe and the projection classify correctly."""
    anatomy, prefix = reader.anatomy, reader.anatomy.num_prefix_tokens
    positions = list(fitted.probes.token_positions)
    hits: _Hits | None = None
    for batch in stream(
        anatomy, test, num_images=num_images, batch_size=batch_size, progress=progress,
        desc="probes: test",
    ):  # fmt: skip
        tokens = reader(batch.images)
        if hits is None:  # the probes go to the model's device once
            count = next(iter(tokens.values())).shape[1]
            probes = fitted.probes.to(batch.images.device)
            curve = [t.to(batch.images.device) for t in fitted.curve or ()]
            hits = _Hits(
                torch.zeros(*reader.shape, len(probes.positions), dtype=torch.float64),
                torch.zeros(*reader.shape, count, dtype=torch.float64),
                torch.zeros(len(curve[0]) if curve else 0, *reader.shape, dtype=torch.float64),
            )
        labels = batch.labels[:, None]
        for i, j, c, b in reader.sites:
            states = tokens[(c, b)].float()
            hits.projection[i, j] += (anatomy.project(states).argmax(-1) == labels).sum(0).cpu()
            if positions:  # the probes of token positions come first
                weights, biases = probes.weights[i, j, : len(positions)], probes.biases[i, j]
                scores = torch.einsum("bpd,pcd->bpc", states[:, positions], weights)
                scores = scores + biases[: len(positions)]
                hits.probes[i, j, : len(positions)] += (scores.argmax(-1) == labels).sum(0).cpu()
            image = states[:, prefix:]
            if POOLED in probes.positions:
                scores = probes.logits(image, b, c, POOLED)
                hits.probes[i, j, -1] += (scores.argmax(-1) == labels).sum().item()
            for s in range(len(hits.curve)):
                scores = image @ curve[0][s, i, j].T + curve[1][s, i, j]
                hits.curve[s, i, j] += (scores.argmax(-1) == labels).sum().item()
        hits.num_images += len(labels)
    if hits is None:
        raise ValueError("test holds no images")
    return hits


def _token_positions(wanted: Sequence[int | str], count: int) -> list[int]:
    """The token positions to fit, checked against the model's ``count`` tokens."""
    if "tokens" in wanted:
        return list(range(count))
    positions = [p for p in wanted if p != POOLED]
    beyond = [p for p in positions if p >= count]
    if beyond:
        raise ValueError(f"positions {beyond} are beyond the model's {count} tokens")
    return positions


def _rank_within_class(labels: torch.Tensor, seen: torch.Tensor) -> np.ndarray:
    """(B,) how many earlier images of the stream share each image's label."""
    counts = seen.clone().tolist()
    ranks = []
    for label in labels.tolist():
        ranks.append(counts[label])
        counts[label] += 1
    return np.array(ranks, dtype=np.int64)
