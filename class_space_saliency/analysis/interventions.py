"""Attention knock-outs and activation patching on unmodified timm and Hugging Face ViTs.

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

**Activation patching** (as TransformerLens's ``patching.py``, with class logits) runs the
*corrupted* images with chosen activations (:class:`Site`) replaced by those of the *clean*
images, and measures the share of the target-logit difference that comes back,
``(patched - corrupted) / (clean - corrupted)``.

Everything runs on the model as it is (no conversion into a re-implementation) through
:meth:`~class_space_saliency.anatomy.ViTAnatomy.intervene`; contexts nest and always remove
what they add, also on exceptions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._hooks import Edit, eval_mode
from .._stats import signed_rank_test
from .._validation import check_bool, check_choice, check_inputs, check_target
from ..adapters import UnsupportedModelError, hf, timm_eva, timm_vit
from ..anatomy import ViTAnatomy
from ._result import AnalysisResult, format_p_value, json_safe, markdown_table
from ._stream import Batch, Data, RankHistogram, _disabled, _known_length, stream
from .identifiability import (
    TOKEN_GROUPS,
    IdentifiabilityResult,
    _as_anatomy,
    _check_components,
    _Counts,
    _positions,
)

MODES = ("self_only", "no_cls")
"""Knock-out modes of the paper (see the module docstring)."""

SITE_KINDS = ("residual", "head", "pattern")
"""What a :class:`Site` patches: block outputs, attention heads' outputs, attention patterns."""

GRIDS = ("token", "head")
"""The grids of :func:`patching_grid`: block x token (residual stream) and block x head."""

EDITABLE_FAMILIES = (timm_vit.NAME, timm_eva.NAME, hf.NAME)
"""Model families whose attention probabilities and activations can be edited."""

_WHY_NOT = {
    "torchvision ViT": "nn.MultiheadAttention computes its probabilities and their weighted "
    "sum in one call, with no place to edit them in between",
    "CLIP zero-shot": "open_clip's nn.MultiheadAttention computes its probabilities and their "
    "weighted sum in one call, with no place to edit them in between",
    "Swin": "its attention runs in shifted windows, not over one sequence of [CLS] and patch "
    "tokens",
    "custom": "a hand-described anatomy does not say how its attention computes probabilities",
}


def _editable(model: nn.Module | ViTAnatomy) -> ViTAnatomy:
    """The anatomy of a model whose attention and activations can be edited."""
    anatomy = _as_anatomy(model)
    if anatomy.family not in EDITABLE_FAMILIES:
        reason = _WHY_NOT.get(anatomy.family, "its attention is not supported")
        raise UnsupportedModelError(
            f"attention interventions support {', '.join(EDITABLE_FAMILIES)} models; "
            f"{type(anatomy.model).__name__} ({anatomy.family}) is not supported: {reason}"
        )
    if anatomy.attention_modules is None:
        raise UnsupportedModelError(
            f"attention interventions need the attention modules of {type(anatomy.model).__name__}:"
            f" {anatomy.attention_reason or 'its blocks have no attention with attn_drop'}"
        )
    return anatomy


# ---------------------------------------------------------------------------- knock-outs
def class_token_index(anatomy: ViTAnatomy) -> int | None:
    """Position of the [CLS] token (0 in timm and Hugging Face ViTs), or ``None`` if none.

    Pooled heads keep a [CLS] token they do not read (timm ``global_pool="avg"`` with a class
    token, Hugging Face BEiT); register-only models have none.
    """
    if anatomy.num_prefix_tokens == 0:
        return None
    if anatomy.readout.cls_index is not None:
        return anatomy.readout.cls_index
    model = anatomy.model
    owner = getattr(getattr(model, "base_model", model), "embeddings", model)
    return 0 if getattr(owner, "cls_token", None) is not None else None


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
    anatomy = _editable(model)
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
    anatomy = _editable(model)
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


# ---------------------------------------------------------------------------- patching
@dataclass(frozen=True)
class Site:
    """One activation that :func:`patch` replaces.

    Attributes:
        kind: ``"residual"``: the block's output (the residual stream after it, (B, N, D));
            ``"head"``: attention heads' outputs, the input of the attention's output
            projection (timm ``attn.proj``, Hugging Face ``o_proj``) split into heads
            (B, N, heads, head_dim); ``"pattern"``: attention probabilities (B, heads, N, N),
            ``tokens`` selecting query rows.
        block: Block index (negative: from the last).
        head: ``"head"``/``"pattern"``: one head, or ``None`` for every head.
        tokens: Token positions in the sequence (prefix tokens first: [CLS] is 0), an int or
            several; ``None`` for every token.

    Example:
        >>> Site("residual", 2, tokens=0)  # the stream after block 2 at [CLS]
        Site(kind='residual', block=2, head=None, tokens=(0,))
        >>> Site("pattern", -1, 1, tokens=[0]).tokens  # head 1's [CLS] row in the last block
        (0,)
    """

    kind: str
    block: int
    head: int | None = None
    tokens: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, SITE_KINDS)
        _check_int("block", self.block)
        if self.head is not None:
            if self.kind == "residual":
                raise ValueError("a 'residual' site has no head: pass head=None")
            _check_int("head", self.head, minimum=0)
        if self.tokens is not None:
            tokens = (self.tokens,) if isinstance(self.tokens, int) else self.tokens
            if isinstance(tokens, torch.Tensor):
                tokens = tokens.tolist()
            if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
                raise TypeError(f"tokens must be an int, ints or None, got {self.tokens!r}")
            for token in tokens:
                _check_int("tokens", token, minimum=0)
            object.__setattr__(self, "tokens", tuple(tokens))


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


Location = tuple[str, int]
"""``(kind, block)``: one place activations are read and replaced."""


@dataclass
class _Geometry:
    """Token and head counts of a model on one input size, and where each site kind lives."""

    anatomy: ViTAnatomy
    grid: tuple[int, int]
    num_heads: list[int]

    @classmethod
    def of(cls, anatomy: ViTAnatomy, images: torch.Tensor) -> _Geometry:
        heads = [_num_heads(module) for module in anatomy.attention_modules]
        return cls(anatomy, anatomy.grid_size(images.shape), heads)

    @property
    def num_tokens(self) -> int:
        """Prefix tokens and one token per patch."""
        return self.anatomy.num_prefix_tokens + self.grid[0] * self.grid[1]

    def resolve(self, site: Site) -> Site:
        """``site`` with a non-negative block, checked against the model."""
        block = self.anatomy.resolve_layers(site.block)[0]
        if site.head is not None and site.head >= self.num_heads[block]:
            raise ValueError(
                f"head {site.head} is out of range: block {block} has {self.num_heads[block]}"
            )
        if site.tokens is not None and max(site.tokens) >= self.num_tokens:
            raise ValueError(
                f"tokens {site.tokens} are out of range: the model has {self.num_tokens} tokens "
                f"({self.anatomy.num_prefix_tokens} prefix + patches) for this input size"
            )
        return Site(site.kind, block, site.head, site.tokens)

    def mask(self, copies: Sequence[Sequence[Site]], location: Location) -> torch.Tensor:
        """(copies, N, heads) bool: what each copy patches at ``location`` (heads 1: residual)."""
        kind, block = location
        heads = 1 if kind == "residual" else self.num_heads[block]
        mask = torch.zeros(len(copies), self.num_tokens, heads, dtype=torch.bool)
        for copy, sites in enumerate(copies):
            for site in sites:
                if (site.kind, site.block) == location:
                    tokens = slice(None) if site.tokens is None else list(site.tokens)
                    mask[copy, tokens, slice(None) if site.head is None else site.head] = True
        return mask

    def edits(self, edits: dict[Location, Edit]) -> dict[str, dict]:
        """``intervene`` keyword arguments that apply ``{location: edit}``."""
        routed: dict[str, dict] = dict(outputs={}, inputs={}, attention={})
        for (kind, block), edit in edits.items():
            if kind == "residual":
                routed["outputs"][self.anatomy.blocks[block]] = edit
            elif kind == "head":
                routed["inputs"][_output_projection(self.anatomy, block)] = edit
            else:
                routed["attention"][block] = edit
        return routed


def _num_heads(attention: nn.Module) -> int:
    """Heads of a timm (``num_heads``) or Hugging Face (``config``) attention module."""
    heads = getattr(attention, "num_heads", None) or getattr(attention, "num_attention_heads", 0)
    return int(heads or attention.config.num_attention_heads)


def _output_projection(anatomy: ViTAnatomy, block: int) -> nn.Module:
    """The attention's output projection (timm ``proj``, Hugging Face ``o_proj``)."""
    attention = anatomy.attention_modules[block]
    for name in ("proj", "o_proj"):
        if isinstance(getattr(attention, name, None), nn.Linear):
            return getattr(attention, name)
    raise UnsupportedModelError(
        f"heads' outputs of {type(anatomy.model).__name__} cannot be patched: its attention "
        f"({type(attention).__name__}) has no output projection 'proj' or 'o_proj'"
    )


def _patcher(kind: str, source: torch.Tensor, mask: torch.Tensor) -> Edit:
    """Replace, in each copy of a stacked batch, the masked part by ``source`` (one copy)."""
    copies, _, heads = mask.shape

    def edit(tensor: torch.Tensor) -> torch.Tensor:
        if kind == "pattern":  # (kB, H, N, N): the mask selects (head, query row)
            stacked = tensor.reshape(copies, *source.shape)
            select = mask.transpose(1, 2)[:, None, :, :, None]
            clean = source[None]
        else:  # (kB, N, H * d) split into heads (one "head" for the residual stream)
            stacked = tensor.reshape(copies, *source.shape[:2], heads, -1)
            select = mask[:, None, :, :, None]
            clean = source.reshape(*source.shape[:2], heads, -1)[None]
        return torch.where(select.to(tensor.device), clean, stacked).reshape(tensor.shape)

    return edit


def _record(
    geometry: _Geometry, images: torch.Tensor, locations: Sequence[Location]
) -> tuple[torch.Tensor, dict[Location, torch.Tensor]]:
    """Logits (B, C) and the activations at ``locations`` of one forward pass."""
    found: dict[Location, torch.Tensor] = {}

    def reader(location: Location) -> Edit:
        def read(tensor: torch.Tensor) -> None:
            found[location] = tensor

        return read

    anatomy = geometry.anatomy
    edits = geometry.edits({location: reader(location) for location in locations})
    with torch.no_grad(), anatomy.intervene(**edits):
        logits = anatomy.forward(images)
    for (kind, block), tensor in found.items():
        tokens = tensor.shape[-1] if kind == "pattern" else tensor.shape[1]
        if tokens != geometry.num_tokens:
            raise UnsupportedModelError(
                f"{type(anatomy.model).__name__} has {tokens} tokens in block {block} where "
                f"the prefix and patch grid make {geometry.num_tokens}"
            )
    return logits, found


def _patched(
    geometry: _Geometry,
    corrupted: torch.Tensor,
    sources: dict[Location, torch.Tensor],
    copies: Sequence[Sequence[Site]],
) -> torch.Tensor:
    """Logits (copies * B, C) of ``corrupted`` stacked once per copy, each copy patched at its
    sites with ``sources``."""
    locations = {(site.kind, site.block) for sites in copies for site in sites}
    edits = {
        location: _patcher(location[0], sources[location], geometry.mask(copies, location))
        for location in sorted(locations)
    }
    stacked = corrupted.repeat(len(copies), *[1] * (corrupted.dim() - 1))
    with geometry.anatomy.intervene(**geometry.edits(edits)):
        return geometry.anatomy.forward(stacked)


def _sites(sites: Site | Sequence[Site]) -> list[Site]:
    sites = [sites] if isinstance(sites, Site) else list(sites)
    if not sites or not all(isinstance(site, Site) for site in sites):
        raise TypeError(f"sites must be a Site or a non-empty list of Sites, got {sites!r:.80}")
    return sites


def patch(
    model: nn.Module | ViTAnatomy,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    sites: Site | Sequence[Site],
) -> torch.Tensor:
    """Logits of the corrupted images with the activations at ``sites`` taken from the clean.

    The clean images run first (without gradients) and their activations at every site are
    kept; the corrupted images then run with those activations written in place of their
    own (at all sites together). The model is in eval mode for both runs; gradients of the
    patched run follow the caller's grad mode.

    Args:
        model: A timm ViT / BEiT / EVA or Hugging Face ViT-like classifier (or its anatomy).
        clean: Normalised images (B, C, H, W) whose activations are written in.
        corrupted: Images of the same shape, the run that is patched.
        sites: A :class:`Site` or several.

    Returns:
        (B, C) logits of the patched corrupted run.

    Raises:
        UnsupportedModelError: For families whose activations cannot be edited.

    Example:
        >>> from class_space_saliency import analysis
        >>> corrupted = images.flip(0)
        >>> logits = analysis.patch(model, images, corrupted, analysis.Site("residual", 1))
        >>> torch.allclose(logits, model(images), atol=1e-5)  # the whole stream: all restored
        True
    """
    anatomy = _editable(model)
    _check_pair(anatomy, clean, corrupted)
    geometry = _Geometry.of(anatomy, clean)
    sites = [geometry.resolve(site) for site in _sites(sites)]
    locations = sorted({(site.kind, site.block) for site in sites})
    with eval_mode(anatomy):
        _, sources = _record(geometry, clean, locations)
        return _patched(geometry, corrupted, sources, [sites])


def _check_pair(anatomy: ViTAnatomy, clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    for tensor in (clean, corrupted):
        check_inputs(tensor, anatomy)
    if clean.shape != corrupted.shape:
        raise ValueError(
            "clean and corrupted must be images of the same shape, got "
            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )


@dataclass
class PatchingResult(AnalysisResult):
    """Share of the target-logit difference restored per block x token and block x head.

    Attributes:
        layers: Blocks (rows of every grid).
        restored: ``{"token": (L, N), "head": (L, H)}``: per image, ``(patched - corrupted) /
            (clean - corrupted)`` of the metric, averaged over the compared images.
        restored_of_mean: The same grids as the share of the mean difference,
            ``(mean patched - mean corrupted) / (mean clean - mean corrupted)`` over the
            compared images (TransformerLens's normalised logit difference).
        metric: What was measured (the label's logit, or its difference to a contrast class).
        num_images: Image pairs seen.
        num_compared: Pairs whose clean and corrupted metric differ by more than
            ``min_difference`` (the others have no difference to restore and are left out).
        clean_metric: Mean metric of the clean images (over all pairs).
        corrupted_metric: Mean metric of the corrupted images (over all pairs).
        num_prefix_tokens: Tokens before the image tokens (token columns ``0 .. P-1``).
        class_token: Column of the [CLS] token, or ``None`` for models without one.
        grid_size: Patch grid (h, w) of the image tokens.
    """

    name = "patching"

    layers: list[int]
    restored: dict[str, torch.Tensor]
    restored_of_mean: dict[str, torch.Tensor]
    metric: str
    num_images: int
    num_compared: int
    clean_metric: float
    corrupted_metric: float
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    class_token: int | None = 0
    grids: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.grids = tuple(grid for grid in GRIDS if grid in self.restored)

    def token_labels(self) -> list[str]:
        """Column names of the token grid: ``[CLS]``/``prefix k`` then ``(row, col)``."""
        prefix = [
            "[CLS]" if k == self.class_token else f"prefix {k}"
            for k in range(self.num_prefix_tokens)
        ]
        h, w = self.grid_size
        return prefix + [f"({r},{c})" for r in range(h) for c in range(w)]

    def to_dict(self) -> dict:
        """Grids (rows: blocks) and the metric's summary."""
        return json_safe(
            dict(
                metric=self.metric,
                layers=self.layers,
                num_images=self.num_images,
                num_compared=self.num_compared,
                clean_metric=self.clean_metric,
                corrupted_metric=self.corrupted_metric,
                num_prefix_tokens=self.num_prefix_tokens,
                class_token=self.class_token,
                grid_size=list(self.grid_size),
                token_columns=self.token_labels(),
                restored=self.restored,
                restored_of_mean=self.restored_of_mean,
            )
        )

    def table(self) -> str:
        """Block x head shares in full; block x token as prefix tokens and image-token summary."""
        title = (
            f"share of the {self.metric} difference restored (clean {self.clean_metric:.3f}, "
            f"corrupted {self.corrupted_metric:.3f}; {self.num_compared} of {self.num_images} "
            "image pairs differ)"
        )
        tables = [title]
        prefix = self.num_prefix_tokens
        if "token" in self.restored:
            grid = self.restored["token"]
            labels = self.token_labels()
            header = ["layer", *labels[:prefix], "image tokens: sum", "max", "at"]
            rows = []
            for i, layer in enumerate(self.layers):
                image = grid[i, prefix:]
                best = int(image.nan_to_num(-math.inf).argmax())
                row = [layer, *grid[i, :prefix].tolist(), image.sum().item(), image[best].item()]
                rows.append([*row, labels[prefix + best]])
            tables.append("**block x token** (residual stream)\n\n" + markdown_table(header, rows))
        if "head" in self.restored:
            grid = self.restored["head"]
            header = ["layer"] + [f"head {h}" for h in range(grid.shape[1])]
            rows = [[layer, *grid[i].tolist()] for i, layer in enumerate(self.layers)]
            tables.append("**block x head** (heads' outputs)\n\n" + markdown_table(header, rows))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None, token_layout: str = "flat") -> Any:
        """Heatmaps of the restored share: block x token and block x head.

        Args:
            ax: Axes, one per grid (new figure otherwise; ignored for ``token_layout="grid"``).
            token_layout: ``"flat"`` (one column per token) or ``"grid"`` (one panel per
                block, image tokens on the patch grid, prefix shares in the titles).
        """
        import matplotlib.pyplot as plt

        check_choice("token_layout", token_layout, ("flat", "grid"))
        values = torch.cat([grid.flatten() for grid in self.restored.values()])
        limit = max(1.0, float(values.nan_to_num(0).abs().max()))
        style = dict(cmap="RdBu_r", vmin=-limit, vmax=limit)
        if token_layout == "grid" and "token" in self.restored:
            return self._plot_token_grids(style)
        if ax is None:
            widths = [max(4.0, 0.14 * self.restored[g].shape[1] + 2) for g in self.grids]
            _, axes = plt.subplots(1, len(self.grids), figsize=(sum(widths), 3.2),
                                   gridspec_kw=dict(width_ratios=widths))  # fmt: skip
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        for axis, grid in zip(axes, self.grids, strict=False):
            image = axis.imshow(self.restored[grid].numpy(), aspect="auto", **style)
            axis.set_yticks(range(len(self.layers)), [str(b) for b in self.layers])
            axis.set_ylabel("layer (block index, from 0)")
            if grid == "token":
                axis.axvline(self.num_prefix_tokens - 0.5, color="k", lw=0.8)
                prefix = self.token_labels()[: self.num_prefix_tokens]
                axis.set_xlabel(f"token ({', '.join(prefix)}; then patches row by row)")
            else:
                axis.set_xticks(range(self.restored[grid].shape[1]))
                axis.set_xlabel("head")
            axis.set_title(f"block x {grid}: share restored")
            axis.figure.colorbar(image, ax=axis, fraction=0.05)
        figure = axes[0].figure
        figure.suptitle(f"activation patching, {self.metric} ({self.num_compared} pairs)",
                        fontsize=9)  # fmt: skip
        figure.tight_layout()
        return figure

    def _plot_token_grids(self, style: dict) -> Any:
        import matplotlib.pyplot as plt

        grid, prefix = self.restored["token"], self.num_prefix_tokens
        columns = min(6, len(self.layers))
        rows = math.ceil(len(self.layers) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows),
                                    squeeze=False)  # fmt: skip
        for axis in axes.flat[len(self.layers) :]:
            axis.axis("off")
        for axis, i, layer in zip(axes.flat, range(len(self.layers)), self.layers, strict=False):
            image = axis.imshow(grid[i, prefix:].reshape(self.grid_size).numpy(), **style)
            cls = self.class_token
            cls = "" if cls is None else f", [CLS] {grid[i, cls]:.2f}"
            axis.set_title(f"layer {layer}{cls}", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
        figure.colorbar(image, ax=axes, fraction=0.03)
        figure.suptitle(f"share of the {self.metric} difference restored per patch", fontsize=9)
        return figure


def patching_grid(
    model: nn.Module | ViTAnatomy,
    clean: Data,
    corrupted: Data,
    *,
    grids: str | Sequence[str] = GRIDS,
    blocks: int | Sequence[int] | str = "all",
    contrast: int | Sequence[int] | torch.Tensor | None = None,
    min_difference: float = 1e-6,
    num_images: int | None = None,
    batch_size: int = 8,
    max_batch_size: int = 256,
    progress: bool | None = None,
) -> PatchingResult:
    """Share of the target-logit difference that each block x token and block x head restores.

    For each image pair and each site, the corrupted image runs with one activation taken
    from the clean image: the residual stream after block ``b`` at token ``t``
    (``Site("residual", b, tokens=t)``, every token including [CLS]) or head ``h``'s output
    in block ``b`` at every token (``Site("head", b, h)``). The metric ``m`` is the logit of
    the label (the clean image's label, or its predicted class for unlabelled data), or the
    label's logit minus the ``contrast`` class's; the share restored is
    ``(m_patched - m_corrupted) / (m_clean - m_corrupted)``: 0 = nothing restored, 1 = the
    clean metric. Patching the whole residual stream of a block restores exactly 1.

    Pairs whose clean and corrupted metric differ by at most ``min_difference`` have nothing
    to restore (their share is 0/0) and are left out of the averages (``num_compared`` counts
    the rest; every share is NaN if none is left).

    Sites are batched: the corrupted images are stacked once per site (up to
    ``max_batch_size`` images per forward pass) and each copy is patched at its own site; the
    clean activations of one batch of ``batch_size`` pairs are kept, so memory does not grow
    with the number of images.

    Args:
        model: A timm ViT / BEiT / EVA or Hugging Face ViT-like classifier (or its anatomy).
        clean: Clean images in any form of :func:`~class_space_saliency.analysis.stream`
            (labels: the targets; unlabelled: the model's predictions on them).
        corrupted: The paired corrupted images (same count and size; labels are ignored).
        grids: ``"token"``, ``"head"`` or both.
        blocks: Blocks to patch (rows of the grids).
        contrast: Class(es) whose logit is subtracted from the label's (an int for every
            image, or one per image); ``None``: the label's logit alone.
        min_difference: Pairs with ``|m_clean - m_corrupted| <= min_difference`` are left out.
        num_images: Use the first ``num_images`` pairs only.
        batch_size: Image pairs per batch.
        max_batch_size: Images per patched forward pass (sites per pass: this // batch size).
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`PatchingResult`.

    Raises:
        UnsupportedModelError: For families whose activations cannot be edited.
        ValueError: For clean and corrupted data of different lengths or sizes, or bad
            arguments.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.patching_grid(model, images, images.flip(0), progress=False)
        >>> result.restored["token"].shape, result.restored["head"].shape  # (L, N), (L, H)
        (torch.Size([3, 17]), torch.Size([3, 2]))
    """
    anatomy = _editable(model)
    grids = (grids,) if isinstance(grids, str) else tuple(dict.fromkeys(grids))
    if not grids:
        raise ValueError(f"grids must name at least one of {GRIDS}")
    for grid in grids:
        check_choice("grids", grid, GRIDS)
    layers = anatomy.resolve_layers(blocks)
    if isinstance(min_difference, bool) or not isinstance(min_difference, int | float):
        raise TypeError(f"min_difference must be a number, got {min_difference!r}")
    if not min_difference >= 0:
        raise ValueError(f"min_difference must be >= 0, got {min_difference}")
    _check_int("max_batch_size", max_batch_size, minimum=1)
    if isinstance(contrast, list | tuple):
        contrast = torch.as_tensor(contrast)
    total = _known_length(clean)
    if num_images is not None and total is not None:
        total = min(total, num_images)
    options = dict(num_images=num_images, batch_size=batch_size, progress=False)
    pairs = _aligned(stream(anatomy, clean, **options), stream(anatomy, corrupted, **options))
    accumulated: _PatchingSums | None = None
    bar = None
    with eval_mode(anatomy), contextlib.ExitStack() as stack:
        for clean_batch, corrupted_images in pairs:
            _check_pair(anatomy, clean_batch.images, corrupted_images)
            if accumulated is None:
                geometry = _Geometry.of(anatomy, clean_batch.images)
                accumulated = _PatchingSums(geometry, grids, layers)
                bar = stack.enter_context(tqdm(
                    total=None if total is None else total * len(accumulated.sites),
                    desc="activation patching", unit="site", disable=_disabled(progress),
                ))  # fmt: skip
            if anatomy.grid_size(clean_batch.images.shape) != geometry.grid:
                raise ValueError("every batch must have images of the same size")
            targets = _targets(anatomy, clean_batch, contrast)
            accumulated.add(clean_batch.images, corrupted_images, targets,
                            max_batch_size, min_difference, bar)  # fmt: skip
    if accumulated is None:
        raise ValueError("data holds no images")
    metric = "label logit" if contrast is None else "label - contrast logit"
    return accumulated.result(metric)


def _aligned(
    clean: Iterator[Batch], corrupted: Iterator[Batch]
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each clean batch with as many corrupted images, whatever the two sources' batching."""
    held: torch.Tensor | None = None
    for batch in clean:
        size = batch.images.shape[0]
        while held is None or held.shape[0] < size:
            more = next(corrupted, None)
            if more is None:
                raise ValueError("clean and corrupted must hold the same number of images")
            held = more.images if held is None else torch.cat([held, more.images])
        yield batch, held[:size]
        held = held[size:]
    if (held is not None and held.shape[0]) or next(corrupted, None) is not None:
        raise ValueError("clean and corrupted must hold the same number of images")


def _targets(
    anatomy: ViTAnatomy, batch: Batch, contrast: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(labels, contrast classes or None)`` of one batch."""
    size = batch.images.shape[0]
    if isinstance(contrast, torch.Tensor) and contrast.dim() == 1:
        if contrast.shape[0] < batch.offset + size:
            raise ValueError(
                f"contrast must have one class per image: it has {contrast.shape[0]} entries "
                f"for at least {batch.offset + size} images"
            )
        contrast = contrast[batch.offset : batch.offset + size]
    found = check_target(contrast, size, anatomy.num_classes)
    return batch.labels, None if found is None else found.to(batch.labels.device)


def _metric(
    logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor | None]
) -> torch.Tensor:
    """(..., B) label logit (minus the contrast class's) of (..., B, C) logits."""
    labels, contrast = targets
    logits = logits.float()

    def column(classes: torch.Tensor) -> torch.Tensor:
        return logits.gather(-1, classes.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    return column(labels) if contrast is None else column(labels) - column(contrast)


class _PatchingSums:
    """What :func:`patching_grid` accumulates: sums over images per site, in grid order."""

    def __init__(self, geometry: _Geometry, grids: Sequence[str], layers: list[int]) -> None:
        self.geometry, self.grids, self.layers = geometry, tuple(grids), layers
        heads = {geometry.num_heads[block] for block in layers}
        if "head" in grids and len(heads) != 1:
            raise UnsupportedModelError(f"blocks have different head counts {sorted(heads)}")
        self.columns = {"token": geometry.num_tokens, "head": heads.pop()}
        self.sites: list[Site] = []
        for grid in self.grids:
            for block in layers:
                for column in range(self.columns[grid]):
                    self.sites.append(
                        Site("residual", block, tokens=column)
                        if grid == "token"
                        else Site("head", block, column)
                    )
        self.share_sum = torch.zeros(len(self.sites), dtype=torch.float64)
        self.restored_sum = torch.zeros(len(self.sites), dtype=torch.float64)
        self.difference_sum = 0.0
        self.clean_sum = self.corrupted_sum = 0.0
        self.num_images = self.num_compared = 0

    def add(
        self,
        clean: torch.Tensor,
        corrupted: torch.Tensor,
        targets: tuple[torch.Tensor, torch.Tensor | None],
        max_batch_size: int,
        min_difference: float,
        bar: Any,
    ) -> None:
        """Patch every site of one batch of pairs."""
        locations = sorted({(site.kind, site.block) for site in self.sites})
        clean_logits, sources = _record(self.geometry, clean, locations)
        with torch.no_grad():
            corrupted_metric = _metric(self.geometry.anatomy.forward(corrupted), targets).double()
        clean_metric = _metric(clean_logits, targets).double()
        difference = clean_metric - corrupted_metric
        compared = difference.abs() > min_difference
        self.clean_sum += clean_metric.sum().item()
        self.corrupted_sum += corrupted_metric.sum().item()
        self.num_images += clean.shape[0]
        self.num_compared += int(compared.sum())
        self.difference_sum += difference[compared].sum().item()
        per_pass = max(1, max_batch_size // clean.shape[0])
        for start in range(0, len(self.sites), per_pass):
            chunk = self.sites[start : start + per_pass]
            with torch.no_grad():
                logits = _patched(self.geometry, corrupted, sources, [[site] for site in chunk])
            restored = _metric(logits.reshape(len(chunk), *clean_logits.shape), targets).double()
            restored = (restored - corrupted_metric)[:, compared]
            share = restored / difference[compared]
            self.share_sum[start : start + len(chunk)] += share.sum(1).cpu()
            self.restored_sum[start : start + len(chunk)] += restored.sum(1).cpu()
            if bar is not None:
                bar.update(len(chunk) * clean.shape[0])

    def result(self, metric: str) -> PatchingResult:
        """The averages as grids."""
        compared = self.num_compared if self.num_compared else math.nan
        difference = self.difference_sum if self.num_compared else math.nan
        restored, of_mean, start = {}, {}, 0
        for grid in self.grids:
            size = len(self.layers) * self.columns[grid]
            shape = (len(self.layers), self.columns[grid])
            restored[grid] = (self.share_sum[start : start + size] / compared).reshape(shape)
            of_mean[grid] = (self.restored_sum[start : start + size] / difference).reshape(shape)
            start += size
        return PatchingResult(
            layers=self.layers,
            restored={k: v.float() for k, v in restored.items()},
            restored_of_mean={k: v.float() for k, v in of_mean.items()},
            metric=metric,
            num_images=self.num_images,
            num_compared=self.num_compared,
            clean_metric=self.clean_sum / self.num_images,
            corrupted_metric=self.corrupted_sum / self.num_images,
            num_prefix_tokens=self.geometry.anatomy.num_prefix_tokens,
            class_token=class_token_index(self.geometry.anatomy),
            grid_size=self.geometry.grid,
        )
