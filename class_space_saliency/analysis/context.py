"""Object and context tokens (Vilas et al. 2023; official ``get_ident_segmented`` and
``compute_context_diff`` in ``identifiability.py`` and ``plots/mech_interp.py``,
``perturbation/tokens_perturbation.py``, ``plots/class_ident.py: print_context_perturb``).

With object masks, every image token is labelled *object* or *context* (:func:`mask_to_tokens`).

- :func:`context_identifiability`: per block, the identifiability of object vs context tokens
  with a seeded permutation test of the difference, and the attention sublayer's change (as
  :func:`~class_space_saliency.analysis.sublayer_changes`) split by object and context.
- :func:`context_removal`: drop the object tokens, or the context tokens, right after the
  position embedding ([CLS] and the other prefix tokens kept), and compare the remaining
  tokens' identifiability with that of the same tokens in the unperturbed model.

The paper's numbers (ViT-B/32 on ImageNet-S, last block; the official notebook
``1_class_identifiability.ipynb``, ``print_context_perturb``), for comparison:

================================  ==============  ======================================
tokens                            unperturbed     after removing the other group
================================  ==============  ======================================
object ("class-labelled")         71.92 %         44.70 % (context tokens removed)
context                           56.24 %         38.68 % (object tokens removed)
================================  ==============  ======================================

"Identifiable" is top-1 = label. The unperturbed shares are pooled over all tokens of the
group; the removal shares are per-image shares that count the [CLS] token among the remaining
tokens, averaged over images (:attr:`RemovalOutcome.official_rate` reproduces that
aggregation; the other figures here count image tokens only, the same way in both conditions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._stats import permutation_test
from .._validation import check_bool, check_choice
from ..adapters import find_token_path
from ..anatomy import ViTAnatomy
from ..datasets import TOKEN_RULES, mask_to_tokens
from ._result import AnalysisResult, draw_rank_boxes, format_p_value, json_safe, markdown_table
from ._states import TokenScores, token_scores
from ._stream import Batch, Data, RankDifferenceHistogram, RankHistogram, stream
from .identifiability import _as_anatomy, _matching_baseline

LOCATIONS = ("object", "context")
"""The two token groups of the context analyses."""

_COLOURS = {"object": "tab:blue", "context": "tab:orange"}


def _check_rule(rule: str, threshold: float) -> None:
    check_choice("rule", rule, TOKEN_RULES)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def _object_tokens(anatomy: ViTAnatomy, batch: Batch, rule: str, threshold: float) -> torch.Tensor:
    """(B, n) object tokens of a batch: masks cut (or zero-padded) to the patch grid first."""
    h, w = anatomy.grid_size(batch.images.shape)
    ph, pw = anatomy.patch_size
    masks = batch.masks[..., : h * ph, : w * pw]  # timm drops pixels past the last patch
    masks = F.pad(masks, (0, w * pw - masks.shape[-1], 0, h * ph - masks.shape[-2]))
    return mask_to_tokens(masks, (h, w), rule, threshold).flatten(1)


def _locations(object_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"object": object_tokens, "context": ~object_tokens}


@dataclass
class ContextIdentifiabilityResult(AnalysisResult):
    """Identifiability of object and context tokens per block, and the attention's change.

    Attributes:
        layers: Block indices (from 0).
        num_classes: Classes ``C``.
        num_images: Images analysed.
        rule: How tokens were labelled (:data:`TOKEN_RULES`), with ``threshold``.
        threshold: The patch share of the ``"share"`` rule.
        histograms: ``{"object" | "context": RankHistogram}`` of the label's rank position
            at each block's output (image tokens only).
        difference: (L,) mean identifiability (normalised rank) of object minus context tokens.
        p_values: (L,) one-sided permutation p-values of "object tokens are more identifiable".
        permutations: Relabellings of each permutation test; ``seed``: their seed.
        seed: Seed of the permutation tests.
        official: Whether p-values and the change test follow the official code.
        change_rises: ``{location: (L,)}`` tokens whose label logit is larger at the
            attention branch than at the block input (empty without the attention change).
        change_mean: ``{location: (L,)}`` mean change of the label logit, attention branch
            minus block input.
        change_difference: (L,) object minus context: share of rising tokens in percentage
            points, or (``official``) mean label-logit change.
        change_p_values: (L,) one-sided permutation p-values of "larger for object tokens".
        images_without: ``{location: images without a token of that location}``.
        baseline: The baseline model's own result, or ``None``.
        baseline_p_values: ``{location: (L,)}`` one-sided Wilcoxon signed-rank p-values of
            "more identifiable than in the baseline", paired by image and token.
    """

    name = "context_identifiability"

    layers: list[int]
    num_classes: int
    num_images: int
    rule: str
    threshold: float
    histograms: dict[str, RankHistogram]
    difference: torch.Tensor
    p_values: torch.Tensor
    permutations: int
    seed: int
    official: bool
    change_rises: dict[str, torch.Tensor] = field(default_factory=dict)
    change_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    change_difference: torch.Tensor | None = None
    change_p_values: torch.Tensor | None = None
    images_without: dict[str, int] = field(default_factory=dict)
    baseline: ContextIdentifiabilityResult | None = None
    baseline_p_values: dict[str, torch.Tensor] = field(default_factory=dict)

    def top1(self, location: str) -> torch.Tensor:
        """(L,) % of the location's tokens whose top-1 class is the label (pooled over images)."""
        check_choice("location", location, LOCATIONS)
        return self.histograms[location].top1()

    def change_share(self, location: str) -> torch.Tensor:
        """(L,) % of the location's tokens whose label logit is larger at the attention
        branch than at the block input."""
        check_choice("location", location, LOCATIONS)
        if not self.change_rises:
            raise ValueError("the attention change was not computed (attention_change=False)")
        totals = self.histograms[location].total().double()
        return 100 * self.change_rises[location].double() / totals

    def to_dict(self) -> dict:
        """Per location: top-1 %, mean rank, quartiles, counts, attention change; the tests."""
        locations = {}
        for location in LOCATIONS:
            histogram = self.histograms[location]
            locations[location] = dict(
                tokens=histogram.total(),
                top1_percent=histogram.top1(),
                mean_rank=histogram.mean_rank(),
                quartiles=histogram.quantiles([0.25, 0.5, 0.75]),
                rank_position_counts=histogram.counts,
                images_without=self.images_without.get(location),
                p_value_vs_baseline=self.baseline_p_values.get(location),
            )
            if self.change_rises:
                locations[location].update(
                    attention_change_share_percent=self.change_share(location),
                    attention_mean_logit_change=self.change_mean[location],
                )
        return json_safe(
            dict(
                analysis=self.name,
                layers=self.layers,
                num_classes=self.num_classes,
                num_images=self.num_images,
                rule=self.rule,
                threshold=self.threshold,
                permutations=self.permutations,
                seed=self.seed,
                official=self.official,
                locations=locations,
                rank_difference=self.difference,
                p_value=self.p_values,
                attention_change_difference=self.change_difference,
                attention_change_p_value=self.change_p_values,
                baseline=None if self.baseline is None else self.baseline.to_dict(),
            )
        )

    def table(self) -> str:
        """A markdown table: rows are blocks; object and context figures side by side."""
        header = ["layer", "object top-1 %", "context top-1 %", "object rank", "context rank"]
        header += ["rank difference", "p (object > context)"]
        if self.change_rises:
            change = "Δ mean logit" if self.official else "Δ pp"
            header += ["attn rise object %", "attn rise context %", f"attn {change}", "attn p"]
        if self.baseline is not None:
            header += [f"{location} p (> baseline)" for location in LOCATIONS]
        rows = []
        for i, layer in enumerate(self.layers):
            row: list[Any] = [layer, self.top1("object")[i].item(), self.top1("context")[i].item()]
            row += [self.histograms[loc].mean_rank()[i].item() for loc in LOCATIONS]
            row += [self.difference[i].item(), format_p_value(self.p_values[i].item())]
            if self.change_rises:
                row += [self.change_share(loc)[i].item() for loc in LOCATIONS]
                row += [
                    self.change_difference[i].item(),
                    format_p_value(self.change_p_values[i].item()),
                ]
            if self.baseline is not None:
                row += [format_p_value(self.baseline_p_values[loc][i].item()) for loc in LOCATIONS]
            rows.append(row)
        counts = ", ".join(
            f"{int(self.histograms[loc].total()[0])} {loc} tokens" for loc in LOCATIONS
        )
        title = (
            f"**object vs context tokens** ({self.num_images} images, {counts}; token rule "
            f"{self.rule!r}; {self.permutations} permutations, seed {self.seed})"
        )
        return title + "\n\n" + markdown_table(header, rows, digits=3)

    def plot(self, ax: Any = None) -> Any:
        """Box plots of the normalised rank of object and context tokens per block (as the
        paper's context figure), a star where the permutation test gives p < 0.05; below
        them, the share of tokens the attention sublayer raises, by location."""
        import matplotlib.pyplot as plt

        panels = 2 if self.change_rises else 1
        if ax is None:
            width = max(5.0, 0.6 * len(self.layers) * 2 + 2)
            _, axes = plt.subplots(panels, 1, figsize=(width, 3.2 * panels))
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        positions = np.arange(len(self.layers))
        ticks = [str(layer) for layer in self.layers]
        draw_rank_boxes(axes[0], self.histograms, _COLOURS)
        stars = np.flatnonzero(self.p_values.numpy() < 0.05)
        axes[0].plot(stars, np.full(len(stars), 1.06), "*", color="grey", label="p < 0.05")
        axes[0].axhline(0.5, ls="--", color="dimgray", lw=1)
        axes[0].set_xticks(positions, ticks)
        axes[0].set_ylim(-0.02, 1.1)
        axes[0].set_ylabel("identifiability (1 - rank/C)")
        axes[0].set_title(f"object vs context tokens ({self.num_images} images)")
        axes[0].legend(fontsize=7, loc="lower right")
        if panels == 2:
            for location in LOCATIONS:
                axes[1].plot(
                    positions, self.change_share(location), "*-", color=_COLOURS[location],
                    label=f"{location} tokens",
                )  # fmt: skip
            stars = np.flatnonzero(self.change_p_values.numpy() < 0.05)
            axes[1].plot(stars, np.full(len(stars), 103), "*", color="grey", label="p < 0.05")
            axes[1].axhline(50, ls=":", color="dimgray", lw=1)
            axes[1].set_xticks(positions, ticks)
            axes[1].set_ylim(0, 106)
            axes[1].set_ylabel("% raised by attention")
            axes[1].set_title("attention sublayer: label logit, branch > block input")
            axes[1].legend(fontsize=7, loc="lower left")
        axes[-1].set_xlabel("layer (block index, from 0)")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


class _LocationCounts:
    """What :func:`context_identifiability` accumulates for one model."""

    def __init__(self, depth: int, num_classes: int, keep_changes: bool) -> None:
        self.histograms = {loc: RankHistogram(depth, num_classes) for loc in LOCATIONS}
        self.rises = {loc: torch.zeros(depth, dtype=torch.int64) for loc in LOCATIONS}
        self.change_sum = {loc: torch.zeros(depth, dtype=torch.float64) for loc in LOCATIONS}
        self.changes: dict[str, list[torch.Tensor]] | None = (
            {loc: [] for loc in LOCATIONS} if keep_changes else None
        )

    def add_change(self, location: str, change: torch.Tensor) -> None:
        """Count label-logit changes (L, k) of the location's tokens."""
        self.rises[location] += (change > 0).sum(1).cpu()
        self.change_sum[location] += change.double().sum(1).cpu()
        if self.changes is not None:
            self.changes[location].append(change.cpu())


def context_identifiability(
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    *,
    layers: int | Sequence[int] | str = "all",
    rule: str = "share",
    threshold: float = 0.5,
    attention_change: bool = True,
    permutations: int = 300,
    seed: int = 0,
    official: bool = False,
    baseline: torch.nn.Module | ViTAnatomy | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> ContextIdentifiabilityResult:
    """Identifiability of object vs context tokens per block, with permutation tests.

    Per block, the label's rank in the class-space projection of every image token at the
    block's output, separately for object and context tokens (official ``get_ident_segmented``),
    and a one-sided permutation test of "object tokens are more identifiable" on the difference
    of mean normalised ranks (official ``compute_context_diff``: 300 relabellings of the
    pooled tokens; here seeded, and exact in distribution on histograms). Paper, ViT-B/32 last
    block: 71.92 % of object tokens and 56.24 % of context tokens are top-1 identifiable
    (``result.top1("object")[-1]``, ``result.top1("context")[-1]``).

    The attention change is :func:`~class_space_saliency.analysis.sublayer_changes`' attention
    comparison (label logit of the attention branch vs of the block input) split by location,
    with a one-sided permutation test of "larger for object tokens" on the share of rising
    tokens. The official ``plots/mech_interp.py: compute_context_diff`` tests the mean
    label-logit change instead (ViT-B/32: object minus context 0.007 … 0.44 in blocks 1-8,
    negative after); ``official=True`` does that, which keeps every token's change in memory
    (4 bytes per image token and block), and also takes the official p-value
    ``#{shuffled > observed} / permutations`` (which can be 0) instead of
    ``(1 + #{shuffled >= observed}) / (1 + permutations)``.

    Args:
        model: A supported ViT (or its :class:`~class_space_saliency.ViTAnatomy`).
        data: ``(images, labels, masks)`` batches, a dataset of ``(image, label, mask)``
            items or an iterable of such batches (see :mod:`._stream`); masks are required.
        layers: Blocks (int, list of ints or ``"all"``).
        rule: How masks label tokens (:func:`mask_to_tokens`): ``"share"`` or the official
            ``"nearest"``.
        threshold: Share of the patch inside the mask that makes a token object (``"share"``).
        attention_change: Also compute the attention sublayer's change by location.
        permutations: Relabellings per permutation test (official: 300).
        seed: Seed of the relabellings.
        official: Official p-values and change statistic (see above).
        baseline: Another model with the same blocks, tokens and classes (typically the same
            architecture randomly initialised): adds its result and, per location and block,
            a one-sided Wilcoxon signed-rank test of "more identifiable than the baseline",
            paired by image and token (ranks are ordinal and paired: the signed-rank test,
            as :func:`~class_space_saliency.analysis.identifiability`).
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`ContextIdentifiabilityResult`.

    Raises:
        ValueError: If the data has no masks, or for bad options.
        UnsupportedModelError: If the model's tokens are not one per patch, or the baseline
            does not pair with the model.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.context_identifiability(model, (images, labels, masks))
        >>> result.top1("object").shape, result.p_values.shape  # per block
        (torch.Size([3]), torch.Size([3]))
    """
    _check_rule(rule, threshold)
    check_bool("attention_change", attention_change)
    check_bool("official", official)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive int, got {permutations!r}")
    anatomy = _as_anatomy(model)
    layers = anatomy.resolve_layers(layers)
    num_classes, prefix = anatomy.num_classes, anatomy.num_prefix_tokens
    states = {"block_output"} | ({"block_input", "attention"} if attention_change else set())
    models = [anatomy]
    if baseline is not None:
        models.append(_matching_baseline(anatomy, _as_anatomy(baseline, "baseline")))
    counts = [_LocationCounts(len(layers), num_classes, official) for _ in models]
    differences = {loc: RankDifferenceHistogram(len(layers), num_classes) for loc in LOCATIONS}
    images_without = dict.fromkeys(LOCATIONS, 0)
    seen = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, masks=True,
        progress=progress, desc="context identifiability",
    ):  # fmt: skip
        where = _locations(_object_tokens(anatomy, batch, rule, threshold))
        positions = []
        for accumulated, each in zip(counts, models, strict=True):
            scores, _ = token_scores(each, batch.images, batch.labels, layers, states)
            found = _stacked(scores, "block_output", layers, "position")[..., prefix:]
            positions.append(found)
            for location, tokens in where.items():
                accumulated.histograms[location].add(found[:, tokens])
            if attention_change:
                change = _stacked(scores, "attention", layers) - _stacked(
                    scores, "block_input", layers
                )
                for location, tokens in where.items():
                    accumulated.add_change(location, change[..., prefix:][:, tokens])
        for location, tokens in where.items():
            images_without[location] += int((~tokens.any(1)).sum())
            if baseline is not None:
                differences[location].add(positions[0][:, tokens], positions[1][:, tokens])
        seen += batch.images.shape[0]

    def result(accumulated: _LocationCounts) -> ContextIdentifiabilityResult:
        histograms = accumulated.histograms
        tests = _permutation_tests(
            histograms["object"].counts, histograms["context"].counts,
            histograms["object"].values(), permutations, seed, official,
        )  # fmt: skip
        outcome = ContextIdentifiabilityResult(
            layers=layers,
            num_classes=num_classes,
            num_images=seen,
            rule=rule,
            threshold=threshold,
            histograms=histograms,
            difference=tests[0],
            p_values=tests[1],
            permutations=permutations,
            seed=seed,
            official=official,
            images_without=images_without,
        )
        if attention_change:
            totals = {loc: histograms[loc].total() for loc in LOCATIONS}
            outcome.change_rises = accumulated.rises
            outcome.change_mean = {
                loc: accumulated.change_sum[loc] / totals[loc].double() for loc in LOCATIONS
            }
            if official:
                first, second, values = _value_histograms(accumulated.changes)
                scale = 1.0
            else:
                first, second = (
                    torch.stack([totals[loc] - accumulated.rises[loc], accumulated.rises[loc]], 1)
                    for loc in LOCATIONS
                )
                values, scale = torch.tensor([0.0, 1.0], dtype=torch.float64), 100.0
            difference, p_values = _permutation_tests(
                first, second, values, permutations, seed, official
            )
            outcome.change_difference, outcome.change_p_values = difference * scale, p_values
        return outcome

    main = result(counts[0])
    if baseline is not None:
        main.baseline = result(counts[1])
        main.baseline_p_values = {
            loc: table.p_values("greater") for loc, table in differences.items()
        }
    return main


def _stacked(
    scores: dict[tuple[str, int], TokenScores],
    state: str,
    layers: Sequence[int],
    attribute: str = "label_logit",
) -> torch.Tensor:
    """(L, B, N) of one attribute of a state's scores over ``layers``."""
    return torch.stack([getattr(scores[(state, block)], attribute) for block in layers])


def _permutation_tests(
    first: torch.Tensor | list,
    second: torch.Tensor | list,
    values: torch.Tensor | list,
    permutations: int,
    seed: int,
    official: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: (observed difference of means, p-value) of the one-sided permutation test
    from value histograms ``first[i]``, ``second[i]`` over ``values`` (or ``values[i]``); NaN
    where a group is empty."""
    found = []
    for i in range(len(first)):
        block_values = values[i] if isinstance(values, list) else values
        if int(first[i].sum()) == 0 or int(second[i].sum()) == 0:
            found.append((float("nan"), float("nan")))
            continue
        found.append(
            permutation_test(first[i], second[i], block_values, permutations, seed, official)
        )
    difference, p_values = zip(*found, strict=True)
    return torch.tensor(difference, dtype=torch.float64), torch.tensor(
        p_values, dtype=torch.float64
    )


def _value_histograms(
    changes: dict[str, list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per block, counts of each distinct value in the object and context tokens' changes."""
    object_changes = torch.cat(changes["object"], 1) if changes["object"] else None
    context_changes = torch.cat(changes["context"], 1) if changes["context"] else None
    parts = [c for c in (object_changes, context_changes) if c is not None]
    first, second, values = [], [], []
    for block in range(parts[0].shape[0]):
        pooled = torch.cat([part[block] for part in parts]).double()
        unique, inverse = torch.unique(pooled, return_inverse=True)
        split = 0 if object_changes is None else object_changes.shape[1]
        first.append(torch.bincount(inverse[:split], minlength=len(unique)))
        second.append(torch.bincount(inverse[split:], minlength=len(unique)))
        values.append(unique)
    return first, second, values


@dataclass
class RemovalOutcome:
    """One removal: the remaining tokens' identifiability with and without the removed ones.

    Attributes:
        removed: The location dropped after the position embedding (``"context"`` or
            ``"object"``).
        kept: The other location: the image tokens that remain and are compared.
        num_images: Images with at least one remaining image token (the figures' images).
        num_skipped: Images without any token of the kept location (left out).
        removed_histogram: Rank positions of the label for the remaining image tokens, with
            the other tokens removed, per block.
        unperturbed_histogram: The same tokens' rank positions in the unperturbed model.
        removed_rate: (L,) per image, % of the remaining image tokens whose top-1 class is
            the label, averaged over images.
        unperturbed_rate: (L,) the same for the same tokens in the unperturbed model.
        official_rate: (L,) ``removed_rate`` with the [CLS] token counted among the tokens,
            the aggregation of the paper's 44.70 % / 38.68 % (equal to ``removed_rate`` for
            models whose head reads no [CLS]).
        p_values: (L,) two-sided Wilcoxon signed-rank p-values of the paired rank positions
            (the same token with and without the removal).
        accuracy_removed: % of the images classified as their label after the removal.
        accuracy_unperturbed: % of the same images classified as their label.
    """

    removed: str
    kept: str
    num_images: int
    num_skipped: int
    removed_histogram: RankHistogram
    unperturbed_histogram: RankHistogram
    removed_rate: torch.Tensor
    unperturbed_rate: torch.Tensor
    official_rate: torch.Tensor
    p_values: torch.Tensor
    accuracy_removed: float
    accuracy_unperturbed: float

    def to_dict(self) -> dict:
        """Plain-Python view (JSON-safe)."""
        return json_safe(
            dict(
                removed=self.removed,
                kept=self.kept,
                num_images=self.num_images,
                num_skipped=self.num_skipped,
                kept_tokens=self.removed_histogram.total()[0],
                removed_top1_percent=self.removed_histogram.top1(),
                unperturbed_top1_percent=self.unperturbed_histogram.top1(),
                removed_mean_rank=self.removed_histogram.mean_rank(),
                unperturbed_mean_rank=self.unperturbed_histogram.mean_rank(),
                removed_rate_percent=self.removed_rate,
                unperturbed_rate_percent=self.unperturbed_rate,
                official_rate_percent=self.official_rate,
                p_value=self.p_values,
                accuracy_removed_percent=self.accuracy_removed,
                accuracy_unperturbed_percent=self.accuracy_unperturbed,
            )
        )


@dataclass
class ContextRemovalResult(AnalysisResult):
    """Identifiability of the tokens that remain when object or context tokens are removed.

    Attributes:
        layers: Block indices (from 0).
        num_classes: Classes ``C``.
        num_images: Images streamed.
        rule: How tokens were labelled (:data:`TOKEN_RULES`), with ``threshold``.
        threshold: The patch share of the ``"share"`` rule.
        outcomes: ``{removed location: RemovalOutcome}``.
    """

    name = "context_removal"

    layers: list[int]
    num_classes: int
    num_images: int
    rule: str
    threshold: float
    outcomes: dict[str, RemovalOutcome]

    def __getitem__(self, removed: str) -> RemovalOutcome:
        """The outcome of removing ``"context"`` or ``"object"`` tokens."""
        check_choice("removed", removed, tuple(self.outcomes))
        return self.outcomes[removed]

    def to_dict(self) -> dict:
        """Per removal: the remaining tokens' figures in both conditions, tests, accuracy."""
        return json_safe(
            dict(
                analysis=self.name,
                layers=self.layers,
                num_classes=self.num_classes,
                num_images=self.num_images,
                rule=self.rule,
                threshold=self.threshold,
                outcomes={name: outcome.to_dict() for name, outcome in self.outcomes.items()},
            )
        )

    def table(self) -> str:
        """One markdown table per removal: rows are blocks."""
        tables = []
        for outcome in self.outcomes.values():
            header = ["layer", "unperturbed top-1 %", "removed top-1 %"]
            header += ["unperturbed rate %", "removed rate %", "official rate %", "p (paired)"]
            rows = [
                [
                    layer,
                    outcome.unperturbed_histogram.top1()[i].item(),
                    outcome.removed_histogram.top1()[i].item(),
                    outcome.unperturbed_rate[i].item(),
                    outcome.removed_rate[i].item(),
                    outcome.official_rate[i].item(),
                    format_p_value(outcome.p_values[i].item()),
                ]
                for i, layer in enumerate(self.layers)
            ]
            title = (
                f"**{outcome.kept} tokens with the {outcome.removed} tokens removed** "
                f"({outcome.num_images} images, {outcome.num_skipped} without {outcome.kept} "
                f"tokens left out; accuracy {outcome.accuracy_unperturbed:.2f} % -> "
                f"{outcome.accuracy_removed:.2f} %)"
            )
            tables.append(title + "\n\n" + markdown_table(header, rows))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None) -> Any:
        """Per removal, the remaining tokens' top-1 % per block, unperturbed (solid) and
        with the other tokens removed (dashed)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(self.layers) + 3), 3.5))
        for outcome in self.outcomes.values():
            colour = _COLOURS[outcome.kept]
            ax.plot(
                self.layers, outcome.unperturbed_histogram.top1(), "o-", color=colour,
                label=f"{outcome.kept} tokens, unperturbed",
            )  # fmt: skip
            ax.plot(
                self.layers, outcome.removed_histogram.top1(), "o--", color=colour,
                label=f"{outcome.kept} tokens, {outcome.removed} removed",
            )  # fmt: skip
        ax.set_xticks(self.layers)
        ax.set_ylim(0, 100)
        ax.set_xlabel("layer (block index, from 0)")
        ax.set_ylabel("% of tokens with top-1 = label")
        ax.set_title(f"context removal ({self.num_images} images)")
        ax.legend(fontsize=7, loc="upper left")
        figure = ax.figure
        figure.tight_layout()
        return figure


class _RemovalCounts:
    """What :func:`context_removal` accumulates for one removal."""

    def __init__(self, depth: int, num_classes: int) -> None:
        self.removed = RankHistogram(depth, num_classes)
        self.unperturbed = RankHistogram(depth, num_classes)
        self.differences = RankDifferenceHistogram(depth, num_classes)
        self.rate_sums = {
            key: torch.zeros(depth, dtype=torch.float64)
            for key in ("removed", "unperturbed", "official")
        }
        self.correct = {"removed": 0, "unperturbed": 0}
        self.images = self.skipped = 0

    def add(
        self,
        removed: torch.Tensor,
        unperturbed: torch.Tensor,
        prefix: int,
        cls: int | None,
        correct: dict[str, torch.Tensor],
    ) -> None:
        """Count (L, g, prefix + c) rank positions of ``g`` images that keep ``c`` tokens."""
        kept = {"removed": removed[..., prefix:], "unperturbed": unperturbed[..., prefix:]}
        self.removed.add(kept["removed"])
        self.unperturbed.add(kept["unperturbed"])
        self.differences.add(kept["unperturbed"], kept["removed"])
        for key, positions in kept.items():
            self.rate_sums[key] += 100 * (positions == 0).double().mean(2).sum(1).cpu()
        official = kept["removed"] == 0
        if cls is not None:
            official = torch.cat([official, removed[..., cls : cls + 1] == 0], -1)
        self.rate_sums["official"] += 100 * official.double().mean(2).sum(1).cpu()
        for key, hits in correct.items():
            self.correct[key] += int(hits.sum())
        self.images += removed.shape[1]

    def outcome(self, removed: str, kept: str) -> RemovalOutcome:
        images = max(self.images, 1)
        return RemovalOutcome(
            removed=removed,
            kept=kept,
            num_images=self.images,
            num_skipped=self.skipped,
            removed_histogram=self.removed,
            unperturbed_histogram=self.unperturbed,
            removed_rate=self.rate_sums["removed"] / images,
            unperturbed_rate=self.rate_sums["unperturbed"] / images,
            official_rate=self.rate_sums["official"] / images,
            p_values=self.differences.p_values("two-sided"),
            accuracy_removed=100 * self.correct["removed"] / images,
            accuracy_unperturbed=100 * self.correct["unperturbed"] / images,
        )


def context_removal(
    model: torch.nn.Module | ViTAnatomy,
    data: Data,
    *,
    remove: str | Sequence[str] = ("context", "object"),
    layers: int | Sequence[int] | str = "all",
    rule: str = "share",
    threshold: float = 0.5,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> ContextRemovalResult:
    """Identifiability of the remaining tokens when object or context tokens are removed.

    The object (or context) image tokens are dropped from the sequence right after the
    position embedding ([CLS] and any other prefix tokens stay), the shortened sequence runs
    through the blocks, and the remaining image tokens' identifiability at every block is
    compared with that of the same tokens in the unperturbed model (official
    ``tokens_perturbation.py``, which reads the last block only). Paper, ViT-B/32 last block:
    removing the context tokens leaves 44.70 % of the object tokens identifiable (71.92 %
    unperturbed); removing the object tokens leaves 38.68 % of the context tokens (56.24 %
    unperturbed). Those removal figures count the [CLS] token among the tokens of each image
    (``result["context"].official_rate[-1]``), the unperturbed ones are pooled over tokens
    (``result["context"].unperturbed_histogram.top1()[-1]``).

    Images keep different numbers of tokens: each batch is split into groups of images that
    keep the same number, and each group runs as one shortened batch. Images without any
    token of the kept location are left out (counted in ``num_skipped``).

    Args:
        model: A ViT whose token sequence can be shortened (see
            :func:`~class_space_saliency.adapters.find_token_path`: timm ViT/DeiT,
            torchvision, CLIP, Hugging Face ViT/DeiT/DINOv2; not models with position
            information inside attention, such as BEiT or EVA).
        data: ``(images, labels, masks)`` batches, a dataset of ``(image, label, mask)``
            items or an iterable of such batches; masks are required.
        remove: ``"context"``, ``"object"`` or both (one outcome each).
        layers: Blocks (int, list of ints or ``"all"``).
        rule: How masks label tokens (:func:`mask_to_tokens`).
        threshold: Share of the patch inside the mask that makes a token object (``"share"``).
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`ContextRemovalResult`; ``result["context"]`` is the outcome of removing the
        context tokens.

    Raises:
        ValueError: If the data has no masks, or for bad options.
        UnsupportedModelError: If tokens cannot be removed from the model's sequence, or
            the model's tokens are not one per patch.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.context_removal(model, (images, labels, masks))
        >>> result["context"].kept, result["context"].official_rate.shape
        ('object', torch.Size([3]))
    """
    removals = (remove,) if isinstance(remove, str) else tuple(dict.fromkeys(remove))
    if not removals:
        raise ValueError(f"remove must name 'context', 'object' or both, got {remove!r}")
    for removal in removals:
        check_choice("remove", removal, LOCATIONS)
    _check_rule(rule, threshold)
    anatomy = _as_anatomy(model)
    path = find_token_path(anatomy.model)
    layers = anatomy.resolve_layers(layers)
    counts = {removal: _RemovalCounts(len(layers), anatomy.num_classes) for removal in removals}
    seen = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, masks=True,
        progress=progress, desc="context removal",
    ):  # fmt: skip
        where = _locations(_object_tokens(anatomy, batch, rule, threshold))
        scores, logits = token_scores(anatomy, batch.images, batch.labels, layers, {"block_output"})
        unperturbed = _stacked(scores, "block_output", layers, "position")
        correct = anatomy.logits(logits).argmax(-1) == batch.labels
        with torch.no_grad(), anatomy.capture():  # eval mode for the embedding
            embedded = path.embed(batch.images)
        for removal in removals:
            kept = where["object" if removal == "context" else "context"]
            _remove_and_count(
                anatomy, path.classify, counts[removal], embedded, kept, batch.labels,
                unperturbed, correct, layers,
            )  # fmt: skip
        seen += batch.images.shape[0]
    outcomes = {
        removal: counts[removal].outcome(removal, "object" if removal == "context" else "context")
        for removal in removals
    }
    return ContextRemovalResult(
        layers=layers,
        num_classes=anatomy.num_classes,
        num_images=seen,
        rule=rule,
        threshold=threshold,
        outcomes=outcomes,
    )


def _remove_and_count(
    anatomy: ViTAnatomy,
    classify: Any,
    counts: _RemovalCounts,
    embedded: torch.Tensor,
    kept: torch.Tensor,
    labels: torch.Tensor,
    unperturbed: torch.Tensor,
    correct: torch.Tensor,
    layers: Sequence[int],
) -> None:
    """Run the shortened sequences of a batch, one group per number of kept tokens, and count.

    Args:
        embedded: (B, prefix + n, D) tokens after the position embedding.
        kept: (B, n) image tokens that remain.
        unperturbed: (L, B, prefix + n) rank positions in the unperturbed model.
        correct: (B,) whether the unperturbed model classifies each image as its label.
    """
    prefix, cls = anatomy.num_prefix_tokens, anatomy.readout.cls_index
    numbers = kept.sum(1)
    counts.skipped += int((numbers == 0).sum())
    for number in numbers.unique().tolist():
        if number == 0:
            continue
        rows = torch.nonzero(numbers == number).flatten()
        image_tokens = torch.nonzero(kept[rows])[:, 1].reshape(len(rows), number) + prefix
        prefix_tokens = torch.arange(prefix, device=kept.device).expand(len(rows), prefix)
        index = torch.cat([prefix_tokens, image_tokens], 1)  # (g, prefix + number)
        tokens = embedded[rows].gather(1, index[..., None].expand(-1, -1, embedded.shape[-1]))
        scores, logits = token_scores(
            anatomy, tokens, labels[rows], layers, {"block_output"}, run=classify
        )
        removed = _stacked(scores, "block_output", layers, "position")
        before = unperturbed[:, rows].gather(2, index.expand(len(layers), -1, -1))
        hits = {
            "removed": anatomy.logits(logits).argmax(-1) == labels[rows],
            "unperturbed": correct[rows],
        }
        counts.add(removed, before, prefix, cls, hits)
