"""Memories in class space (Vilas et al. 2023, Sec. 6; official ``src/memories.py``).

A linear layer that writes into the residual stream is a key-value memory (Geva et al. 2021):
column ``m`` of its weight, the *value vector* ``v_m``, is added in proportion to the ``m``-th
entry of its input, the *key* coefficient. Per block:

- **MLP**: values are the columns of the second linear (``fc2``); keys are the first linear's
  outputs, before the activation as the official code reads them (node ``mlp.fc1``;
  ``keys="post"`` reads the activated values, the second linear's input);
- **attention**: values are the columns of the output projection (``attn.proj``); keys are
  its input, the per-head ``softmax(QK^T) V`` concatenated over heads.

Value vectors are taken as the block adds them to the stream, i.e. times the block's layer
scale where it has one (BEiT/EVA ``gamma``, timm ``ls1``/``ls2``; ViT-B has none). Their
scores against the classes use the class embeddings ``E`` (rows of the head's weight,
DeiT's two heads averaged) through the final norm's scale ``gamma`` by default:
``E_c * gamma`` is the direction in which a token state raises the logit of ``c``
(``norm_scale=False``: the head's rows alone, as the official code). The norm's centring and
``1 / sigma`` are not applied: they do not depend on the memory.

- :func:`value_vectors`: cosine of unit-normed value vectors and class embeddings; per class
  the best-matching memory and its score; the mean per block is the *class-value agreement*;
  ``baseline=`` tests per block that the model's classes are matched better than an
  untrained model's (one-sided Wilcoxon signed-rank test paired by class, as the official
  ``wilcoxon(top1, random_top1, alternative='greater')``).
- :func:`value_vector_classes`: each memory's top-k classes by name, sortable by score.
- :func:`key_value_agreement`: per token, its ``k`` most activated memories; the token
  *agrees* when one of them is among the label's ``k`` memories of largest logit increment
  ``E_label . v_m``; rates per image and block against a random-class control, [CLS]
  agreement of correctly vs wrongly classified images, and memory compositionality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._stats import paired_signed_rank_test, permutation_test
from .._validation import check_bool, check_choice
from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ._result import AnalysisResult, format_p_value, json_safe, markdown_table
from ._stream import Data, stream
from .identifiability import _as_anatomy, _matching_baseline

MEMORY_COMPONENTS = ("mlp", "attention")
"""Sublayers whose weights are read as memories."""

MLP_KEYS = ("pre", "post")
"""MLP key coefficients: the first linear's output (``"pre"`` the activation, official) or
the activated values that the second linear reads (``"post"``)."""

FIRST_LINEAR = ("mlp.fc1", "mlp.0", "intermediate.dense")
"""Where blocks keep the MLP's first linear: timm, torchvision, Hugging Face ViT/BEiT."""

SECOND_LINEAR = ("mlp.fc2", "mlp.3", "output.dense")
"""Where blocks keep the MLP's second linear (its columns are the MLP's value vectors)."""

OUTPUT_PROJECTION = ("attn.proj", "self_attention.out_proj", "attention.output.dense")
"""Where blocks keep the attention's output projection (timm, torchvision, Hugging Face)."""


# ---------------------------------------------------------------------------- weights
def _linear(block: nn.Module, paths: Sequence[str], what: str) -> nn.Linear:
    for path in paths:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return module
    raise UnsupportedModelError(
        f"{type(block).__name__} has no {what} where memories are read (looked for "
        f"{', '.join(paths)})"
    )


def value_layer(anatomy: ViTAnatomy, block: int, component: str) -> nn.Linear:
    """The linear whose columns are the value vectors of ``component`` in ``block``."""
    check_choice("component", component, MEMORY_COMPONENTS)
    if component == "mlp":
        return _linear(anatomy.blocks[block], SECOND_LINEAR, "second MLP linear")
    return _linear(anatomy.blocks[block], OUTPUT_PROJECTION, "attention output projection")


def key_site(
    anatomy: ViTAnatomy, block: int, component: str, keys: str = "pre"
) -> tuple[nn.Module, str]:
    """``(module, side)`` whose input or output are the key coefficients (see module doc)."""
    check_choice("keys", keys, MLP_KEYS)
    if component == "mlp" and keys == "pre":
        return _linear(anatomy.blocks[block], FIRST_LINEAR, "first MLP linear"), "output"
    return value_layer(anatomy, block, component), "input"


@torch.no_grad()
def value_vectors_of(anatomy: ViTAnatomy, block: int, component: str) -> torch.Tensor:
    """(D, M) value vectors of a sublayer as the block adds them (times its layer scale)."""
    linear = value_layer(anatomy, block, component)
    values = linear.weight.detach().float().clone()  # never a view: scale modules may be inplace
    scales = (anatomy.layer_scales or {}).get(component)
    if scales is not None and scales[block] is not None:  # BEiT/EVA gamma parameters
        return values * scales[block].detach().float()[:, None]
    try:
        branch = anatomy.branch_module(component, block)
    except ValueError:  # no branch module known (e.g. Hugging Face ViT MLPs): no layer scale
        return values
    if any(module is linear for module in branch.modules()):
        return values
    # the branch is a scale module after the linear (timm LayerScale, DINOv2 layer_scale)
    return branch(values.T.to(linear.weight.dtype)).T.float()


@torch.no_grad()
def class_embeddings(anatomy: ViTAnatomy, norm_scale: bool = True) -> torch.Tensor:
    """(C, D) class embeddings: the head's rows, times the final norm's scale by default.

    Raises:
        UnsupportedModelError: For a head that is not one linear map (e.g. CLIP's cosine).
    """
    linear = anatomy.linear_head()
    if linear is None and len(anatomy.heads) == 1:  # torchvision: Sequential(head=Linear)
        head = anatomy.heads[0]
        if isinstance(head, nn.Sequential) and len(head) == 1 and isinstance(head[0], nn.Linear):
            linear = (head[0].weight, head[0].bias)
    if linear is None:
        raise UnsupportedModelError(
            f"the head of {type(anatomy.model).__name__} is not one linear map, so classes "
            "have no embedding vectors to compare memories with"
        )
    weight = linear[0].detach().float()
    if norm_scale:
        for module in anatomy.norm.modules():
            gamma = getattr(module, "weight", None)
            if isinstance(gamma, torch.Tensor) and gamma.shape == weight.shape[1:]:
                weight = weight * gamma.detach().float()
    return weight


def value_class_scores(
    anatomy: ViTAnatomy,
    block: int,
    component: str,
    *,
    cosine: bool = True,
    norm_scale: bool = True,
) -> torch.Tensor:
    """(C, M) scores of every memory for every class.

    Args:
        anatomy: The model's anatomy.
        block: Block index.
        component: ``"mlp"`` or ``"attention"``.
        cosine: Cosine of unit-normed class embeddings and value vectors (class-value
            agreement); else the logit increment ``E_c . v_m`` of a unit key (the official
            key-value agreement and compositionality).
        norm_scale: Class embeddings through the final norm's scale.

    Returns:
        (C, M) float32 scores.
    """
    embeddings = class_embeddings(anatomy, norm_scale)
    values = value_vectors_of(anatomy, block, component).to(embeddings.device)
    if cosine:
        embeddings = embeddings / embeddings.norm(dim=1, keepdim=True)
        values = values / values.norm(dim=0, keepdim=True)
    return embeddings @ values


def _check_memory_components(components: str | Sequence[str]) -> tuple[str, ...]:
    components = (components,) if isinstance(components, str) else tuple(components)
    if not components:
        raise ValueError(f"components must name at least one of {MEMORY_COMPONENTS}")
    for component in components:
        check_choice("components", component, MEMORY_COMPONENTS)
    return tuple(dict.fromkeys(components))


def _check_k(k: int, limit: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"k must be an int in 1..{limit}, got {k!r}")
    return k


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"class_names must have {num_classes} entries (one per class), got {len(class_names)}"
        )
    return [str(name) for name in class_names]


# ---------------------------------------------------------------------------- value vectors
@dataclass
class ValueVectorsResult(AnalysisResult):
    """Class-value agreement per block: how well each class is matched by one memory.

    Attributes:
        layers: Block indices.
        components: ``"mlp"`` and/or ``"attention"``.
        num_classes: Classes ``C``.
        best_score: ``{component: (L, C)}`` per block and class, the largest cosine between
            the class embedding and a value vector.
        best_memory: ``{component: (L, C)}`` the index of that value vector.
        norm_scale: Whether class embeddings went through the final norm's scale.
        p_values: ``{component: (L,)}`` one-sided Wilcoxon signed-rank p-values (paired by
            class) of "better matched than the baseline", or empty.
        baseline: The baseline model's result, or ``None``.
    """

    name = "value_vectors"

    layers: list[int]
    components: tuple[str, ...]
    num_classes: int
    best_score: dict[str, torch.Tensor]
    best_memory: dict[str, torch.Tensor]
    norm_scale: bool = True
    p_values: dict[str, torch.Tensor] = field(default_factory=dict)
    baseline: ValueVectorsResult | None = None

    def agreement(self, component: str) -> torch.Tensor:
        """(L,) class-value agreement: the mean over classes of the best score."""
        return self.best_score[component].mean(1)

    def to_dict(self) -> dict:
        """Per component: agreement per block, best score and memory per class, tests."""
        return json_safe(
            dict(
                layers=self.layers,
                num_classes=self.num_classes,
                norm_scale=self.norm_scale,
                components={
                    c: dict(
                        class_value_agreement=self.agreement(c),
                        best_score=self.best_score[c],
                        best_memory=self.best_memory[c],
                        p_value_vs_baseline=self.p_values.get(c),
                    )
                    for c in self.components
                },
                baseline=None if self.baseline is None else self.baseline.to_dict(),
            )
        )

    def table(self) -> str:
        """Rows are blocks: class-value agreement (and baseline, p) per component."""
        header = ["layer"]
        for component in self.components:
            header += [f"{component} agreement", f"{component} min", f"{component} max"]
            if self.baseline is not None:
                header += [f"{component} baseline", f"{component} p (> baseline)"]
        rows = []
        for i, layer in enumerate(self.layers):
            row: list[Any] = [layer]
            for component in self.components:
                scores = self.best_score[component][i]
                row += [scores.mean().item(), scores.min().item(), scores.max().item()]
                if self.baseline is not None:
                    row += [self.baseline.agreement(component)[i].item()]
                    row += [format_p_value(self.p_values[component][i].item())]
            rows.append(row)
        scale = "through the final norm's scale" if self.norm_scale else "head rows only"
        title = (
            f"**class-value agreement** (mean over {self.num_classes} classes of the best cosine "
            f"of a value vector with the class embedding, {scale})"
        )
        return title + "\n\n" + markdown_table(header, rows, digits=3)

    def plot(self, ax: Any = None) -> Any:
        """Box plots per block of the classes' best scores (the paper's class-value figure)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, axes = plt.subplots(1, len(self.components), figsize=(5 * len(self.components), 3.5))
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        positions = np.arange(len(self.layers))
        for axis, component in zip(axes, self.components, strict=False):
            axis.boxplot(self.best_score[component].T.numpy(), positions=positions, widths=0.5)
            if self.baseline is not None:
                axis.plot(positions, self.baseline.agreement(component).numpy(), "o--",
                          color="grey", ms=3, label="untrained baseline (mean)")  # fmt: skip
                stars = np.flatnonzero(self.p_values[component].numpy() < 0.05)
                top = float(self.best_score[component].max()) * 1.05
                axis.plot(stars, np.full(len(stars), top), "*", color="grey", label="p < 0.05")
                axis.legend(fontsize=7)
            axis.set_xticks(positions, [str(b) for b in self.layers])
            axis.set_xlabel("layer (block index, from 0)")
            axis.set_ylabel("best cosine per class")
            axis.set_title(f"{component}: class-value agreement")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


def value_vectors(
    model: nn.Module | ViTAnatomy,
    *,
    layers: int | Sequence[int] | str = "all",
    components: str | Sequence[str] = MEMORY_COMPONENTS,
    baseline: nn.Module | ViTAnatomy | None = None,
    norm_scale: bool = True,
) -> ValueVectorsResult:
    """Class-value agreement: per class, the value vector that points most at it, per block.

    Needs no data: it reads the weights. Scores are cosines of unit-normed value vectors
    (columns of the second MLP linear / the attention output projection, times layer scale)
    and unit-normed class embeddings (see the module docstring).

    Args:
        model: A supported ViT (or its anatomy) with a linear head.
        layers: Blocks (int, list of ints or ``"all"``).
        components: ``"mlp"``, ``"attention"`` or both.
        baseline: The same architecture untrained (randomly initialised): adds its result
            and a one-sided Wilcoxon signed-rank test per block, paired by class.
        norm_scale: Class embeddings through the final norm's scale (default); ``False``:
            the head's rows alone, as the official code.

    Returns:
        A :class:`ValueVectorsResult`.

    Raises:
        UnsupportedModelError: For a head that is not linear, blocks without the linears
            named in :data:`SECOND_LINEAR` / :data:`OUTPUT_PROJECTION`, or a baseline that
            does not match the model.

    Example:
        >>> from class_space_saliency import analysis, testing
        >>> result = analysis.value_vectors(model, baseline=testing.tiny_vit("plain"))
        >>> result.best_score["mlp"].shape, result.agreement("mlp").shape  # (L, C), (L,)
        (torch.Size([3, 7]), torch.Size([3]))
    """
    anatomy = _as_anatomy(model)
    layers = anatomy.resolve_layers(layers)
    components = _check_memory_components(components)
    check_bool("norm_scale", norm_scale)

    def result(anatomy: ViTAnatomy) -> ValueVectorsResult:
        best_score, best_memory = {}, {}
        for c in components:
            maxima = [
                value_class_scores(anatomy, b, c, norm_scale=norm_scale).max(1) for b in layers
            ]
            best_score[c] = torch.stack([found.values for found in maxima]).cpu()
            best_memory[c] = torch.stack([found.indices for found in maxima]).cpu()
        return ValueVectorsResult(
            layers=layers,
            components=components,
            num_classes=anatomy.num_classes,
            best_score=best_score,
            best_memory=best_memory,
            norm_scale=norm_scale,
        )

    main = result(anatomy)
    if baseline is not None:
        other = _matching_baseline(anatomy, _as_anatomy(baseline, "baseline"))
        main.baseline = result(other)
        main.p_values = {
            c: torch.tensor(
                [
                    paired_signed_rank_test(mine, theirs, "greater")[1]
                    for mine, theirs in zip(
                        main.best_score[c], main.baseline.best_score[c], strict=True
                    )
                ],
                dtype=torch.float64,
            )
            for c in components
        }
    return main


# ---------------------------------------------------------------------------- classes per memory
@dataclass
class ValueVectorClasses(AnalysisResult):
    """The classes each memory of one sublayer points at most.

    Attributes:
        block: Block index.
        component: ``"mlp"`` or ``"attention"``.
        indices: (M, k) classes of each memory, best first.
        scores: (M, k) their cosines (see :func:`value_class_scores`).
        class_names: Name of every class.
        norm_scale: Whether class embeddings went through the final norm's scale.
    """

    name = "value_vector_classes"

    block: int
    component: str
    indices: torch.Tensor
    scores: torch.Tensor
    class_names: list[str]
    norm_scale: bool = True

    @property
    def order(self) -> torch.Tensor:
        """(M,) memories sorted by their best score, strongest first (ties by index)."""
        return self.scores[:, 0].argsort(descending=True, stable=True)

    def classes_of(self, memory: int) -> list[tuple[str, float]]:
        """``[(class name, score), ...]`` of one memory, best first."""
        return [
            (self.class_names[c], s)
            for c, s in zip(
                self.indices[memory].tolist(), self.scores[memory].tolist(), strict=True
            )
        ]

    def to_dict(self) -> dict:
        """Block, component, class names, and per memory its classes and scores."""
        return json_safe(
            dict(
                block=self.block,
                component=self.component,
                norm_scale=self.norm_scale,
                class_names=self.class_names,
                indices=self.indices,
                scores=self.scores,
            )
        )

    def table(self, limit: int | None = 20) -> str:
        """The ``limit`` strongest memories (all for ``None``) with their classes and scores."""
        memories = self.order if limit is None else self.order[:limit]
        k = self.indices.shape[1]
        header = ["memory", *[f"class {i + 1} (score)" for i in range(k)]]
        rows = [
            [int(m), *[f"{name} ({score:.3f})" for name, score in self.classes_of(int(m))]]
            for m in memories
        ]
        title = (
            f"**block {self.block} {self.component}**: the {len(rows)} of {len(self.indices)} "
            "memories that point most at a class"
        )
        return title + "\n\n" + markdown_table(header, rows)

    def plot(self, ax: Any = None) -> Any:
        """Memories per best class (bars) and the sorted best scores (curve)."""
        import matplotlib.pyplot as plt

        axes = np.atleast_1d(ax) if ax is not None else plt.subplots(1, 2, figsize=(10, 3.5))[1]
        counts = torch.bincount(self.indices[:, 0], minlength=len(self.class_names))
        axes[0].bar(np.arange(len(counts)), counts.numpy())
        axes[0].set_xticks(np.arange(len(counts)), self.class_names, rotation=60, ha="right")
        axes[0].set_ylabel("memories (best class)")
        axes[1].plot(self.scores[self.order, 0].numpy())
        axes[1].set_xlabel("memory (sorted)")
        axes[1].set_ylabel("best cosine")
        for axis in axes[:2]:
            axis.set_title(f"block {self.block} {self.component}")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


def value_vector_classes(
    model: nn.Module | ViTAnatomy,
    block: int,
    component: str = "mlp",
    k: int = 5,
    *,
    class_names: Sequence[str] | None = None,
    norm_scale: bool = True,
) -> ValueVectorClasses:
    """Each memory's ``k`` classes of largest cosine with its value vector.

    Args:
        model: A supported ViT (or its anatomy) with a linear head.
        block: Block index (negative counts from the end).
        component: ``"mlp"`` or ``"attention"``.
        k: Classes per memory.
        class_names: Names of the classes (default: their indices).
        norm_scale: Class embeddings through the final norm's scale.

    Returns:
        A :class:`ValueVectorClasses`; ``print(result)`` lists the strongest memories.

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.value_vector_classes(model, block=-1, component="mlp", k=3)
        >>> result.indices.shape, result.scores.shape  # (memories, k): fc2 has 128 columns
        (torch.Size([128, 3]), torch.Size([128, 3]))
    """
    anatomy = _as_anatomy(model)
    (block,) = anatomy.resolve_layers(block)
    check_choice("component", component, MEMORY_COMPONENTS)
    check_bool("norm_scale", norm_scale)
    scores = value_class_scores(anatomy, block, component, norm_scale=norm_scale).cpu()
    k = _check_k(k, scores.shape[0])
    found = scores.T.topk(k, dim=1)
    return ValueVectorClasses(
        block=block,
        component=component,
        indices=found.indices,
        scores=found.values,
        class_names=_names(class_names, scores.shape[0]),
        norm_scale=norm_scale,
    )


# ---------------------------------------------------------------------------- key-value agreement
@dataclass
class KeyValueAgreementResult(AnalysisResult):
    """Key-value agreement per component and block.

    A token *agrees* when one of its ``k`` most activated memories is among the ``k``
    memories of the label with the largest logit increment ``E_label . v_m``.

    Attributes:
        layers: Block indices.
        components: ``"mlp"`` and/or ``"attention"``.
        k: Memories per token and per class.
        keys: MLP key coefficients read (``"pre"`` or ``"post"`` the activation).
        num_classes: Classes ``C``.
        image_rate: ``{component: (n, L)}`` % of each image's tokens (all tokens, as the
            official ``tokens='all'``) that agree with the image's label.
        control_rate: ``{component: (n, L)}`` the same for a random other class per image
            (seeded; the official code draws any class, the label included).
        cls_agrees: ``{component: (n, L)}`` bool: the [CLS] token agrees (empty where the
            head reads no [CLS]).
        correct: (n,) bool: the model's prediction is the label.
        compositional: ``{component: (L,)}`` % of tokens whose sublayer output's top-1 class
            (its class-space projection) is the top-1 class (largest ``E_c . v_m``) of one of
            the token's ``k`` most activated memories.
        p_values: ``{component: (L,)}`` one-sided Wilcoxon signed-rank p-values, paired by
            image, of "agreement with the label exceeds the control".
        cls_p_values: ``{component: (L,)}`` one-sided permutation-test p-values of "[CLS]
            agrees more often on correctly than on wrongly classified images" (NaN where
            either group is empty).
        permutations: Relabellings of the permutation test.
        seed: Seed of the control classes and the permutation test.
    """

    name = "key_value_agreement"

    layers: list[int]
    components: tuple[str, ...]
    k: int
    keys: str
    num_classes: int
    image_rate: dict[str, torch.Tensor]
    control_rate: dict[str, torch.Tensor]
    cls_agrees: dict[str, torch.Tensor]
    correct: torch.Tensor
    compositional: dict[str, torch.Tensor]
    p_values: dict[str, torch.Tensor]
    cls_p_values: dict[str, torch.Tensor]
    permutations: int
    seed: int

    @property
    def num_images(self) -> int:
        """Images analysed."""
        return len(self.correct)

    def rate(self, component: str) -> torch.Tensor:
        """(L,) agreement rate in %: per image, the share of agreeing tokens, averaged."""
        return self.image_rate[component].mean(0)

    def control(self, component: str) -> torch.Tensor:
        """(L,) the agreement rate with random other classes (the control)."""
        return self.control_rate[component].mean(0)

    def cls_rate(self, component: str, correct: bool) -> torch.Tensor | None:
        """(L,) % of correctly (or wrongly) classified images whose [CLS] agrees, or None."""
        if component not in self.cls_agrees:
            return None
        chosen = self.cls_agrees[component][self.correct == correct]
        return chosen.double().mean(0) * 100  # NaN for an empty group

    def to_dict(self) -> dict:
        """Rates, control, [CLS] by correctness, compositionality and tests per component."""
        components = {
            c: dict(
                agreement_rate_percent=self.rate(c),
                control_rate_percent=self.control(c),
                p_value_vs_control=self.p_values[c],
                cls_agreement_correct_percent=self.cls_rate(c, True),
                cls_agreement_wrong_percent=self.cls_rate(c, False),
                cls_p_value_correct_vs_wrong=self.cls_p_values.get(c),
                compositional_percent=self.compositional[c],
                image_rate_percent=self.image_rate[c],
            )
            for c in self.components
        }
        return json_safe(
            dict(
                layers=self.layers,
                k=self.k,
                mlp_keys=self.keys,
                num_classes=self.num_classes,
                num_images=self.num_images,
                correct_images=int(self.correct.sum()),
                permutations=self.permutations,
                seed=self.seed,
                components=components,
            )
        )

    def table(self) -> str:
        """One table per component; rows are blocks."""
        tables = []
        for c in self.components:
            header = ["layer", "agreement %", "control %", "p (> control)"]
            has_cls = c in self.cls_agrees
            if has_cls:
                header += ["[CLS] correct %", "[CLS] wrong %", "p (correct > wrong)"]
            header += ["compositional %"]
            rows = []
            for i, layer in enumerate(self.layers):
                row: list[Any] = [layer, self.rate(c)[i].item(), self.control(c)[i].item()]
                row += [format_p_value(self.p_values[c][i].item())]
                if has_cls:
                    row += [self.cls_rate(c, True)[i].item(), self.cls_rate(c, False)[i].item()]
                    row += [format_p_value(self.cls_p_values[c][i].item())]
                rows.append([*row, self.compositional[c][i].item()])
            keys = f", {self.keys}-activation keys" if c == "mlp" else ""
            title = (
                f"**{c}** (top-{self.k} memories{keys}; {self.num_images} images, "
                f"{int(self.correct.sum())} correctly classified)"
            )
            tables.append(title + "\n\n" + markdown_table(header, rows))
        return "\n\n".join(tables)

    def plot(self, ax: Any = None) -> Any:
        """Per component, box plots per block of the per-image agreement rate vs the control."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, axes = plt.subplots(len(self.components), 1, figsize=(7, 3.2 * len(self.components)))
            axes = np.atleast_1d(axes)
        else:
            axes = np.atleast_1d(ax)
        positions = np.arange(len(self.layers))
        for axis, c in zip(axes, self.components, strict=False):
            for offset, rates, colour, label in (
                (-0.18, self.image_rate[c], "tab:blue", "label"),
                (0.18, self.control_rate[c], "tab:grey", "random class"),
            ):
                boxes = axis.boxplot(rates.numpy(), positions=positions + offset, widths=0.3,
                                     patch_artist=True, showfliers=False)  # fmt: skip
                for box in boxes["boxes"]:
                    box.set_facecolor(colour)
                axis.plot([], [], "s", color=colour, label=label)
            axis.plot(positions, self.compositional[c].numpy(), "k.--", lw=1, label="compositional")
            stars = np.flatnonzero(self.p_values[c].numpy() < 0.05)
            axis.plot(stars, np.full(len(stars), 102.0), "*", color="grey", label="p < 0.05")
            axis.set_xticks(positions, [str(b) for b in self.layers])
            axis.set_ylim(-2, 106)
            axis.set_xlabel("layer (block index, from 0)")
            axis.set_ylabel("% of tokens")
            axis.set_title(f"{c}: key-value agreement (top-{self.k})")
            axis.legend(fontsize=7, loc="upper left")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


def control_classes(labels: torch.Tensor, offset: int, num_classes: int, seed: int) -> torch.Tensor:
    """A random class other than the label for each image, fixed by ``(seed, image index)``.

    The draw of image ``offset + i`` does not depend on how the stream is batched.
    """
    draws = [
        int(np.random.default_rng((seed, offset + i)).integers(num_classes - 1))
        for i in range(len(labels))
    ]
    shift = torch.tensor(draws, dtype=torch.long, device=labels.device) + 1
    return (labels + shift) % num_classes


def key_value_agreement(
    model: nn.Module | ViTAnatomy,
    data: Data,
    *,
    layers: int | Sequence[int] | str = "all",
    components: str | Sequence[str] = MEMORY_COMPONENTS,
    k: int = 5,
    keys: str = "pre",
    norm_scale: bool = True,
    seed: int = 0,
    permutations: int = 10_000,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> KeyValueAgreementResult:
    """Key-value agreement, [CLS] agreement by correctness, and memory compositionality.

    One forward pass per batch records, per block and component, each token's ``k`` most
    activated memories (the top-k key coefficients, reduced inside the hook) and the top-1
    class of the sublayer's output; memory grows with the number of images only through
    the per-image rates.

    Args:
        model: A supported ViT (or its anatomy) with a linear head.
        data: Images, ``(images, labels[, masks])``, a dataset or an iterable of batches
            (see :mod:`class_space_saliency.analysis._stream`); unlabelled images are
            labelled with the model's predictions.
        layers: Blocks (int, list of ints or ``"all"``).
        components: ``"mlp"``, ``"attention"`` or both.
        k: Memories per token and per class (the official 5).
        keys: MLP keys before (``"pre"``, official) or after (``"post"``) the activation.
        norm_scale: Class embeddings through the final norm's scale (``False``: official).
        seed: Seed of the control classes and of the permutation test.
        permutations: Relabellings of the [CLS] permutation test.
        num_images: Analyse the first ``num_images`` images only.
        batch_size: Images per forward pass.
        progress: Show a progress bar (``None``: on a terminal).

    Returns:
        A :class:`KeyValueAgreementResult`.

    Raises:
        UnsupportedModelError: For models whose memories cannot be read (no linear head,
            unknown block layout, or an attention output projection that is not called as
            a module, e.g. torchvision's ``nn.MultiheadAttention``).

    Example:
        >>> from class_space_saliency import analysis
        >>> result = analysis.key_value_agreement(model, (images, labels), k=3)
        >>> result.image_rate["mlp"].shape, result.rate("attention").shape  # (images, L), (L,)
        (torch.Size([3, 3]), torch.Size([3]))
    """
    anatomy = _as_anatomy(model)
    layers = anatomy.resolve_layers(layers)
    components = _check_memory_components(components)
    check_choice("keys", keys, MLP_KEYS)
    check_bool("norm_scale", norm_scale)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive int, got {permutations!r}")
    sites = [(c, b) for c in components for b in layers]
    scores = {
        site: value_class_scores(anatomy, site[1], site[0], cosine=False, norm_scale=norm_scale)
        for site in sites
    }
    k = _check_k(k, min(s.shape[1] for s in scores.values()))
    label_memories = {site: s.topk(k, dim=1).indices for site, s in scores.items()}  # (C, k)
    memory_class = {site: s.argmax(0) for site, s in scores.items()}  # (M,)
    key_sites = {(f"{c} keys", b): key_site(anatomy, b, c, keys) for c, b in sites}
    num_classes = anatomy.num_classes
    cls = anatomy.readout.cls_index

    def reduce(name: str, block: int, tensor: torch.Tensor) -> torch.Tensor:
        if name in components:  # a sublayer's output: its top-1 class
            return anatomy.project(tensor).argmax(-1)
        expected = scores[(name.removesuffix(" keys"), block)].shape[1]
        if tensor.shape[-1] != expected:
            raise UnsupportedModelError(
                f"block {block} {name} have {tensor.shape[-1]} entries for {expected} memories"
            )
        return tensor.topk(k, dim=-1).indices

    collected: dict[str, list] = {"rate": [], "control": [], "cls": [], "correct": []}
    matches = {c: torch.zeros(len(layers), dtype=torch.float64) for c in components}
    tokens_seen = tokens_per_image = 0
    for batch in stream(
        anatomy, data, num_images=num_images, batch_size=batch_size, progress=progress,
        desc="key-value agreement",
    ):  # fmt: skip
        with torch.no_grad(), anatomy.capture(sites, reduce=reduce, modules=key_sites) as cap:
            cap.output = anatomy.forward(batch.images)
        controls = control_classes(batch.labels, batch.offset, num_classes, seed)
        tokens_per_image = cap.tokens[sites[0]].shape[1]  # (B, N) top-1 classes
        tokens_seen += len(batch.labels) * tokens_per_image
        rate, control, cls_agrees = {}, {}, {}
        for c in components:
            found: dict[str, list[torch.Tensor]] = {"rate": [], "control": [], "cls": []}
            for i, b in enumerate(layers):
                top = _top_memories(cap.tokens, key_sites, c, b)  # (B, N, k)
                memories = label_memories[(c, b)].to(top.device)
                agree = _agrees(top, memories[batch.labels])
                # integer counts per image: tied rates stay tied in the signed-rank test
                found["rate"].append(agree.sum(1).cpu())
                found["control"].append(_agrees(top, memories[controls]).sum(1).cpu())
                if cls is not None:
                    found["cls"].append(agree[:, cls].cpu())
                classes = memory_class[(c, b)].to(top.device)[top]  # (B, N, k)
                sublayer = cap.tokens[(c, b)]  # (B, N) top-1 class of the sublayer output
                matches[c][i] += (classes == sublayer[..., None]).any(-1).sum().item()
            rate[c] = torch.stack(found["rate"], 1)
            control[c] = torch.stack(found["control"], 1)
            if cls is not None:
                cls_agrees[c] = torch.stack(found["cls"], 1)
        collected["rate"].append(rate)
        collected["control"].append(control)
        collected["cls"].append(cls_agrees)
        collected["correct"].append((cap.output.argmax(-1) == batch.labels).cpu())

    def joined(key: str) -> dict[str, torch.Tensor]:
        return {c: torch.cat([part[c] for part in collected[key]]) for c in components}

    image_count, control_count = joined("rate"), joined("control")
    cls_agrees = joined("cls") if cls is not None else {}
    correct = torch.cat(collected["correct"])
    p_values = {
        c: torch.tensor(
            [
                paired_signed_rank_test(image_count[c][:, i], control_count[c][:, i])[1]
                for i in range(len(layers))
            ],
            dtype=torch.float64,
        )
        for c in components
    }
    cls_p_values = {
        c: torch.tensor(
            [
                _correct_vs_wrong(agrees[:, i], correct, permutations, seed)
                for i in range(len(layers))
            ],
            dtype=torch.float64,
        )
        for c, agrees in cls_agrees.items()
    }
    return KeyValueAgreementResult(
        layers=layers,
        components=components,
        k=k,
        keys=keys,
        num_classes=num_classes,
        image_rate={c: (v * 100 / tokens_per_image).float() for c, v in image_count.items()},
        control_rate={c: (v * 100 / tokens_per_image).float() for c, v in control_count.items()},
        cls_agrees=cls_agrees,
        correct=correct,
        compositional={c: (v * 100 / tokens_seen).float() for c, v in matches.items()},
        p_values=p_values,
        cls_p_values=cls_p_values,
        permutations=permutations,
        seed=seed,
    )


def _top_memories(
    tokens: dict[tuple[str, int], torch.Tensor],
    key_sites: dict[tuple[str, int], tuple[nn.Module, str]],
    component: str,
    block: int,
) -> torch.Tensor:
    """The recorded (B, N, k) top memories of a sublayer; an error where its hook never ran."""
    key = (f"{component} keys", block)
    if key not in tokens:
        raise UnsupportedModelError(
            f"the keys of block {block}'s {component} memories cannot be read: "
            f"{type(key_sites[key][0]).__name__} is never called as a module (its weight is used "
            "directly, as in torch's nn.MultiheadAttention)"
        )
    return tokens[key]


def _agrees(top: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
    """(B, N) whether any of a token's top memories (B, N, k) is among its image's (B, k)."""
    return (top[:, :, :, None] == memories[:, None, None, :]).any(-1).any(-1)


def _correct_vs_wrong(
    agrees: torch.Tensor, correct: torch.Tensor, permutations: int, seed: int
) -> float:
    """Permutation p-value of "[CLS] agrees more often on correct than on wrong images"."""
    first = torch.bincount(agrees[correct].long(), minlength=2)
    second = torch.bincount(agrees[~correct].long(), minlength=2)
    if first.sum() == 0 or second.sum() == 0:
        return float("nan")
    values = np.array([0.0, 1.0])
    return permutation_test(first.numpy(), second.numpy(), values, permutations, seed)[1]
