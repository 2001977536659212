"""Class identifiability per block (Vilas et al. 2023, Sec. 4; official ``plots/class_ident.py``).

The identifiability of a token is the label's normalised rank in its class-space projection,
``r = 1 - k / C`` with ``k`` the number of classes whose logit is strictly larger than the
label's (``r = 1``: the label is the token's top-1 class). Per block and component (residual
stream, attention or MLP branch) this module reports, for [CLS] and for image tokens, the
distribution of ``r`` (a histogram of ``k``: exact, in memory that does not grow with the
data), the share of tokens whose top-1 class is the label, the per-image *identifiability
rate* (share of image tokens with top-1 = label, averaged over images; paper, ViT-B/32 last
block: 60.73 %), and the share of images with at least one identifiable image token (95.58 %).
With ``baseline=`` (typically the same architecture randomly initialised) a one-sided Wilcoxon
signed-rank test per block asks whether the model's tokens are more identifiable than the
baseline's at the same image and token position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._validation import check_choice
from ..adapters import UnsupportedModelError
from ..anatomy import COMPONENTS, ViTAnatomy
from ..projection import target_class_column
from ._result import AnalysisResult, draw_rank_boxes, format_p_value, json_safe, markdown_table
from ._stream import Data, RankDifferenceHistogram, RankHistogram, stream

TOKEN_GROUPS = ("cls", "image")
"""Token groups reported: the [CLS] token the head reads, and the image tokens."""


def rank_positions(anatomy: ViTAnatomy, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank position of the label (0 = top-1) in the class-space projection of every token.

    Args:
        anatomy: The model's anatomy.
        tokens: Token states (B, N, D).
        labels: (B,) class per image.

    Returns:
        (B, N) int64: the number of classes with a strictly larger logit than the label's.
    """
    logits = anatomy.project(tokens).float()
    label_logit = target_class_column(logits, labels).unsqueeze(-1)
    return (logits > label_logit).sum(-1)


@dataclass
class Identifiability:
    """Mean identifiability of one component per block (the summary view).

    Attributes:
        layers: Block indices.
        token_rank: Mean normalised rank of the label over image tokens and images (L,).
        token_rate: Identifiability rate in % (L,): per image, the share of image tokens whose
            top-1 class is the label, averaged over images.
        cls_rank: Mean normalised rank of the label for the [CLS] token (L,), ``NaN`` at
            blocks whose tokens do not hold the [CLS] yet (ConViT before
            ``local_up_to_layer``); ``None`` where no analysed block holds a [CLS] that the
            head reads (pooled models, also those that keep a [CLS] or registers; CaiT and
            XCiT, whose [CLS] joins after the blocks).
        cls_rate: % of images whose [CLS] token's top-1 class is the label (L,), with
            ``NaN`` and ``None`` as ``cls_rank``.
        num_images: Images the figures average over.
        component: Which token state was projected.
    """

    layers: list[int]
    token_rank: torch.Tensor
    token_rate: torch.Tensor
    cls_rank: torch.Tensor | None
    cls_rate: torch.Tensor | None
    num_images: int
    component: str = "residual"

    def to_dict(self) -> dict:
        """Plain-Python view (lists of floats) for JSON."""
        return json_safe(
            dict(
                layers=self.layers,
                component=self.component,
                num_images=self.num_images,
                token_rank=self.token_rank,
                token_rate=self.token_rate,
                cls_rank=self.cls_rank,
                cls_rate=self.cls_rate,
            )
        )

    def __str__(self) -> str:
        header = f"{'layer':>5} {'img rank':>9} {'img rate %':>10}"
        if self.cls_rank is not None:
            header += f" {'cls rank':>9} {'cls top-1 %':>11}"
        title = f"class identifiability ({self.component}, {self.num_images} images)"
        lines = [title, header]
        for i, layer in enumerate(self.layers):
            line = f"{layer:>5} {self.token_rank[i]:>9.4f} {self.token_rate[i]:>10.2f}"
            if self.cls_rank is not None and torch.isnan(self.cls_rank[i]):
                line += f" {'-':>9} {'-':>11}"
            elif self.cls_rank is not None:
                line += f" {self.cls_rank[i]:>9.4f} {self.cls_rate[i]:>11.2f}"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Plot identifiability by block (see :func:`visualize.plot_identifiability`)."""
        from ..visualize import plot_identifiability

        return plot_identifiability(self, ax=ax)


@dataclass
class IdentifiabilityResult(AnalysisResult):
    """Class identifiability per component, token group and block.

    Attributes:
        layers: Block indices (from 0).
        components: Components analysed (``"residual"``, ``"attention"``, ``"mlp"``).
        num_classes: Classes ``C`` of the head.
        num_images: Images analysed.
        histograms: ``{(component, group): RankHistogram}``, group ``"cls"`` (absent for
            heads that read no [CLS]) or ``"image"``.
        image_rate: ``{component: (L,)}`` identifiability rate in %: per image, the share of
            image tokens whose top-1 class is the label, averaged over images.
        images_with_identifiable: ``{component: (L,)}`` % of images with at least one image
            token whose top-1 class is the label.
        p_values: ``{(component, group): (L,)}`` one-sided Wilcoxon signed-rank p-values of
            "more identifiable than the baseline" (paired by image and token), or empty.
        baseline: The baseline model's own result, or ``None``.
    """

    name = "identifiability"

    layers: list[int]
    components: tuple[str, ...]
    num_classes: int
    num_images: int
    histograms: dict[tuple[str, str], RankHistogram]
    image_rate: dict[str, torch.Tensor]
    images_with_identifiable: dict[str, torch.Tensor]
    p_values: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    baseline: IdentifiabilityResult | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """Token groups present (``"cls"`` only where the head reads a [CLS] token)."""
        return tuple(g for g in TOKEN_GROUPS if (self.components[0], g) in self.histograms)

    def __getitem__(self, component: str) -> Identifiability:
        """The summary of one component (the older :class:`Identifiability` view)."""
        check_choice("component", component, self.components)
        cls = self.histograms.get((component, "cls"))
        image = self.histograms[(component, "image")]
        return Identifiability(
            layers=self.layers,
            token_rank=image.mean_rank().float(),
            token_rate=self.image_rate[component].float(),
            cls_rank=None if cls is None else cls.mean_rank().float(),
            cls_rate=None if cls is None else cls.top1().float(),
            num_images=self.num_images,
            component=component,
        )

    def to_dict(self) -> dict:
        """Per component and group: mean rank, top-1 %, quartiles, counts; tests; baseline."""
        components = {}
        for component in self.components:
            groups = {}
            for group in self.groups:
                histogram = self.histograms[(component, group)]
                groups[group] = dict(
                    mean_rank=histogram.mean_rank(),
                    top1_percent=histogram.top1(),
                    quartiles=histogram.quantiles([0.25, 0.5, 0.75]),
                    p_value_vs_baseline=self.p_values.get((component, group)),
                    rank_position_counts=histogram.counts,
                )
            components[component] = dict(
                identifiability_rate_percent=self.image_rate[component],
                images_with_identifiable_token_percent=self.images_with_identifiable[component],
                **groups,
            )
        return json_safe(
            dict(
                layers=self.layers,
                num_classes=self.num_classes,
                num_images=self.num_images,
                components=components,
                baseline=None if self.baseline is None else self.baseline.to_dict(),
            )
        )

    def table(self) -> str:
        """One markdown table per component: rows are blocks."""
        tables = []
        for component in self.components:
            header = ["layer", "image rank", "image top-1 %", "identifiability rate %"]
            header += ["images with one %"]
            if "cls" in self.groups:
                header += ["[CLS] rank", "[CLS] top-1 %"]
            if self.baseline is not None:
                header += [f"{g} baseline rank" for g in self.groups]
                header += [f"{g} p (> baseline)" for g in self.groups]
            rows = []
            for i, layer in enumerate(self.layers):
                image = self.histograms[(component, "image")]
                row: list[Any] = [layer, image.mean_rank()[i].item(), image.top1()[i].item()]
                row += [self.image_rate[component][i].item()]
                row += [self.images_with_identifiable[component][i].item()]
                if "cls" in self.groups:
                    cls = self.histograms[(component, "cls")]
                    row += [cls.mean_rank()[i].item(), cls.top1()[i].item()]
                if self.baseline is not None:
                    row += [
                        self.baseline.histograms[(component, g)].mean_rank()[i].item()
                        for g in self.groups
                    ]
                    row += [
                        format_p_value(self.p_values[(component, g)][i].item()) for g in self.groups
                    ]
                rows.append(row)
            title = f"**{component}** ({self.num_images} images, {self.num_classes} classes)"
            tables.append(title + "\n\n" + markdown_table(header, rows, digits=3))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None) -> Any:
        """Box plots of the normalised rank per block, [CLS] and image tokens (as Fig. 2).

        Boxes span the quartiles, whiskers the 5th and 95th percentiles, dots the means; a
        star marks blocks where both groups' tests against the baseline give p < 0.05, and
        the dashed line is chance (0.5).
        """
        import matplotlib.pyplot as plt

        components = self.components
        if ax is None:
            width = max(5.0, 0.6 * len(self.layers) * len(self.groups) + 2)
            _, axes = plt.subplots(len(components), 1, figsize=(width, 3.0 * len(components)))
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        colours = {"cls": "tab:green", "image": "tab:orange"}
        for axis, component in zip(axes, components, strict=False):
            histograms = {g: self.histograms[(component, g)] for g in self.groups}
            draw_rank_boxes(axis, histograms, colours)
            if self.p_values:
                significant = np.all(
                    [self.p_values[(component, g)].numpy() < 0.05 for g in self.groups], axis=0
                )
                stars = np.flatnonzero(significant)
                axis.plot(stars, np.full(len(stars), 1.06), "*", color="grey", label="p < 0.05")
            axis.axhline(0.5, ls="--", color="dimgray", lw=1)
            axis.set_xticks(np.arange(len(self.layers)), [str(b) for b in self.layers])
            axis.set_ylim(-0.02, 1.1)
            axis.set_xlabel("layer (block index, from 0)")
            axis.set_ylabel("identifiability (1 - rank/C)")
            axis.set_title(f"{component}: class identifiability ({self.num_images} images)")
            axis.legend(fontsize=7, loc="lower right")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


class _Counts:
    """What :func:`identifiability` accumulates for one model."""

    def __init__(self, components: Sequence[str], groups: Sequence[str], depth: int, C: int):
        self.histograms = {(c, g): RankHistogram(depth, C) for c in components for g in groups}
        self.rate_sum = {c: torch.zeros(depth, dtype=torch.float64) for c in components}
        self.with_one = {c: torch.zeros(depth, dtype=torch.float64) for c in components}

    def add(self, component: str, positions: torch.Tensor) -> None:
        """Count (L, B, 1 + h*w) rank positions of one component (see :func:`_positions`)."""
        image = positions[:, :, 1:]
        self.histograms[(component, "image")].add(image)
        if (component, "cls") in self.histograms:
            self.histograms[(component, "cls")].add(positions[:, :, 0])
        top1 = (image == 0).double()
        self.rate_sum[component] += top1.mean(2).sum(1).cpu() * 100
        self.with_one[component] += top1.amax(2).sum(1).cpu() * 100

    def result(self, layers: list[int], num_images: int) -> IdentifiabilityResult:
        """The accumulated counts of ``num_images`` images as a result."""
        component, group = next(iter(self.histograms))
        return IdentifiabilityResult(
            layers=layers,
            components=tuple(self.rate_sum),
            num_classes=self.histograms[(component, group)].num_classes,
            num_images=num_images,
            histograms=self.histograms,
            image_rate={c: v / num_images for c, v in self.rate_sum.items()},
            images_with_identifiable={c: v / num_images for c, v in self.with_one.items()},
        )


def _positions(
    anatomy: ViTAnatomy,
    images: torch.Tensor,
    labels: torch.Tensor,
    components: Sequence[str],
    layers: Sequence[int],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``{component: (L, B, 1 + h*w)}`` rank positions of the label and the logits (B, C),
    from one forward pass.

    Column 0 is the [CLS] token the head reads (-1 at blocks that do not hold it yet, e.g.
    ConViT before ``local_up_to_layer``, and for heads that read no [CLS]), the others are
    the image tokens (every block's token count is checked against the patch grid).
    """
    grid = anatomy.grid_size(images.shape)
    cls, cls_blocks = anatomy.readout.cls_index, set(anatomy.cls_blocks)

    def reduce(component: str, block: int, tokens: torch.Tensor) -> torch.Tensor:
        positions = rank_positions(anatomy, tokens, labels)
        image = anatomy.image_tokens(positions, block, grid)
        first = positions[:, cls] if block in cls_blocks else torch.full_like(image[:, 0], -1)
        return torch.cat([first[:, None], image], 1)

    sites = [(component, block) for component in components for block in layers]
    with torch.no_grad(), anatomy.capture(sites, reduce=reduce) as cap:
        logits = anatomy.forward(images)
    return {c: torch.stack([cap.tokens[(c, b)] for b in layers]) for c in components}, logits


def _as_anatomy(model: torch.nn.Module | ViTAnatomy, argument: str = "model") -> ViTAnatomy:
    if isinstance(model, ViTAnatomy):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module or a ViTAnatomy, got {model!r:.60}")
    return ViTAnatomy.from_model(model)


def _check_components(components: str | Sequence[str]) -> tuple[str, ...]:
    components = (components,) if isinstance(components, str) else tuple(components)
    if not components:
        raise ValueError("components must name at least one of " + str(COMPONENTS))
    for component in components:
        check_choice("components", component, COMPONENTS)
    return tuple(dict.fromkeys(components))


def identifiability(
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    *,
    layers: int | Sequence[int] | str = "all",
    components: str | Sequence[str] = ("residual",),
    baseline: torch.nn.Module | ViTAnatomy | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> IdentifiabilityResult:
    """Class identifiability of [CLS] and image tokens per block and component.

    Args:
        model: A supported ViT (or its :class:`~class_space_saliency.ViTAnatomy`).
        data: Images, ``(images, labels[, masks])``, a dataset or an iterable of batches
            (see :mod:`class_space_saliency.analysis._stream`); unlabelled images are
            labelled with the model's predictions.
        layers: Blocks (int, list of ints or ``"all"``).
        components: ``"residual"``, ``"attention"``, ``"mlp"`` or several of them.
        baseline: Another model with the same blocks, tokens and classes (typically the same
            architecture randomly initialised): adds its result and the one-sided Wilcoxon
            signed-rank test per block (paired by image and token, as the official code's
            ``wilcoxon(dec.flatten(), rand_dec.flatten(), alternative='greater')``, but per
            token group rather than over [CLS] and image tokens pooled).
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        An :class:`IdentifiabilityResult`; ``result["residual"]`` is the per-block summary.

    Raises:
        UnsupportedModelError: If a block holds another number of tokens than its prefix
            tokens and the patch grid make, or the baseline does not match the model.

    Example:
        >>> from class_space_saliency import analysis, testing
        >>> result = analysis.identifiability(model, (images, labels),
        ...                                   components=["residual", "mlp"],
        ...                                   baseline=testing.tiny_vit("plain"))
        >>> result["residual"].token_rate.shape, sorted(result.p_values)[0]
        (torch.Size([3]), ('mlp', 'cls'))
    """
    anatomy = _as_anatomy(model)
    components = _check_components(components)
    layers = anatomy.resolve_layers(layers)
    groups = TOKEN_GROUPS if set(layers) & set(anatomy.cls_blocks) else ("image",)
    num_classes = anatomy.num_classes
    models = [anatomy]
    if baseline is not None:
        models.append(_matching_baseline(anatomy, _as_anatomy(baseline, "baseline")))
    counts = [_Counts(components, groups, len(layers), num_classes) for _ in models]
    differences = {
        key: RankDifferenceHistogram(len(layers), num_classes) for key in counts[0].histograms
    }
    seen = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, progress=progress,
        desc="identifiability",
    ):  # fmt: skip
        found = [_positions(a, batch.images, batch.labels, components, layers)[0] for a in models]
        for accumulated, positions in zip(counts, found, strict=True):
            for component in components:
                accumulated.add(component, positions[component])
        if baseline is not None:
            for component, group in differences:
                columns = slice(0, 1) if group == "cls" else slice(1, None)  # see _positions
                mine, theirs = (f[component][:, :, columns] for f in found)
                differences[(component, group)].add(mine, theirs)
        seen += batch.images.shape[0]

    main = counts[0].result(layers, seen)
    if baseline is not None:
        main.baseline = counts[1].result(layers, seen)
        main.p_values = {key: table.p_values("greater") for key, table in differences.items()}
    return main


def _matching_baseline(anatomy: ViTAnatomy, baseline: ViTAnatomy) -> ViTAnatomy:
    """``baseline`` if its tokens pair with the model's (blocks, prefix, classes, patches)."""
    mine = (anatomy.depth, anatomy.num_prefix_tokens, anatomy.num_classes, anatomy.patch_size)
    theirs = (baseline.depth, baseline.num_prefix_tokens, baseline.num_classes, baseline.patch_size)
    if mine != theirs:
        raise UnsupportedModelError(
            "baseline must pair its tokens with the model's: (blocks, prefix tokens, classes, "
            f"patch size) are {mine} for the model and {theirs} for the baseline"
        )
    return baseline


def class_identifiability(
    model: torch.nn.Module | ViTAnatomy,
    inputs: torch.Tensor,
    labels: int | Sequence[int] | torch.Tensor,
    layers: int | Sequence[int] | str = "all",
    component: str = "residual",
    max_batch_size: int = 64,
    progress: bool = False,
) -> Identifiability:
    """Mean class identifiability of [CLS] and image tokens at each block of one component.

    The summary view of :func:`identifiability` for one batch of images.

    Args:
        model: A supported ViT, or its :class:`ViTAnatomy`.
        inputs: Normalised images (B, C, H, W).
        labels: Class per image (Captum target conventions).
        layers: Blocks to analyse (int, list of ints or ``"all"``).
        component: ``"residual"``, ``"attention"`` or ``"mlp"``.
        max_batch_size: Images per forward pass.
        progress: Show a progress bar.

    Returns:
        An :class:`Identifiability` result; ``print`` it or call ``.plot()``.

    Example:
        >>> result = class_identifiability(model, images, labels)
        >>> result.layers, result.token_rate.shape  # one value per block
        ([0, 1, 2], torch.Size([3]))
    """
    anatomy = _as_anatomy(model)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor (B, C, H, W), got {type(inputs).__name__}")
    if labels is None:
        raise ValueError("labels must be given (int, list of ints or int tensor), got None")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    check_choice("component", component, COMPONENTS)
    result = identifiability(
        anatomy,
        (inputs, labels),
        layers=layers,
        components=(component,),
        batch_size=max_batch_size,
        progress=progress,
    )
    return result[component]
