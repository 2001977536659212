"""Attention knock-outs on unmodified timm and Hugging Face ViTs.

**Knock-outs** (Vilas et al. 2023, Sec. 5; official ``models/vit_edited.py`` and
``perturbation/attn_perturbation.py``) edit the post-softmax attention probabilities
``A`` (B, heads, N, N) of the chosen blocks (every block in the paper) before they weigh the
values, for the *image-token query rows* ``i >= P`` only (``P`` prefix tokens: [CLS],
distillation and register tokens keep their rows; the official ViT-B has ``P = 1`` and edits
rows ``1 .. N-1``):

- ``"self_only"``: ``A[i, :] = 0; A[i, i] = 1``: each image token attends only to itself.
  Paper, ViT-B/32, last block: 0.126 % identifiable image tokens (60.73 % unperturbed).
- ``"no_cls"``: ``A[i, cls] = 0``: image tokens do not read [CLS]. The rows are *not*
  renormalised (as the official code; they sum to ``1 - A[i, cls]``); ``renormalise=True``
  divides them by their new sum. Paper: 60.71 %.

The paper's knocked-out figures count the [CLS] token with the image tokens (the official
``print_attn_perturb`` reads all 50 positions of ``attn-{mode}_dec.pt``, the unperturbed
figure only the 49 image tokens); :func:`attention_knockout` reports image tokens under every
mode, per block, next to the unperturbed model, and the top-1 accuracy of each run.

Everything runs on the model as it is (no conversion into a re-implementation) through
:meth:`~class_space_saliency.anatomy.ViTAnatomy.intervene`; contexts nest and always remove
what they add, also on exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._hooks import Edit
from .._stats import signed_rank_test
from .._validation import check_bool, check_choice
from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ._editing import class_token_index, editable_anatomy
from ._result import AnalysisResult, format_p_value, json_safe, markdown_table
from ._stream import Data, RankHistogram, stream
from .identifiability import (
    TOKEN_GROUPS,
    IdentifiabilityResult,
    _check_components,
    _Counts,
    _positions,
)

MODES = ("self_only", "no_cls")
"""Knock-out modes of the paper (see the module docstring)."""


def knockout_edit(anatomy: ViTAnatomy, mode: str, renormalise: bool = False) -> Edit:
    """The edit of attention probabilities (B, heads, N, N) that a knock-out ``mode`` makes.

    Args:
        anatomy: The model's anatomy (its prefix tokens and [CLS] position).
        mode: ``"self_only"`` or ``"no_cls"`` (see the module docstring).
        renormalise: ``"no_cls"`` only: divide the edited rows by their new sum (the
            ``"self_only"`` rows sum to one already).

    Returns:
        ``f(probs) -> edited probs`` (a new tensor; image-token rows edited).

    Raises:
        UnsupportedModelError: ``"no_cls"`` on a model without a [CLS] token.

    Example:
        >>> edit = knockout_edit(ViTAnatomy.from_model(model), "self_only")
        >>> edit(torch.full((1, 1, 3, 3), 1 / 3))[0, 0]  # row 0 is [CLS]: unchanged
        tensor([[0.3333, 0.3333, 0.3333],
                [0.0000, 1.0000, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    check_choice("mode", mode, MODES)
    check_bool("renormalise", renormalise)
    prefix = anatomy.num_prefix_tokens
    if mode == "self_only":

        def self_only(probs: torch.Tensor) -> torch.Tensor:
            identity = torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device)
            edited = probs.clone()
            edited[..., prefix:, :] = identity[prefix:]
            return edited

        return self_only
    cls = class_token_index(anatomy)
    if cls is None:
        raise UnsupportedModelError(
            f"knock-out 'no_cls' needs a [CLS] token; {type(anatomy.model).__name__} has none"
        )

    def no_cls(probs: torch.Tensor) -> torch.Tensor:
        edited = probs.clone()
        edited[..., prefix:, cls] = 0
        if renormalise:
            rows = edited[..., prefix:, :]
            total = rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
            edited[..., prefix:, :] = rows / total
        return edited

    return no_cls


@contextlib.contextmanager
def knockout(
    model: nn.Module | ViTAnatomy,
    mode: str,
    blocks: int | Sequence[int] | str = "all",
    *,
    renormalise: bool = False,
) -> Iterator[nn.Module]:
    """Knock out attention in the chosen blocks for the length of a ``with`` block.

    Inside the context every forward pass of the model uses the edited probabilities of
    :func:`knockout_edit` (``"self_only"``: image tokens attend only to themselves;
    ``"no_cls"``: not to [CLS], rows not renormalised unless ``renormalise=True``). On exit,
    also after an exception, every hook, fused-attention flag and attention implementation
    is restored; knock-outs nest with each other and with
    :meth:`~class_space_saliency.anatomy.ViTAnatomy.capture` (which then records the edited
    probabilities). The training mode is left as it is (edits follow attention dropout, as
    in the official code).

    Args:
        model: A timm ViT / BEiT / EVA or Hugging Face ViT-like classifier (or its anatomy).
        mode: ``"self_only"`` or ``"no_cls"``.
        blocks: Blocks to edit: ``"all"`` (the paper), an int or a list of ints.
        renormalise: ``"no_cls"``: divide the edited rows by their new sum.

    Yields:
        The model.

    Raises:
        UnsupportedModelError: For other families (torchvision, open_clip, Swin), or
            ``"no_cls"`` on a model without [CLS].

    Example:
        >>> from class_space_saliency import analysis
        >>> with analysis.knockout(model, "self_only") as knocked:
        ...     edited = knocked(images)
        >>> bool((edited != model(images)).any())
        True
    """
    anatomy = editable_anatomy(model)
    edit = knockout_edit(anatomy, mode, renormalise)
    layers = anatomy.resolve_layers(blocks)
    with anatomy.intervene(attention={block: edit for block in layers}):
        yield anatomy.model


@dataclass
class KnockoutResult(AnalysisResult):
    """Identifiability under each knock-out mode next to the unperturbed model.

    Attributes:
        runs: ``"none"`` (unperturbed) and the knock-out modes, in order.
        results: ``{run: IdentifiabilityResult}``, all on the same images.
        accuracy: ``{run: top-1 accuracy in %}`` of the model's output against the labels.
        p_values: ``{(mode, component, group): (L,)}`` two-sided Wilcoxon signed-rank
            p-values of "the label's rank differs from the unperturbed model's", paired by
            image and token (NaN where no token changed).
        blocks: The knocked-out blocks.
        renormalise: Whether ``"no_cls"`` rows were renormalised.
    """

    name = "attention_knockout"

    runs: tuple[str, ...]
    results: dict[str, IdentifiabilityResult]
    accuracy: dict[str, float]
    p_values: dict[tuple[str, str, str], torch.Tensor]
    blocks: list[int]
    renormalise: bool = False

    def __getitem__(self, run: str) -> IdentifiabilityResult:
        """The identifiability result of one run (``"none"`` or a mode)."""
        check_choice("run", run, self.runs)
        return self.results[run]

    @property
    def layers(self) -> list[int]:
        """The blocks whose identifiability was measured."""
        return self.results["none"].layers

    def to_dict(self) -> dict:
        """Per run: accuracy and identifiability (as ``IdentifiabilityResult.to_dict``)."""
        return json_safe(
            dict(
                blocks_knocked_out=self.blocks,
                renormalise=self.renormalise,
                runs={
                    run: dict(
                        accuracy_percent=self.accuracy[run],
                        identifiability=self.results[run].to_dict(),
                        p_value_vs_unperturbed={
                            f"{component}/{group}": p
                            for (mode, component, group), p in self.p_values.items()
                            if mode == run
                        },
                    )
                    for run in self.runs
                },
            )
        )

    def table(self) -> str:
        """Per component: identifiability rate and mean rank of image tokens per block and run."""
        base = self.results["none"]
        modes = [run for run in self.runs if run != "none"]
        accuracy = ", ".join(f"{run}: {self.accuracy[run]:.2f} %" for run in self.runs)
        tables = [f"top-1 accuracy ({base.num_images} images): {accuracy}"]
        for component in base.components:
            header = ["layer"] + [f"{run} rate %" for run in self.runs]
            header += [f"{run} rank" for run in self.runs]
            header += [f"{mode} p (image)" for mode in modes]
            rows = []
            for i, layer in enumerate(self.layers):
                row: list[Any] = [layer]
                row += [self.results[run].image_rate[component][i].item() for run in self.runs]
                row += [
                    self.results[run].histograms[(component, "image")].mean_rank()[i].item()
                    for run in self.runs
                ]
                row += [
                    format_p_value(self.p_values[(mode, component, "image")][i].item())
                    for mode in modes
                ]
                rows.append(row)
            title = (
                f"**{component}**: image tokens whose top-1 class is the label (%, per image) and "
                f"mean normalised rank; attention knocked out in blocks {self.blocks}"
            )
            tables.append(title + "\n\n" + markdown_table(header, rows, digits=3))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None) -> Any:
        """Identifiability rate of image tokens (and of [CLS], dashed) per block and run."""
        import matplotlib.pyplot as plt

        components = self.results["none"].components
        if ax is None:
            _, axes = plt.subplots(1, len(components), figsize=(5.5 * len(components), 3.6))
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        for axis, component in zip(axes, components, strict=False):
            colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for colour, run in zip(colours, self.runs, strict=False):
                result = self.results[run]
                label = "unperturbed" if run == "none" else run
                label += f" (acc. {self.accuracy[run]:.1f} %)"
                axis.plot(self.layers, result.image_rate[component], "o-", color=colour,
                          label=f"{label}: image tokens")  # fmt: skip
                if "cls" in result.groups:
                    cls = result.histograms[(component, "cls")].top1()
                    axis.plot(self.layers, cls, "s--", color=colour, ms=3, alpha=0.7,
                              label=f"{label}: [CLS]")  # fmt: skip
            axis.set_xticks(self.layers)
            axis.set_ylim(-2, 102)
            axis.set_xlabel("layer (block index, from 0)")
            axis.set_ylabel("top-1 class = label (%)")
            axis.set_title(f"{component}: attention knock-outs ({self.results['none'].num_images} "
                           "images)")  # fmt: skip
            axis.legend(fontsize=6, loc="upper left")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


def attention_knockout(
    model: nn.Module | ViTAnatomy,
    data: Data,
    *,
    modes: str | Sequence[str] = MODES,
    blocks: int | Sequence[int] | str = "all",
    layers: int | Sequence[int] | str = "all",
    components: str | Sequence[str] = ("residual",),
    renormalise: bool = False,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> KnockoutResult:
    """Class identifiability with attention knocked out, next to the unperturbed model.

    Every batch runs once unperturbed and once under each mode (:func:`knockout` on
    ``blocks``); the label's rank in the class-space projection of every token is counted
    per run as in :func:`~class_space_saliency.analysis.identifiability`, and paired by image
    and token for a two-sided Wilcoxon signed-rank test per block against the unperturbed run.
    Paper (ViT-B/32, ImageNet-S, last block): 60.73 % of image tokens identifiable unperturbed,
    0.126 % with ``"self_only"``, 60.71 % with ``"no_cls"`` (all blocks knocked out).

    Args:
        model: A timm ViT / BEiT / EVA or Hugging Face ViT-like classifier (or its anatomy).
        data: Images, ``(images, labels[, masks])``, a dataset or an iterable of batches.
        modes: Knock-out modes to run (``"self_only"``, ``"no_cls"``).
        blocks: Blocks whose attention is knocked out (``"all"``: the paper).
        layers: Blocks whose identifiability is reported.
        components: ``"residual"``, ``"attention"``, ``"mlp"`` or several.
        renormalise: ``"no_cls"``: renormalise the edited rows (the official code does not).
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`KnockoutResult`; ``result["self_only"]["residual"].token_rate`` is the
        identifiability rate per block under ``"self_only"``.

    Raises:
        UnsupportedModelError: For families whose attention cannot be edited, or
            ``"no_cls"`` on a model without [CLS].

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.attention_knockout(model, (images, labels))
        >>> result.runs, result["self_only"]["residual"].token_rate.shape
        (('none', 'self_only', 'no_cls'), torch.Size([3]))
    """
    anatomy = editable_anatomy(model)
    modes = (modes,) if isinstance(modes, str) else tuple(dict.fromkeys(modes))
    if not modes:
        raise ValueError(f"modes must name at least one of {MODES}")
    edits = {mode: knockout_edit(anatomy, mode, renormalise) for mode in modes}
    knocked = anatomy.resolve_layers(blocks)
    components = _check_components(components)
    layers = anatomy.resolve_layers(layers)
    groups = TOKEN_GROUPS if set(layers) & set(anatomy.cls_blocks) else ("image",)
    C = anatomy.num_classes
    runs = ("none", *modes)
    counts = {run: _Counts(components, groups, len(layers), C) for run in runs}
    correct = dict.fromkeys(runs, 0)
    # paired differences (knocked-out position - unperturbed position), shifted by C - 1
    differences = {
        (mode, component, group): RankHistogram(len(layers), 2 * C - 1)
        for mode in modes
        for component in components
        for group in groups
    }
    seen = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, progress=progress,
        desc="attention knock-out",
    ):  # fmt: skip
        found = {}
        for run in runs:
            edit = {block: edits[run] for block in knocked} if run != "none" else {}
            with anatomy.intervene(attention=edit):
                found[run], logits = _positions(
                    anatomy, batch.images, batch.labels, components, layers
                )
            correct[run] += int((logits.argmax(-1) == batch.labels).sum())
            for component in components:
                counts[run].add(component, found[run][component])
        for (mode, component, group), histogram in differences.items():
            columns = slice(0, 1) if group == "cls" else slice(1, None)  # see _positions
            knocked_out, unperturbed = (found[r][component][:, :, columns] for r in (mode, "none"))
            shift = knocked_out - unperturbed + C - 1
            histogram.add(torch.where(unperturbed >= 0, shift, -1))
        seen += batch.images.shape[0]
    return KnockoutResult(
        runs=runs,
        results={run: counts[run].result(layers, seen) for run in runs},
        accuracy={run: 100 * correct[run] / seen for run in runs},
        p_values={
            key: torch.tensor(
                [signed_rank_test(row.numpy(), "two-sided")[1] for row in histogram.counts],
                dtype=torch.float64,
            )
            for key, histogram in differences.items()
        },
        blocks=knocked,
        renormalise=renormalise,
    )
