"""How blocks and their sublayers build the label's logit (Vilas et al. 2023).

Every token state is read in class space, ``head(norm(h))`` (the official code calls these
logits "probs"; they are logits, not probabilities); see :mod:`._states` for the states of a
block ``x -> m = x + attention(x) -> y = m + mlp(m)``.

- :func:`logit_increment` (official ``get_ident_change_rate``, figure ``prob_increment.png``,
  the notebook's "class similarity change rate" of image tokens): per block, the share of
  tokens whose label logit is larger at the block's output ``y`` than at its input ``x``.
- :func:`sublayer_changes` (official ``compute_class_similarity_change``, left panel of
  ``compositionality_<model>.png``, the "class similarity change rate" of a sublayer): per
  block, the share of tokens whose label logit is larger when projecting a sublayer's output
  alone (the attention branch, the MLP branch) than when projecting that sublayer's input
  (``x`` for attention, ``m`` for the MLP).
- :func:`residual_composition` (official ``compute_residual_match``, right panel): per
  block, the share of tokens whose top-1 class at the block output equals the top-1 class of
  the block input, of the attention branch, of the MLP branch, or of none of them.

The official figures start at the second block (1-based block 2), because their saved states
have no input of the first block; here the first block's input is the embedding, so every
block is reported. Blocks are indexed from 0 throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .._stats import mcnemar_test
from .._validation import check_bool
from ..anatomy import ViTAnatomy
from ._result import AnalysisResult, format_p_value, json_safe, markdown_table
from ._states import present_groups, token_groups, token_scores
from ._stream import Data, stream
from .identifiability import _as_anatomy, _matching_baseline

GROUP_LABELS = {"cls": "[CLS]", "image": "image", "all": "all tokens"}
"""How token groups are named in tables and legends."""


@dataclass
class RiseResult(AnalysisResult):
    """Shares of tokens whose label logit rises from a reference state to a state, per block.

    Attributes:
        layers: Block indices (from 0).
        comparisons: ``{name: (reference state, state)}`` compared (see :mod:`._states`).
        groups: Token groups (``"cls"`` where the head reads a [CLS] token, ``"image"``).
        num_images: Images analysed.
        rises: ``{(comparison, group): (L,)}`` tokens whose label logit rose.
        totals: ``{(comparison, group): (L,)}`` tokens compared.
        mean_change: ``{(comparison, group): (L,)}`` mean change of the label logit.
        p_values: ``{(comparison, group): (L,)}`` one-sided exact McNemar p-values of "rises
            more often than in the baseline", paired by image and token; empty without one.
        baseline: The baseline model's own result, or ``None``.
    """

    title: ClassVar[str] = "label logit rises"

    layers: list[int]
    comparisons: dict[str, tuple[str, str]]
    groups: tuple[str, ...]
    num_images: int
    rises: dict[tuple[str, str], torch.Tensor]
    totals: dict[tuple[str, str], torch.Tensor]
    mean_change: dict[tuple[str, str], torch.Tensor]
    p_values: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    baseline: RiseResult | None = None

    @property
    def keys(self) -> list[tuple[str, str]]:
        """``(comparison, group)`` pairs, in table order."""
        return [(c, g) for c in self.comparisons for g in self.groups]

    def share(self, group: str = "image", comparison: str | None = None) -> torch.Tensor:
        """(L,) % of the group's tokens whose label logit rises (the paper's change rate x 100).

        Args:
            group: A token group of :attr:`groups`.
            comparison: A name of :attr:`comparisons`; may be left out where there is one.
        """
        if comparison is None:
            if len(self.comparisons) != 1:
                raise ValueError(f"comparison must be one of {tuple(self.comparisons)}")
            comparison = next(iter(self.comparisons))
        key = (comparison, group)
        if key not in self.rises:
            raise ValueError(f"(comparison, group) must be one of {self.keys}, got {key}")
        return 100 * self.rises[key].double() / self.totals[key].double()

    def _label(self, comparison: str, group: str) -> str:
        group = GROUP_LABELS[group]
        return group if len(self.comparisons) == 1 else f"{comparison} {group}"

    def to_dict(self) -> dict:
        """Per comparison and group: share %, mean logit change, tokens, p-values; baseline."""
        comparisons = {
            name: dict(
                reference=reference,
                state=state,
                **{
                    group: dict(
                        share_percent=self.share(group, name),
                        mean_logit_change=self.mean_change[(name, group)],
                        tokens=self.totals[(name, group)],
                        p_value_vs_baseline=self.p_values.get((name, group)),
                    )
                    for group in self.groups
                },
            )
            for name, (reference, state) in self.comparisons.items()
        }
        return json_safe(
            dict(
                analysis=self.name,
                layers=self.layers,
                num_images=self.num_images,
                comparisons=comparisons,
                baseline=None if self.baseline is None else self.baseline.to_dict(),
            )
        )

    def table(self) -> str:
        """One markdown table: rows are blocks, columns the shares (and baseline, p)."""
        header = ["layer"]
        for name, group in self.keys:
            label = self._label(name, group)
            header += [f"{label} %"]
            if self.baseline is not None:
                header += [f"{label} baseline %", f"{label} p (> baseline)"]
        rows = []
        for i, layer in enumerate(self.layers):
            row: list[Any] = [layer]
            for name, group in self.keys:
                row.append(self.share(group, name)[i].item())
                if self.baseline is not None:
                    row.append(self.baseline.share(group, name)[i].item())
                    row.append(format_p_value(self.p_values[(name, group)][i].item()))
            rows.append(row)
        title = f"**{self.title}** ({self.num_images} images; % of tokens per block)"
        return title + "\n\n" + markdown_table(header, rows)

    def plot(self, ax: Any = None) -> Any:
        """Lines of the shares per block, as the official ``plot_logits_increment`` and the left
        panel of ``plot_class_building``.

        Solid lines are the model, dashed ones the baseline; a star marks blocks where the
        test against the baseline gives p < 0.05; the dotted line is 50 %.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(self.layers) + 3), 3.5))
        colours = plt.get_cmap("Paired").colors
        for index, (name, group) in enumerate(self.keys):
            colour = colours[(2 * index + 1) % len(colours)]
            label = self._label(name, group)
            ax.plot(self.layers, self.share(group, name), "*-", color=colour, label=label)
            if self.baseline is not None:
                base = self.baseline.share(group, name)
                ax.plot(self.layers, base, "--", color=colour, label=f"{label} (baseline)")
                stars = np.flatnonzero(self.p_values[(name, group)].numpy() < 0.05)
                ax.plot(
                    np.asarray(self.layers)[stars],
                    np.full(len(stars), 102 + 2 * index),
                    "*",
                    color=colour,
                )
        ax.axhline(50, ls=":", color="dimgray", lw=1)
        ax.set_xticks(self.layers)
        ax.set_ylim(0, 110 if self.baseline is not None else 100)
        ax.set_xlabel("layer (block index, from 0)")
        ax.set_ylabel("% of tokens")
        ax.set_title(f"{self.title} ({self.num_images} images)")
        ax.legend(fontsize=7, loc="lower left")
        figure = ax.figure
        figure.tight_layout()
        return figure


@dataclass
class LogitIncrementResult(RiseResult):
    """:func:`logit_increment`'s result: comparison ``"block"`` (block input -> output)."""

    name = "logit_increment"
    title = "logit increment (label logit, block output > block input)"


@dataclass
class SublayerChangesResult(RiseResult):
    """:func:`sublayer_changes`' result: comparisons ``"attention"`` and ``"mlp"``.

    Attributes:
        official: Whether the MLP branch was compared with the block input (the official
            code) rather than with the MLP's own input.
    """

    name = "sublayer_changes"
    title = "sublayer changes (label logit, sublayer output > its input)"

    official: bool = False


class _RiseCounts:
    """What a rise analysis accumulates for one model and one (comparison, group)."""

    def __init__(self, depth: int) -> None:
        self.rises = torch.zeros(depth, dtype=torch.int64)
        self.totals = torch.zeros(depth, dtype=torch.int64)
        self.change_sum = torch.zeros(depth, dtype=torch.float64)

    def add(self, change: torch.Tensor) -> None:
        """Count label-logit changes (L, B, n)."""
        flat = change.reshape(change.shape[0], -1)
        self.rises += (flat > 0).sum(1).cpu()
        self.totals += flat.shape[1]
        self.change_sum += flat.double().sum(1).cpu()


def _rise_analysis(
    result_type: type[RiseResult],
    comparisons: dict[str, tuple[str, str]],
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    layers: int | Sequence[int] | str,
    baseline: torch.nn.Module | ViTAnatomy | None,
    num_images: int | None,
    batch_size: int,
    progress: bool | None,
    **extra: Any,
) -> RiseResult:
    """Stream ``data`` and count, per comparison, group and block, tokens whose label logit
    rises from the reference state to the state (for the model and a baseline)."""
    anatomy = _as_anatomy(model)
    layers = anatomy.resolve_layers(layers)
    groups = present_groups(anatomy, ("cls", "image"))
    select = token_groups(anatomy, groups)
    states = {state for pair in comparisons.values() for state in pair}
    models = [anatomy]
    if baseline is not None:
        models.append(_matching_baseline(anatomy, _as_anatomy(baseline, "baseline")))
    keys = [(c, g) for c in comparisons for g in groups]
    counts = [{key: _RiseCounts(len(layers)) for key in keys} for _ in models]
    discordant = {key: torch.zeros(2, len(layers), dtype=torch.int64) for key in keys}
    seen = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, progress=progress,
        desc=result_type.name,
    ):  # fmt: skip
        changes = []
        for accumulated, each in zip(counts, models, strict=True):
            scores, _ = token_scores(each, batch.images, batch.labels, layers, states)
            found = {}
            for name, (reference, state) in comparisons.items():
                change = torch.stack(
                    [
                        scores[(state, b)].label_logit - scores[(reference, b)].label_logit
                        for b in layers
                    ]
                )
                for group in groups:
                    found[(name, group)] = select[group](change)
                    accumulated[(name, group)].add(found[(name, group)])
            changes.append(found)
        if baseline is not None:
            for key in keys:
                mine, theirs = changes[0][key] > 0, changes[1][key] > 0
                discordant[key][0] += (mine & ~theirs).flatten(1).sum(1).cpu()
                discordant[key][1] += (theirs & ~mine).flatten(1).sum(1).cpu()
        seen += batch.images.shape[0]

    def result(accumulated: dict[tuple[str, str], _RiseCounts]) -> RiseResult:
        return result_type(
            layers=layers,
            comparisons=comparisons,
            groups=groups,
            num_images=seen,
            rises={key: value.rises for key, value in accumulated.items()},
            totals={key: value.totals for key, value in accumulated.items()},
            mean_change={
                key: value.change_sum / value.totals.double() for key, value in accumulated.items()
            },
            **extra,
        )

    main = result(counts[0])
    if baseline is not None:
        main.baseline = result(counts[1])
        main.p_values = {
            key: torch.tensor(
                [mcnemar_test(a, b, "greater")[1] for a, b in zip(*table.tolist(), strict=True)],
                dtype=torch.float64,
            )
            for key, table in discordant.items()
        }
    return main


def logit_increment(
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    *,
    layers: int | Sequence[int] | str = "all",
    baseline: torch.nn.Module | ViTAnatomy | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> LogitIncrementResult:
    """Per block, the share of tokens whose label logit rises from the block's input to its output.

    The official ``get_ident_change_rate`` (``plot_logits_increment``) over image tokens:
    ``mean(head(norm(hs_b))[label] > head(norm(hs_{b-1}))[label])``; the [CLS] token is
    reported as a group of its own. The official plot of the paper's ViTs spans 50-100 %:
    their blocks raise the label logit of most image tokens.

    Args:
        model: A supported ViT (or its :class:`~class_space_saliency.ViTAnatomy`).
        data: Images, ``(images, labels[, masks])``, a dataset or an iterable of batches
            (see :mod:`class_space_saliency.analysis._stream`); unlabelled images are
            labelled with the model's predictions.
        layers: Blocks (int, list of ints or ``"all"``).
        baseline: Another model with the same blocks, tokens and classes (typically the same
            architecture randomly initialised): adds its result and, per block and group, a
            one-sided exact McNemar test of "the model raises the label logit of a token more
            often than the baseline does at the same image and token". The outcome is binary
            and paired, so McNemar's test (the binomial test of the discordant pairs) is the
            exact test; a Wilcoxon test would reduce to its normal approximation. Tokens of
            one image are not independent, so read the p-values as descriptive.
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`LogitIncrementResult`; ``result.share("image")`` is the paper's curve in %.

    Raises:
        UnsupportedModelError: If the model's tokens are not one per patch, or the baseline
            does not pair with the model.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.logit_increment(model, (images, labels))
        >>> result.share("image").shape  # % of image tokens per block
        torch.Size([3])
    """
    return _rise_analysis(
        LogitIncrementResult,
        {"block": ("block_input", "block_output")},
        model, data, layers, baseline, num_images, batch_size, progress,
    )  # fmt: skip


def sublayer_changes(
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    *,
    layers: int | Sequence[int] | str = "all",
    official: bool = False,
    baseline: torch.nn.Module | ViTAnatomy | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> SublayerChangesResult:
    """Per block, the share of tokens whose label logit is larger at a sublayer's output than at
    its input (the official "class similarity change rate", ``plot_class_building``, left).

    For the attention sublayer the output is the attention branch projected alone and the
    input is the block input ``x``; for the MLP the output is the MLP branch and the input is
    the stream after the attention add, ``m = x + attention(x)``. The official
    ``compute_class_similarity_change`` compares the MLP branch with the block input ``x``
    instead of ``m``: ``official=True`` does that (and says so in the result). (For its
    global-pooling ViT-B/16 the official extractor also passes the branch outputs through the
    block's ``norm1`` / ``norm2`` before projecting; here every state is projected alike.)

    Args:
        model: A supported ViT whose blocks are ``x + attention + MLP`` with both branches
            found (timm ViT/DeiT/BEiT/EVA, torchvision, CLIP, Hugging Face DINOv2/BEiT).
        data: See :func:`logit_increment`.
        layers: Blocks (int, list of ints or ``"all"``).
        official: Compare the MLP branch with the block input, as the official code does.
        baseline: As for :func:`logit_increment` (one-sided exact McNemar test per block,
            sublayer and group).
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`SublayerChangesResult`; ``result.share("image", "attention")`` in %.

    Raises:
        ValueError: If the model exposes no attention or MLP branch.
        UnsupportedModelError: If the tokens are not one per patch, or a block's output is
            not its input plus both branches (so the MLP's input cannot be rebuilt).

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.sublayer_changes(model, (images, labels))
        >>> sorted(result.comparisons), result.groups
        (['attention', 'mlp'], ('cls', 'image'))
    """
    check_bool("official", official)
    comparisons = {
        "attention": ("block_input", "attention"),
        "mlp": ("block_input" if official else "mlp_input", "mlp"),
    }
    return _rise_analysis(
        SublayerChangesResult, comparisons,
        model, data, layers, baseline, num_images, batch_size, progress, official=official,
    )  # fmt: skip


SOURCES = ("block_input", "attention", "mlp", "none")
"""What a token's top-1 class at the block output can come from (``"none"``: no match)."""

SOURCE_LABELS = {
    "block_input": "previous",
    "attention": "attention",
    "mlp": "MLP",
    "none": "none (composition)",
}
"""Legend names of :data:`SOURCES`, as the official ``plot_class_building``."""


@dataclass
class ResidualCompositionResult(AnalysisResult):
    """Where the top-1 class of each block's output comes from.

    The shares of ``block_input``, ``attention`` and ``mlp`` overlap (a token's top-1 class
    can match several); ``none`` is the share matching none of them.

    Attributes:
        layers: Block indices (from 0).
        groups: ``"all"`` (every token, the paper's figure), ``"cls"`` and ``"image"``.
        num_images: Images analysed.
        matches: ``{(group, source): (L,)}`` tokens whose top-1 class at the block output
            equals that of the source (``"none"``: of no source).
        totals: ``{group: (L,)}`` tokens counted.
        official: Whether ``"none"`` followed the official code (checks the attention
            branch twice and never the MLP branch).
    """

    name = "residual_composition"

    layers: list[int]
    groups: tuple[str, ...]
    num_images: int
    matches: dict[tuple[str, str], torch.Tensor]
    totals: dict[str, torch.Tensor]
    official: bool = False

    def share(self, group: str = "all", source: str = "none") -> torch.Tensor:
        """(L,) % of the group's tokens whose output top-1 matches ``source`` (or none)."""
        if (group, source) not in self.matches:
            raise ValueError(
                f"group must be one of {self.groups} and source one of {SOURCES}, got "
                f"{(group, source)}"
            )
        return 100 * self.matches[(group, source)].double() / self.totals[group].double()

    def to_dict(self) -> dict:
        """Per group: % per source and token counts."""
        groups = {
            group: dict(
                tokens=self.totals[group],
                **{f"{source}_percent": self.share(group, source) for source in SOURCES},
            )
            for group in self.groups
        }
        return json_safe(
            dict(
                analysis=self.name,
                layers=self.layers,
                num_images=self.num_images,
                official=self.official,
                groups=groups,
            )
        )

    def table(self) -> str:
        """One markdown table per group: rows are blocks, columns the sources."""
        tables = []
        for group in self.groups:
            header = ["layer"] + [f"{SOURCE_LABELS[s]} %" for s in SOURCES]
            rows = [
                [layer] + [self.share(group, s)[i].item() for s in SOURCES]
                for i, layer in enumerate(self.layers)
            ]
            note = "; none as the official code" if self.official else ""
            title = (
                f"**residual composition, {GROUP_LABELS[group]}** ({self.num_images} images; "
                f"top-1 at the block output matches ...{note})"
            )
            tables.append(title + "\n\n" + markdown_table(header, rows))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None) -> Any:
        """Stacked bars per block, one panel per group, as the official ``plot_class_building``.

        The shares overlap (a token can match several sources), so a bar can pass 100 %.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            width = max(5.0, 0.45 * len(self.layers) + 3)
            _, axes = plt.subplots(1, len(self.groups), figsize=(width * len(self.groups), 3.5))
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        colours = plt.get_cmap("Set2").colors
        positions = np.arange(len(self.layers))
        for axis, group in zip(axes, self.groups, strict=False):
            bottom = np.zeros(len(self.layers))
            for colour, source in zip(colours, SOURCES, strict=False):
                heights = self.share(group, source).numpy()
                axis.bar(
                    positions, heights, bottom=bottom, color=colour, label=SOURCE_LABELS[source]
                )
                bottom += heights
            axis.set_xticks(positions, [str(layer) for layer in self.layers])
            axis.set_xlabel("layer (block index, from 0)")
            axis.set_ylabel("% of tokens")
            axis.set_title(f"residual composition: {GROUP_LABELS[group]}")
            axis.legend(fontsize=7, loc="upper left", ncol=2)
        figure = axes[0].figure
        figure.tight_layout()
        return figure


def residual_composition(
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    *,
    layers: int | Sequence[int] | str = "all",
    official: bool = False,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> ResidualCompositionResult:
    """Per block, the share of tokens whose top-1 class at the block output equals the top-1
    class of the block input, of the attention branch, of the MLP branch, or of none of them.

    The official ``compute_residual_match`` (``plot_class_building``, all tokens) computes
    the "none" share as ``(out != previous) & (out != attention) & (out != attention)``: it
    checks the attention branch twice and never the MLP branch, so tokens whose top-1 comes
    from the MLP count as "none". Here "none" checks all three; ``official=True`` reproduces
    the official share.

    Args:
        model: A supported ViT with attention and MLP branches found.
        data: See :func:`logit_increment` (labels are not needed; unlabelled images cost one
            extra forward pass for predicted labels).
        layers: Blocks (int, list of ints or ``"all"``).
        official: Compute "none" as the official code does.
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`ResidualCompositionResult`; ``result.share("all", "none")`` in %.

    Raises:
        ValueError: If the model exposes no attention or MLP branch.
        UnsupportedModelError: If the model's tokens are not one per patch.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.residual_composition(model, (images, labels))
        >>> result.share("all", "none").shape
        torch.Size([3])
    """
    check_bool("official", official)
    anatomy = _as_anatomy(model)
    layers = anatomy.resolve_layers(layers)
    groups = present_groups(anatomy, ("all", "cls", "image"))
    select = token_groups(anatomy, groups)
    states = ("block_input", "attention", "mlp", "block_output")
    matches = {(g, s): torch.zeros(len(layers), dtype=torch.int64) for g in groups for s in SOURCES}
    totals = {group: torch.zeros(len(layers), dtype=torch.int64) for group in groups}
    seen = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, progress=progress,
        desc="residual composition",
    ):  # fmt: skip
        scores, _ = token_scores(anatomy, batch.images, batch.labels, layers, states)
        top1 = {s: torch.stack([scores[(s, b)].top1 for b in layers]) for s in states}
        same = {s: top1["block_output"] == top1[s] for s in SOURCES[:-1]}
        checked = ("block_input", "attention", "attention") if official else SOURCES[:-1]
        same["none"] = ~torch.stack([same[s] for s in checked]).any(0)
        for group in groups:
            for source in SOURCES:
                matches[(group, source)] += select[group](same[source]).flatten(1).sum(1).cpu()
            totals[group] += select[group](same["none"]).flatten(1).shape[1]
        seen += batch.images.shape[0]
    return ResidualCompositionResult(
        layers=layers,
        groups=groups,
        num_images=seen,
        matches=matches,
        totals=totals,
        official=official,
    )
