"""Faithfulness protocols: every knob of a perturbation test, named, with the field's presets.

A :class:`PerturbationProtocol` describes one curve: which units are perturbed (pixels, patches or
tokens), in which order, with what they are replaced, what is scored and how the curve is
summarised. Each preset yields its pair of curves as separately named sub-protocols, e.g.
``"chefer2021/positive"`` and ``"chefer2021/negative"``; change any knob with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .._deprecation import deprecated_aliases
from .._validation import check_choice
from ..methods.base import UPSAMPLE_MODES

UNITS = ("pixel", "patch", "token")
ORDERS = ("positive", "negative")
MODES = ("deletion", "insertion")
BASELINE_FILLS = ("black", "zero", "mean", "blur", "impute")
"""What hidden pixels show (``PerturbationProtocol.baseline``)."""
CURVE_SCORES = ("accuracy", "probability", "logit")
"""What a perturbation curve records at each step (``PerturbationProtocol.score``)."""
CLASSES = ("label", "predicted")
AUC_RULES = ("trapezoid", "trapezoid_percent", "max_normalised_sum", "mean")
SHARED_RANDOM = "random_shared"
"""Method name of the records of the official random baseline (``shared_random_orders``)."""


@dataclass(frozen=True)
class PerturbationProtocol:
    """One perturbation curve and how it is summarised.

    Attributes:
        name: ``"preset/curve"``, e.g. ``"chefer2021/positive"``.
        steps: Fractions of the units perturbed at each point of the curve; the count at
            fraction ``f`` of ``N`` units is ``floor(f * N)``. ``None``: every count
            ``k = 1 … N-1`` (the x value is then ``k / N``).
        unit: ``"pixel"`` (the patch map upsampled to the input, see ``upsample``), ``"patch"``
            (whole patches of the patch grid) or ``"token"`` (image tokens removed from the
            sequence after the position embeddings are added; timm ViTs only).
        order: ``"positive"``: the most salient units are perturbed first; ``"negative"``:
            the least salient first. Ties are broken in a random order seeded by the image's
            own values, so curves do not depend on batching or sharding.
        mode: ``"deletion"``: perturbed units are replaced by the baseline (or removed);
            ``"insertion"``: the curve starts from the baseline and perturbed units are
            revealed.
        baseline: What hidden pixels show: ``"black"`` (0 in [0, 1] pixel space,
            re-normalised), ``"zero"`` (0 in normalised space), ``"mean"`` (per-channel
            mean of the evaluated images), ``"blur"`` (Gaussian blur of the image),
            ``"impute"`` (noisy linear imputation from the kept pixels, see
            :func:`~class_space_saliency.evaluation.imputation.noisy_linear_impute`; pixel
            unit, deletion only); ``None`` for token removal.
        score: What is recorded at each step: ``"accuracy"`` (top-1 prediction equals the
            scored class), ``"probability"`` or ``"logit"`` of the scored class.
        extra_scores: Further scores recorded beside ``score`` from the same forward passes
            (records' ``extra_curves``); the AUC and report use ``score`` only.
        map_class: The class the saliency map explains: ``"label"`` or ``"predicted"``
            (the clean prediction).
        score_class: The class that is scored: ``"label"`` or ``"predicted"``.
        auc: ``"trapezoid"`` (``trapz(y, x)``), ``"trapezoid_percent"``
            (``trapz(y, x) * 100``), ``"mean"`` (``mean(y)``) or ``"max_normalised_sum"``
            (``sum(y) / (max(y) * (len(y) + 1))``: for the every-count curve of N units,
            ``sum(y) / (max(y) * N)`` as in the official vilas2023 code; 0 for an all-zero
            curve).
        blur_kernel_size: Gaussian kernel size of the ``"blur"`` baseline.
        blur_sigma: Gaussian sigma of the ``"blur"`` baseline.
        impute_noise: Noise std of the ``"impute"`` baseline (normalised space).
        upsample: How the pixel unit turns the patch map into pixels: ``"bilinear"``
            (``align_corners=False``, as Chefer et al.'s code; the default of every preset)
            or ``"nearest"`` (patch-aligned: every pixel takes its patch's value, and ties
            within a patch are broken at random). Bilinear blending ranks the pixels inside a
            patch by its neighbours and gives the outer 2 pixels of the image frame the border
            patches' unblended values; compare both to see how much a verdict rests on it.
            Only the pixel unit reads it.
        shared_random_orders: ``k > 0`` (token unit only): the run adds the official random
            baseline of Vilas et al. (2023) as the method ``"random_shared"``: each image's
            curve is the mean over ``k`` random token orders shared by all images, order ``p``
            being ``torch.randperm(N, generator=torch.Generator().manual_seed(p))`` and step
            ``n`` keeping its first ``N - n`` tokens, for the positive and the negative test
            alike (so both AUCs are equal, 0.7159 in the paper with ``k = 10``). The
            library's per-image seeded ``"random"`` map stays the default random method.
            Official code (``explain_perturbation.py``, ``compute_random``): it seeds the
            global RNG per order, draws ``randperm(49)`` (ViT-B/32's token count, for every
            model) and averages the dataset accuracy over the 10 orders; as written it does
            not run (called with arguments it does not take, on a data loader it never
            builds). Here ``N`` is the model's number of image tokens.

    Example:
        >>> import dataclasses
        >>> fine = dataclasses.replace(PROTOCOLS["rise2018/deletion"], steps=(0, 0.5, 1))
    """

    name: str
    steps: tuple[float, ...] | None
    unit: str
    order: str
    mode: str
    baseline: str | None
    score: str
    map_class: str
    score_class: str
    auc: str
    blur_kernel_size: int = 11
    blur_sigma: float = 5.0
    extra_scores: tuple[str, ...] = ()
    impute_noise: float = 0.01
    upsample: str = "bilinear"
    shared_random_orders: int = 0

    def __post_init__(self) -> None:
        check_choice("unit", self.unit, UNITS)
        check_choice("order", self.order, ORDERS)
        check_choice("mode", self.mode, MODES)
        check_choice("score", self.score, CURVE_SCORES)
        check_choice("map_class", self.map_class, CLASSES)
        check_choice("score_class", self.score_class, CLASSES)
        check_choice("auc", self.auc, AUC_RULES)
        if self.unit == "token":
            if self.baseline is not None:
                raise ValueError(f"token removal takes no baseline, got {self.baseline!r}")
        else:
            check_choice("baseline", self.baseline, BASELINE_FILLS)
        if self.steps is not None:
            steps = tuple(float(step) for step in self.steps)
            if not steps or any(not 0.0 <= step <= 1.0 for step in steps):
                raise ValueError(f"steps must be fractions in [0, 1], got {self.steps!r}")
            if any(b <= a for a, b in itertools.pairwise(steps)):
                raise ValueError(f"steps must be strictly increasing, got {self.steps!r}")
            object.__setattr__(self, "steps", steps)
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        extra = tuple(self.extra_scores)
        for score in extra:
            check_choice("extra_scores", score, CURVE_SCORES)
        object.__setattr__(self, "extra_scores", extra)
        if self.baseline == "impute" and (self.unit != "pixel" or self.mode != "deletion"):
            raise ValueError("baseline='impute' needs unit='pixel' and mode='deletion'")
        if not self.impute_noise >= 0:
            raise ValueError(f"impute_noise must be >= 0, got {self.impute_noise!r}")
        check_choice("upsample", self.upsample, UPSAMPLE_MODES)
        orders = self.shared_random_orders
        if isinstance(orders, bool) or not isinstance(orders, int) or orders < 0:
            raise ValueError(f"shared_random_orders must be an int >= 0, got {orders!r}")
        if orders and self.unit != "token":
            raise ValueError("shared_random_orders needs unit='token' (the official baseline)")

    @property
    def preset(self) -> str:
        """The preset this curve belongs to (the name before ``/``)."""
        return self.name.split("/")[0]

    @property
    def higher_is_better(self) -> bool:
        """Whether a more faithful map gives a higher AUC.

        Deleting the most salient units first should destroy the score fast (lower is
        better); deleting the least salient first, or inserting the most salient first,
        should keep or restore it (higher is better).
        """
        return (self.mode == "insertion") == (self.order == "positive")


def _chefer2021(order: str) -> PerturbationProtocol:
    return PerturbationProtocol(
        name=f"chefer2021/{order}",
        steps=tuple(i / 10 for i in range(10)),
        unit="pixel",
        order=order,
        mode="deletion",
        baseline="black",
        score="accuracy",
        map_class="predicted",
        score_class="label",
        auc="trapezoid_percent",
    )


def _rise2018(mode: str) -> PerturbationProtocol:
    return PerturbationProtocol(
        name=f"rise2018/{mode}",
        steps=tuple(i / 20 for i in range(21)),
        unit="pixel",
        order="positive",
        mode=mode,
        baseline="zero" if mode == "deletion" else "blur",
        score="probability",
        map_class="predicted",
        score_class="predicted",
        auc="trapezoid",
    )


def _vilas2023(order: str) -> PerturbationProtocol:
    return PerturbationProtocol(
        name=f"vilas2023/{order}",
        steps=None,
        unit="token",
        order=order,
        mode="deletion",
        baseline=None,
        score="accuracy",
        map_class="label",
        score_class="label",
        auc="max_normalised_sum",
    )


def _road2022(order: str) -> PerturbationProtocol:
    return PerturbationProtocol(
        name=f"road2022/{'morf' if order == 'positive' else 'lerf'}",
        steps=tuple(i / 10 for i in range(1, 10)),
        unit="pixel",
        order=order,
        mode="deletion",
        baseline="impute",
        score="probability",
        map_class="label",
        score_class="label",
        auc="mean",
        extra_scores=("accuracy",),
    )


PRESETS: dict[str, tuple[PerturbationProtocol, ...]] = {
    "chefer2021": (_chefer2021("positive"), _chefer2021("negative")),
    "rise2018": (_rise2018("deletion"), _rise2018("insertion")),
    "vilas2023": (_vilas2023("positive"), _vilas2023("negative")),
    "road2022": (_road2022("positive"), _road2022("negative")),
}
"""Preset name -> its pair of curves.

- ``chefer2021`` (Chefer et al. 2021): pixels of the upsampled map set to black at
  ``p = 0, .1, …, .9``; top-1 accuracy w.r.t. the label for maps of the predicted class;
  AUC ``trapz(acc, p) * 100``. Positive: lower is better; negative: higher is better.
- ``rise2018`` (Petsiuk et al. 2018): deletion to the normalised zero, insertion from a
  Gaussian blur (kernel 11, sigma 5), both on a 0.05 grid of pixel fractions; probability of
  the predicted class; trapezoid AUC on ``[0, 1]``. Deletion: lower is better; insertion:
  higher is better.
- ``vilas2023`` (Vilas et al. 2023): image tokens removed from the sequence after the
  position embeddings; the positive test keeps the ``n`` least important, the negative test
  the ``n`` most important, ``n = 1 … N-1``; top-1 accuracy w.r.t. the label for maps of the
  label; AUC ``sum(acc) / (max(acc) * N)`` of the mean curve, N the number of image tokens
  (the official code's normaliser; ``N - 1`` curve points).
- ``road2022`` (Rong et al. 2022, ROAD): the most (``morf``) or least (``lerf``) relevant
  10, 20, …, 90 % of the pixels of the upsampled map of the label are removed and filled by
  noisy linear imputation (noise std 0.01 in normalised space); probability of the label
  (top-1 accuracy recorded too); AUC = mean over the nine percentiles. MoRF: lower is better;
  LeRF: higher is better; the report adds ``road2022/combined`` = (LeRF - MoRF) / 2 per image
  (higher is better).
"""

PROTOCOLS: dict[str, PerturbationProtocol] = {p.name: p for pair in PRESETS.values() for p in pair}
"""Sub-protocol name (``"chefer2021/positive"`` …) -> :class:`PerturbationProtocol`."""


def resolve_protocols(specs: Sequence[str | PerturbationProtocol]) -> list[PerturbationProtocol]:
    """Expand preset names, sub-protocol names and :class:`PerturbationProtocol` objects to a list.

    Args:
        specs: E.g. ``["chefer2021", "rise2018/deletion", my_protocol]``.

    Returns:
        The protocols in the given order (a preset contributes both of its curves).

    Raises:
        ValueError: For an unknown name, an empty list or two protocols with one name.

    Example:
        >>> [p.name for p in resolve_protocols(["vilas2023"])]
        ['vilas2023/positive', 'vilas2023/negative']
    """
    if isinstance(specs, str | PerturbationProtocol):
        specs = [specs]
    resolved: list[PerturbationProtocol] = []
    for spec in specs:
        if isinstance(spec, PerturbationProtocol):
            resolved.append(spec)
        elif spec in PRESETS:
            resolved.extend(PRESETS[spec])
        elif spec in PROTOCOLS:
            resolved.append(PROTOCOLS[spec])
        else:
            raise ValueError(
                f"unknown protocol {spec!r}; presets: {sorted(PRESETS)}, "
                f"curves: {sorted(PROTOCOLS)}"
            )
    names = [p.name for p in resolved]
    if not names:
        raise ValueError("no protocols given")
    if len(set(names)) != len(names):
        raise ValueError(f"protocol names must be unique, got {names}")
    return resolved


def protocol_to_dict(protocol: PerturbationProtocol) -> dict:
    """All knobs of ``protocol`` as a JSON-ready dict (inverse: ``PerturbationProtocol(**d)``)."""
    knobs = dataclasses.asdict(protocol)
    knobs["steps"] = None if protocol.steps is None else list(protocol.steps)
    knobs["extra_scores"] = list(protocol.extra_scores)
    return knobs


__getattr__ = deprecated_aliases(
    __name__,
    {"Protocol": "PerturbationProtocol", "SCORES": "CURVE_SCORES", "BASELINES": "BASELINE_FILLS"},
    globals(),
)
