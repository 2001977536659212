"""Sanity checks for saliency maps: cascading model randomisation (Adebayo et al., 2018).

A map that explains the model must change when the model's learned weights are destroyed.
:func:`cascading_randomization` re-initialises a copy of the model top-down, one step at a
time and cumulatively (first the head with the final norm, then the blocks from the last to
the first), and reports, per step and method, the Spearman rank correlation between each
image's map of the trained model and its map of the randomised one, over the patch grid.
Maps that keep a high correlation do not depend on what the model learned (the
model-agnostic controls ``sobel`` and ``intensity`` stay at exactly 1).

Re-initialisation: every parameter tensor is replaced by i.i.d. normal draws with that
tensor's own mean and standard deviation, from a ``torch.Generator`` seeded with ``seed``
(drawn on the CPU in float64, so the draws are the same on every device). Each tensor keeps
its scale, so activations stay in range and only the learned structure is lost; a constant
tensor (e.g. an untrained bias) stays constant. Buffers, the patch embedding and the
[CLS]/position/register tokens are never changed.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ._stats import spearman
from ._validation import TargetType, check_inputs, check_target
from .anatomy import ViTAnatomy
from .methods import create_methods, list_methods

DEFAULT_METHODS = tuple(
    name for name in list_methods(variants=False, needs_fitting=False) if name != "random"
)
"""Methods :func:`cascading_randomization` checks unless told otherwise: every registered
method but ``random``, whose map depends on the image and seed alone (as ``sobel``'s and
``intensity``'s do, which stay as the model-agnostic references), and those built from fitted
parameters (``linear_probe``: name it with ``method_kwargs={"linear_probe": {"probes": ...}}``)."""


@torch.no_grad()
def _randomize(modules: Sequence[nn.Module], generator: torch.Generator, done: set[int]) -> None:
    """Redraw every parameter of ``modules`` not in ``done`` (ids) from N(its mean, its std)."""
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) in done:
                continue
            done.add(id(parameter))
            values = parameter.detach().double()
            mean, std = values.mean().item(), values.std(correction=0).item()
            fresh = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(fresh * std + mean)


def randomization_cascade(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Randomise a deep copy of ``model`` top-down, one step at a time (cumulative).

    Yields ``("original", copy)`` first, then ``("head", copy)`` once the head(s) and the
    final norm are redrawn, then ``("layer L-1", copy)`` ... ``("layer 0", copy)`` as each
    block is redrawn in turn, last block first (layers numbered from 0, as ``layer=``; see the
    module docstring for how). It is always the same copy, changed in place; ``model`` itself
    is never touched.

    Args:
        model: A supported ViT (see :class:`~class_space_saliency.anatomy.ViTAnatomy`).
        seed: Seed of the draws.

    Yields:
        ``(step name, the copy in its randomised state)``.

    Example:
        >>> for step, randomized in randomization_cascade(model):  # a ViT with 3 blocks
        ...     print(step, randomized(images).shape)
        original torch.Size([3, 7])
        head torch.Size([3, 7])
        layer 2 torch.Size([3, 7])
        layer 1 torch.Size([3, 7])
        layer 0 torch.Size([3, 7])
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    copied = copy.deepcopy(model)
    anatomy = ViTAnatomy.from_model(copied)
    generator = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    yield "original", copied
    _randomize([anatomy.norm, *anatomy.heads], generator, done)
    yield "head", copied
    for index in reversed(range(anatomy.depth)):
        _randomize([anatomy.blocks[index]], generator, done)
        yield f"layer {index}", copied


@dataclass
class SanityResult:
    """Correlations between maps of the trained and the progressively randomised model.

    Attributes:
        steps: Randomisation steps: ``"original"``, ``"head"``, ``"layer L-1"`` ... ``"layer 0"``.
        methods: Method names.
        correlations: Per-image Spearman correlations (steps, methods, images), float64;
            NaN where a map is constant.
        seed: Seed of the re-initialisation.
    """

    steps: list[str]
    methods: list[str]
    correlations: torch.Tensor
    seed: int = 0

    @property
    def num_images(self) -> int:
        """Images the correlations average over."""
        return int(self.correlations.shape[-1])

    @property
    def spearman(self) -> torch.Tensor:
        """Mean Spearman correlation over images (steps, methods); NaN images are skipped."""
        return self.correlations.nanmean(-1)

    @property
    def abs_spearman(self) -> torch.Tensor:
        """Mean absolute Spearman correlation over images (steps, methods)."""
        return self.correlations.abs().nanmean(-1)

    def to_dict(self) -> dict:
        """Plain-Python view for JSON; undefined (NaN) values become ``None``.

        Returns:
            ``steps``, ``methods``, ``num_images``, ``seed`` and, per method, the lists
            ``spearman`` and ``abs_spearman`` over the steps.
        """

        def column(table: torch.Tensor, m: int) -> list[float | None]:
            return [None if math.isnan(v) else round(float(v), 6) for v in table[:, m].tolist()]

        return dict(
            test="cascading randomization (Adebayo et al. 2018)",
            steps=self.steps,
            methods=self.methods,
            num_images=self.num_images,
            seed=self.seed,
            spearman={m: column(self.spearman, i) for i, m in enumerate(self.methods)},
            abs_spearman={m: column(self.abs_spearman, i) for i, m in enumerate(self.methods)},
        )

    def _table(self, title: str, table: torch.Tensor) -> list[str]:
        widths = [max(len(m), 7) for m in self.methods]

        def line(label: str, cells: Sequence[str]) -> str:
            return f"{label:<10}" + "".join(
                f" {cell:>{width}}" for cell, width in zip(cells, widths, strict=True)
            )

        rows = [
            line(step, [f"{v:.4f}" for v in values])
            for step, values in zip(self.steps, table.tolist(), strict=True)
        ]
        return [title, line("step", self.methods), *rows]

    def __str__(self) -> str:
        about = f"with the original maps ({self.num_images} images, seed {self.seed})"
        signed = self._table(f"mean Spearman rank correlation {about}", self.spearman)
        absolute = self._table(f"mean |Spearman| {about}", self.abs_spearman)
        return "\n".join([*signed, "", *absolute])

    def plot(self, ax=None, absolute: bool = False):
        """One line per method: mean correlation with the original maps by step.

        Args:
            ax: Optional matplotlib Axes (a new figure otherwise).
            absolute: Plot the mean absolute correlation instead of the signed one.

        Returns:
            The matplotlib ``Figure``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6.5, 4))
        table = self.abs_spearman if absolute else self.spearman
        for index, method in enumerate(self.methods):  # markers and dashes tell ties apart
            style = "os^vDPX*"[index % 8] + ("-" if index % 2 == 0 else "--")
            ax.plot(range(len(self.steps)), table[:, index], style, label=method)
        ax.axhline(0, color="tab:gray", linewidth=0.8)
        ax.set_xticks(range(len(self.steps)), self.steps, rotation=45, ha="right")
        ax.set_ylim(-0.05 if absolute else -1.05, 1.05)
        ax.set_xlabel("randomised down to (cumulative)")
        ax.set_ylabel(f"mean {'|Spearman|' if absolute else 'Spearman'} with original maps")
        ax.set_title(f"cascading randomization ({self.num_images} images)")
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def cascading_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetType,
    methods: Sequence[str] = DEFAULT_METHODS,
    seed: int = 0,
    max_batch_size: int | None = 64,
    method_kwargs: Mapping[str, Mapping] | None = None,
    progress: bool = False,
) -> SanityResult:
    """Adebayo et al.'s cascading randomisation test on a copy of ``model``.

    At every step of :func:`randomization_cascade` each method explains ``inputs`` for the
    same ``targets``, and each image's map is compared with its map of the trained model by
    Spearman rank correlation over the patch grid.

    Args:
        model: A supported ViT; it is deep-copied and never changed.
        inputs: Normalised images (B, C, H, W).
        targets: Class per image (int, list of ints or int tensor), the same at every
            step; e.g. the labels, or the trained model's predictions.
        methods: Registry names (see ``list_methods``); the methods are built on the copy.
        seed: Seed of the re-initialisation.
        max_batch_size: Images per forward pass.
        method_kwargs: Constructor options per method name.
        progress: Show a progress bar.

    Returns:
        A :class:`SanityResult`; ``print`` it, ``.to_dict()`` it or ``.plot()`` it.

    Raises:
        ValueError: For unknown or repeated methods, bad inputs, or missing or bad targets.
        TypeError: For method objects instead of names, or a non-int seed.

    Example:
        >>> result = cascading_randomization(model, images, labels, ["class_space", "sobel"])
        >>> result.steps, result.spearman.shape  # (steps, methods)
        (['original', 'head', 'layer 2', 'layer 1', 'layer 0'], torch.Size([5, 2]))
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"methods must be registry names (they are built on a copy of the model), got {names}"
        )
    anatomy = ViTAnatomy.from_model(model)
    check_inputs(inputs, anatomy)
    targets = check_target(targets, inputs.shape[0], anatomy.num_classes)
    if targets is None:
        raise ValueError(
            "targets must be given (int, list of ints or int tensor), got None: the predicted "
            "class would change as the model is randomised; pass model(inputs).argmax(-1)"
        )
    cascade = randomization_cascade(model, seed)
    _, copied = next(cascade)
    built = create_methods(copied, names, method_kwargs)

    steps: list[str] = []
    rows: list[torch.Tensor] = []
    original: dict[str, torch.Tensor] = {}
    total = (anatomy.depth + 2) * len(built)
    with tqdm(total=total, desc="sanity", disable=not progress) as bar:
        for step, _ in itertools.chain([("original", copied)], cascade):
            row = []
            for name, method in built.items():
                maps = method.attribute(inputs, target=targets, max_batch_size=max_batch_size)
                original.setdefault(name, maps)
                row.append(spearman(original[name], maps))
                bar.update()
            steps.append(step)
            rows.append(torch.stack(row))
    return SanityResult(steps, list(built), torch.stack(rows), seed)
