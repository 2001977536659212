"""The paper's seven models by name: exact weights, how each is built, its official preprocessing.

Vilas, Schaumlöffel & Roig (NeurIPS 2023) analyse seven ViTs; the official code
(martinagvilas/vit-cls_emb, ``src/models/load.py``) names them ``vit_b_32``, ``vit_b_16``,
``vit_large_16``, ``vit_miil_16``, ``vit_gap_16``, ``vit_cifar_16`` and ``deit_ensemble_16``,
and so does :data:`PAPER_MODELS` here. It ran timm 0.6.12, whose bare model names loaded the
weights the tags below pin; timm 1.0 resolves two bare names to other weights
(:func:`paper_weights_warning`). :func:`~class_space_saliency.models.load_model` loads them as
``"paper:KEY"`` with the official preprocessing:

- the Hugging Face ``ViTImageProcessor`` of the in21k checkpoints (``google/vit-*-in21k``):
  the whole image resized to 224 x 224 (bilinear, no crop), mean = std = 0.5 (ViT-B/32,
  B/16, L/16, GAP);
- timm's data config of the MIIL model: resize the shorter side to 256, centre crop 224,
  mean 0, std 1;
- torchvision ``Resize((224, 224))``, mean = std = 0.5 for the CIFAR-100 model (32 x 32
  images upsampled);
- the Hugging Face ``DeiTImageProcessor`` of ``facebook/deit-base-distilled-patch16-224``
  for the Refinement model: 256 x 256 (bicubic), centre crop 224, ImageNet mean and std.

Example:
    >>> PAPER_MODELS["vit_b_16"].timm_name
    'vit_base_patch16_224.augreg_in21k_ft_in1k'
    >>> paper_model("vit_cifar_16").checkpoint, paper_model("vit_cifar_16").key_prefix
    ('vit_base_patch16_224-CIFAR100.pt', 'model.')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .preprocessing import Preprocessing, timm_preprocessing

INPUT_SIZE = (3, 224, 224)
"""Every paper model takes 224 x 224 RGB images."""


@dataclass(frozen=True)
class OfficialPreprocessing:
    """The preprocessing the official code used for a model, as timm eval-transform settings.

    Attributes:
        source: What the official code called (for the record).
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.
        crop_pct: Crop fraction (1.0 with ``crop_mode="squash"``: no crop).
        crop_mode: timm crop mode (:data:`~class_space_saliency.preprocessing.CROP_MODES`).
        interpolation: Resize interpolation.
    """

    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str
    interpolation: str

    def build(self, class_names: Sequence[str] | None = None) -> Preprocessing:
        """The :class:`~class_space_saliency.preprocessing.Preprocessing` (224 x 224 input)."""
        return timm_preprocessing(
            INPUT_SIZE,
            self.mean,
            self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            interpolation=self.interpolation,
            class_names=class_names,
        )


HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

HF_VIT_IN21K = OfficialPreprocessing(
    "transformers AutoImageProcessor of google/vit-{base,large}-patch{16,32}-224-in21k",
    HALF,
    HALF,
    crop_pct=1.0,
    crop_mode="squash",
    interpolation="bilinear",
)
TIMM_MIIL = OfficialPreprocessing(
    "timm.data.create_transform(**resolve_data_config({}, model=model)), timm 0.6.12",
    (0.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    crop_pct=0.875,
    crop_mode="center",
    interpolation="bilinear",
)
TORCHVISION_CIFAR = OfficialPreprocessing(
    "torchvision Resize((224, 224)), CenterCrop(224), Normalize(0.5, 0.5)",
    HALF,
    HALF,
    crop_pct=1.0,
    crop_mode="squash",
    interpolation="bilinear",
)
HF_DEIT = OfficialPreprocessing(
    "transformers AutoImageProcessor of facebook/deit-base-distilled-patch16-224",
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_pct=0.875,
    crop_mode="squash",
    interpolation="bicubic",
)


@dataclass(frozen=True)
class PaperModel:
    """One of the paper's models: where its weights come from and how to build it.

    Attributes:
        key: The official code's name (``load_model("paper:KEY")``).
        name: The name in the paper.
        architecture: timm architecture that builds it (``timm.create_model``).
        num_classes: Classes of its head.
        preprocessing: The official code's preprocessing.
        tag: timm pretrained tag of the weights; ``None`` for a checkpoint (below).
        checkpoint: File name of the checkpoint the official code loads, where the weights
            are not in timm.
        checkpoint_url: Where the official code downloads that checkpoint (``None``: the user
            supplies it).
        key_prefix: Prefix on every key of the checkpoint, stripped on loading.
        ignored_keys: Prefixes of checkpoint keys that belong to parts the model does not
            use (dropped; any other mismatch is an error).
        note: Where to get the weights, and what sets the model apart.
    """

    key: str
    name: str
    architecture: str
    num_classes: int
    preprocessing: OfficialPreprocessing
    tag: str | None = None
    checkpoint: str | None = None
    checkpoint_url: str | None = None
    key_prefix: str | None = None
    ignored_keys: tuple[str, ...] = ()
    note: str = ""

    @property
    def timm_name(self) -> str | None:
        """``architecture.tag`` for weights from timm, else ``None``."""
        return f"{self.architecture}.{self.tag}" if self.tag else None


PAPER_MODELS: dict[str, PaperModel] = {
    model.key: model
    for model in (
        PaperModel(
            "vit_b_32",
            "ViT-B/32",
            "vit_base_patch32_224",
            1000,
            HF_VIT_IN21K,
            tag="augreg_in21k_ft_in1k",
            note="AugReg, ImageNet-21k pretrained, ImageNet-1k fine-tuned",
        ),
        PaperModel(
            "vit_b_16",
            "ViT-B/16",
            "vit_base_patch16_224",
            1000,
            HF_VIT_IN21K,
            tag="augreg_in21k_ft_in1k",
            note="AugReg; timm 1.0's bare name loads augreg2_in21k_ft_in1k instead",
        ),
        PaperModel(
            "vit_large_16",
            "ViT-L/16",
            "vit_large_patch16_224",
            1000,
            HF_VIT_IN21K,
            tag="augreg_in21k_ft_in1k",
            note="AugReg, ImageNet-21k pretrained, ImageNet-1k fine-tuned",
        ),
        PaperModel(
            "vit_miil_16",
            "ViT-B/16-MIIL",
            "vit_base_patch16_224_miil",
            1000,
            TIMM_MIIL,
            tag="in21k_ft_in1k",
            note="ImageNet-21k-P (MIIL); timm 1.0's bare name loads the 11,221-class in21k head",
        ),
        PaperModel(
            "vit_gap_16",
            "ViT-B/16-GAP",
            "vit_base_patch16_rpn_224",
            1000,
            HF_VIT_IN21K,
            tag="sw_in1k",
            note="no [CLS] token: global average pooling, residual post-norm blocks",
        ),
        PaperModel(
            "vit_cifar_16",
            "ViT-B/16 (CIFAR-100)",
            "vit_base_patch16_224",
            100,
            TORCHVISION_CIFAR,
            checkpoint="vit_base_patch16_224-CIFAR100.pt",
            key_prefix="model.",
            note="the authors' checkpoint folder (linked in the official README, step 2.3); "
            "its keys carry a 'model.' prefix",
        ),
        PaperModel(
            "deit_ensemble_16",
            "Refinement",
            "vit_base_patch16_224",
            1000,
            HF_DEIT,
            checkpoint="deit_base_trm.pth",
            checkpoint_url="https://github.com/Muzammal-Naseer/Improving-Adversarial-"
            "Transferability-of-Vision-Transformers/releases/download/v0/deit_base_trm.pth",
            ignored_keys=("transformerheads.",),
            note="DeiT-B with refinement heads on intermediate blocks (Naseer et al., ICLR "
            "2022); the analysis, like the official forward, reads the final [CLS] head only",
        ),
    )
}
"""The paper's models by the official code's names."""

_BY_TIMM_ARCHITECTURE = {m.architecture: m for m in PAPER_MODELS.values() if m.tag is not None}


def paper_model(key: str) -> PaperModel:
    """The paper model ``key`` (``"vit_b_32"``, ...).

    Raises:
        ValueError: For an unknown key (the message lists the keys and names).
    """
    if key not in PAPER_MODELS:
        known = ", ".join(f"{m.key} ({m.name})" for m in PAPER_MODELS.values())
        raise ValueError(f"unknown paper model {key!r}; the paper's models are: {known}")
    return PAPER_MODELS[key]


def paper_model_of_architecture(name: str) -> PaperModel | None:
    """The paper model whose timm weights use architecture ``name`` (a tag is ignored).

    The CIFAR-100 and Refinement models share ViT-B/16's architecture but not its weights:
    load them as ``"paper:KEY"``.
    """
    return _BY_TIMM_ARCHITECTURE.get(name.partition(".")[0])


def paper_weights_warning(name: str) -> str | None:
    """A warning for a bare timm name that timm resolves to other weights than the paper's.

    Works offline: timm's registry of pretrained configs is local.

    Args:
        name: A timm model name, with or without a ``.tag``.

    Returns:
        The warning text, or ``None`` when the name carries a tag, is not a paper
        architecture, or its default weights are the paper's.

    Example:
        >>> print(paper_weights_warning("vit_base_patch16_224"))  # doctest: +ELLIPSIS
        timm resolves 'vit_base_patch16_224' to vit_base_patch16_224.augreg2_in21k_ft_in1k, ...
        >>> paper_weights_warning("vit_base_patch32_224") is None  # the default is the paper's
        True
    """
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, tag = split_model_name_tag(name)
    paper = _BY_TIMM_ARCHITECTURE.get(architecture)
    if tag or paper is None:
        return None
    default = get_pretrained_cfg(architecture)
    resolved = getattr(default, "tag", None)
    if resolved == paper.tag:
        return None
    return (
        f"timm resolves {name!r} to {architecture}.{resolved}, not the weights of the paper's "
        f"{paper.name} ({paper.timm_name}); load 'paper:{paper.key}' or '{paper.timm_name}' "
        "to get the paper's model"
    )
