"""What ``reproduce`` will do: per model its weights, data, steps and an estimated GPU time.

:func:`plan_reproduction` decides, without the network and without loading weights, which
models can run with the data and checkpoints the user has, which steps each one runs, and
what the run costs. Parameter counts and FLOPs come from building each architecture on
PyTorch's ``meta`` device (no memory, no weights). The GPU time is a cost model, not a
measurement: forward-pass equivalents per image x images x FLOPs per forward pass / the
GPU's sustained throughput (``gpu_tflops``), leaving out data loading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

import torch

from ..analysis import ANALYSES
from ..datasets import CIFAR100, ImageNetS
from ..evaluation import PerturbationProtocol
from ..methods import method_info
from ..paper import PAPER_MODELS, PaperModel, paper_results

STEPS = ("analyses", "vilas2023", "value_vector_classes")
"""The steps of a model: the analyses of :data:`~class_space_saliency.analysis.ANALYSES`,
the token-removal benchmark (``vilas2023``) and the notebook's value-vector classes (only
where the paper lists them)."""

BENCHMARK_METHODS = ("class_space_gradient_paper", "chefer", "random")
"""The maps of the token-removal test: the paper's, Chefer et al.'s and a random one."""

OFFICIAL_RANDOM_ORDERS = 10
"""Random token orders of the official random baseline (``compute_random``)."""

STIMULI_PER_CLASS = 5
"""Images per class of the paper's stimuli (ImageNet-S validation, CIFAR-100 test)."""

PROBE_IMAGES_PER_CLASS = 10
"""Training images per class of the official probes (``prober.py``: ``n=10``)."""

PROBE_ANALYSIS = "linear_probes"
"""The analysis that fits probes and so needs training images."""

CHECKPOINT_MODELS = ("vit_cifar_16", "deit_ensemble_16")
"""Models whose weights are checkpoints outside timm."""

DEFAULT_GPU_TFLOPS = 20.0
"""Sustained float32 throughput assumed by the estimate (TFLOP/s): an A100's float32 peak
is 19.5, an H100 SXM's 67; set ``gpu_tflops`` to your GPU's."""

PAPER_IMAGES = {"imagenet-s": 4550, "cifar100": 500}
"""Images of the paper's stimuli, assumed when the data folder is not given."""


@dataclass(frozen=True)
class DataPlan:
    """The images one model reads.

    Attributes:
        name: ``"imagenet-s"`` or ``"cifar100"``.
        description: Where they come from and how they are chosen.
        images: How many (``None``: unknown).
        probe_description: The probes' training images, or why there are none.
        probe_images: How many (0: none).
        error: Why the data cannot be read (``""`` where it can).
    """

    name: str
    description: str
    images: int | None
    probe_description: str = ""
    probe_images: int = 0
    error: str = ""


@dataclass(frozen=True)
class ModelPlan:
    """One model of the run.

    Attributes:
        model: The paper model.
        weights: Where the weights come from (timm name and tag, or checkpoint file).
        weights_file: The checkpoint the user gave, if any.
        download_url: Where a checkpoint outside timm is downloaded from, if it is.
        parameters: Parameter count (built on the meta device).
        download_bytes: Estimated download (parameters x 4 bytes, float32); ``None`` for a
            checkpoint the user supplies.
        flops: FLOPs of one forward pass of one image.
        image_tokens: Image tokens per image.
        data: The images it reads.
        steps: Steps it runs (``"analyses/<name>"``, ``"vilas2023"``, ...).
        not_run: ``{step or "model": reason}`` of what will not run.
        forward_passes: Forward-pass equivalents per image, per step.
    """

    model: PaperModel
    weights: str
    weights_file: str | None
    download_url: str | None
    parameters: int
    download_bytes: int | None
    flops: float
    image_tokens: int
    data: DataPlan
    steps: tuple[str, ...]
    not_run: dict[str, str] = field(default_factory=dict)
    forward_passes: dict[str, float] = field(default_factory=dict)

    @property
    def runs(self) -> bool:
        """Whether the model runs at all."""
        return "model" not in self.not_run

    @property
    def images(self) -> int:
        """Images it reads: counted in the data, else the paper's count (assumed)."""
        return PAPER_IMAGES[self.data.name] if self.data.images is None else self.data.images

    def gpu_seconds(self, tflops: float) -> float:
        """Estimated GPU time of its steps at ``tflops`` TFLOP/s sustained."""
        passes = sum(self.forward_passes.get(step, 0.0) for step in self.steps)
        return passes * self.images * self.flops / (tflops * 1e12)


@dataclass(frozen=True)
class ReproductionPlan:
    """Everything ``reproduce --dry-run`` prints.

    Attributes:
        models: One :class:`ModelPlan` per model asked for.
        gpu_tflops: Throughput of the time estimate.
        out_dir: The output folder.
    """

    models: list[ModelPlan]
    gpu_tflops: float
    out_dir: Path

    def __str__(self) -> str:
        lines = [
            "reproduce --dry-run: nothing is downloaded, loaded or computed",
            f"output: {self.out_dir} (resumable: rerun the same command to continue)",
            "",
            "data:",
        ]
        for data in {plan.data.name: plan.data for plan in self.models}.values():
            lines.append(f"  {data.name}: {data.error or data.description}")
            if data.probe_description:
                lines.append(f"  {data.name} probe training images: {data.probe_description}")
        header = ("model", "name", "weights", "params", "download", "images", "GPU time", "runs")
        rows = [header]
        for plan in self.models:
            rows.append(
                (
                    plan.model.key,
                    plan.model.name,
                    plan.weights,
                    f"{plan.parameters / 1e6:.1f} M",
                    "your file" if plan.download_bytes is None else _size(plan.download_bytes),
                    str(plan.images) + ("" if plan.data.images is not None else " *"),
                    _hours(plan.gpu_seconds(self.gpu_tflops)),
                    "yes" if plan.runs else "no",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["", "models:"]
        lines += [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        if any(plan.data.images is None for plan in self.models):
            lines.append("  * the paper's image count, assumed: the data folder was not given")
        urls = [
            f"  {plan.model.key}: {plan.download_url}" for plan in self.models if plan.download_url
        ]
        lines += ["", "downloads: timm models from the Hugging Face Hub (timm's cache)", *urls]
        notes = [
            f"  {plan.model.key}{'' if what == 'model' else ' ' + what}: {reason}"
            for plan in self.models
            for what, reason in plan.not_run.items()
        ]
        if notes:
            lines += ["", "not run:", *notes]
        lines += ["", "steps (forward-pass equivalents per image):"]
        for plan in self.models:
            costs = ", ".join(
                f"{step} {plan.forward_passes.get(step, 0.0):g}" for step in plan.steps
            )
            lines.append(f"  {plan.model.key}: {costs}")
        running = sum(plan.gpu_seconds(self.gpu_tflops) for plan in self.models if plan.runs)
        every = sum(plan.gpu_seconds(self.gpu_tflops) for plan in self.models)
        lines += [
            "",
            f"estimated GPU time: {_hours(running)} for the models that run "
            f"({_hours(every)} for all listed), at {self.gpu_tflops:g} TFLOP/s sustained "
            "(--gpu-tflops): forward-pass equivalents per image x images x FLOPs per forward "
            "pass (torch's FLOP counter on the meta device); data loading not included.",
            "download sizes: parameters x 4 bytes (float32), an estimate: timm's pretrained "
            "configs record no file sizes.",
        ]
        return "\n".join(lines)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.0f} MB" if num_bytes < 1e9 else f"{num_bytes / 1e9:.2f} GB"


def _hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class ArchitectureCost:
    """What building an architecture on the meta device tells.

    Attributes:
        parameters: Parameter count.
        flops: FLOPs of one forward pass of one 224 x 224 image.
        image_tokens: Image tokens per image.
        has_cls: Whether it has a [CLS] token.
    """

    parameters: int
    flops: float
    image_tokens: int
    has_cls: bool


@cache
def architecture_cost(architecture: str, num_classes: int) -> ArchitectureCost:
    """Parameters, FLOPs and tokens of a timm architecture, built on the ``meta`` device.

    No weights are allocated or downloaded.

    Example:
        >>> cost = architecture_cost("vit_base_patch32_224", 1000)
        >>> cost.parameters, round(cost.flops / 1e9, 1), cost.image_tokens, cost.has_cls
        (88224232, 8.8, 49, True)
    """
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return ArchitectureCost(
        parameters=sum(p.numel() for p in model.parameters()),
        flops=float(counter.get_total_flops()),
        image_tokens=int(model.patch_embed.num_patches),
        has_cls=getattr(model, "cls_token", None) is not None,
    )


def benchmark_forward_passes(
    image_tokens: int, methods: Sequence[str], random_orders: int = 0
) -> float:
    """Forward-pass equivalents per image of the vilas2023 test (both orders).

    One clean pass; each map (a gradient map counts 3: forward and a backward of about
    two); per order and method, the ``N - 1`` shortened sequences, which keep half the
    tokens on average (counted 0.5 each); and the shared random orders likewise.

    Example:
        >>> benchmark_forward_passes(49, ["chefer", "random"])  # 1 + 3 + 0 + 2 * 48 * 2 * 0.5
        100.0
    """
    maps = sum(_map_cost(name) for name in methods)
    steps = image_tokens - 1
    return 1.0 + maps + 2 * steps * (len(methods) + random_orders) * 0.5


def official_random_orders(model: str) -> int:
    """Shared random orders of the official random baseline for ``model``'s token-removal test.

    :data:`OFFICIAL_RANDOM_ORDERS` for a model the paper reports a random AUC for (ViT-B/32),
    where the token protocol offers that baseline (``PerturbationProtocol.
    shared_random_orders``); else 0: the per-image seeded ``random`` map is the random row
    (the shared orders cost 10 shortened sequences per step and order, more than the maps).
    """
    names = {knob.name for knob in fields(PerturbationProtocol)}
    reported = any(r.quantity.endswith("/random") for r in paper_results(model, "vilas2023"))
    return OFFICIAL_RANDOM_ORDERS if reported and "shared_random_orders" in names else 0


def _map_cost(name: str) -> float:
    info = method_info(name)
    if info.needs_gradients:
        return 3.0
    return 0.0 if info.model_agnostic else 1.0


def plan_reproduction(
    out_dir: str | Path,
    *,
    imagenet_s: str | Path | None = None,
    cifar100: str | Path | None = None,
    models: Sequence[str] | None = None,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    analyses: Sequence[str] | None = None,
    steps: Sequence[str] = STEPS,
    stimuli: str = "auto",
    probe_split: str = "test",
    num_images: int | None = None,
    gpu_tflops: float = DEFAULT_GPU_TFLOPS,
) -> ReproductionPlan:
    """Decide what ``reproduce`` runs for each model, and estimate what it costs.

    Args:
        out_dir: The output folder.
        imagenet_s: ImageNet-S root (``ImageNetS919`` or the folder holding it).
        cifar100: CIFAR-100 root (torchvision's layout), for ``vit_cifar_16``.
        models: Keys of :data:`~class_space_saliency.paper.PAPER_MODELS` (default: all).
        checkpoints: ``{model key: checkpoint file}`` for the models outside timm.
        analyses: Names of :data:`~class_space_saliency.analysis.ANALYSES` (default: all).
        steps: Steps of :data:`STEPS` to run.
        stimuli: ``"auto"`` (the authors' list where it is in the root, else the rule),
            ``"paper"`` (the list, required) or ``"rule"`` (the first 5 images per class in
            file-name order, without the 10 merged classes).
        probe_split: ImageNet-S split the probes are fitted on (official: ``"test"``).
        num_images: Use the first ``num_images`` stimuli only.
        gpu_tflops: Sustained throughput of the time estimate.

    Returns:
        A :class:`ReproductionPlan`; ``print(plan)`` is the dry run.

    Raises:
        ValueError: For unknown models, analyses, steps or options.

    Example:
        >>> plan = plan_reproduction("out", models=["vit_b_32"])
        >>> plan.models[0].weights
        'timm vit_base_patch32_224.augreg_in21k_ft_in1k'
    """
    keys = _choices("models", models, list(PAPER_MODELS))
    names = _choices("analyses", analyses, list(ANALYSES))
    steps = _choices("steps", steps, list(STEPS))
    if stimuli not in ("auto", "paper", "rule"):
        raise ValueError(f"stimuli must be 'auto', 'paper' or 'rule', got {stimuli!r}")
    if num_images is not None and (isinstance(num_images, bool) or num_images < 1):
        raise ValueError(f"num_images must be a positive int or None, got {num_images!r}")
    if not gpu_tflops > 0:
        raise ValueError(f"gpu_tflops must be positive, got {gpu_tflops!r}")
    checkpoints = dict(checkpoints or {})
    unknown = sorted(set(checkpoints) - set(CHECKPOINT_MODELS))
    if unknown:
        raise ValueError(f"checkpoints are for {list(CHECKPOINT_MODELS)}, got {unknown}")
    data = {
        "imagenet-s": _imagenet_s_plan(imagenet_s, stimuli, probe_split, num_images),
        "cifar100": _cifar_plan(cifar100, num_images),
    }
    plans = []
    for key in keys:
        spec = PAPER_MODELS[key]
        cost = architecture_cost(spec.architecture, spec.num_classes)
        weights, url, download, not_run = _weights(spec, checkpoints.get(key), cost.parameters)
        model_data = data["cifar100" if key == "vit_cifar_16" else "imagenet-s"]
        if model_data.error:
            reasons = (not_run.get("model"), model_data.error)
            not_run["model"] = "; ".join(reason for reason in reasons if reason)
        model_steps, passes = [], {}
        if "analyses" in steps:
            for name in names:
                if name == PROBE_ANALYSIS and not model_data.probe_images:
                    not_run[f"analyses/{name}"] = model_data.probe_description
                    continue
                model_steps.append(f"analyses/{name}")
                passes[f"analyses/{name}"] = ANALYSES[name].cost
        if "vilas2023" in steps:
            model_steps.append("vilas2023")
            methods = [m for m in BENCHMARK_METHODS if cost.has_cls or not method_info(m).needs_cls]
            passes["vilas2023"] = benchmark_forward_passes(
                cost.image_tokens, methods, official_random_orders(key)
            )
        if "value_vector_classes" in steps and paper_results(key, "value_vector_classes"):
            model_steps.append("value_vector_classes")
        plans.append(
            ModelPlan(
                spec,
                weights,
                None if checkpoints.get(key) is None else str(checkpoints[key]),
                url,
                cost.parameters,
                download,
                cost.flops,
                cost.image_tokens,
                model_data,
                tuple(model_steps),
                not_run,
                passes,
            )
        )
    return ReproductionPlan(plans, float(gpu_tflops), Path(out_dir))


def _choices(what: str, given: Sequence[str] | None, known: list[str]) -> list[str]:
    if given is None:
        return known
    given = [given] if isinstance(given, str) else list(dict.fromkeys(given))
    unknown = [name for name in given if name not in known]
    if unknown or not given:
        raise ValueError(f"{what} must be names of {known}, got {unknown or given}")
    return given


def _weights(
    spec: PaperModel, checkpoint: str | Path | None, parameters: int
) -> tuple[str, str | None, int | None, dict[str, str]]:
    """``(weights, download URL, download bytes, {"model": reason} or {})``."""
    if checkpoint is not None:
        reason = {} if Path(checkpoint).is_file() else {"model": f"no file {checkpoint}"}
        return f"checkpoint {checkpoint}", None, None, reason
    if spec.tag is not None:
        return f"timm {spec.timm_name}", None, 4 * parameters, {}
    if spec.checkpoint_url is not None:
        return f"checkpoint {spec.checkpoint} (download)", spec.checkpoint_url, 4 * parameters, {}
    reason = f"needs its checkpoint {spec.checkpoint} (--cifar100-checkpoint; {spec.note})"
    return f"checkpoint {spec.checkpoint} (yours)", None, None, {"model": reason}


def stimuli_list(root: Path, split: str, stimuli: str) -> str | None:
    """``"paper"`` where the authors' list of ``split`` is used, else ``None`` (the rule)."""
    folder = root / "ImageNetS919" if (root / "ImageNetS919").is_dir() else root
    listed = (folder / f"{split}_stim_info.csv").is_file()
    if stimuli == "paper" or (stimuli == "auto" and listed):
        return "paper"
    return None


def _imagenet_s_plan(
    root: str | Path | None, stimuli: str, probe_split: str, num_images: int | None
) -> DataPlan:
    if root is None:
        return DataPlan(
            "imagenet-s", "", None, error="--imagenet-s not given (the ImageNet-S folder)"
        )
    root = Path(root)
    try:
        chosen = stimuli_list(root, "validation", stimuli)
        data = ImageNetS(root, _no_preprocessing, stimuli=chosen, masks=False)
    except (FileNotFoundError, ValueError) as error:
        return DataPlan("imagenet-s", "", None, error=f"ImageNet-S: {error}")
    how = (
        "the authors' list validation_stim_info.csv"
        if chosen
        else f"the first {STIMULI_PER_CLASS} images per class by file name, 10 merged "
        "classes left out (no validation_stim_info.csv)"
    )
    images = len(data) if num_images is None else min(num_images, len(data))
    description = (
        f"{data.images_dir} and its segmentation masks: {how}; {images} images (the paper: 4550)"
    )
    try:
        chosen = stimuli_list(root, probe_split, stimuli)
        probes = ImageNetS(
            root,
            _no_preprocessing,
            split=probe_split,
            stimuli=chosen,
            per_class=PROBE_IMAGES_PER_CLASS,
            masks=False,
        )
    except (FileNotFoundError, ValueError) as error:
        probe = (
            f"needs ImageNet-S {probe_split} images ({error}); the official probes were "
            f"fitted on ImageNetS919/test, {PROBE_IMAGES_PER_CLASS} images per class"
        )
        return DataPlan("imagenet-s", description, images, probe, 0)
    how = f"{probe_split}_stim_info.csv" if chosen else f"{PROBE_IMAGES_PER_CLASS} per class"
    probe = f"{probes.images_dir}: {how}, {len(probes)} images"
    return DataPlan("imagenet-s", description, images, probe, len(probes))


def _cifar_plan(root: str | Path | None, num_images: int | None) -> DataPlan:
    if root is None:
        return DataPlan("cifar100", "", None, error="--cifar100 not given (CIFAR-100 folder)")
    try:
        data = CIFAR100(root, _no_preprocessing, per_class=STIMULI_PER_CLASS)
        probes = CIFAR100(root, _no_preprocessing, split="train", per_class=PROBE_IMAGES_PER_CLASS)
    except (FileNotFoundError, ValueError) as error:
        return DataPlan("cifar100", "", None, error=f"CIFAR-100: {error}")
    images = len(data) if num_images is None else min(num_images, len(data))
    return DataPlan(
        "cifar100",
        f"{data.file}: the first {STIMULI_PER_CLASS} test images per class, {images} images "
        "(the paper: 500)",
        images,
        f"{probes.file}: the first {PROBE_IMAGES_PER_CLASS} training images per class, "
        f"{len(probes)} images",
        len(probes),
    )


def _no_preprocessing(image):
    """Stand-in preprocessing for counting images (the plan never reads them)."""
    return image
